//! Unit tests of the store, on both backends where the behaviour is shared.

use crate::{layout, FaultPoint, KeyRing, RecoveryMode, Store, StoreConfig, StoreError};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use tokenwal_core::*;

const T0: u64 = 1_800_000_000_000;
const WAIT: Duration = Duration::from_secs(10);

fn machine(store: &Store) -> Machine {
    Machine::shopify(store.fingerprint_key())
}

fn key(i: usize) -> GrantKey {
    GrantKey::shopify(&ShopDomain::parse(&format!("shop-{i}.myshopify.com")).unwrap())
}

fn tokens(now: u64) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("shpat_secret_{now}")),
        access_expires_at: UnixMillis(now + 3_600_000),
        refresh_token: RefreshToken::new(format!("shprt_secret_{now}")),
        refresh_expires_at: None,
        scope: Some("read_orders".into()),
    }
}

fn state_of(b: &WriteBatch) -> GrantState {
    codec::decode_state(&b.state).unwrap()
}

fn install(m: &Machine, cur: Option<&GrantState>, g: &GrantKey, now: u64) -> WriteBatch {
    m.install(cur, g.clone(), tokens(now), InstallSource::Import, UnixMillis(now)).transition().write_batch().unwrap()
}

fn attempt(m: &Machine, s: &GrantState, now: u64) -> WriteBatch {
    m.plan_attempt(s, UnixMillis(now)).unwrap().transition().write_batch().unwrap()
}

/// Applies `b` and returns the state it wrote.
fn put(store: &Store, b: WriteBatch) -> GrantState {
    let s = state_of(&b);
    store.apply_blocking(b).unwrap();
    s
}

/// Applies `b` on a thread of its own (a writer blocked until its answer).
fn spawn_write(store: &Store, b: WriteBatch) -> thread::JoinHandle<Result<(), StoreError>> {
    let store = store.clone();
    thread::spawn(move || store.apply_blocking(b))
}

/// Waits until `n` writes have been submitted (a writer's submission is counted right after it is
/// queued).
fn wait_submitted(store: &Store, n: u64) {
    while store.stats().submitted < n {
        thread::sleep(Duration::from_millis(1));
    }
}

/// The fixed test ring (so a test can reopen a sled store).
fn ring() -> KeyRing {
    KeyRing::insecure_test_ring()
}

fn open(path: &Path) -> Store {
    Store::open(path, &ring(), StoreConfig::default()).unwrap().0
}

/// A sled store in a fresh temporary directory, an in-memory store, and a PostgreSQL store in a
/// fresh schema (when a server is reachable; see [`crate::PgScratch`]). The first element keeps
/// the directory or schema alive; bound first, it is dropped after the store.
fn both() -> Vec<(Box<dyn std::any::Any>, Store)> {
    let dir = tempfile::tempdir().unwrap();
    let sled = open(&dir.path().join("store"));
    let mut all: Vec<(Box<dyn std::any::Any>, Store)> = vec![(Box::new(dir), sled), (Box::new(()), Store::in_memory())];
    if let Some(pg) = crate::PgScratch::new("store unit tests") {
        let store = open_pg(&pg.location());
        all.push((Box::new(pg), store));
    }
    all
}

fn open_pg(location: &crate::PgLocation) -> Store {
    Store::open_postgres(location, &ring(), StoreConfig::default()).unwrap().0
}

fn versions(states: &[GrantState]) -> Vec<(GrantKey, u64)> {
    states.iter().map(|s| (s.grant.clone(), s.version)).collect()
}

#[test]
fn compare_and_swap_refuses_stale_writes_and_writes_nothing() {
    for (_dir, store) in both() {
        let m = machine(&store);
        let g = key(1);
        let s1 = put(&store, install(&m, None, &g, T0));
        assert_eq!(s1.version, 1);

        // "Must not exist" against an existing grant.
        let err = store.apply_blocking(install(&m, None, &g, T0 + 1)).unwrap_err();
        assert!(matches!(err, StoreError::Conflict { expected: None, found: Some(1), .. }), "{err:?}");

        let s2 = put(&store, attempt(&m, &s1, T0 + 2));
        // A second planner computed from the same version loses.
        let err = store.apply_blocking(attempt(&m, &s1, T0 + 3)).unwrap_err();
        match &err {
            StoreError::Conflict { grant, expected, found } => {
                assert_eq!(grant, "shopify/shop-1.myshopify.com");
                assert_eq!((*expected, *found), (Some(1), Some(2)));
            }
            other => panic!("{other:?}"),
        }
        assert!(!err.may_be_durable());
        // Expecting a version of a grant that does not exist.
        let err = store.apply_blocking(attempt(&m, &s1.clone_with_grant(key(2)), T0)).unwrap_err();
        assert!(matches!(err, StoreError::Conflict { expected: Some(1), found: None, .. }), "{err:?}");

        assert_eq!(store.get(&g).unwrap().unwrap(), s2);
        assert_eq!(store.history(&g).unwrap().len(), 2);
        assert_eq!(store.get(&key(2)).unwrap(), None);
        assert!(store.history(&key(2)).unwrap().is_empty());
        let stats = store.stats();
        assert_eq!((stats.conflicts, stats.batches_applied), (3, 2));
        assert!(!store.is_poisoned());
    }
}

trait CloneWithGrant {
    fn clone_with_grant(&self, g: GrantKey) -> GrantState;
}

impl CloneWithGrant for GrantState {
    fn clone_with_grant(&self, g: GrantKey) -> GrantState {
        GrantState { grant: g, ..self.clone() }
    }
}

#[test]
fn open_index_follows_the_phase() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = open(&path);
        let m = machine(&store);
        let (a, b) = (key(1), key(2));
        let a1 = put(&store, install(&m, None, &a, T0));
        let b1 = put(&store, install(&m, None, &b, T0));
        assert!(store.open_grants().unwrap().is_empty());

        let a2 = put(&store, attempt(&m, &a1, T0 + 1));
        assert_eq!(versions(&store.open_grants().unwrap()), vec![(a.clone(), 2)]);
        let b2 = put(&store, attempt(&m, &b1, T0 + 1));
        assert_eq!(versions(&store.open_grants().unwrap()), vec![(a.clone(), 2), (b.clone(), 2)]);

        // A new install supersedes the attempt: the grant leaves the index.
        put(&store, install(&m, Some(&a2), &a, T0 + 2));
        assert_eq!(versions(&store.open_grants().unwrap()), vec![(b.clone(), 2)]);
        // Needs-reauth is not open either.
        let t = m.mark_needs_reauth(&b2, "test", UnixMillis(T0 + 3));
        put(&store, t.write_batch().unwrap());
        assert!(store.open_grants().unwrap().is_empty());
        let b4 = put(&store, install(&m, Some(&store.get(&b).unwrap().unwrap()), &b, T0 + 4));
        put(&store, attempt(&m, &b4, T0 + 5));
        assert_eq!(store.grant_count(), 2);
    }
    let (store, report) = Store::open(&path, &ring(), StoreConfig::default()).unwrap();
    assert_eq!((report.grants, report.open_attempts, report.created), (2, 1, false));
    assert!(report.corrupt.is_empty());
    assert_eq!(versions(&store.open_grants().unwrap()), vec![(key(2), 5)]);
    assert_eq!(store.grant_count(), 2);
}

#[test]
fn history_is_per_grant_and_in_lsn_order() {
    for (_dir, store) in both() {
        let m = machine(&store);
        // "oidc/a" is a byte prefix of "oidc/ab": the index must still keep them apart.
        let a = GrantKey::new("oidc", "a").unwrap();
        let ab = GrantKey::new("oidc", "ab").unwrap();
        let a1 = put(&store, install(&m, None, &a, T0));
        let ab1 = put(&store, install(&m, None, &ab, T0));
        let a2 = put(&store, attempt(&m, &a1, T0 + 1));
        put(&store, attempt(&m, &ab1, T0 + 1));
        put(&store, install(&m, Some(&a2), &a, T0 + 2));

        let h = store.history(&a).unwrap();
        let kinds: Vec<_> = h.iter().map(|(_, r)| r.kind_name()).collect();
        assert_eq!(kinds, ["installed", "intent", "installed", "resolved"]);
        assert!(h.windows(2).all(|w| w[0].0 < w[1].0), "lsns not increasing: {h:?}");
        assert!(h.iter().all(|(_, r)| r.grant() == &a));
        let hab = store.history(&ab).unwrap();
        assert_eq!(hab.len(), 2);
        assert!(hab.iter().all(|(_, r)| r.grant() == &ab));
        assert_eq!(store.stats().records_appended, 6);
    }
}

#[test]
fn find_before_reads_one_grant_backwards_from_the_lsn_and_stops_at_the_first_answer() {
    for (_dir, store) in both() {
        let m = machine(&store);
        // "oidc/a" is a byte prefix of "oidc/ab": the reverse scan must keep them apart too.
        let a = GrantKey::new("oidc", "a").unwrap();
        let ab = GrantKey::new("oidc", "ab").unwrap();
        let a1 = put(&store, install(&m, None, &a, T0));
        let ab1 = put(&store, install(&m, None, &ab, T0));
        let a2 = put(&store, attempt(&m, &a1, T0 + 1));
        put(&store, attempt(&m, &ab1, T0 + 1));
        put(&store, install(&m, Some(&a2), &a, T0 + 2));
        put(&store, install(&m, None, &GrantKey::new("oidc", "b").unwrap(), T0 + 3));

        let h = store.history(&a).unwrap();
        assert_eq!(h.len(), 4);
        let seen_before = |g: &GrantKey, lsn: u64| {
            let mut seen = Vec::new();
            let none: Option<()> = store
                .find_before(g, lsn, |r| {
                    seen.push((r.kind_name(), r.at(), r.grant().clone()));
                    None
                })
                .unwrap();
            assert!(none.is_none());
            seen
        };
        // Exactly the grant's records before `lsn`, newest first.
        for (i, (lsn, _)) in h.iter().enumerate().chain([(h.len(), &(u64::MAX, h[0].1.clone()))]) {
            let want: Vec<_> = h[..i].iter().rev().map(|(_, r)| (r.kind_name(), r.at(), r.grant().clone())).collect();
            assert_eq!(seen_before(&a, *lsn), want, "before {lsn}");
        }
        let ab_seen = seen_before(&ab, u64::MAX);
        assert_eq!(ab_seen.len(), 2);
        assert!(ab_seen.iter().all(|(_, _, g)| g == &ab));
        assert!(seen_before(&GrantKey::new("oidc", "c").unwrap(), u64::MAX).is_empty());

        // It stops at the first answer: the newest record (resolved), then the installed one.
        let mut reads = 0;
        let got = store
            .find_before(&a, u64::MAX, |r| {
                reads += 1;
                matches!(r, Record::Installed { .. }).then(|| r.at())
            })
            .unwrap();
        assert_eq!((got, reads), (Some(UnixMillis(T0 + 2)), 2));
    }
}

#[test]
fn compaction_drops_old_records_in_chunks_and_keeps_states() {
    for (store, _dir) in [(Store::in_memory_with(cfg_compact()), None), {
        let dir = tempfile::tempdir().unwrap();
        (Store::open(dir.path().join("s"), &ring(), cfg_compact()).unwrap().0, Some(dir))
    }] {
        let m = machine(&store);
        for i in 0..5 {
            put(&store, install(&m, None, &key(i), T0 + 1000 * i as u64));
        }
        // Cutoff T0+2000: the records at T0 and T0+1000 go; the one at exactly the cutoff stays.
        let r = store.compact(UnixMillis(T0 + 2000 + 10_000)).unwrap();
        assert_eq!((r.removed, r.more, r.cutoff), (2, true, UnixMillis(T0 + 2000)));
        let r = store.compact(UnixMillis(T0 + 2000 + 10_000)).unwrap();
        assert_eq!((r.removed, r.more), (0, false));
        assert!(store.history(&key(0)).unwrap().is_empty());
        assert!(store.history(&key(1)).unwrap().is_empty());
        assert_eq!(store.history(&key(2)).unwrap().len(), 1);

        let r = store.compact(UnixMillis(T0 + 5000 + 10_000)).unwrap();
        assert_eq!((r.removed, r.more), (2, true));
        let r = store.compact(UnixMillis(T0 + 5000 + 10_000)).unwrap();
        assert_eq!((r.removed, r.more), (1, false));
        assert_eq!(store.stats().compacted, 5);
        for i in 0..5 {
            assert_eq!(store.get(&key(i)).unwrap().unwrap().version, 1, "compaction never deletes states");
            assert!(store.history(&key(i)).unwrap().is_empty());
        }
        assert_eq!(store.grant_count(), 5);
    }
}

#[test]
fn trimming_keeps_a_grants_newest_records_and_what_a_cursor_needs() {
    for (store, _dir) in [(Store::in_memory_with(cfg_compact()), None), {
        let dir = tempfile::tempdir().unwrap();
        (Store::open(dir.path().join("s"), &ring(), cfg_compact()).unwrap().0, Some(dir))
    }] {
        let m = machine(&store);
        let (g, other) = (key(1), key(2));
        let mut s = put(&store, install(&m, None, &g, T0));
        put(&store, install(&m, None, &other, T0));
        for step in 1..10u64 {
            s = if s.phase.is_open() {
                put(&store, install(&m, Some(&s), &g, T0 + step))
            } else {
                put(&store, attempt(&m, &s, T0 + step))
            };
        }
        let before = store.history(&g).unwrap();
        assert!(before.len() >= 10, "{}", before.len());
        // A cursor below the second-newest-but-three record holds those back.
        let held = before[before.len() - 6].0;
        store.set_cursor("sink", held).unwrap();
        // Chunks of two (cfg_compact): call until a call deletes less than a chunk.
        let mut removed = 0;
        loop {
            let n = store.trim_history(&g, 3).unwrap();
            removed += n;
            if n < 2 {
                break;
            }
        }
        let after = store.history(&g).unwrap();
        let kept: Vec<u64> = after.iter().map(|(l, _)| *l).collect();
        let expected: Vec<u64> = before.iter().map(|(l, _)| *l).filter(|l| *l >= held).collect();
        assert_eq!(kept, expected, "the newest three and everything at or above the cursor");
        assert_eq!(removed, before.len() - expected.len());
        // Without the cursor, down to three; the other grant and every state are untouched.
        store.delete_cursor("sink").unwrap();
        while store.trim_history(&g, 3).unwrap() == 2 {}
        let after = store.history(&g).unwrap();
        assert_eq!(after, before[before.len() - 3..].to_vec());
        assert_eq!(store.history(&other).unwrap().len(), 1);
        assert_eq!(store.get(&g).unwrap().unwrap().version, s.version);
        // Their expiry entries went with them: retention compaction finds nothing of theirs left.
        let mut compacted = 0;
        loop {
            let r = store.compact(UnixMillis(T0 + 10 + 10_000)).unwrap();
            compacted += r.removed;
            if !r.more {
                break;
            }
        }
        assert_eq!(compacted, 4, "the three kept records and the other grant's: no expiry entry left behind");
    }
}

fn cfg_compact() -> StoreConfig {
    StoreConfig::default().with_retention(Duration::from_secs(10)).with_compact_chunk(2)
}

#[test]
fn lsns_stay_monotonic_after_compacting_everything_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let last_lsn;
    {
        let store = Store::open(&path, &ring(), cfg_compact()).unwrap().0;
        let m = machine(&store);
        let s = put(&store, install(&m, None, &key(1), T0));
        put(&store, attempt(&m, &s, T0 + 1));
        last_lsn = store.history(&key(1)).unwrap().last().unwrap().0;
        while store.compact(UnixMillis(T0 + 60_000)).unwrap().more {}
        assert!(store.history(&key(1)).unwrap().is_empty());
        // Make the compaction durable (compaction is not synced by itself).
        put(&store, install(&m, None, &key(2), T0 + 60_000));
    }
    let (store, report) = Store::open(&path, &ring(), cfg_compact()).unwrap();
    assert!(report.next_lsn > last_lsn + 1);
    let m = machine(&store);
    let s = store.get(&key(1)).unwrap().unwrap();
    put(
        &store,
        m.install(Some(&s), key(1), tokens(T0), InstallSource::Import, UnixMillis(T0 + 70_000))
            .transition()
            .write_batch()
            .unwrap(),
    );
    let h = store.history(&key(1)).unwrap();
    assert!(h.iter().all(|(lsn, _)| *lsn > last_lsn), "{h:?}");
}

#[test]
fn compaction_keeps_the_journal_bounded_under_continuous_refreshes() {
    let store = Store::in_memory_with(StoreConfig::default().with_retention(Duration::from_secs(60)));
    let m = machine(&store);
    let g = key(1);
    let mut s = put(&store, install(&m, None, &g, T0));
    let mut max_len = 0;
    for step in 1..2_000u64 {
        let now = T0 + step * 1000;
        s = if s.phase.is_open() {
            put(&store, install(&m, Some(&s), &g, now))
        } else {
            put(&store, attempt(&m, &s, now))
        };
        store.compact(UnixMillis(now)).unwrap();
        max_len = max_len.max(store.history(&g).unwrap().len());
    }
    // One minute of one step per second, at most two records a step.
    assert!(max_len <= 2 * 62, "journal grew to {max_len} records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let m = Arc::new(machine(&store));
    let n = 64;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (store, m) = (store.clone(), Arc::clone(&m));
        tasks.push(tokio::spawn(async move {
            let g = key(i);
            let s = install(&m, None, &g, T0);
            store.apply(s).await.unwrap();
            let s1 = store.get(&g).unwrap().unwrap();
            store.apply(attempt(&m, &s1, T0 + 1)).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.batches_applied, 2 * n as u64);
    assert_eq!(stats.syncs, stats.commit_groups);
    assert!(stats.syncs < n as u64, "{} syncs for {} batches", stats.syncs, 2 * n);
    assert_eq!(store.open_grants().unwrap().len(), n);
}

#[test]
fn queued_writers_are_committed_with_one_sync() {
    for (_dir, store) in both() {
        let m = machine(&store);
        let hold = store.hold_acks();
        let n = 64;
        let writers: Vec<_> = (0..n).map(|i| spawn_write(&store, install(&m, None, &key(i), T0))).collect();
        assert!(hold.wait_parked(WAIT));
        wait_submitted(&store, n as u64);
        hold.release();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        let stats = store.stats();
        // The parked group, then one group with everything queued behind it.
        assert_eq!(stats.batches_applied, n as u64);
        assert!(stats.syncs <= 2, "{stats:?}");
        assert_eq!(store.grant_count(), n);
    }
}

#[test]
fn readers_see_only_durable_state() {
    for (_dir, store) in both() {
        let m = machine(&store);
        let g = key(1);
        let s1 = put(&store, install(&m, None, &g, T0));

        // Applied but not synced: every reader still sees version 1.
        let hold = store.hold_acks();
        let w = spawn_write(&store, attempt(&m, &s1, T0 + 1));
        assert!(hold.wait_parked(WAIT));
        assert_eq!(store.get(&g).unwrap().unwrap().version, 1);
        assert!(store.open_grants().unwrap().is_empty());
        assert_eq!(store.history(&g).unwrap().len(), 1);
        let mut seen = Vec::new();
        store.for_each_grant(|s| seen.push(s.version)).unwrap();
        assert_eq!(seen, [1]);
        hold.release();
        w.join().unwrap().unwrap();
        assert_eq!(store.get(&g).unwrap().unwrap().version, 2);
        assert_eq!(store.open_grants().unwrap().len(), 1);
        assert_eq!(store.history(&g).unwrap().len(), 2);

        // A new grant is invisible until durable.
        let s2 = store.get(&g).unwrap().unwrap();
        let hold = store.hold_acks();
        let w = spawn_write(&store, install(&m, None, &key(2), T0));
        assert!(hold.wait_parked(WAIT));
        assert_eq!(store.get(&key(2)).unwrap(), None);
        assert_eq!(store.grant_count(), 1);
        let mut seen = Vec::new();
        store.for_each_grant(|s| seen.push(s.grant)).unwrap();
        assert_eq!(seen, std::slice::from_ref(&g));
        hold.release();
        w.join().unwrap().unwrap();

        // Leaving the open index is invisible until durable too.
        let hold = store.hold_acks();
        let w = spawn_write(&store, install(&m, Some(&s2), &g, T0 + 2));
        assert!(hold.wait_parked(WAIT));
        assert_eq!(versions(&store.open_grants().unwrap()), vec![(g.clone(), 2)]);
        assert_eq!(store.history(&g).unwrap().len(), 2);
        hold.release();
        w.join().unwrap().unwrap();
        assert!(store.open_grants().unwrap().is_empty());
        assert_eq!(store.grant_count(), 2);
    }
}

#[test]
fn crash_image_holds_only_acknowledged_writes() {
    let store = Store::in_memory();
    let m = machine(&store);
    let a1 = put(&store, install(&m, None, &key(1), T0));
    let hold = store.hold_acks();
    let w = {
        let store = store.clone();
        let (b1, b2) = (attempt(&m, &a1, T0 + 1), install(&m, None, &key(2), T0 + 1));
        thread::spawn(move || (store.apply_blocking(b1), store.apply_blocking(b2)))
    };
    assert!(hold.wait_parked(WAIT));
    let crashed = store.crash_image();
    hold.release();
    let (r1, r2) = w.join().unwrap();
    r1.unwrap();
    r2.unwrap();

    assert_eq!(crashed.get(&key(1)).unwrap().unwrap().version, 1);
    assert_eq!(crashed.get(&key(2)).unwrap(), None);
    assert!(crashed.open_grants().unwrap().is_empty());
    assert_eq!(crashed.history(&key(1)).unwrap().len(), 1);
    assert_eq!(crashed.grant_count(), 1);
    assert_eq!(crashed.fingerprint_key().expose_secret(), store.fingerprint_key().expose_secret());
    // The crash image is a working store; its LSNs continue after what it holds.
    let c2 = put(&crashed, attempt(&m, &a1, T0 + 5));
    assert_eq!(c2.version, 2);
    assert_eq!(crashed.history(&key(1)).unwrap().len(), 2);

    // After the acks, a crash image has everything.
    let later = store.crash_image();
    assert_eq!(later.get(&key(1)).unwrap().unwrap().version, 2);
    assert_eq!(later.grant_count(), 2);
    assert_eq!(later.open_grants().unwrap().len(), 1);
}

fn assert_poisoned(store: &Store, m: &Machine) {
    assert!(store.is_poisoned());
    assert!(matches!(store.apply_blocking(install(m, None, &key(99), T0)), Err(StoreError::Poisoned)));
    assert!(matches!(store.get(&key(1)), Err(StoreError::Poisoned)));
    assert!(matches!(store.open_grants(), Err(StoreError::Poisoned)));
    assert!(matches!(store.history(&key(1)), Err(StoreError::Poisoned)));
    assert!(matches!(store.compact(UnixMillis(T0)), Err(StoreError::Poisoned)));
}

#[test]
fn a_failed_sync_poisons_the_store_and_reopening_recovers() {
    for point in [FaultPoint::Sync, FaultPoint::AfterWrite, FaultPoint::BeforeWrite] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        {
            let store = open(&path);
            let m = machine(&store);
            let a1 = put(&store, install(&m, None, &key(1), T0));
            store.inject_fault(point, 2);
            let a2 = put(&store, attempt(&m, &a1, T0 + 1));
            let err = store.apply_blocking(install(&m, Some(&a2), &key(1), T0 + 2)).unwrap_err();
            assert!(matches!(err, StoreError::Io { .. }) && err.may_be_durable(), "{point:?}: {err:?}");
            assert_poisoned(&store, &m);
        }
        // Reopen: the failed write may or may not be there, and everything is consistent.
        let store = open(&path);
        let s = store.get(&key(1)).unwrap().unwrap();
        assert!(s.version == 2 || s.version == 3, "{point:?}: {}", s.version);
        if point == FaultPoint::BeforeWrite {
            assert_eq!(s.version, 2);
        }
        let open_now = store.open_grants().unwrap();
        assert_eq!(open_now.len(), usize::from(s.phase.is_open()));
        assert_eq!(store.history(&key(1)).unwrap().len() as u64, if s.version == 2 { 2 } else { 4 });
        let m = machine(&store);
        put(&store, install(&m, Some(&s), &key(1), T0 + 3));
        assert!(!store.is_poisoned());
    }
}

#[test]
fn memory_fail_stop_keeps_the_unsynced_write_out_of_the_crash_image() {
    for point in [FaultPoint::Sync, FaultPoint::AfterWrite] {
        let store = Store::in_memory();
        let m = machine(&store);
        let a1 = put(&store, install(&m, None, &key(1), T0));
        store.inject_fault(point, 1);
        let err = store.apply_blocking(attempt(&m, &a1, T0 + 1)).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert_poisoned(&store, &m);
        let crashed = store.crash_image();
        assert_eq!(crashed.get(&key(1)).unwrap().unwrap().version, 1);
        assert!(crashed.open_grants().unwrap().is_empty());
        put(&crashed, attempt(&m, &a1, T0 + 2));
    }
}

/// Opens the store's sled database directly, waiting for the dropped store's sled to let go of it
/// (sled 0.34.7 releases its lock from background threads).
fn raw_sled(path: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
}

fn flip(tree: &sled::Tree, key: &[u8], at: usize) {
    let mut v = tree.get(key).unwrap().unwrap().to_vec();
    let i = at.min(v.len() - 1);
    v[i] ^= 0x5a;
    tree.insert(key, v).unwrap();
}

#[test]
fn corrupt_frames_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (a, b) = (key(1), key(2));
    {
        let store = open(&path);
        let m = machine(&store);
        let a1 = put(&store, install(&m, None, &a, T0));
        put(&store, attempt(&m, &a1, T0 + 1));
        let b1 = put(&store, install(&m, None, &b, T0));
        let b2 = put(&store, attempt(&m, &b1, T0 + 1));
        put(&store, install(&m, Some(&b2), &b, T0 + 2));
    }
    let b_first_lsn;
    {
        let db = raw_sled(&path);
        flip(&db.open_tree(layout::GRANTS).unwrap(), &a.to_bytes(), 20);
        let history = db.open_tree(layout::HISTORY).unwrap();
        let (k, _) = history.scan_prefix(layout::history_prefix(&b.to_bytes())).next().unwrap().unwrap();
        b_first_lsn = layout::trailing_lsn(&k).unwrap();
        flip(&db.open_tree(layout::JOURNAL).unwrap(), &layout::journal_key(b_first_lsn), 9);
        db.flush().unwrap();
    }
    {
        let (store, report) = Store::open(&path, &ring(), StoreConfig::default()).unwrap();
        assert_eq!(report.corrupt, vec![format!("grants/{a}")]);
        assert_eq!(report.open_attempts, 0);
        let err = store.get(&a).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { what, .. } if what == &format!("grants/{a}")), "{err:?}");
        assert_eq!(store.get(&b).unwrap().unwrap().version, 3);
        assert!(store.open_grants().unwrap().is_empty());
        let mut seen = Vec::new();
        let scan = store.for_each_grant(|s| seen.push(s.grant)).unwrap();
        assert_eq!((seen, scan.corrupt), (vec![b.clone()], vec![format!("grants/{a}")]));
        assert_eq!(store.history(&a).unwrap().len(), 2, "a's journal is intact");
        let err = store.history(&b).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { what, .. } if what == &format!("journal/{b_first_lsn}")));

        // A write over a corrupt state is refused (never guessed), and does not poison.
        let m = machine(&store);
        let fake = GrantState { version: 2, ..store.get(&b).unwrap().unwrap() }.clone_with_grant(a.clone());
        let err = store.apply_blocking(install(&m, Some(&fake), &a, T0 + 3)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert_eq!(store.stats().corrupt_refusals, 1);
        let b3 = store.get(&b).unwrap().unwrap();
        put(&store, attempt(&m, &b3, T0 + 4));
        assert!(!store.is_poisoned());
    }
    let cfg = StoreConfig::default().with_recovery(RecoveryMode::SkipCorruptRecords);
    let (store, _) = Store::open(&path, &ring(), cfg).unwrap();
    let h = store.history_report(&b).unwrap();
    assert_eq!(h.skipped, vec![b_first_lsn]);
    let kinds: Vec<_> = h.records.iter().map(|(_, r)| r.kind_name()).collect();
    assert_eq!(kinds, ["intent", "installed", "resolved", "intent"]);
}

#[test]
fn memory_corruption_is_quarantined_too() {
    let store = Store::in_memory();
    let m = machine(&store);
    let a1 = put(&store, install(&m, None, &key(1), T0));
    put(&store, attempt(&m, &a1, T0 + 1));
    put(&store, install(&m, None, &key(2), T0));
    assert!(store.put_raw_for_test(layout::GRANTS, &key(1).to_bytes(), b"TS\x01garbage"));
    assert!(matches!(store.get(&key(1)), Err(StoreError::Corrupt { .. })));
    assert!(store.open_grants().unwrap().is_empty());
    let crashed = store.crash_image();
    assert_eq!(crashed.open_grants().unwrap().len(), 0);
    assert_eq!(crashed.get(&key(2)).unwrap().unwrap().version, 1);
}

#[test]
fn unknown_formats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = open(&path);
        let m = machine(&store);
        put(&store, install(&m, None, &key(1), T0));
    }
    {
        let db = raw_sled(&path);
        db.open_tree(layout::META).unwrap().insert(layout::META_FORMAT, "tokenwal-store/99\n").unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(&path, &ring(), StoreConfig::default()).unwrap_err();
    assert!(matches!(&err, StoreError::UnsupportedFormat { found, .. } if found == "tokenwal-store/99"), "{err:?}");
    assert!(err.to_string().contains("tokenwal-store/2"), "{err}");
    {
        let db = raw_sled(&path);
        db.open_tree(layout::META).unwrap().remove(layout::META_FORMAT).unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(&path, &ring(), StoreConfig::default()).unwrap_err();
    assert!(matches!(&err, StoreError::UnsupportedFormat { found, .. } if found == "(missing)"), "{err:?}");
}

#[cfg(unix)]
#[test]
fn a_created_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("store");
    let (_store, report) = Store::open(&path, &ring(), StoreConfig::default()).unwrap();
    assert!(report.created);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn one_open_at_a_time_and_the_key_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let key_bytes;
    {
        let (store, report) = Store::open(&path, &ring(), StoreConfig::default()).unwrap();
        assert!(report.created);
        key_bytes = *store.fingerprint_key().expose_secret();
        let err = Store::open(&path, &ring(), StoreConfig::default()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let m = machine(&store);
        put(&store, install(&m, None, &key(1), T0));
    }
    let (store, report) = Store::open(&path, &ring(), StoreConfig::default()).unwrap();
    assert!(!report.created);
    assert_eq!(store.fingerprint_key().expose_secret(), &key_bytes);
    assert_ne!(Store::in_memory().fingerprint_key().expose_secret(), &key_bytes);
    assert_eq!((store.grant_count(), report.grants), (1, 1));
}

#[test]
fn inconsistent_batches_are_refused_before_the_queue() {
    let store = Store::in_memory();
    let m = machine(&store);
    let mut b = install(&m, None, &key(1), T0);
    b.grant = key(2).to_bytes();
    assert!(matches!(store.apply_blocking(b), Err(StoreError::InvalidBatch { .. })));
    let mut b = install(&m, None, &key(1), T0);
    b.open = true;
    assert!(matches!(store.apply_blocking(b), Err(StoreError::InvalidBatch { .. })));
    let mut b = install(&m, None, &key(1), T0);
    b.state[10] ^= 1;
    assert!(matches!(store.apply_blocking(b), Err(StoreError::Codec(_))));
    let mut b = install(&m, None, &key(1), T0);
    b.records[0].0 = UnixMillis(1);
    assert!(matches!(store.apply_blocking(b), Err(StoreError::InvalidBatch { .. })));
    assert_eq!(store.stats().submitted, 0);
    assert!(!store.is_poisoned());
}

#[test]
fn nothing_secret_in_errors_or_debug() {
    let store = Store::in_memory();
    let m = machine(&store);
    let s = put(&store, install(&m, None, &key(1), T0));
    let err = store.apply_blocking(install(&m, None, &key(1), T0)).unwrap_err();
    put(&store, attempt(&m, &s, T0 + 1));
    store.put_raw_for_test(layout::GRANTS, &key(1).to_bytes(), &install(&m, None, &key(1), T0).state[..40]);
    let corrupt = store.get(&key(1)).unwrap_err();
    for text in [format!("{err} {err:?}"), format!("{corrupt} {corrupt:?}"), format!("{store:?}")] {
        assert!(!text.contains("shprt_") && !text.contains("shpat_"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_as_the_cores_durable_log() {
    let store = Store::in_memory();
    let m = machine(&store);
    let now = UnixMillis(T0);
    let installed = m.install(None, key(1), tokens(T0), InstallSource::Import, now).make_durable(&store).await.unwrap();
    let permit = m.plan_attempt(installed.state(), now).unwrap().make_durable(&store).await.unwrap();
    assert_eq!(store.get(&key(1)).unwrap().as_ref(), Some(permit.state()));
    let outcome = Outcome::Success { tokens: tokens(T0 + 1), request_id: Some("r1".into()) };
    let done = m.on_outcome(permit.state(), &permit, outcome, now, 0).make_durable(&store).await.unwrap();
    assert_eq!(done.state().generation, Generation(2));
    assert!(store.open_grants().unwrap().is_empty());
    assert_eq!(store.history(&key(1)).unwrap().len(), 3);
}

#[test]
fn dropping_the_store_while_acks_are_held_does_not_hang() {
    let store = Store::in_memory();
    let m = machine(&store);
    let hold = store.hold_acks();
    let w = spawn_write(&store, install(&m, None, &key(1), T0));
    assert!(hold.wait_parked(WAIT));
    drop(store);
    // The writer's clone keeps the store alive; releasing lets it finish and the last drop joins.
    drop(hold);
    w.join().unwrap().unwrap();
}

/// Parks a first write at the hold, queues `rest` behind it, then releases: `rest` forms one group.
fn park_then_queue(store: &Store, first: WriteBatch, rest: Vec<WriteBatch>) -> Vec<Result<(), StoreError>> {
    let hold = store.hold_acks();
    // Waiting for each submission in turn makes the queue order the order given.
    let mut count = store.stats().submitted;
    let mut writers = vec![spawn_write(store, first)];
    assert!(hold.wait_parked(WAIT));
    count += 1;
    wait_submitted(store, count);
    for b in rest {
        writers.push(spawn_write(store, b));
        count += 1;
        wait_submitted(store, count);
    }
    hold.release();
    writers.into_iter().map(|w| w.join().unwrap()).collect()
}

#[test]
fn a_conflict_in_a_group_answers_only_its_writer() {
    for (_dir, store) in both() {
        let m = machine(&store);
        let a1 = put(&store, install(&m, None, &key(1), T0));
        let syncs = store.stats().syncs;
        let results = park_then_queue(
            &store,
            attempt(&m, &a1, T0 + 1),
            vec![install(&m, None, &key(2), T0), attempt(&m, &a1, T0 + 2), install(&m, None, &key(3), T0)],
        );
        assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok(), "{results:?}");
        assert!(matches!(results[2], Err(StoreError::Conflict { found: Some(2), .. })), "{results:?}");
        assert_eq!(store.stats().syncs - syncs, 2);
        assert_eq!(store.grant_count(), 3);
        assert_eq!(store.history(&key(1)).unwrap().len(), 2);
        assert!(!store.is_poisoned());
    }
}

/// Writes queued behind a group whose sync fails are refused, never acknowledged: `Poisoned` when
/// the committer had not written them yet, or the failed sync's own error ("may be durable") when
/// it wrote them while that sync ran — with sled's pipelined sync the committer may take them
/// before the test's hold parks it (found by CI: all three answered the sync's error).
#[test]
fn writes_queued_behind_a_failed_sync_are_refused() {
    for (_dir, store) in both() {
        let m = machine(&store);
        store.inject_fault(FaultPoint::Sync, 1);
        let results = park_then_queue(
            &store,
            install(&m, None, &key(1), T0),
            vec![install(&m, None, &key(2), T0), install(&m, None, &key(3), T0)],
        );
        assert!(matches!(results[0], Err(StoreError::Io { op: "sync", .. })), "{results:?}");
        for r in &results[1..] {
            assert!(matches!(r, Err(StoreError::Poisoned | StoreError::Io { op: "sync", .. })), "{results:?}");
        }
        assert_eq!(store.stats().syncs, 0);
        assert!(store.is_poisoned());
    }
}

/// sled syncs a group on a second thread while the committer writes the next one. A group written
/// while the one before it is being synced stays invisible to readers (state, open index, journal
/// end) until its own sync, even after the earlier group is synced and answered.
#[test]
fn a_group_written_during_the_previous_sync_stays_hidden_until_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let m = machine(&store);
    let a1 = put(&store, install(&m, None, &key(1), T0));
    let hold = store.hold_syncs();
    // Group A (an intent on grant 1) parks at its sync.
    let a_end = store.journal_end().unwrap();
    let a = spawn_write(&store, attempt(&m, &a1, T0 + 1));
    assert!(hold.wait_parked(WAIT));
    // Group B (a new grant 2) is written meanwhile: live in sled, not durable.
    let b = spawn_write(&store, install(&m, None, &key(2), T0));
    let deadline = std::time::Instant::now() + WAIT;
    while store.shared().backend.get(layout::Tree::Grants, key(2).to_bytes().as_slice()).unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "group B was not written while A's sync was held");
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(store.get(&key(1)).unwrap().unwrap().version, a1.version);
    assert!(store.get(&key(2)).unwrap().is_none());
    assert_eq!(store.journal_end().unwrap(), a_end);
    // A is synced and answered; B waits at its own sync.
    hold.step();
    a.join().unwrap().unwrap();
    assert!(hold.wait_parked(WAIT));
    assert_eq!(store.get(&key(1)).unwrap().unwrap().version, a1.version + 1);
    assert_eq!(store.open_grants().unwrap().len(), 1);
    assert!(store.get(&key(2)).unwrap().is_none(), "B is visible before its sync");
    assert_eq!(store.journal_end().unwrap(), a_end + 1);
    assert_eq!(store.stats().syncs, 2);
    hold.release();
    b.join().unwrap().unwrap();
    assert!(store.get(&key(2)).unwrap().is_some());
    assert_eq!(store.journal_end().unwrap(), a_end + 2);
    assert_eq!(store.stats().syncs, 3);
}

/// With the pipelined sync, a group that writes a grant of the group being synced is written only
/// after that sync: otherwise the earlier group's sync would drop the grant's pre-image and expose
/// the later, unsynced write.
#[test]
fn a_group_writing_a_grant_of_the_group_being_synced_waits_for_that_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let m = machine(&store);
    let a1 = put(&store, install(&m, None, &key(1), T0));
    let hold = store.hold_syncs();
    let intent = attempt(&m, &a1, T0 + 1);
    let a2 = state_of(&intent);
    let a = spawn_write(&store, intent);
    assert!(hold.wait_parked(WAIT));
    // Queued behind A on the same grant.
    let submitted = store.stats().submitted;
    let c = spawn_write(&store, install(&m, Some(&a2), &key(1), T0 + 2));
    wait_submitted(&store, submitted + 1);
    hold.step();
    a.join().unwrap().unwrap();
    // C is written now and waits for its own sync: readers still see A's state.
    assert!(hold.wait_parked(WAIT));
    assert_eq!(store.get(&key(1)).unwrap().unwrap().version, a2.version, "C is visible before its sync");
    hold.release();
    c.join().unwrap().unwrap();
    assert_eq!(store.get(&key(1)).unwrap().unwrap().version, a2.version + 1);
}

// ------------------------------------------------------------------------------------ sealing

/// Every byte of every file under `dir`, recursively.
fn all_bytes(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Installs, refreshes (intent + commit with new tokens) and re-installs a few grants on a sled
/// store; returns the token strings it stored and the fingerprint key.
fn write_tokens(store: &Store) -> Vec<String> {
    let m = machine(store);
    let mut secrets = Vec::new();
    for i in 0..5 {
        let g = key(i);
        let now = T0 + i as u64 * 10;
        let s1 = put(store, install(&m, None, &g, now));
        let s2 = put(store, attempt(&m, &s1, now + 1));
        put(store, install(&m, Some(&s2), &g, now + 2));
        for t in [now, now + 2] {
            let ts = tokens(t);
            secrets.push(ts.access_token.expose_secret().to_owned());
            secrets.push(ts.refresh_token.expose_secret().to_owned());
        }
    }
    secrets
}

#[test]
fn the_files_on_disk_hold_no_token_and_no_fingerprint_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (secrets, fingerprint) = {
        let store = open(&path);
        let s = write_tokens(&store);
        (s, *store.fingerprint_key().expose_secret())
    };
    let files = all_bytes(&path);
    assert!(files.iter().map(|(_, b)| b.len()).sum::<usize>() > 1000, "sled wrote its files");
    for (p, bytes) in &files {
        for s in &secrets {
            assert!(!contains(bytes, s.as_bytes()), "{s} is in the clear in {}", p.display());
        }
        assert!(!contains(bytes, &fingerprint), "the fingerprint key is in the clear in {}", p.display());
        assert!(!contains(bytes, b"shprt_secret") && !contains(bytes, b"shpat_secret"), "{}", p.display());
    }
    // The states are still there, and read back.
    let store = open(&path);
    assert_eq!(store.get(&key(3)).unwrap().unwrap().version, 3);
}

#[cfg(unix)]
#[test]
fn the_files_in_the_store_directory_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = open(&path);
        write_tokens(&store);
    }
    // A file that was made readable by others is tightened again at the next open.
    std::fs::set_permissions(path.join("db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = open(&path);
    for (p, _) in all_bytes(&path) {
        if p.parent() == Some(path.as_path()) {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", p.display());
        }
    }
    assert_eq!(std::fs::metadata(path.join("db")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(path.join(layout::LOCK_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_state_moved_to_another_grant_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (a, b) = (key(1), key(2));
    {
        let store = open(&path);
        let m = machine(&store);
        put(&store, install(&m, None, &a, T0));
        put(&store, install(&m, None, &b, T0 + 5));
    }
    {
        let db = raw_sled(&path);
        let grants = db.open_tree(layout::GRANTS).unwrap();
        // An intact envelope (its checksum holds), sealed for `a`, now stored under `b`.
        let a_sealed = grants.get(a.to_bytes()).unwrap().unwrap();
        grants.insert(b.to_bytes(), a_sealed).unwrap();
        db.flush().unwrap();
    }
    let store = open(&path);
    let err = store.get(&b).unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { what, .. } if what == &format!("grants/{b}")), "{err:?}");
    assert!(err.to_string().contains("another grant"), "{err}");
    assert_eq!(store.get(&a).unwrap().unwrap().grant, a);
    // And a write over it is refused: it is never taken for b's state.
    let m = machine(&store);
    let err = store.apply_blocking(install(
        &m,
        Some(&store.get(&a).unwrap().unwrap().clone_with_grant(b.clone())),
        &b,
        T0 + 9,
    ));
    assert!(matches!(err, Err(StoreError::Corrupt { .. })), "{err:?}");
}

#[test]
fn a_tampered_ciphertext_is_corrupt_for_that_grant_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (a, b) = (key(1), key(2));
    {
        let store = open(&path);
        let m = machine(&store);
        let a1 = put(&store, install(&m, None, &a, T0));
        put(&store, attempt(&m, &a1, T0 + 1));
        put(&store, install(&m, None, &b, T0));
    }
    {
        let db = raw_sled(&path);
        let grants = db.open_tree(layout::GRANTS).unwrap();
        let mut v = grants.get(a.to_bytes()).unwrap().unwrap().to_vec();
        v[50] ^= 0x01; // a ciphertext byte…
        let end = v.len() - 4;
        let crc = crc32fast::hash(&v[..end]).to_le_bytes();
        v[end..].copy_from_slice(&crc); // …with the checksum made to match: only the tag can tell
        grants.insert(a.to_bytes(), v).unwrap();
        db.flush().unwrap();
    }
    let (store, report) = Store::open(&path, &ring(), StoreConfig::default()).unwrap();
    assert_eq!(report.corrupt, vec![format!("grants/{a}")], "a was open: reported by name at open");
    let err = store.get(&a).unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { what, .. } if what == &format!("grants/{a}")), "{err:?}");
    assert!(err.to_string().contains("authentication"), "{err}");
    assert_eq!(store.get(&b).unwrap().unwrap().version, 1);
    let mut seen = Vec::new();
    let scan = store.for_each_grant(|s| seen.push(s.grant)).unwrap();
    assert_eq!((seen, scan.corrupt), (vec![b.clone()], vec![format!("grants/{a}")]));
}

#[test]
fn a_missing_or_wrong_key_is_named_never_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let old = KeyRing::ephemeral();
    let fingerprint = {
        let (store, _) = Store::open(&path, &old, StoreConfig::default()).unwrap();
        let m = machine(&store);
        put(&store, install(&m, None, &key(1), T0));
        *store.fingerprint_key().expose_secret()
    };
    let other = KeyRing::ephemeral();
    let err = Store::open(&path, &other, StoreConfig::default()).unwrap_err();
    match &err {
        StoreError::KeyUnavailable { what, key_id, ring } => {
            assert_eq!(what, "meta/fingerprint_key");
            assert_eq!(*key_id, old.active_id());
            assert_eq!(ring, &other.ids());
        }
        e => panic!("{e:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&old.active_id().to_string()) && !text.contains("corrupt"), "{text}");

    // The old key as a read-only key of a rotated ring: everything opens, the fingerprint key is
    // re-sealed under the new key at once, the grant stays readable until rekeyed.
    let rotated = other.rotated(crate::StoreKey::generate()).rotated_with_old(&old);
    let (store, _) = Store::open(&path, &rotated, StoreConfig::default()).unwrap();
    assert_eq!(store.fingerprint_key().expose_secret(), &fingerprint);
    assert_eq!(store.get(&key(1)).unwrap().unwrap().version, 1);
    let usage = store.key_usage().unwrap();
    assert_eq!(usage.fingerprint_key, Some(rotated.active_id()));
    assert_eq!(usage.grants.get(&old.active_id()), Some(&1));
    assert_eq!(usage.remaining_under_other_keys(rotated.active_id()), 1);
}

#[test]
fn rekey_interrupted_at_any_grant_then_rerun_leaves_everything_under_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let old = KeyRing::ephemeral();
    let n = 12;
    let before: Vec<GrantState> = {
        let (store, _) = Store::open(&path, &old, StoreConfig::default()).unwrap();
        let m = machine(&store);
        for i in 0..n {
            let s = put(&store, install(&m, None, &key(i), T0 + i as u64));
            if i % 3 == 0 {
                put(&store, attempt(&m, &s, T0 + 100)); // some grants are open (Refreshing)
            }
        }
        (0..n).map(|i| store.get(&key(i)).unwrap().unwrap()).collect()
    };
    let new_key = crate::StoreKey::generate();
    let both = KeyRing::from_keys([new_key.clone(), crate::StoreKey::generate()]).unwrap().rotated_with_old(&old);
    // First run: stops after 5 grants (a kill between two re-seals; each one is durable).
    {
        let (store, _) = Store::open(&path, &both, StoreConfig::default()).unwrap();
        for g in store.grants_under_old_keys().unwrap().into_iter().take(5) {
            assert_eq!(store.reseal_blocking(&g).unwrap(), crate::Reseal::Resealed);
        }
    }
    {
        let (store, report) = Store::open(&path, &both, StoreConfig::default()).unwrap();
        assert!(report.corrupt.is_empty());
        assert_eq!(store.open_grants().unwrap().len(), n.div_ceil(3));
        for (i, s) in before.iter().enumerate() {
            assert_eq!(&store.get(&key(i)).unwrap().unwrap(), s, "a mix reads with both keys");
        }
        let usage = store.key_usage().unwrap();
        assert_eq!(usage.remaining_under_other_keys(both.active_id()), n - 5);
        // The re-run finishes the job; a second pass finds nothing to do.
        for g in store.grants_under_old_keys().unwrap() {
            assert_eq!(store.reseal_blocking(&g).unwrap(), crate::Reseal::Resealed);
        }
        assert!(store.grants_under_old_keys().unwrap().is_empty());
        assert_eq!(store.reseal_blocking(&key(0)).unwrap(), crate::Reseal::AlreadyActive);
        assert_eq!(store.key_usage().unwrap().remaining_under_other_keys(both.active_id()), 0);
    }
    // The old key dropped: everything reads, and writing goes on.
    let (store, report) = Store::open(&path, &KeyRing::new(new_key), StoreConfig::default()).unwrap();
    assert!(report.corrupt.is_empty());
    assert_eq!(report.open_attempts, n.div_ceil(3));
    for (i, s) in before.iter().enumerate() {
        assert_eq!(&store.get(&key(i)).unwrap().unwrap(), s);
    }
    let m = machine(&store);
    let s1 = store.get(&key(1)).unwrap().unwrap();
    put(&store, attempt(&m, &s1, T0 + 200));
    assert_eq!(store.get(&key(1)).unwrap().unwrap().version, s1.version + 1);
}

#[test]
fn a_reseal_cut_by_a_crash_before_its_sync_leaves_the_old_seal_readable() {
    let store = Store::in_memory();
    let m = machine(&store);
    put(&store, install(&m, None, &key(1), T0));
    let s = store.get(&key(1)).unwrap().unwrap();
    // The in-memory store's key is ephemeral: rotate it by reopening a crash image under a ring
    // holding a new active key and the old one.
    let old_ids = store.key_ids();
    let store2 = store.crash_image_with_keys(|r| r.rotated(crate::StoreKey::generate()));
    assert_eq!(store2.key_ids()[1..], old_ids[..]);
    let hold = store2.hold_acks();
    let s2 = store2.clone();
    let t = thread::spawn(move || s2.reseal_blocking(&key(1)));
    assert!(hold.wait_parked(WAIT));
    // Written, not synced: a crash now finds the old seal, which the ring still opens.
    let crashed = store2.crash_image();
    assert_eq!(crashed.get(&key(1)).unwrap().unwrap(), s);
    assert_eq!(crashed.key_usage().unwrap().grants.get(&old_ids[0]), Some(&1));
    // Readers of the live store do not see the unsynced re-seal either way, and the state is equal.
    assert_eq!(store2.get(&key(1)).unwrap().unwrap(), s);
    hold.release();
    assert_eq!(t.join().unwrap().unwrap(), crate::Reseal::Resealed);
    assert_eq!(store2.crash_image().key_usage().unwrap().grants.get(&store2.key_ids()[0]), Some(&1));
    assert_eq!(crashed.reseal_blocking(&key(1)).unwrap(), crate::Reseal::Resealed, "the re-run finishes it");
}

#[test]
fn a_format_1_store_is_refused_clearly_and_upgrades_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (a, b) = (key(1), key(2));
    // Build a format-1 store by hand: plaintext state frames and a plaintext fingerprint key.
    let frames = {
        let m = Machine::shopify(FingerprintKey::from_bytes([9u8; 32]));
        let a1 = install(&m, None, &a, T0);
        let b1 = install(&m, None, &b, T0);
        let db = raw_sled(&path);
        let meta = db.open_tree(layout::META).unwrap();
        meta.insert(layout::META_FINGERPRINT_KEY, &[9u8; 32]).unwrap();
        meta.insert(layout::META_GRANT_COUNT, &2u64.to_be_bytes()).unwrap();
        meta.insert(layout::META_LSN_FLOOR, &0u64.to_be_bytes()).unwrap();
        meta.insert(layout::META_FORMAT, layout::FORMAT_1.as_bytes()).unwrap();
        let grants = db.open_tree(layout::GRANTS).unwrap();
        grants.insert(a.to_bytes(), a1.state.clone()).unwrap();
        grants.insert(b.to_bytes(), b1.state.clone()).unwrap();
        db.flush().unwrap();
        (state_of(&a1), state_of(&b1))
    };
    let err = Store::open(&path, &ring(), StoreConfig::default()).unwrap_err();
    assert!(matches!(err, StoreError::PlaintextFormat { .. }), "{err:?}");
    assert!(err.to_string().contains("rekey --upgrade"), "{err}");
    assert_eq!(Store::upgrade_format1(&path, &ring(), StoreConfig::default()).unwrap(), 3);
    assert_eq!(Store::upgrade_format1(&path, &ring(), StoreConfig::default()).unwrap(), 0, "idempotent");
    let store = open(&path);
    assert_eq!(store.fingerprint_key().expose_secret(), &[9u8; 32]);
    assert_eq!((store.get(&a).unwrap().unwrap(), store.get(&b).unwrap().unwrap()), frames);
    // Tokens stored after the upgrade go through the same sealing as in any format-2 store.
    let (c, later) = (key(3), T0 + 7);
    put(&store, install(&machine(&store), None, &c, later));
    drop(store);
    let secret = |t: &TokenSet| [t.access_token.expose_secret().to_owned(), t.refresh_token.expose_secret().to_owned()];
    let (old, new) = (secret(&tokens(T0)), secret(&tokens(later)));
    // In place means every live value is now a sealed envelope under the active key, holding no
    // token in the clear: the upgraded ones and the later one, and the fingerprint key.
    {
        let db = raw_sled(&path);
        let grants = db.open_tree(layout::GRANTS).unwrap();
        assert_eq!(grants.len(), 3);
        for entry in grants.iter() {
            let (k, v) = entry.unwrap();
            let what = layout::key_name(layout::GRANTS, &k);
            let header = crate::seal::header(&v).unwrap_or_else(|e| panic!("{what} is not a sealed envelope: {e}"));
            assert_eq!(header.key_id, ring().active_id(), "{what}");
            for s in old.iter().chain(&new) {
                assert!(!contains(&v, s.as_bytes()), "{s} is in the clear in {what}");
            }
        }
        let fk = db.open_tree(layout::META).unwrap().get(layout::META_FINGERPRINT_KEY).unwrap().unwrap();
        assert!(crate::seal::header(&fk).is_ok() && !contains(&fk, &[9u8; 32]), "the fingerprint key is not sealed");
    }
    // And no file of the store directory holds a token the upgraded store wrote. The format-1
    // plaintext itself may survive in the free space of sled's log until sled reuses it (it does
    // here): docs/security.md tells operators to treat that disk and its backups as holding it.
    let files = all_bytes(&path);
    assert!(files.iter().map(|(_, b)| b.len()).sum::<usize>() > 1000, "sled wrote its files");
    for (p, bytes) in &files {
        for s in &new {
            assert!(!contains(bytes, s.as_bytes()), "{s} is in the clear in {}", p.display());
        }
    }
}

/// PostgreSQL only: what the database holds, several writers, leases and fencing, schema checks.
mod postgres_store {
    use super::*;
    use crate::{PgLocation, PgScratch};

    fn scratch() -> Option<PgScratch> {
        PgScratch::new("PostgreSQL store tests")
    }

    fn try_open(l: &PgLocation) -> Result<Store, StoreError> {
        Store::open_postgres(l, &ring(), StoreConfig::default()).map(|(s, _)| s)
    }

    #[test]
    fn the_database_holds_no_token_and_a_reopen_sees_every_acknowledged_write() {
        let Some(pg) = scratch() else { return };
        let store = open_pg(&pg.location());
        let m = machine(&store);
        let mut states = Vec::new();
        for i in 0..20 {
            let s = put(&store, install(&m, None, &key(i), T0 + i as u64));
            states.push(put(&store, attempt(&m, &s, T0 + 100)));
        }
        drop(store);
        for table in ["grants", "journal", "meta"] {
            let rows = pg.query_bytes(&format!("SELECT v FROM \"{}\".\"{table}\"", pg.schema())).unwrap();
            assert!(!rows.is_empty(), "{table}");
            for v in rows {
                assert!(!contains(&v, b"shpat_secret") && !contains(&v, b"shprt_secret"), "{table} holds a token");
            }
        }
        let store = open_pg(&pg.location());
        assert_eq!(store.grant_count(), 20);
        let open = store.open_grants().unwrap();
        assert_eq!(versions(&open).len(), 20, "every attempt is an open intent after the reopen");
        for s in &states {
            assert_eq!(store.get(&s.grant).unwrap().unwrap().version, s.version);
        }
    }

    /// Ends member `id`'s lease on the database's clock, as if its process had been frozen past it.
    fn expire(pg: &PgScratch, id: i64) {
        pg.execute(&format!(
            "UPDATE \"{}\".members SET expires = now() - interval '1 second' WHERE id = {id}",
            pg.schema()
        ))
        .unwrap();
    }

    #[test]
    fn two_processes_write_one_store_and_every_compare_and_swap_sees_the_others_writes() {
        let Some(pg) = scratch() else { return };
        let (a, b) = (open_pg(&pg.location()), open_pg(&pg.location()));
        assert!(a.is_shared() && a.member_id() != b.member_id());
        assert_eq!(b.members().unwrap().len(), 2);
        let m = machine(&a);
        let s1 = put(&a, install(&m, None, &key(1), T0));
        assert_eq!(b.get(&key(1)).unwrap().unwrap(), s1, "a write of one process is read by the other");
        let s2 = put(&b, attempt(&m, &s1, T0 + 1));
        // The first process, planning from what it read before, loses the compare-and-swap.
        let err = a.apply_blocking(attempt(&m, &s1, T0 + 2)).unwrap_err();
        assert!(matches!(err, StoreError::Conflict { expected: Some(1), found: Some(2), .. }), "{err:?}");
        assert_eq!(a.get(&key(1)).unwrap().unwrap(), s2);
        // LSNs are unique across the two writers: both histories are whole.
        put(&a, install(&m, None, &key(2), T0 + 3));
        assert_eq!(a.history(&key(1)).unwrap().len(), 2);
        assert_eq!(b.history(&key(2)).unwrap().len(), 1);
        let lsns: Vec<u64> = a.journal_from(0, 100).unwrap().iter().map(|(l, _)| *l).collect();
        assert_eq!(lsns.len(), 3, "{lsns:?}");
        assert!(lsns.windows(2).all(|w| w[0] < w[1]));
        assert!(!a.is_poisoned() && !b.is_poisoned());
    }

    #[test]
    fn concurrent_writers_of_the_same_new_grants_never_overwrite_each_other() {
        let Some(pg) = scratch() else { return };
        let stores: Vec<Arc<Store>> = (0..3).map(|_| Arc::new(open_pg(&pg.location()))).collect();
        let m = Arc::new(machine(&stores[0]));
        let won: Vec<usize> = stores
            .iter()
            .enumerate()
            .map(|(w, store)| {
                let (store, m) = (Arc::clone(store), Arc::clone(&m));
                thread::spawn(move || {
                    // Each writer installs the same 40 grants (each must not exist yet), from
                    // several threads so that its groups hold several batches.
                    let handles: Vec<_> = (0..4)
                        .map(|t| {
                            let (store, m) = (Arc::clone(&store), Arc::clone(&m));
                            thread::spawn(move || {
                                (0..10)
                                    .filter(|i| {
                                        let g = key(t * 10 + i);
                                        match store.apply_blocking(install(&m, None, &g, T0 + w as u64)) {
                                            Ok(()) => true,
                                            Err(StoreError::Conflict { .. }) => false,
                                            Err(e) => panic!("{e:?}"),
                                        }
                                    })
                                    .count()
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).sum()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(won.iter().sum::<usize>(), 40, "each grant is created exactly once: {won:?}");
        let journal = pg.query_bytes(&format!("SELECT k FROM \"{}\".journal", pg.schema())).unwrap();
        assert_eq!(journal.len(), 40, "one record per successful install, none overwritten");
        drop(stores);
        let reopened = open_pg(&pg.location());
        assert_eq!(reopened.grant_count(), 40, "the grant count is incremented atomically");
    }

    #[test]
    fn an_attempt_in_flight_belongs_to_its_process_until_its_lease_runs_out() {
        let Some(pg) = scratch() else { return };
        let (a, b) = (open_pg(&pg.location()), open_pg(&pg.location()));
        let m = machine(&a);
        let s1 = put(&a, install(&m, None, &key(1), T0));
        let s2 = put(&a, attempt(&m, &s1, T0 + 1));
        assert_eq!(a.open_grants().unwrap().len(), 1);
        assert!(b.recoverable_grants().unwrap().is_empty(), "a live process's attempt is not recoverable");
        // Another process may not write the grant while the attempt's process lives, even with the
        // current version in hand.
        let err = b.apply_blocking(install(&m, Some(&s2), &key(1), T0 + 2)).unwrap_err();
        assert!(matches!(err, StoreError::Busy { member, .. } if Some(member) == a.member_id()), "{err:?}");
        assert!(!err.may_be_durable() && !b.is_poisoned());
        // Its process may.
        let s3 = put(&a, install(&m, Some(&s2), &key(1), T0 + 3));
        let s4 = put(&a, attempt(&m, &s3, T0 + 4));
        // Once its lease has run out, the attempt is the others' to recover, and its process is
        // fenced: it never writes again.
        expire(&pg, a.member_id().unwrap());
        assert_eq!(versions(&b.recoverable_grants().unwrap()), vec![(key(1), s4.version)]);
        put(&b, install(&m, Some(&s4), &key(1), T0 + 5));
        let journal = || pg.query_bytes(&format!("SELECT k FROM \"{}\".journal", pg.schema())).unwrap().len();
        let before = journal();
        let err = a.apply_blocking(install(&m, None, &key(2), T0 + 6)).unwrap_err();
        assert!(matches!(err, StoreError::LeaseLost { .. } | StoreError::Poisoned), "{err:?}");
        assert!(a.is_poisoned(), "fail-stop after losing the lease");
        assert_eq!(a.lease_left(), Some(Duration::ZERO), "a lost lease leaves no time to send in");
        drop(a);
        assert_eq!(journal(), before, "the fenced write wrote nothing");
        assert_eq!(b.get(&key(2)).unwrap(), None);
    }

    #[test]
    fn processes_claiming_orphans_at_once_get_disjoint_sets_and_own_what_they_claim() {
        let Some(pg) = scratch() else { return };
        const N: usize = 240;
        let dead = open_pg(&pg.location());
        let m = machine(&dead);
        let mut open = Vec::new();
        for i in 0..N {
            let s = put(&dead, install(&m, None, &key(i), T0));
            open.push(put(&dead, attempt(&m, &s, T0 + 1)));
        }
        // A process that leaves (or whose lease runs out) leaves its attempts to the others.
        drop(dead);
        let stores: Vec<Store> = (0..3).map(|_| open_pg(&pg.location())).collect();
        let start = std::sync::Barrier::new(stores.len());
        let claimed: Vec<Vec<GrantState>> = std::thread::scope(|scope| {
            let handles: Vec<_> = stores
                .iter()
                .map(|s| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        let mut mine = Vec::new();
                        loop {
                            let chunk = s.claim_orphans(16).unwrap();
                            assert!(chunk.len() <= 16);
                            if chunk.is_empty() {
                                return mine;
                            }
                            mine.extend(chunk);
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<GrantKey> = claimed.iter().flatten().map(|s| s.grant.clone()).collect();
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "no orphan is claimed twice");
        assert_eq!(all.len(), N, "every orphan is claimed");
        for s in claimed.iter().flatten() {
            let found = open.iter().find(|o| o.grant == s.grant).unwrap();
            assert_eq!(s.version, found.version, "a claim returns the durable open state");
            assert!(s.phase.is_open());
        }
        // Claimed attempts belong to their claimer now: nobody else recovers or writes them.
        for s in &stores {
            assert!(s.recoverable_grants().unwrap().is_empty());
            assert!(s.claim_orphans(16).unwrap().is_empty());
        }
        let (owner, other) = if claimed[0].is_empty() { (1, 0) } else { (0, 1) };
        let grant = &claimed[owner][0];
        let err = stores[other].apply_blocking(install(&m, Some(grant), &grant.grant, T0 + 2)).unwrap_err();
        assert!(matches!(err, StoreError::Busy { member, .. } if Some(member) == stores[owner].member_id()), "{err:?}");
        put(&stores[owner], install(&m, Some(grant), &grant.grant, T0 + 3));
        // The claimer's lease runs out: what it claimed and left open is orphaned again.
        expire(&pg, stores[owner].member_id().unwrap());
        let again = stores[other].claim_orphans(1000).unwrap();
        assert_eq!(again.len(), claimed[owner].len() - 1, "the claimer's unfinished claims are orphans again");
    }

    /// A text value from the admin connection.
    fn text(pg: &PgScratch, sql: &str) -> String {
        let rows = pg.query_bytes(&format!("SELECT convert_to(({sql})::text, 'UTF8')")).unwrap();
        String::from_utf8(rows[0].clone()).unwrap()
    }

    #[test]
    fn connections_use_tls_when_the_url_asks_and_check_the_certificate_as_asked() {
        let Some(pg) = scratch() else { return };
        if text(&pg, "current_setting('ssl')") != "on" {
            eprintln!("\n*** SKIPPED (TLS to PostgreSQL): the test server runs with ssl = off ***\n");
            return;
        }
        let app = format!("tw_tls_{:08x}", rand::random::<u32>());
        let url = |extra: &str| format!("{}&application_name={app}{extra}", pg.url());
        let encrypted = || {
            text(
                &pg,
                &format!(
                    "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                     WHERE a.application_name = '{app}' AND s.ssl"
                ),
            )
            .parse::<usize>()
            .unwrap()
        };
        let write_one = |store: &Store, i: usize| {
            let m = machine(store);
            put(store, install(&m, None, &key(i), T0));
        };
        // No sslmode: plain connections, as before.
        let plain = try_open(&PgLocation::parse(&url("")).unwrap()).unwrap();
        write_one(&plain, 1);
        assert_eq!(encrypted(), 0);
        drop(plain);
        // `require`: encrypted (the server's self-signed certificate is not checked, as in libpq).
        let store = try_open(&PgLocation::parse(&url("&sslmode=require")).unwrap()).unwrap();
        write_one(&store, 2);
        assert!(encrypted() >= 2, "the member and the writer connections are encrypted");
        assert_eq!(store.get(&key(1)).unwrap().unwrap().grant, key(1));
        drop(store);
        // `verify-full` against the public roots: the self-signed certificate is refused, clearly.
        let err = try_open(&PgLocation::parse(&url("&sslmode=verify-full")).unwrap()).unwrap_err();
        assert!(matches!(&err, StoreError::Database { .. }), "{err:?}");
        assert!(err.to_string().contains("certificate"), "{err}");
        // With the server's own certificate as the root: `verify-ca` accepts it whatever the host
        // name; `verify-full` checks the name too.
        let cert = text(&pg, "current_setting('ssl_cert_file')");
        if std::fs::metadata(&cert).is_err() {
            eprintln!("\n*** SKIPPED (TLS verify with a root): cannot read {cert} ***\n");
            return;
        }
        let rooted = |mode: &str| url(&format!("&sslmode={mode}&sslrootcert={cert}"));
        let ca = try_open(&PgLocation::parse(&rooted("verify-ca")).unwrap()).unwrap();
        write_one(&ca, 3);
        drop(ca);
        let subject = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in", &cert])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        if !subject.contains("IP Address:127.0.0.1") {
            let err = try_open(&PgLocation::parse(&rooted("verify-full")).unwrap()).unwrap_err();
            assert!(err.to_string().contains("certificate"), "a name mismatch is refused: {err}");
        }
    }

    #[test]
    fn a_store_that_is_not_shared_has_nothing_to_claim() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &ring(), StoreConfig::default()).unwrap().0;
        let m = machine(&store);
        let s = put(&store, install(&m, None, &key(1), T0));
        put(&store, attempt(&m, &s, T0 + 1));
        assert!(store.claim_orphans(10).unwrap().is_empty());
        assert_eq!(store.open_grants().unwrap().len(), 1);
    }

    #[test]
    fn a_clean_close_hands_the_attempts_it_left_open_to_the_others_at_once() {
        let Some(pg) = scratch() else { return };
        let (a, b) = (open_pg(&pg.location()), open_pg(&pg.location()));
        let m = machine(&a);
        let s1 = put(&a, install(&m, None, &key(1), T0));
        put(&a, attempt(&m, &s1, T0 + 1));
        assert!(b.recoverable_grants().unwrap().is_empty());
        drop(a);
        assert_eq!(b.recoverable_grants().unwrap().len(), 1, "the closed process's attempt is recoverable");
        assert_eq!(b.members().unwrap().len(), 1);
    }

    #[test]
    fn no_intent_is_committed_on_a_lease_about_to_run_out() {
        let Some(pg) = scratch() else { return };
        let store = open_pg(&pg.location());
        let m = machine(&store);
        let s = put(&store, install(&m, None, &key(1), T0));
        pg.execute(&format!("UPDATE \"{}\".members SET expires = now() + interval '5 seconds'", pg.schema())).unwrap();
        let err = store.apply_blocking(attempt(&m, &s, T0 + 1)).unwrap_err();
        assert!(matches!(err, StoreError::LeaseExpiring { .. }), "{err:?}");
        assert!(store.is_poisoned());
    }

    #[test]
    fn another_applications_tables_are_refused_and_left_alone() {
        let Some(pg) = scratch() else { return };
        let q = format!("\"{}\"", pg.schema());
        pg.execute(&format!("CREATE SCHEMA {q}; CREATE TABLE {q}.grants (id int); INSERT INTO {q}.grants VALUES (7)"))
            .unwrap();
        let err = try_open(&pg.location()).unwrap_err();
        assert!(matches!(err, StoreError::ForeignSchema { .. }), "{err:?}");
        assert!(err.to_string().contains("another application"), "{err}");
        let rows = pg.query_bytes(&format!("SELECT int4send(id) FROM {q}.grants")).unwrap();
        assert_eq!(rows, vec![7i32.to_be_bytes().to_vec()], "untouched");
        let tables = pg
            .query_bytes(&format!(
                "SELECT convert_to(tablename, 'UTF8') FROM pg_tables WHERE schemaname = '{}'",
                pg.schema()
            ))
            .unwrap();
        assert_eq!(tables.len(), 1, "nothing created beside it");
    }

    #[test]
    fn a_schema_migrated_by_a_newer_release_is_refused() {
        let Some(pg) = scratch() else { return };
        drop(open_pg(&pg.location()));
        pg.execute(&format!(
            "INSERT INTO \"{}\".tokenwal_migrations (version, name) VALUES (99, 'future')",
            pg.schema()
        ))
        .unwrap();
        let err = try_open(&pg.location()).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found: 99, supported: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("upgrade tokenwal"), "{err}");
    }

    #[test]
    fn a_role_without_ddl_rights_is_told_to_run_migrate_schema() {
        let Some(pg) = scratch() else { return };
        pg.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tokenwal_test_app') THEN \
             CREATE ROLE tokenwal_test_app LOGIN; END IF; END $$",
        )
        .unwrap();
        let url = crate::test_pg_url();
        let mut app = url::Url::parse(&url).unwrap();
        app.set_username("tokenwal_test_app").unwrap();
        let app = PgLocation::parse(app.as_str()).unwrap().with_schema(pg.schema()).unwrap();
        let err = try_open(&app).unwrap_err();
        assert!(matches!(err, StoreError::MigrationNeeded { .. }), "{err:?}");
        assert!(err.to_string().contains("tokenwal migrate-schema"), "{err}");
        // The owner migrates; the application's role, granted the rights, then opens.
        assert_eq!(Store::migrate_postgres_schema(&pg.location()).unwrap(), (0, 2));
        assert_eq!(Store::migrate_postgres_schema(&pg.location()).unwrap(), (2, 2), "idempotent");
        let q = format!("\"{}\"", pg.schema());
        pg.execute(&format!(
            "GRANT USAGE ON SCHEMA {q} TO tokenwal_test_app; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {q} TO tokenwal_test_app; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA {q} TO tokenwal_test_app"
        ))
        .unwrap();
        let store = try_open(&app).expect("the application's role opens a migrated schema");
        let m = machine(&store);
        put(&store, install(&m, None, &key(1), T0));
    }

    #[test]
    fn a_password_never_reaches_an_error() {
        let l = PgLocation::parse("postgres://app:hunter2-secret@127.0.0.1:1/db?connect_timeout=2").unwrap();
        let err = try_open(&l).unwrap_err();
        for text in [err.to_string(), format!("{err:?}"), format!("{l:?}"), l.to_string()] {
            assert!(!text.contains("hunter2-secret"), "{text}");
        }
        assert!(matches!(err, StoreError::Database { op: "connect", .. }), "{err:?}");
    }
}
