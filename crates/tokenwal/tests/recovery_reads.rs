//! How often recovery reads a probed grant's state from the store (`Store::get`: on PostgreSQL a
//! round trip on a reader connection, on sled a get, an authenticated decrypt and a decode).
//!
//! Recovery reads the open grants' states in one batch (`Store::open_grants_among`, or a shared
//! store's claim) and plans from them. A probe that nothing wrote before it (its interruption goes
//! with its intent, or its grant was ambiguous already) decides on that reading instead of reading
//! the grant again, and the state its attempt settled in is what recovery counts: the one read left
//! is the re-check between the durable intent and the send (`docs/journal.md` §2). Before, a probe
//! read its grant three times.
//!
//! The engine opens its own store, and its recovery reads before a handle of it could be counted, so
//! the reads of every store of the process are counted: this file holds **one** test (sled, then
//! PostgreSQL in the same test: skipped loudly without a server, failed under
//! `TOKENWAL_REQUIRE_PG=1`).

use std::time::Duration;
use tokenwal::core::{GrantKey, InstallSource, Machine, Phase, UnixMillis};
use tokenwal::store::Store;
use tokenwal::{Engine, StoreLocation};
use tokenwal_sim::SimHandle;
use tokenwal_testkit::{accepted, engine_config, now, requests, seed, shop, sim, state, Backend, TestStore, SECRET};

/// Probed grants per backend.
const GRANTS: usize = 6;

/// Installs each of `names` and leaves an attempt's intent durable for it, started a minute ago (a
/// process that stopped then: on a shared store its request has long timed out, so the probe goes at
/// once).
async fn leave_intents_open(sim: &SimHandle, store: &Store, names: &[String]) {
    let machine = Machine::shopify(store.fingerprint_key());
    let started = UnixMillis(now().0 - 60_000);
    for n in names {
        let grant = GrantKey::shopify(&shop(n));
        let installed = machine
            .install(None, grant, seed(sim, n), InstallSource::Application, started)
            .make_durable(store)
            .await
            .unwrap();
        machine.plan_attempt(installed.state(), started).unwrap().make_durable(store).await.unwrap();
    }
}

/// Leaves `GRANTS` intents open on `location`, opens an engine on it and returns the `Store::get`
/// calls its recovery made, after checking that every probe resolved its grant with one request.
async fn reads_to_recover(sim: &SimHandle, test_store: &TestStore, location: StoreLocation, tag: &str) -> u64 {
    let names: Vec<String> = (0..GRANTS).map(|i| format!("{tag}-{i}")).collect();
    {
        let store = test_store.open();
        leave_intents_open(sim, &store, &names).await;
    }
    let reads = Store::count_all_reads();
    let (engine, report) = Engine::open(engine_config(&sim.base_url(), location, SECRET)).await.unwrap();
    for _ in 0..400 {
        if engine.recovering() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let counted = reads.get();
    drop(reads);
    assert_eq!(engine.recovering(), 0, "recovery did not end");
    assert_eq!((report.open, report.pending), (GRANTS, 0), "{report:?}");
    for n in &names {
        assert_eq!(requests(sim, n), 1, "{n}: one probe");
        assert_eq!(state(&engine, n).map(|s| s.phase), Some(Phase::Healthy), "{n}");
        let token = engine.access_token(&shop(n)).await.unwrap();
        assert!(accepted(sim, n, &token), "{n}: the probe's new token");
    }
    engine.shutdown().await;
    counted
}

#[tokio::test]
async fn a_probe_reads_its_grant_once() {
    let sim = sim().await;
    for backend in [Backend::Sled, Backend::Postgres] {
        let Some(test_store) = TestStore::new(backend, "recovery reads") else { continue };
        let reads = reads_to_recover(&sim, &test_store, test_store.location(), backend.name()).await;
        assert_eq!(
            reads,
            GRANTS as u64,
            "{}: one read per probe (the re-check before its send), none to decide or to count it",
            backend.name()
        );
    }
}
