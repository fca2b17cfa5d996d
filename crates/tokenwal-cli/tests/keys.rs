//! The store key through the `tokenwal` binary: `keygen` (0600, never overwriting), key sources
//! (environment, key file, config file; never an argument), the errors of a missing, unsafe or
//! wrong key, and a rotation with `keygen --rotate` and `rekey` — killed mid-way, re-run, the old
//! key dropped, a refresh after it.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokenwal_testkit::cli::Out;
use tokenwal_testkit::BlockingSim;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
fn command(db: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = tokenwal_testkit::cli::clean_command(BIN);
    cmd.arg("--db").arg(db).args(args);
    cmd.envs(env.iter().copied());
    cmd
}

fn run(db: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Out {
    tokenwal_testkit::cli::run(BIN, db, args, env, stdin, false)
}

fn line(shop: &str, access: &str, refresh: &str) -> String {
    format!(r#"{{"shop":"{shop}","access_token":"{access}","refresh_token":"{refresh}","expires_in":3600}}"#)
}

/// The key lines of a key file (comments dropped).
fn key_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn rekey_json(db: &Path, env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let mut all = vec!["rekey", "--json"];
    all.extend_from_slice(args);
    let out = run(db, &all, env, None);
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn keygen_writes_a_private_file_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("store.key");
    let db = dir.path().join("unused");
    let out = run(&db, &["keygen", file.to_str().unwrap()], &[], None);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(mode(&file), 0o600);
    let keys = key_lines(&file);
    assert_eq!(keys.len(), 1);
    assert!(!out.stdout.contains(&keys[0]) && !out.stderr.contains(&keys[0]), "the key is never printed");
    let again = run(&db, &["keygen", file.to_str().unwrap()], &[], None);
    assert_ne!(again.code, 0);
    assert_eq!(key_lines(&file), keys, "an existing key file is never overwritten");

    let rotated = run(&db, &["keygen", "--rotate", file.to_str().unwrap()], &[], None);
    assert_eq!(rotated.code, 0, "{rotated:?}");
    let after = key_lines(&file);
    assert_eq!((after.len(), &after[1]), (2, &keys[0]), "the new key is prepended, the old one kept");
    assert_eq!(mode(&file), 0o600);
    assert!(!rotated.stdout.contains(&after[0]));
}

#[test]
fn a_missing_unsafe_or_wrong_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let file = dir.path().join("store.key");
    assert_eq!(run(&db, &["keygen", file.to_str().unwrap()], &[], None).code, 0);
    let input = line("keyed.myshopify.com", "shpat_KEYED_A", "shprt_KEYED_R");

    // No key: refused before anything is created.
    let out = run(&db, &["import"], &[], Some(&input));
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("no store key") && out.stderr.contains("TOKENWAL_STORE_KEY"), "{out:?}");
    assert!(!db.exists(), "no store is created without a key");

    let via_file = [("TOKENWAL_STORE_KEY_FILE", file.to_str().unwrap())];
    assert_eq!(run(&db, &["import"], &via_file, Some(&input)).code, 0);
    assert_eq!(run(&db, &["status"], &via_file, None).code, 0);

    // The key file from the config file works too.
    let config = dir.path().join("config.json");
    std::fs::write(&config, format!(r#"{{"store_key_file": {:?}}}"#, file.to_str().unwrap())).unwrap();
    let out = run(&db, &["--config", config.to_str().unwrap(), "status"], &[], None);
    assert_eq!(out.code, 0, "{out:?}");

    // Group-readable: a warning. World-readable: refused.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(&db, &["status"], &via_file, None);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("group-accessible"), "{out:?}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&db, &["status"], &via_file, None);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("chmod 600"), "{out:?}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The wrong key: named by the id the store needs, not "corrupt".
    let check = rekey_json(&db, &via_file, &["--check"]);
    let needed = check["active_key"].as_str().unwrap().to_owned();
    let other = tokenwal_store::StoreKey::generate().to_base64().to_string();
    let out = run(&db, &["shops"], &[("TOKENWAL_STORE_KEY", &other)], None);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains(&needed) && !out.stderr.contains("corrupt"), "{out:?}");
    assert!(!out.stderr.contains(&other), "the key is never printed");
    // A malformed key is refused without echoing it.
    let out = run(&db, &["status"], &[("TOKENWAL_STORE_KEY", "c2hvcnQ=")], None);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("malformed store key") && !out.stderr.contains("c2hvcnQ"), "{out:?}");
}

#[test]
fn rotation_with_a_killed_rekey_then_a_rerun_then_the_old_key_dropped() {
    let sim = BlockingSim::start();
    let h = sim.h();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let file = dir.path().join("store.key");
    assert_eq!(run(&db, &["keygen", file.to_str().unwrap()], &[], None).code, 0);
    let via_file = [("TOKENWAL_STORE_KEY_FILE", file.to_str().unwrap())];

    // One shop the simulator knows (its access token already expired), and many more.
    let live = h.seed_shop("live.myshopify.com");
    let mut lines = vec![format!(
        r#"{{"shop":"live.myshopify.com","access_token":"{}","refresh_token":"{}","expires_at":1700000000}}"#,
        live.access_token.as_str(),
        live.refresh_token.as_str()
    )];
    let n = 300;
    for i in 0..n {
        lines.push(line(&format!("bulk-{i}.myshopify.com"), &format!("shpat_BULK_{i}"), &format!("shprt_BULK_{i}")));
    }
    assert_eq!(run(&db, &["import"], &via_file, Some(&lines.join("\n"))).code, 0);
    let old_id = rekey_json(&db, &via_file, &["--check"])["active_key"].as_str().unwrap().to_owned();

    assert_eq!(run(&db, &["keygen", "--rotate", file.to_str().unwrap()], &[], None).code, 0);
    let check = rekey_json(&db, &via_file, &["--check"]);
    let new_id = check["active_key"].as_str().unwrap().to_owned();
    assert_ne!(new_id, old_id);
    assert_eq!(check["remaining_under_old_keys"], n + 1, "{check}");

    // A rekey killed mid-way (SIGKILL after its first progress report).
    let mut child = command(&db, &["rekey"], &via_file).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(first.starts_with("rekey: re-sealed"), "{first:?}");
    let check = rekey_json(&db, &via_file, &["--check"]);
    let remaining = check["remaining_under_old_keys"].as_u64().unwrap();
    assert!(remaining > 0 && remaining < n as u64 + 1, "killed mid-way: {check}");
    assert_eq!(check["in_use"][&new_id].as_u64().unwrap() + remaining, n as u64 + 2, "{check}");
    // The mix reads: every grant is listed, none unreadable.
    let shops = run(&db, &["shops", "--json"], &via_file, None);
    assert_eq!(shops.code, 0, "{shops:?}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&shops.stdout).unwrap().as_array().unwrap().len(), n + 1);

    // Without the old key now, the grants still under it are named as needing it.
    let new_only = dir.path().join("new-only.key");
    let keys = key_lines(&file);
    std::fs::write(&new_only, format!("{}\n", keys[0])).unwrap();
    std::fs::set_permissions(&new_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    let new_only_env = [("TOKENWAL_STORE_KEY_FILE", new_only.to_str().unwrap())];
    let out = run(&db, &["inspect", "bulk-299.myshopify.com"], &new_only_env, None);
    if out.code != 0 {
        assert!(out.stderr.contains(&old_id), "{out:?}");
    }

    // The re-run finishes; then the old key may go.
    let done = rekey_json(&db, &via_file, &[]);
    assert_eq!(done["remaining_under_old_keys"], 0, "{done}");
    assert_eq!(done["resealed"].as_u64().unwrap(), remaining, "{done}");
    let after = rekey_json(&db, &new_only_env, &["--check"]);
    assert_eq!(after["in_use"].as_object().unwrap().keys().collect::<Vec<_>>(), vec![&new_id], "{after}");
    let shops = run(&db, &["shops", "--json"], &new_only_env, None);
    assert_eq!(shops.code, 0, "{shops:?}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&shops.stdout).unwrap().as_array().unwrap().len(), n + 1);

    // A refresh after the rekey, under the new key alone.
    let base = h.base_url();
    let env = [
        ("TOKENWAL_STORE_KEY_FILE", new_only.to_str().unwrap()),
        ("TOKENWAL_CLIENT_ID", "sim-client-id"),
        ("TOKENWAL_CLIENT_SECRET", "sim-client-secret"),
        ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str()),
    ];
    let started = Instant::now();
    let out = run(&db, &["token", "live.myshopify.com"], &env, None);
    assert_eq!(out.code, 0, "{out:?}");
    let token = out.stdout.trim();
    assert!(token.starts_with("shpat_") && token != live.access_token.as_str(), "{out:?}");
    assert_eq!(h.counters().shop("live.myshopify.com").token_requests, 1);
    assert!(started.elapsed() < Duration::from_secs(30));
}
