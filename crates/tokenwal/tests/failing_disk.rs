//! A failing disk during a refresh, at the engine level, against the simulator over real sockets:
//! the sync of the commit that follows a server-side rotation fails (`FaultPoint::Sync`, the 2nd
//! sync after the install: the intent's is the 1st). Then:
//!
//! * the response's tokens are never handed out: `access_token` returns the store error, not the
//!   new token the server issued;
//! * the store is fail-stop: every later call fails (`Poisoned`), nothing is served;
//! * a restart on the crash image (what a real disk would hold: the intent, not the commit) runs
//!   recovery, which retries with the **old** credential.
//!
//! Under Shopify's retain-until-replacement-used policy that retry gets the same pair back: the
//! shop ends healthy with the token the server issued, and nothing is lost. Under a strict
//! single-use server no client can recover a rotation whose answer it lost: the retry is rejected
//! and the shop is reported needs-reauth once (the documented outcome; docs/hostile-input.md).
//! (tests/crash.rs runs the same with real processes on a real directory.)

use std::time::Duration;
use tokenwal::core::{AccessToken, ClientSecret, GrantKey, Phase, RefreshToken, ShopDomain, TokenSet};
use tokenwal::store::{FaultPoint, Store, StoreError};
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_sim::config::PolicyKind;
use tokenwal_sim::{serve, SimConfig, SimHandle};
use tokenwal_testkit::now;

fn shop() -> ShopDomain {
    ShopDomain::parse("failing-disk.myshopify.com").unwrap()
}

fn config(sim: &SimHandle, store: Store) -> Config {
    let mut c = Config::shopify(StoreLocation::Open(store), "sim-client-id", ClientSecret::new("sim-client-secret"))
        .with_insecure_test_endpoint(url::Url::parse(&sim.base_url()).unwrap());
    c.proactive = false;
    c.max_wait = Duration::from_secs(5);
    c.timeouts.total = Duration::from_secs(3);
    c.policy.backoff.base = Duration::from_millis(20);
    c.policy.backoff.cap = Duration::from_millis(100);
    c
}

/// Every access and refresh token the simulator has issued for the shop.
fn issued(sim: &SimHandle) -> (Vec<String>, Vec<String>) {
    let state = sim.shop_state(shop().as_str());
    let mut access = Vec::new();
    let mut refresh = Vec::new();
    for g in &state.grants {
        access.extend(g.access_tokens.iter().map(|t| t.token.as_str().to_owned()));
        refresh.extend(g.refresh_tokens.iter().map(|t| t.token.as_str().to_owned()));
    }
    (access, refresh)
}

/// Runs the scenario under `policy`; returns the restarted engine's answer and the sim.
async fn sync_fails_after_rotation(policy: PolicyKind) -> (Result<AccessToken, Error>, Engine, SimHandle, String) {
    let sim = serve(SimConfig { policy, ..SimConfig::default() }, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let seeded = sim.seed_shop(shop().as_str());
    let old_refresh = seeded.refresh_token.as_str().to_owned();
    let store = Store::in_memory();
    let (engine, _) = Engine::open(config(&sim, store.clone())).await.unwrap();
    let tokens = TokenSet {
        access_token: AccessToken::new(seeded.access_token.as_str()),
        access_expires_at: now(),
        refresh_token: RefreshToken::new(old_refresh.as_str()),
        refresh_expires_at: None,
        scope: None,
    };
    engine.install(&shop(), tokens).await.unwrap();
    // The intent's sync is the 1st from here, the commit's the 2nd.
    store.inject_fault(FaultPoint::Sync, 2);

    let err = engine.access_token(&shop()).await.expect_err("a failed commit hands nothing out");
    assert!(matches!(err, Error::Store(StoreError::Io { .. })), "{err:?}");
    // The server did rotate: it processed the old refresh token and issued a new pair.
    assert_eq!(sim.counters().shop(shop().as_str()).token_requests, 1);
    let (access, refresh) = issued(&sim);
    assert!(access.len() >= 2 && refresh.len() >= 2, "the server rotated: {} {}", access.len(), refresh.len());
    let shown = format!("{err} {err:?}");
    for t in access.iter().chain(&refresh) {
        assert!(!shown.contains(t.as_str()), "a token in the error: {shown}");
    }

    // Fail-stop: nothing more is served or written.
    for _ in 0..2 {
        let again = engine.access_token(&shop()).await;
        assert!(matches!(again, Err(Error::Store(StoreError::Poisoned))), "{again:?}");
    }
    assert!(matches!(engine.state(&GrantKey::shopify(&shop())), Err(Error::Store(StoreError::Poisoned))));
    let image = store.crash_image();
    engine.shutdown().await;
    drop(store);

    // What the disk held: the intent, not the commit.
    let before = image.get(&GrantKey::shopify(&shop())).unwrap().expect("the grant survived");
    assert!(matches!(before.phase, Phase::Refreshing { .. }), "{:?}", before.phase);
    assert_eq!(before.tokens.as_ref().unwrap().refresh_token.expose_secret(), old_refresh, "the old credential");

    let (restarted, report) = Engine::open(config(&sim, image)).await.unwrap();
    assert_eq!((report.open, report.interrupted), (1, 1), "{report:?}");
    let answer = restarted.access_token(&shop()).await;
    (answer, restarted, sim, old_refresh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_after_rotation_loses_nothing_under_shopify_retention() {
    let (answer, engine, sim, old_refresh) = sync_fails_after_rotation(PolicyKind::RetainUntilReplacementUsed).await;
    let token = answer.expect("recovery retried the old credential and got the pair back");
    let now_ms = sim.now_ms();
    assert!(sim.with_model(|m| m.access_token_valid(shop().as_str(), token.expose_secret(), now_ms)));
    let state = engine.state(&GrantKey::shopify(&shop())).unwrap().unwrap();
    assert_eq!(state.phase, Phase::Healthy);
    let stored = state.tokens.unwrap().refresh_token.expose_secret().to_owned();
    assert_ne!(stored, old_refresh, "the rotated refresh token is now stored");
    assert!(sim.grant_alive(shop().as_str()), "the grant is alive at the server");
    // The retry was a replay of the old token (same pair), not a second rotation.
    assert_eq!(sim.counters().shop(shop().as_str()).token_requests, 2);
    // Nothing is lost: the next refresh uses the stored token and the server accepts it.
    let again = engine.on_unauthorized(&shop(), &token).await.expect("a further refresh works");
    assert_ne!(again.expose_secret(), token.expose_secret());
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_after_rotation_under_a_strict_server_is_needs_reauth_once() {
    let (answer, engine, sim, _) = sync_fails_after_rotation(PolicyKind::Strict).await;
    let err = answer.expect_err("the single-use token was consumed with its answer lost");
    assert!(matches!(err, Error::NeedsReauth { .. }), "{err:?}");
    let state = engine.state(&GrantKey::shopify(&shop())).unwrap().unwrap();
    assert!(matches!(state.phase, Phase::NeedsReauth { .. }), "{:?}", state.phase);
    let requests = sim.counters().shop(shop().as_str()).token_requests;
    // Asked again: said so again, without another request (no loop against the server).
    assert!(matches!(engine.access_token(&shop()).await, Err(Error::NeedsReauth { .. })));
    assert_eq!(sim.counters().shop(shop().as_str()).token_requests, requests);
    engine.shutdown().await;
}

/// Issue 18.6: a valid cached token must not be served once the store is poisoned. The cache may
/// hold a token that a failed commit was about to retire (an install over it, an uninstall), and
/// fail-stop means every call fails until the engine is reopened — also the fast path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_store_serves_no_cached_token() {
    let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let seeded = sim.seed_shop(shop().as_str());
    let store = Store::in_memory();
    let (engine, _) = Engine::open(config(&sim, store.clone())).await.unwrap();
    let tokens = TokenSet {
        access_token: AccessToken::new(seeded.access_token.as_str()),
        // Valid for an hour: served from the cache, no refresh due.
        access_expires_at: now().saturating_add(Duration::from_secs(3600)),
        refresh_token: RefreshToken::new(seeded.refresh_token.as_str()),
        refresh_expires_at: None,
        scope: None,
    };
    engine.install(&shop(), tokens.clone()).await.unwrap();
    assert_eq!(engine.access_token(&shop()).await.unwrap(), tokens.access_token, "cached");

    // The app/uninstalled webhook's write fails at its sync: the store poisons.
    store.inject_fault(FaultPoint::Sync, 1);
    let err = engine.uninstalled(&shop()).await.expect_err("the uninstall's sync failed");
    assert!(matches!(err, Error::Store(StoreError::Io { .. })), "{err:?}");
    assert!(store.is_poisoned());

    for _ in 0..2 {
        let served = engine.access_token(&shop()).await;
        assert!(matches!(served, Err(Error::Store(StoreError::Poisoned))), "a cached token was served: {served:?}");
        let any = engine.access_token_for(&GrantKey::shopify(&shop())).await;
        assert!(matches!(any, Err(Error::Store(StoreError::Poisoned))), "{any:?}");
    }
    assert_eq!(sim.counters().shop(shop().as_str()).token_requests, 0, "nothing was sent");
    engine.shutdown().await;
}
