//! State shared by the store handles and the committer thread.

use crate::backend::Backend;
use crate::config::{StoreConfig, StoreStats};
use crate::keys::KeyRing;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokenwal_core::FingerprintKey;

/// Locks `m`, ignoring poisoning: every critical section here leaves its data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The durable state of a grant that a commit group is writing, captured before the group's first
/// write to it becomes visible and dropped once the group is synced. Readers prefer it to the
/// live tree, so they never see a write before it is durable.
pub(crate) struct PreImage {
    /// The durable state frame (`None`: the grant did not exist).
    pub state: Option<Vec<u8>>,
    /// Whether the grant was in the durable open index.
    pub open: bool,
    /// The first LSN the group may give this grant's records: later history is not durable yet.
    pub first_lsn: u64,
}

/// Where a test can make the store fail.
#[doc(hidden)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultPoint {
    /// Before a batch's transaction: nothing of it is written.
    BeforeWrite,
    /// After a batch's transaction: it is written (visible, not yet synced) but reported failed.
    AfterWrite,
    /// Instead of the group's flush and sync: the group is written but not made durable.
    Sync,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub submitted: AtomicU64,
    pub batches_applied: AtomicU64,
    pub records_appended: AtomicU64,
    pub commit_groups: AtomicU64,
    pub syncs: AtomicU64,
    pub conflicts: AtomicU64,
    pub corrupt_refusals: AtomicU64,
    pub compacted: AtomicU64,
    pub write_nanos: AtomicU64,
    pub sync_nanos: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_time(c: &AtomicU64, since: Instant) {
        Counters::add(c, u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreStats {
            submitted: r(&self.submitted),
            batches_applied: r(&self.batches_applied),
            records_appended: r(&self.records_appended),
            commit_groups: r(&self.commit_groups),
            syncs: r(&self.syncs),
            conflicts: r(&self.conflicts),
            corrupt_refusals: r(&self.corrupt_refusals),
            compacted: r(&self.compacted),
            write_time: Duration::from_nanos(r(&self.write_nanos)),
            sync_time: Duration::from_nanos(r(&self.sync_nanos)),
        }
    }
}

#[derive(Default)]
struct HoldState {
    held: bool,
    parked: bool,
    shutdown: bool,
}

/// A gate between a group's writes and its sync, for tests.
#[derive(Default)]
pub(crate) struct Hold {
    state: Mutex<HoldState>,
    cv: Condvar,
}

impl Hold {
    pub(crate) fn set(&self, held: bool) {
        lock(&self.state).held = held;
        self.cv.notify_all();
    }

    pub(crate) fn shutdown(&self) {
        lock(&self.state).shutdown = true;
        self.cv.notify_all();
    }

    /// Called by the committer between a group's writes and its sync.
    pub(crate) fn park_if_held(&self) {
        let mut g = lock(&self.state);
        while g.held && !g.shutdown {
            g.parked = true;
            self.cv.notify_all();
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked = false;
        self.cv.notify_all();
    }

    pub(crate) fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.state);
        while !g.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

pub(crate) struct Shared {
    pub backend: Backend,
    pub config: StoreConfig,
    pub fingerprint: FingerprintKey,
    /// The keys that seal grant states: the active one seals, every one opens.
    pub keys: KeyRing,
    pub pending: Mutex<HashMap<Vec<u8>, PreImage>>,
    pub poisoned: AtomicBool,
    pub counters: Counters,
    /// Grants in the durable image.
    pub durable_grants: AtomicU64,
    pub hold: Arc<Hold>,
    faults: Mutex<Option<(FaultPoint, u64)>>,
}

impl Shared {
    pub(crate) fn new(
        backend: Backend,
        config: StoreConfig,
        fingerprint: FingerprintKey,
        keys: KeyRing,
        grants: u64,
    ) -> Shared {
        Shared {
            backend,
            config,
            fingerprint,
            keys,
            pending: Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
            counters: Counters::default(),
            durable_grants: AtomicU64::new(grants),
            hold: Arc::new(Hold::default()),
            faults: Mutex::new(None),
        }
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub(crate) fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    pub(crate) fn arm_fault(&self, point: FaultPoint, nth: u64) {
        *lock(&self.faults) = Some((point, nth.max(1)));
    }

    /// Fails if a fault is armed at `point` and this is its n-th visit.
    pub(crate) fn fault(&self, point: FaultPoint) -> io::Result<()> {
        let mut f = lock(&self.faults);
        if let Some((p, n)) = f.as_mut() {
            if *p == point {
                *n -= 1;
                if *n == 0 {
                    *f = None;
                    return Err(io::Error::other(format!("injected fault at {point:?}")));
                }
            }
        }
        Ok(())
    }
}
