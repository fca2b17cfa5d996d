//! The engine with the built-in `shopify-customer-account` profile against the simulator's Customer
//! Account API mode over real loopback sockets, with random faults on: per-customer grants of a
//! public client at `/authentication/{shop_id}/oauth/token`, strict single use (the profile's
//! Retention), 400 `invalid_grant` for a spent token.
//!
//! The verdict, per customer, after faults stop: a customer may need to log in again only if one of
//! its refreshes was committed by the server and its answer lost or unusable (a 520, a reset, a
//! truncated or malformed body, a success without `expires_in`: under strict single use nobody can
//! recover those). Every other customer must be served a token the simulator's Customer Account API
//! accepts. And one engine never sends two token requests for one customer at the same time.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::protocol::ProviderSpec;
use tokenwal::core::{
    AccessToken, ClientSecret, CustomerAccount, GrantKey, InstallSource, ProviderProfile, RefreshToken, TokenSet,
};
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_sim::{FaultProbabilities, RandomFaults, SimConfig, SimDuration, SimHandle};
use tokenwal_testkit::{now, sim_with};

/// Faults that answer after the server committed a rotation, with the answer lost or unusable.
const LOSSY: [&str; 5] = ["rotate_then_drop", "rotate_then_reset", "truncated", "malformed", "missing_expires_in"];

fn config(sim: &SimHandle) -> Config {
    let mut profile = ProviderProfile::shopify_customer_account();
    let ProviderSpec::OAuth2 { token_url, .. } = &mut profile.spec else { unreachable!() };
    *token_url = sim.customer_token_url_template();
    // The simulator's access tokens live 1.5 s: refresh 400 ms before expiry (Hydrogen: 120 s of 1 h).
    profile.refresh_buffer = Duration::from_millis(400);
    let mut c = Config::shopify(StoreLocation::InMemory, "sim-public-client-id", ClientSecret::new("never-sent"))
        .with_profile(profile)
        .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
    c.proactive = false;
    c.max_wait = Duration::from_secs(10);
    c.timeouts.connect = Duration::from_secs(2);
    c.timeouts.total = Duration::from_secs(2);
    c.policy.backoff.base = Duration::from_millis(20);
    c.policy.backoff.cap = Duration::from_millis(200);
    c
}

fn key(shop_id: u64, customer_id: u64) -> GrantKey {
    GrantKey::customer_account(&CustomerAccount::new(shop_id, customer_id).unwrap())
}

fn install_tokens(t: &tokenwal_sim::TokenSet) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(t.access_token.as_str()),
        access_expires_at: now(),
        refresh_token: RefreshToken::new(t.refresh_token.as_str()),
        refresh_expires_at: None,
        scope: Some(t.scope.clone()),
    }
}

/// A customer's outcome once faults are off and the engine has settled it.
enum Outcome {
    Served(AccessToken),
    MustLogIn,
}

async fn settle(engine: &Engine, grant: &GrantKey) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match engine.access_token_for(grant).await {
            Ok(t) => return Outcome::Served(t),
            Err(Error::NeedsReauth { .. }) => return Outcome::MustLogIn,
            Err(e) => {
                assert!(Instant::now() < deadline, "{grant} never settled: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn run(probabilities: FaultProbabilities, shops: u64, per_shop: u64) -> (usize, usize) {
    let sim = Arc::new(
        sim_with(SimConfig {
            seed: Some(17),
            access_ttl: SimDuration::from_millis(1_500),
            hang_cap: SimDuration::from_millis(200),
            ..SimConfig::default()
        })
        .await,
    );
    let (engine, _) = Engine::open(config(&sim)).await.unwrap();
    let engine = Arc::new(engine);
    let customers: Vec<(u64, u64)> =
        (1..=shops).flat_map(|s| (1..=per_shop).map(move |c| (1_000 + s, 50_000 + c))).collect();
    for &(s, c) in &customers {
        let t = sim.seed_customer(s, c);
        engine.install_grant(key(s, c), install_tokens(&t), InstallSource::Application).await.unwrap();
    }
    sim.with_model(|m| {
        m.set_random_faults(Some(RandomFaults { seed: 5, probabilities, slow_delay_ms: 30, ..RandomFaults::default() }))
    })
    .unwrap();

    // Three storefront requests per customer at a time, for 4 s: each wants a fresh token.
    let stop = Instant::now() + Duration::from_secs(4);
    let mut tasks = tokio::task::JoinSet::new();
    for &(s, c) in &customers {
        for _ in 0..3 {
            let engine = Arc::clone(&engine);
            tasks.spawn(async move {
                let grant = key(s, c);
                while Instant::now() < stop {
                    match engine.access_token_for(&grant).await {
                        Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        Err(Error::NeedsReauth { .. }) => return,
                        Err(_) => tokio::time::sleep(Duration::from_millis(30)).await,
                    }
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    sim.with_model(|m| m.set_random_faults(None)).unwrap();

    let counters = sim.counters();
    assert!(counters.total.rotations > customers.len() as u64, "refreshes happened: {:?}", counters.total);
    let mut lost = 0;
    let mut lossy_hit = 0;
    for &(s, c) in &customers {
        let grant = key(s, c);
        let name = tokenwal_sim::model::customer_grant(s, c);
        let per = counters.shop(&name);
        let had_lossy = LOSSY.iter().any(|k| per.faults_of(k) > 0);
        lossy_hit += usize::from(had_lossy);
        match settle(&engine, &grant).await {
            Outcome::Served(token) => {
                let now = sim.now_ms();
                let ok = sim.with_model(|m| m.customer_access_token_valid(&s.to_string(), token.expose_secret(), now));
                assert_eq!(ok, Some(c), "{grant}: the served token is that customer's, live at the server");
            }
            Outcome::MustLogIn => {
                lost += 1;
                assert!(had_lossy, "{grant} was sent to log in again without a lost rotation: {per:?}");
            }
        }
    }
    // One engine, one request per customer at a time (hangs are not in the mix: a hung request
    // stays open at the server after the client's timeout, and its retry would overlap it).
    assert_eq!(counters.total.overlapping_token_requests, 0, "{:?}", counters.overlapping_grants());
    let distinct: BTreeSet<u64> = customers.iter().map(|(s, _)| *s).collect();
    assert_eq!(distinct.len() as u64, shops);
    (lost, lossy_hit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_before_processing_never_log_a_customer_out() {
    let p =
        FaultProbabilities { fail_before_processing: 0.15, throttle: 0.05, slow: 0.1, ..FaultProbabilities::default() };
    let (lost, _) = run(p, 3, 20).await;
    assert_eq!(lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_every_fault_only_customers_whose_rotation_was_lost_log_in_again() {
    let p = FaultProbabilities {
        fail_before_processing: 0.1,
        throttle: 0.03,
        slow: 0.05,
        rotate_then_drop: 0.02,
        rotate_then_reset: 0.02,
        truncated: 0.01,
        malformed: 0.01,
        missing_expires_in: 0.01,
        ..FaultProbabilities::default()
    };
    let (lost, lossy_hit) = run(p, 4, 25).await;
    eprintln!("{lost} customers logged out, {lossy_hit} had a rotation lost");
    assert!(lost <= lossy_hit, "{lost} lost, {lossy_hit} with a lost rotation");
    assert!(lossy_hit > 0, "the mix reached some customers");
}
