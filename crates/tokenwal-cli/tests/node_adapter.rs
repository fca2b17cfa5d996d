//! The Node package `clients/node` (`@tokenwal/shopify-session-storage`) end to end: its
//! `node --test` suite runs Shopify's real npm packages (@shopify/shopify-api through
//! @shopify/shopify-app-express) with the package's `SessionStorage` against real `tokenwal serve`
//! processes (this crate's binary) and the simulator as Shopify (started here, on loopback; its
//! URL goes to node as `TOKENWAL_SIM_URL`).
//!
//! Needs node and `npm ci` in `clients/node`. Without them the suite is skipped with a message,
//! unless `TOKENWAL_REQUIRE_NODE=1` (CI sets it), in which case it fails. A node run that skipped
//! or ran no test fails too.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokenwal_testkit::BlockingSim;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
/// The whole node suite (about a minute: the rotation test waits out 12 short token lifetimes).
const DEADLINE: Duration = Duration::from_secs(300);

fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/node")
}

/// `Some(reason)` when the suite cannot run here; panics instead when node is required.
fn missing_prerequisite(dir: &Path) -> Option<String> {
    let required = std::env::var("TOKENWAL_REQUIRE_NODE").is_ok_and(|v| v == "1");
    let reason = if Command::new("node").arg("--version").output().is_err() {
        Some("node is not installed".to_owned())
    } else if !dir.join("node_modules/@shopify/shopify-api").exists() {
        Some(format!("clients/node has no node_modules: run `npm ci` in {}", dir.display()))
    } else {
        None
    };
    if let Some(r) = &reason {
        assert!(!required, "TOKENWAL_REQUIRE_NODE=1 but {r}");
    }
    reason
}

/// The `# name N` summary line of node's test runner.
fn summary(out: &str, name: &str) -> Option<u64> {
    out.lines().find_map(|l| l.strip_prefix(&format!("# {name} "))).and_then(|n| n.trim().parse().ok())
}

#[test]
fn node_session_storage_suite_against_a_real_broker_and_the_simulator() {
    let dir = package_dir();
    if let Some(reason) = missing_prerequisite(&dir) {
        eprintln!("SKIPPED: the Node adapter suite (clients/node) did not run: {reason}");
        return;
    }
    let mut files: Vec<String> = std::fs::read_dir(dir.join("test"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".test.js"))
        .map(|n| format!("test/{n}"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "node test files missing: {files:?}");

    let sim = BlockingSim::start();
    let mut child = Command::new("node")
        .args(["--test", "--test-concurrency=1"])
        .args(&files)
        .current_dir(&dir)
        .env("TOKENWAL_BIN", BIN)
        .env("TOKENWAL_SIM_URL", sim.h().base_url())
        .env_remove("TOKENWAL_SIM_BIN")
        .env_remove("TOKENWAL_BROKER_TOKEN")
        .env_remove("TOKENWAL_BROKER_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("node --test did not finish within {DEADLINE:?}:\n{}", out_reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    println!("{out}");
    eprintln!("{err}");
    assert!(status.success(), "node --test failed ({status}):\n{out}\n{err}");
    let passed = summary(&out, "pass").expect("node printed its summary");
    assert!(passed >= 18, "only {passed} node tests passed");
    assert_eq!(summary(&out, "fail"), Some(0));
    assert_eq!(summary(&out, "skipped"), Some(0), "an end-to-end test skipped:\n{err}");
}
