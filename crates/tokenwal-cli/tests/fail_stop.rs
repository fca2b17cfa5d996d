//! `tokenwal run` as a real process when its store fails a sync: it must not sit idle and look
//! healthy. It logs one clear line, exits 74 (EX_IOERR) at once so a supervisor restarts it, and the
//! restart's recovery brings every shop back.
//!
//! The fault: `TOKENWAL_TEST_INJECT_SYNC_FAULT=N` fails the store's N-th group sync. The store honours
//! it only with its `test-hooks` feature, which this package's dev-dependency enables for the binary
//! the tests run (a release build has no such hook). If the hook were missing, the process would
//! never fail and the test says so.

#![cfg(unix)]

use std::path::Path;
use std::time::{Duration, Instant};
use tokenwal_testkit::cli::{spawn, Out, CREDENTIALS};
use tokenwal_testkit::BlockingSim;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const SHOPS: [&str; 2] = ["disk-a.myshopify.com", "disk-b.myshopify.com"];

fn tokenwal(db: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Out {
    tokenwal_testkit::cli::run(BIN, db, args, env, stdin, true)
}

/// Every token the simulator issued for `shop`, and the app's secret: none may be printed.
fn secrets(sim: &BlockingSim) -> Vec<String> {
    let mut all = vec![tokenwal_testkit::SECRET.to_owned()];
    for shop in SHOPS {
        for g in &sim.h().shop_state(shop).grants {
            all.extend(g.access_tokens.iter().map(|t| t.token.as_str().to_owned()));
            all.extend(g.refresh_tokens.iter().map(|t| t.token.as_str().to_owned()));
        }
    }
    all
}

/// Seconds since UTC midnight.
fn seconds_of_day(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64().rem_euclid(86_400.0)
}

/// Seconds since UTC midnight of a log line stamped `2026-12-06T18:10:24.151536Z …`.
fn logged_seconds_of_day(line: &str) -> f64 {
    let time = line.split_once('T').and_then(|(_, t)| t.split_once('Z')).map(|(t, _)| t);
    let parts: Vec<f64> = time.unwrap_or_else(|| panic!("{line}")).split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

#[test]
fn run_exits_74_on_a_failed_sync_and_a_restart_recovers() {
    let sim = BlockingSim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let mut import = String::new();
    for shop in SHOPS {
        let t = sim.h().seed_shop(shop);
        // Expired access tokens: the scheduler refreshes both at once.
        import.push_str(&format!(
            r#"{{"shop":"{shop}","access_token":"{}","refresh_token":"{}","expires_at":1700000000}}"#,
            t.access_token.as_str(),
            t.refresh_token.as_str()
        ));
        import.push('\n');
    }
    let imported = tokenwal(&db, &["import"], &[], Some(&import));
    assert_eq!(imported.code, 0, "{imported:?}");
    let base = sim.h().base_url();

    // The 1st sync is an intent's (made durable, then sent); the 2nd, an intent's or a commit's, fails.
    let env = [
        CREDENTIALS[0],
        CREDENTIALS[1],
        ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str()),
        ("TOKENWAL_TEST_INJECT_SYNC_FAULT", "2"),
    ];
    let started = Instant::now();
    let (mut child, stderr) = spawn(BIN, &db, &["run", "--grace", "2s"], &env);

    let requests = || sim.h().counters().total.token_requests;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`tokenwal run` stayed alive after its store failed (or the binary lacks the store's test-hooks): {:#?}",
                stderr.iter().collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let exited = seconds_of_day(std::time::SystemTime::now());
    let log = stderr.iter().collect::<Vec<_>>();
    let text = log.join("\n");
    assert_eq!(status.code(), Some(74), "{text}");
    // Within a second of the failure (the store's own log line stamps it, in UTC).
    let poisoned = log.iter().find(|l| l.contains("store poisoned")).unwrap_or_else(|| panic!("{text}"));
    let took = (exited - logged_seconds_of_day(poisoned)).rem_euclid(86_400.0);
    assert!(took < 1.0, "exit {took:.3} s after the failure: {text}");

    // One clear line: what failed, that nothing further was sent, that a restart recovers.
    let clear: Vec<&String> = log.iter().filter(|l| l.starts_with("tokenwal: store fail-stopped")).collect();
    assert_eq!(clear.len(), 1, "{text}");
    let line = clear[0];
    assert!(line.contains("i/o error during sync") && line.contains("injected fault"), "{line}");
    assert!(line.contains("no further token request was sent") && line.contains("restart runs recovery"), "{line}");
    let sent = requests();
    assert!(sent <= 2, "at most one request per shop before the fail-stop: {sent}");
    for s in secrets(&sim) {
        assert!(!text.contains(&s), "a secret in the output:\n{text}");
    }

    // The supervisor restarts it: recovery at open, then every shop is refreshed and healthy.
    let env = {
        let mut e = CREDENTIALS.to_vec();
        e.push(("TOKENWAL_INSECURE_TEST_ENDPOINT", &base));
        e
    };
    let restarted = tokenwal(&db, &["run", "--once"], &env, None);
    assert_eq!(restarted.code, 0, "{restarted:?}");
    assert!(restarted.stderr.contains("recovery: 2 shops"), "{}", restarted.stderr);
    let shops = tokenwal(&db, &["shops", "--json"], &[], None);
    let v: serde_json::Value = serde_json::from_str(&shops.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    for g in v.as_array().unwrap() {
        assert_eq!(g["state"], "healthy", "{v}");
        assert!(g["generation"].as_u64().unwrap() >= 2, "refreshed since the import: {v}");
    }
    for shop in SHOPS {
        assert!(sim.h().grant_alive(shop), "{shop}: the grant is alive at the server");
    }
    let status = tokenwal(&db, &["status"], &[], None);
    assert_eq!(status.code, 0, "{status:?}");
    for s in secrets(&sim) {
        assert!(!restarted.all().contains(&s) && !shops.all().contains(&s), "a secret in the output");
    }
}

#[test]
fn the_help_documents_exit_74() {
    let dir = tempfile::tempdir().unwrap();
    let run = tokenwal(dir.path(), &["run", "--help"], &[], None);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("74 the store failed a write or sync"), "{}", run.stdout);
    let top = tokenwal(dir.path(), &["--help"], &[], None);
    assert!(top.stdout.contains("  74  run: the store failed a write or sync"), "{}", top.stdout);
}
