//! How often one refresh reads its grant's state from the store (`Store::get`: on PostgreSQL a round
//! trip, on sled a get, an authenticated decrypt and a decode), and that deciding on the caller's
//! own reading instead of a second read loses nothing: a grant that moved on since that reading is
//! caught by the compare-and-swap, and on a shared store ends the drive as `NoChange::Moved` rather
//! than refreshing it a second time.
//!
//! Each runs on sled and, as `NAME_pg`, on PostgreSQL (skipped loudly without a server, failed
//! under `TOKENWAL_REQUIRE_PG=1`).

use std::sync::atomic::{AtomicUsize, Ordering};
use tokenwal::core::{
    AttemptRequest, Durable, Goal, GrantKey, InstallSource, Machine, NoChange, NotSentReason, Outcome, Phase,
    UnixMillis,
};
use tokenwal::{Driven, Driver, Engine, Io, Offline};
use tokenwal_testkit::{engine_config as config, on_both_backends, requests, seed, shop, sim, TestStore, SECRET};

/// Reads per refresh: the caller's reading under the flight lock, and the re-check between the
/// durable intent and the send (`docs/journal.md` §2, "No retired credential on the wire"). The
/// driver decides on the caller's reading: no third read.
const READS_PER_REFRESH: u64 = 2;

on_both_backends! {
    /// The slow path of `access_token` and the background drive (`refresh_due`) each read the
    /// grant's state exactly twice for one refresh.
    #[tokio::test]
    async fn one_refresh_reads_the_state_twice, one_refresh_reads_the_state_twice_pg(backend) {
        let Some(store) = TestStore::new(backend, "store reads") else { return };
        let sim = sim().await;
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        // Both seeded with an expired access token: the next use must refresh.
        let (asked, due) = (shop("reads-asked"), shop("reads-due"));
        engine.install(&asked, seed(&sim, "reads-asked")).await.unwrap();
        engine.install(&due, seed(&sim, "reads-due")).await.unwrap();

        let reads = engine.store().count_reads();
        let token = engine.access_token(&asked).await.unwrap();
        assert_eq!(requests(&sim, "reads-asked"), 1, "one refresh");
        assert_eq!(reads.take(), READS_PER_REFRESH, "access_token's refresh");
        assert!(tokenwal_testkit::accepted(&sim, "reads-asked", &token));

        // `refresh_due` scans (not a `get`), then drives the one due grant.
        assert_eq!(engine.refresh_due().await.unwrap(), 1);
        assert_eq!(requests(&sim, "reads-due"), 1, "one refresh");
        assert_eq!(reads.take(), READS_PER_REFRESH, "the background drive's refresh");
        let state = engine.state(&GrantKey::shopify(&due)).unwrap().unwrap();
        assert_eq!(state.phase, Phase::Healthy);
        engine.shutdown().await;
    }
}

/// An [`Io`] that counts what it would send and sends nothing.
#[derive(Default)]
struct CountingIo {
    sends: AtomicUsize,
}

impl Io for CountingIo {
    async fn send(&self, _: &Durable<AttemptRequest>) -> Outcome {
        self.sends.fetch_add(1, Ordering::SeqCst);
        Outcome::NotSent(NotSentReason::Build { detail: "test: not sent".into() })
    }
    fn after_durable<T>(&self, _: &Durable<T>) {}
    fn paused(&self) -> Option<UnixMillis> {
        None
    }
}

on_both_backends! {
    /// A caller's reading that the grant has moved on from (another writer installed a pair since):
    /// the intent decided on it is refused by the compare-and-swap and nothing is sent. With
    /// `stop_if_moved` (a shared store's refresh) the drive then ends as `Moved`; without it, the
    /// driver re-reads and refreshes the grant as it is now.
    #[tokio::test]
    async fn a_reading_the_grant_moved_on_from_sends_nothing, a_reading_the_grant_moved_on_from_sends_nothing_pg(backend) {
        let Some(test_store) = TestStore::new(backend, "store reads") else { return };
        let sim = sim().await;
        let store = test_store.open();
        let machine = Machine::shopify(store.fingerprint_key());
        let grant = GrantKey::shopify(&shop("moved"));
        let install = |tokens| Goal::Install { tokens, source: InstallSource::Application, force: true };
        let offline = Driver::new(&store, &machine, &Offline);
        assert!(matches!(offline.drive(&grant, &install(seed(&sim, "moved"))).await.unwrap(), Driven::Wrote(_)));
        let read = store.get(&grant).unwrap();
        let old_version = read.as_ref().unwrap().version;

        // Another writer moves the grant on.
        assert!(matches!(offline.drive(&grant, &install(seed(&sim, "moved"))).await.unwrap(), Driven::Wrote(_)));
        let conflicts = store.stats().conflicts;

        let io = CountingIo::default();
        let driver = Driver::new(&store, &machine, &io);
        let driven = driver.drive_from(&grant, &Goal::Refresh, read.clone(), true).await.unwrap();
        match driven {
            Driven::Unchanged { why: NoChange::Moved, state } => {
                assert!(state.unwrap().version > old_version, "ended on the state it moved to");
            }
            other => panic!("expected Moved, got {other:?}"),
        }
        assert_eq!(io.sends.load(Ordering::SeqCst), 0, "nothing sent on a reading the grant moved on from");
        assert_eq!(store.stats().conflicts, conflicts + 1, "the stale intent was refused by its compare-and-swap");

        // Without `stop_if_moved`: the conflict is followed by a re-read and one attempt on the state
        // as it is now.
        let driven = driver.drive_from(&grant, &Goal::Refresh, read, false).await.unwrap();
        assert!(matches!(driven, Driven::Attempted { .. }), "{driven:?}");
        assert_eq!(io.sends.load(Ordering::SeqCst), 1, "one attempt, on the current state");
        assert_eq!(store.stats().conflicts, conflicts + 2);
    }
}
