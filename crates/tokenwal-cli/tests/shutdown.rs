//! Graceful shutdown of `tokenwal run` as a real process (issue 16.3), with a refresh held on the
//! wire by the simulator's hold control:
//!
//! * SIGTERM stops new attempts but lets the refresh in flight finish: the process stays up while the
//!   answer is held, commits it once released, and exits 0; nothing is left open.
//! * A second signal exits at once, leaving the refresh journaled as an intent; the next start's
//!   recovery retries the old credential and the shop ends healthy — nothing is lost.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use tokenwal_testkit::cli::{spawn, CREDENTIALS};
use tokenwal_testkit::BlockingSim;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const SHOP: &str = "closing.myshopify.com";

/// Seeds the shop with an expired access token and imports it.
fn import_due_shop(sim: &BlockingSim, db: &Path) {
    let t = sim.h().seed_shop(SHOP);
    let line = format!(
        r#"{{"shop":"{SHOP}","access_token":"{}","refresh_token":"{}","expires_at":1700000000,"refresh_token_expires_in":7776000}}"#,
        t.access_token.as_str(),
        t.refresh_token.as_str()
    );
    let out = tokenwal_testkit::cli::run(BIN, db, &["import"], &[], Some(&line), true);
    assert_eq!(out.code, 0, "{out:?}");
}

/// Starts `tokenwal run` (the scheduler refreshes the due shop at once) with stderr on a channel.
fn start_run(sim: &BlockingSim, db: &Path) -> (Child, Receiver<String>) {
    let base = sim.h().base_url();
    let env = [CREDENTIALS[0], CREDENTIALS[1], ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str())];
    spawn(BIN, db, &["run", "--grace", "20s"], &env)
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success());
}

/// Waits for the child to exit, at most `within`; its exit code.
fn exits_within(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("tokenwal run did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn shop_state(db: &Path) -> serde_json::Value {
    let out = tokenwal_testkit::cli::run(BIN, db, &["shops", "--json"], &[], None, true);
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v[0].clone()
}

#[test]
fn sigterm_lets_the_refresh_in_flight_commit_then_exits_zero() {
    let sim = BlockingSim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    import_due_shop(&sim, &db);
    sim.h().hold(SHOP);
    let (mut child, rx) = start_run(&sim, &db);
    assert!(sim.runtime().block_on(sim.h().wait_held(SHOP, Duration::from_secs(20))), "the refresh is on the wire");

    signal(&child, "-TERM");
    // The answer is still held: the process waits for it (within its grace period) instead of exiting.
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "exited with a refresh in flight");
    assert!(sim.h().release(SHOP));
    assert_eq!(exits_within(&mut child, Duration::from_secs(15)), Some(0));
    let log: Vec<String> = rx.iter().collect();
    let text = log.join("\n");
    assert!(text.contains("stopping: waiting for refreshes in flight") && text.contains("stopped"), "{text}");
    assert!(!text.contains("shpat_") && !text.contains("shprt_") && !text.contains("sim-client-secret"), "{text}");

    // The outcome was committed before the exit: healthy, a new generation, nothing open.
    let shop = shop_state(&db);
    assert_eq!(shop["state"], "healthy", "{shop}");
    assert!(shop["generation"].as_u64().unwrap() >= 2, "{shop}");
    assert_eq!(sim.h().counters().shop(SHOP).token_requests, 1);
}

#[test]
fn a_second_signal_exits_at_once_and_recovery_loses_nothing() {
    let sim = BlockingSim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    import_due_shop(&sim, &db);
    sim.h().hold(SHOP);
    let (mut child, rx) = start_run(&sim, &db);
    assert!(sim.runtime().block_on(sim.h().wait_held(SHOP, Duration::from_secs(20))), "the refresh is on the wire");

    signal(&child, "-TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "exited with a refresh in flight after one signal");
    signal(&child, "-TERM");
    // At once: well inside the 20 s grace period.
    assert_eq!(exits_within(&mut child, Duration::from_secs(5)), Some(0));
    let text = rx.iter().collect::<Vec<_>>().join("\n");
    assert!(text.contains("second signal"), "{text}");
    // The server rotated (the held request was processed); the answer is lost with the process.
    sim.h().cancel(SHOP);
    assert_eq!(shop_state(&db)["state"], "refreshing", "the intent stays journaled");

    // The next start's recovery retries the old credential and gets the pair back.
    let base = sim.h().base_url();
    let env = [CREDENTIALS[0], CREDENTIALS[1], ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str())];
    let out = tokenwal_testkit::cli::run(BIN, &db, &["run", "--once"], &env, None, true);
    assert_eq!(out.code, 0, "{out:?}");
    let shop = shop_state(&db);
    assert_eq!(shop["state"], "healthy", "{shop}");
    assert!(sim.h().grant_alive(SHOP), "the grant is alive at the server");
}
