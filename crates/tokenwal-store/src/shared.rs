//! State shared by the store handles and the committer thread.

use crate::backend::Backend;
use crate::config::{StoreConfig, StoreStats, SYNC_LATENCY_BOUNDS, SYNC_LATENCY_BUCKETS};
use crate::hooks::Hooks;
use crate::keys::KeyRing;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tokenwal_core::FingerprintKey;
use tokio::sync::watch;

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
    /// Successful syncs by latency bucket ([`SYNC_LATENCY_BOUNDS`]).
    pub sync_latency: [AtomicU64; SYNC_LATENCY_BUCKETS],
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_time(c: &AtomicU64, since: Instant) {
        Counters::add(c, u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }

    /// Counts one successful sync that took `took`.
    pub(crate) fn observe_sync(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = SYNC_LATENCY_BOUNDS.iter().position(|b| secs <= *b).unwrap_or(SYNC_LATENCY_BOUNDS.len());
        Counters::add(&self.sync_latency[i], 1);
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
            sync_latency: std::array::from_fn(|i| r(&self.sync_latency[i])),
        }
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
    /// The first failure that poisoned the store (set once, with `poisoned`), for whoever watches.
    pub fail_stop: watch::Sender<Option<FailStop>>,
    pub counters: Counters,
    /// Grants in the durable image.
    pub durable_grants: AtomicU64,
    /// Fault injection and the ack hold (no-ops without the `test-hooks` feature).
    pub hooks: Hooks,
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
            fail_stop: watch::channel(None).0,
            counters: Counters::default(),
            durable_grants: AtomicU64::new(grants),
            hooks: Hooks::new(),
        }
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Fail-stop: refuses every later call, and tells the watchers of [`crate::Store::watch_fail_stop`]
    /// (the first failure only). `error` is a store error's text: an operation and an OS error,
    /// never a token.
    pub(crate) fn poison(&self, error: &dyn std::fmt::Display) {
        self.poisoned.store(true, Ordering::Release);
        self.fail_stop.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            *f = Some(FailStop { since: SystemTime::now(), error: error.to_string() });
            true
        });
    }
}

/// Why and since when a store is fail-stopped: the first write, sync or compaction that failed.
/// Every later call fails with [`crate::StoreError::Poisoned`] until the store is reopened (which
/// runs recovery).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailStop {
    /// When the failure was seen.
    pub since: SystemTime,
    /// What failed, e.g. `i/o error during sync: …` (an operation and an OS error; never a token).
    pub error: String,
}
