//! The `tokenwal` binary under hostile conditions, as a real process against the simulator:
//!
//! * no token the simulator ever issued, and not the client secret, reaches stdout or stderr of
//!   any command on any path (import errors on lines that carry tokens, `token` failures,
//!   `recover`, `run --once`, `status`, `shops`, `inspect`), with logging at TRACE;
//! * corrupt bytes on disk: a corrupt grant state is quarantined and named, the other shops are
//!   served; a corrupt journal record fails `inspect` by default (naming it) and is skipped with
//!   `--skip-corrupt-records`; nothing panics.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use tokenwal_sim::{Fault, SimHandle};
use tokenwal_testkit::BlockingSim;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const SECRET: &str = "sim-client-secret";

#[derive(Debug)]
struct Out {
    args: String,
    code: i32,
    stdout: String,
    stderr: String,
}

/// The store key every command gets (a secret too: it must never be printed).
fn store_key() -> String {
    tokenwal_testkit::cli::test_key()
}

fn tokenwal(db: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.arg("--db").arg(db).args(args);
    for k in ["TOKENWAL_CLIENT_ID", "TOKENWAL_CLIENT_SECRET", "TOKENWAL_DB", "TOKENWAL_CONFIG"] {
        cmd.env_remove(k);
    }
    cmd.env_remove("TOKENWAL_INSECURE_TEST_ENDPOINT");
    cmd.env_remove("TOKENWAL_STORE_KEY_FILE");
    cmd.env("TOKENWAL_STORE_KEY", store_key());
    cmd.env("RUST_LOG", "trace");
    cmd.envs(env.iter().copied());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tokenwal");
    if let Some(input) = stdin {
        let _ = child.stdin.take().unwrap().write_all(input);
    }
    let out = child.wait_with_output().unwrap();
    let o = Out {
        args: args.join(" "),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!o.stderr.contains("panicked"), "{o:?}");
    o
}

struct Sim(BlockingSim);

impl Sim {
    fn start() -> Sim {
        Sim(BlockingSim::start())
    }

    fn h(&self) -> &SimHandle {
        self.0.h()
    }

    /// Every token the simulator ever issued, for every shop it knows.
    fn issued(&self, shops: &[String]) -> Vec<String> {
        let mut all = Vec::new();
        for s in shops {
            for g in &self.h().shop_state(s).grants {
                all.extend(g.refresh_tokens.iter().map(|t| t.token.as_str().to_owned()));
                all.extend(g.access_tokens.iter().map(|t| t.token.as_str().to_owned()));
            }
        }
        all
    }
}

fn line(shop: &str, access: &str, refresh: &str) -> String {
    format!(
        r#"{{"shop":"{shop}","access_token":"{access}","refresh_token":"{refresh}","expires_at":1700000000,"refresh_token_expires_in":7776000}}"#
    )
}

#[test]
fn no_command_prints_a_secret_on_any_path() {
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let base = sim.h().base_url();
    let env = [
        ("TOKENWAL_CLIENT_ID", "sim-client-id"),
        ("TOKENWAL_CLIENT_SECRET", SECRET),
        ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str()),
    ];
    let wrong = [
        ("TOKENWAL_CLIENT_ID", "sim-client-id"),
        ("TOKENWAL_CLIENT_SECRET", "wrong-client-secret-value"),
        ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str()),
    ];
    let names = ["calm", "dropped", "flaky", "gone", "spare"];
    let shops: Vec<String> = names.iter().map(|n| format!("{n}.myshopify.com")).collect();
    let mut good = Vec::new();
    let mut tokens = Vec::new();
    for s in &shops {
        let t = sim.h().seed_shop(s);
        good.push(line(s, t.access_token.as_str(), t.refresh_token.as_str()));
        tokens.push((t.access_token.as_str().to_owned(), t.refresh_token.as_str().to_owned()));
    }
    let (a, r) = (&tokens[0].0, &tokens[0].1);
    // Import lines that carry real tokens but are wrong in every way: no error may echo them.
    let mut bad: Vec<Vec<u8>> = vec![
        line("Calm.myshopify.com", a, r).into_bytes(),
        line(r, a, r).into_bytes(),
        line("calm.myshopify.com", a, r).as_bytes()[..60].to_vec(),
        format!(
            r#"{{"shop":"calm.myshopify.com","access_token":{{"v":"{a}"}},"refresh_token":"{r}","expires_in":60}}"#
        )
        .into_bytes(),
        format!(r#"{{"shop":"calm.myshopify.com","access_token":"{a}","refresh_token":"{r} ","expires_in":60}}"#)
            .into_bytes(),
        format!(r#"{{"shop":"calm.myshopify.com","access_token":"{a}","refresh_token":"{r}","expires_in":"{a}"}}"#)
            .into_bytes(),
        format!(r#"{{"shop":"calm.myshopify.com","access_token":"{a}","access_token":"{r}","expires_in":60}}"#)
            .into_bytes(),
        format!(r#""{a}""#).into_bytes(),
        format!("{a} {r}").into_bytes(),
        [b"\xef\xbb\xbf", line("calm.myshopify.com", a, r).as_bytes()].concat(),
        [line("calm.myshopify.com", a, r).as_bytes(), b"\xff"].concat(),
    ];
    let mut outs = Vec::new();
    for b in bad.drain(..) {
        let out = tokenwal(&db, &["import", "-"], &[], Some(&b));
        assert_eq!(out.code, 65, "{out:?}");
        assert!(out.stderr.contains("line 1: "), "{out:?}");
        outs.push(out);
    }
    let out = tokenwal(&db, &["import", "-"], &[], Some(good.join("\n").as_bytes()));
    assert_eq!(out.code, 0, "{out:?}");
    outs.push(out);

    // Every failure path of `token`.
    sim.h().push_faults("dropped.myshopify.com", [Fault::RotateThenDrop]).unwrap();
    sim.h().push_faults("flaky.myshopify.com", [Fault::Malformed, Fault::Truncated]).unwrap();
    sim.h().with_model(|m| m.uninstall("gone.myshopify.com"));
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"max_wait": "0s", "request_timeout": "2s"}"#).unwrap();
    let cfg = cfg.to_str().unwrap();
    let mut served = Vec::new();
    for (shop, want) in [("dropped", 75), ("flaky", 75), ("gone", 77), ("nobody", 66), ("Calm", 2)] {
        let s = format!("{shop}.myshopify.com");
        let out = tokenwal(&db, &["--config", cfg, "token", &s], &env, None);
        assert_eq!(out.code, want, "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        outs.push(out);
    }
    let out = tokenwal(&db, &["token", "spare.myshopify.com"], &wrong, None);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    outs.push(out);
    // Its job is to print the token: only stderr is checked.
    let out = tokenwal(&db, &["token", "calm.myshopify.com"], &env, None);
    assert_eq!(out.code, 0, "{out:?}");
    served.push(out.stdout.trim().to_owned());
    outs.push(Out { stdout: String::new(), ..out });

    for args in [
        &["recover", "--dry-run"][..],
        &["recover", "--dry-run", "--json"],
        &["recover"],
        &["run", "--once"],
        &["status"],
        &["status", "--json"],
        &["shops"],
        &["shops", "--json"],
    ] {
        let out = tokenwal(&db, args, &env, None);
        assert!(out.code == 0 || out.code == 75, "{out:?}");
        outs.push(out);
    }
    for s in &shops {
        outs.push(tokenwal(&db, &["inspect", s], &[], None));
        outs.push(tokenwal(&db, &["inspect", s, "--json"], &[], None));
    }

    let mut secrets = sim.issued(&shops);
    assert!(secrets.len() >= 2 * shops.len() + 3, "the simulator issued tokens: {}", secrets.len());
    secrets.push(SECRET.into());
    secrets.push("wrong-client-secret-value".into());
    secrets.push(store_key());
    let total: usize = outs.iter().map(|o| o.stdout.len() + o.stderr.len()).sum();
    assert!(total > 20_000, "TRACE output should be substantial: {total} bytes");
    for o in &outs {
        for s in &secrets {
            assert!(
                !o.stdout.contains(s.as_str()) && !o.stderr.contains(s.as_str()),
                "`{}` leaked a secret:\n{o:?}",
                o.args
            );
        }
    }
    assert!(served.iter().all(|t| secrets.contains(t)), "the served token is one the simulator issued");
}

/// Flips one byte in the middle of the value under `key` in `tree` of the closed store at `db`.
fn corrupt(db: &Path, tree: &str, key: Option<&[u8]>) -> Vec<u8> {
    // sled 0.34 releases its file lock from background threads after the previous `Db` (here, the
    // previous call's) is dropped: wait for it rather than fail on a loaded machine.
    let mut tries = 0;
    let sled = loop {
        match sled::open(db) {
            Ok(s) => break s,
            Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("open {}: {e}", db.display()),
        }
    };
    let t = sled.open_tree(tree).unwrap();
    let (k, v) = match key {
        Some(k) => (k.to_vec(), t.get(k).unwrap().expect("key present").to_vec()),
        None => {
            let (k, v) = t.last().unwrap().expect("tree not empty");
            (k.to_vec(), v.to_vec())
        }
    };
    let mut bad = v.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5a;
    t.insert(&k, bad).unwrap();
    sled.flush().unwrap();
    k
}

#[test]
fn corrupt_records_are_named_quarantined_and_never_panic() {
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let base = sim.h().base_url();
    let env = [
        ("TOKENWAL_CLIENT_ID", "sim-client-id"),
        ("TOKENWAL_CLIENT_SECRET", SECRET),
        ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let quiet = [("RUST_LOG", "warn")];
    let mut lines = Vec::new();
    for s in ["bad-state.myshopify.com", "bad-record.myshopify.com", "fine.myshopify.com"] {
        let t = sim.h().seed_shop(s);
        lines.push(line(s, t.access_token.as_str(), t.refresh_token.as_str()));
    }
    // Imported in this order: the last journal record is fine's, so import bad-record last.
    lines.swap(1, 2);
    assert_eq!(tokenwal(&db, &["import"], &quiet, Some(lines.join("\n").as_bytes())).code, 0);
    corrupt(&db, "grants", Some(b"shopify/bad-state.myshopify.com"));
    let lsn_key = corrupt(&db, "journal", None);
    assert_eq!(lsn_key.len(), 8, "journal keys are big-endian LSNs");
    let lsn = u64::from_be_bytes(lsn_key.try_into().unwrap());

    // The corrupt state is named, and that shop is refused; the others are served.
    let status = tokenwal(&db, &["status"], &quiet, None);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.contains("corrupt entries    1"), "{status:?}");
    assert!(status.stderr.contains("grants/shopify/bad-state.myshopify.com"), "{status:?}");
    let token = tokenwal(&db, &["token", "bad-state.myshopify.com"], &env, None);
    assert_eq!(token.code, 1, "{token:?}");
    assert!(token.stderr.contains("bad-state.myshopify.com") && token.stderr.contains("corrupt"), "{token:?}");
    assert!(token.stdout.is_empty());
    assert_eq!(sim.h().counters().shop("bad-state.myshopify.com").token_requests, 0, "nothing guessed");
    let recover = tokenwal(&db, &["recover"], &env, None);
    assert_eq!(recover.code, 0, "{recover:?}");
    assert!(recover.stdout.contains("1 corrupt"), "{recover:?}");
    assert!(recover.stderr.contains("grants/shopify/bad-state.myshopify.com"), "{recover:?}");
    for s in ["fine", "bad-record"] {
        let out = tokenwal(&db, &["token", &format!("{s}.myshopify.com")], &env, None);
        assert_eq!(out.code, 0, "{out:?}");
    }

    // A corrupt journal record: `inspect` refuses by default and names it; the operator flag
    // skips it and says so.
    let strict = tokenwal(&db, &["inspect", "bad-record.myshopify.com"], &quiet, None);
    assert_eq!(strict.code, 1, "{strict:?}");
    assert!(strict.stderr.contains(&format!("journal/{lsn}")), "{strict:?}");
    assert!(strict.stderr.contains("--skip-corrupt-records"), "the error names the flag: {strict:?}");
    let lenient = tokenwal(&db, &["--skip-corrupt-records", "inspect", "bad-record.myshopify.com"], &quiet, None);
    assert_eq!(lenient.code, 0, "{lenient:?}");
    assert!(lenient.stdout.contains(&format!("corrupt records skipped: [{lsn}]")), "{lenient:?}");
    let fine = tokenwal(&db, &["inspect", "fine.myshopify.com"], &quiet, None);
    assert_eq!(fine.code, 0, "{fine:?}");
    let bad_state = tokenwal(&db, &["inspect", "bad-state.myshopify.com"], &quiet, None);
    assert_eq!(bad_state.code, 1, "{bad_state:?}");
    assert!(bad_state.stderr.contains("grants/shopify/bad-state.myshopify.com"), "{bad_state:?}");
}
