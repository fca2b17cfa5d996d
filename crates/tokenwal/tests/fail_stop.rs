//! The engine's health through a fail-stop, with the proactive scheduler running against the
//! simulator: the commit after a rotation fails its sync (`FaultPoint::Sync`), and then
//!
//! * `Engine::health()` is `FailStopped` with the store's error (no secret in it), and
//!   `Engine::fail_stopped()` resolves — what an embedding worker waits on to exit or reopen;
//! * the scheduler sends nothing more: a second shop that comes due afterwards is not refreshed.

use std::time::{Duration, Instant};
use tokenwal::store::{FaultPoint, Store};
use tokenwal::{Engine, Health, StoreLocation};
use tokenwal_testkit::{engine_config, now, requests, seed, shop, sim, SECRET};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_fail_stopped_and_the_scheduler_sends_nothing_after() {
    let sim = sim().await;
    let store = Store::in_memory();
    let mut config = engine_config(&sim.base_url(), StoreLocation::Open(store.clone()), SECRET);
    config.proactive = true;
    config.refresh_margin = Duration::from_secs(1);
    let (engine, _) = Engine::open(config).await.unwrap();
    assert_eq!(engine.health(), Health::Healthy);

    // fs-a comes due in about a second, fs-b in about three.
    let installed = Instant::now();
    let (mut a, mut b) = (seed(&sim, "fs-a"), seed(&sim, "fs-b"));
    a.access_expires_at = now().saturating_add(Duration::from_secs(2));
    b.access_expires_at = now().saturating_add(Duration::from_secs(4));
    let secrets: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|t| [t.access_token.expose_secret().to_owned(), t.refresh_token.expose_secret().to_owned()])
        .chain([SECRET.to_owned()])
        .collect();
    engine.install(&shop("fs-a"), a).await.unwrap();
    engine.install(&shop("fs-b"), b).await.unwrap();
    // fs-a's intent is the next sync, the commit after its rotation the one after: it fails.
    store.inject_fault(FaultPoint::Sync, 2);

    let health = tokio::time::timeout(Duration::from_secs(10), engine.fail_stopped())
        .await
        .expect("the scheduler's refresh of fs-a fails its commit: the engine fail-stops");
    let Health::FailStopped { since, error } = &health else { panic!("{health:?}") };
    assert!(error.contains("sync") && error.contains("injected fault"), "{error}");
    assert!(*since <= std::time::SystemTime::now());
    assert_eq!(engine.health(), health, "health() says the same");
    // A fail-stop is for good: asking again answers at once.
    let again = tokio::time::timeout(Duration::from_millis(100), engine.fail_stopped()).await;
    assert_eq!(again.expect("already fail-stopped"), health);
    let shown = format!("{health:?}");
    for s in &secrets {
        assert!(!shown.contains(s.as_str()), "a secret in the health: {shown}");
    }
    assert_eq!(requests(&sim, "fs-a"), 1, "fs-a was refreshed once, its commit failed");

    // Past fs-b's due time: the scheduler has stopped, nothing is sent for it.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(installed.elapsed())).await;
    assert_eq!(requests(&sim, "fs-b"), 0, "a request was sent after the fail-stop");
    assert_eq!(requests(&sim, "fs-a"), 1);
    assert!(matches!(engine.health(), Health::FailStopped { .. }));
    engine.shutdown().await;
}
