//! Operating the engine: its metrics, read the way Prometheus reads them (the OpenMetrics text), and
//! its background compaction; against the simulator over real sockets and a store on disk.

use std::time::Duration;
use tokenwal::core::{AccessToken, RefreshToken, TokenSet};
use tokenwal::{Engine, Error, StoreLocation};
use tokenwal_sim::Fault;
use tokenwal_testkit::{engine_config as config, now, seed, shop, sim, SECRET};

/// The value of the sample `name` (with its labels, as written: `x_total{outcome="success"}`), or 0
/// if the exposition has no such sample.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}: not a number: {v}")))
        .unwrap_or(0.0)
}

async fn census_complete(engine: &Engine) -> String {
    for _ in 0..500 {
        let text = engine.metrics().encode_openmetrics();
        if sample(&text, "tokenwal_grant_census_complete") == 1.0 {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the grant census never completed");
}

fn dead_tokens() -> TokenSet {
    TokenSet {
        access_token: AccessToken::new("shpat_unknown_to_the_server"),
        access_expires_at: now(),
        refresh_token: RefreshToken::new("shprt_unknown_to_the_server"),
        refresh_expires_at: None,
        scope: None,
    }
}

#[tokio::test]
async fn metrics_count_refreshes_phases_and_syncs_across_a_reopen() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let db = || StoreLocation::Path(dir.path().join("db"));
    {
        let (engine, _) = Engine::open(config(&sim.base_url(), db(), SECRET)).await.unwrap();
        for name in ["a", "b"] {
            engine.install(&shop(name), seed(&sim, name)).await.unwrap();
        }
        engine.install(&shop("dead"), dead_tokens()).await.unwrap();
        let err = engine.access_token(&shop("dead")).await.unwrap_err();
        assert!(matches!(err, Error::NeedsReauth { .. }), "{err:?}");
        let text = engine.metrics().encode_openmetrics();
        assert_eq!(sample(&text, "tokenwal_refreshes_total{outcome=\"rejected\"}"), 1.0, "{text}");
        assert!(text.ends_with("# EOF\n"));
        engine.shutdown().await;
    }

    // A new process: the census counts what is on disk, once.
    let (engine, _) = Engine::open(config(&sim.base_url(), db(), SECRET)).await.unwrap();
    let text = census_complete(&engine).await;
    assert_eq!(sample(&text, "tokenwal_grants"), 3.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants_by_phase{phase=\"healthy\"}"), 2.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants_needing_reauth"), 1.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_ambiguous_attempts_open"), 0.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_store_up"), 1.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_refreshes_total{outcome=\"rejected\"}"), 0.0, "counters are per process");

    // A lost answer (rotated, then 520): one ambiguous attempt, resolved by the retry (a success).
    sim.push_faults(&shop("a").to_string(), [Fault::RotateThenDrop]).unwrap();
    engine.access_token(&shop("a")).await.unwrap();
    engine.access_token(&shop("b")).await.unwrap();
    let text = engine.metrics().encode_openmetrics();
    assert_eq!(sample(&text, "tokenwal_refreshes_total{outcome=\"ambiguous\"}"), 1.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_refreshes_total{outcome=\"success\"}"), 2.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_refresh_duration_seconds_count"), 3.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants_by_phase{phase=\"healthy\"}"), 2.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants_by_phase{phase=\"refreshing\"}"), 0.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants_by_phase{phase=\"ambiguous\"}"), 0.0, "{text}");
    // Every durable write of this process went through a sync that the histogram counted.
    let syncs = sample(&text, "tokenwal_journal_syncs_total");
    assert!(syncs >= 1.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_journal_sync_duration_seconds_count"), syncs, "{text}");
    assert_eq!(sample(&text, "tokenwal_journal_sync_duration_seconds_bucket{le=\"+Inf\"}"), syncs, "{text}");
    assert!(sample(&text, "tokenwal_journal_batches_total") >= syncs, "{text}");

    // Uninstall and a new install move the counts.
    engine.uninstalled(&shop("b")).await.unwrap();
    engine.install(&shop("c"), seed(&sim, "c")).await.unwrap();
    let text = engine.metrics().encode_openmetrics();
    assert_eq!(sample(&text, "tokenwal_grants"), 4.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants_by_phase{phase=\"healthy\"}"), 2.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants_by_phase{phase=\"uninstalled\"}"), 1.0, "{text}");
    // No label carries a shop, and no token shows.
    for secret in ["shprt_", "shpat_", "myshopify"] {
        assert!(!text.contains(secret), "{secret} in the metrics:\n{text}");
    }
}

#[tokio::test]
async fn metrics_register_into_a_callers_registry() {
    let sim = sim().await;
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory, SECRET)).await.unwrap();
    let mut registry = tokenwal::prometheus_client::registry::Registry::default();
    engine.metrics().register(&mut registry);
    engine.install(&shop("r"), seed(&sim, "r")).await.unwrap();
    engine.access_token(&shop("r")).await.unwrap();
    let mut text = String::new();
    tokenwal::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert_eq!(sample(&text, "tokenwal_refreshes_total{outcome=\"success\"}"), 1.0, "{text}");
    assert_eq!(sample(&text, "tokenwal_grants"), 1.0, "{text}");
}

/// The engine's background compaction keeps a busy grant's history at its cap, while the grant keeps
/// refreshing and everything it needs (its state) stays.
#[tokio::test]
async fn background_compaction_caps_each_grants_history() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&sim.base_url(), StoreLocation::Path(dir.path().join("db")), SECRET);
    c.compaction =
        Some(tokenwal::Compaction { history_per_grant: 4, interval: Duration::from_millis(20), ..Default::default() });
    let (engine, _) = Engine::open(c).await.unwrap();
    let s = shop("busy");
    engine.install(&s, seed(&sim, "busy")).await.unwrap();
    let mut token = engine.access_token(&s).await.unwrap();
    for _ in 0..30 {
        token = engine.on_unauthorized(&s, &token).await.unwrap();
    }
    let grant = tokenwal::core::GrantKey::shopify(&s);
    let mut len = usize::MAX;
    for _ in 0..500 {
        len = engine.store().history(&grant).unwrap().len();
        if len <= 4 + 2 + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Cap 4: trimmed when the version reaches a multiple of 2, so at most 4 + 2 transitions' records.
    assert!(len <= 8, "history never trimmed: {len} records");
    assert!(engine.store().stats().compacted >= 50, "{:?}", engine.store().stats());
    let again = engine.on_unauthorized(&s, &token).await.unwrap();
    assert!(tokenwal_testkit::accepted(&sim, "busy", &again));
    engine.shutdown().await;
}
