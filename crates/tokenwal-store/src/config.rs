//! Configuration and the reports the store hands back.

use std::time::Duration;
use tokenwal_core::{Record, UnixMillis};

/// How to treat a journal record that fails its checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum RecoveryMode {
    /// Reading a corrupt record is an error ([`crate::StoreError::Corrupt`]).
    #[default]
    Strict,
    /// Corrupt records are skipped and reported (and logged); the rest of the history is returned.
    SkipCorruptRecords,
}

/// Store configuration. Build it with struct-update syntax (`StoreConfig { retention, ..Default::default() }`)
/// or the `with_*` methods.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// How long journal records are kept ([`crate::Store::compact`] drops older ones). Default 30 days.
    pub retention: Duration,
    /// How corrupt journal records are treated. Default [`RecoveryMode::Strict`].
    pub recovery: RecoveryMode,
    /// The most write batches one commit group (one sync) takes. Default 1024.
    pub max_batch: usize,
    /// The most records one [`crate::Store::compact`] call deletes. Default 10 000.
    pub compact_chunk: usize,
    /// sled's page cache, in bytes. Default 256 MiB.
    pub cache_capacity: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            retention: Duration::from_secs(30 * 86_400),
            recovery: RecoveryMode::Strict,
            max_batch: 1024,
            compact_chunk: 10_000,
            cache_capacity: 256 * 1024 * 1024,
        }
    }
}

impl StoreConfig {
    /// Sets [`StoreConfig::retention`].
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets [`StoreConfig::recovery`].
    pub fn with_recovery(mut self, recovery: RecoveryMode) -> Self {
        self.recovery = recovery;
        self
    }

    /// Sets [`StoreConfig::max_batch`] (at least 1).
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// Sets [`StoreConfig::compact_chunk`] (at least 1).
    pub fn with_compact_chunk(mut self, chunk: usize) -> Self {
        self.compact_chunk = chunk.max(1);
        self
    }

    /// Sets [`StoreConfig::cache_capacity`].
    pub fn with_cache_capacity(mut self, bytes: u64) -> Self {
        self.cache_capacity = bytes;
        self
    }
}

/// What opening a store found. Opening reads only the open-attempt index, never every grant.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OpenReport {
    /// Grants stored.
    pub grants: usize,
    /// Grants in an open phase (an intent without outcome, or an ambiguity): recovery's work list.
    pub open_attempts: usize,
    /// Entries of the open index that failed their checks (`grants/<key>` for a corrupt or missing
    /// state, `open/<key>` for an index entry whose state is not open). Quarantined, not guessed.
    pub corrupt: Vec<String>,
    /// How long opening took.
    pub elapsed: Duration,
    /// Whether this open created the store.
    pub created: bool,
    /// The LSN the next record will get.
    pub next_lsn: u64,
}

/// What a full scan ([`crate::Store::for_each_grant`]) found.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ScanReport {
    /// Grants handed to the callback.
    pub grants: usize,
    /// Grants whose state failed its checks (`grants/<key>`); they were skipped.
    pub corrupt: Vec<String>,
}

/// What one [`crate::Store::compact`] call did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CompactReport {
    /// Journal records deleted.
    pub removed: usize,
    /// Records strictly older than this were eligible.
    pub cutoff: UnixMillis,
    /// Whether more eligible records may remain (the chunk was full): call again.
    pub more: bool,
}

/// One grant's journal, as read by [`crate::Store::history_report`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct History {
    /// `(lsn, record)` in LSN order.
    pub records: Vec<(u64, Record)>,
    /// LSNs of records that failed their checks and were skipped ([`RecoveryMode::SkipCorruptRecords`]).
    pub skipped: Vec<u64>,
}

/// Counters since the store was opened. Reads are not synchronised with each other: under load
/// the fields are each exact, but not necessarily from the same instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Write batches handed to the committer.
    pub submitted: u64,
    /// Write batches applied and made durable.
    pub batches_applied: u64,
    /// Journal records appended (in applied batches).
    pub records_appended: u64,
    /// Commit groups that wrote something (each costs one flush and one sync).
    pub commit_groups: u64,
    /// Syncs (`fsync` of the data file, or the in-memory backend's "sync").
    pub syncs: u64,
    /// Batches refused by the compare-and-swap.
    pub conflicts: u64,
    /// Batches refused because the stored state is corrupt.
    pub corrupt_refusals: u64,
    /// Journal records deleted by compaction.
    pub compacted: u64,
    /// Time the committer spent in commit groups' transactions.
    pub write_time: Duration,
    /// Time the committer spent in flushes and syncs.
    pub sync_time: Duration,
    /// Successful commit-group syncs (flush + fsync) by latency: entry `i` counts those that took
    /// at most [`SYNC_LATENCY_BOUNDS`]`[i]` seconds and more than the bound before it; the last
    /// entry counts the slower ones. Not cumulative.
    pub sync_latency: [u64; SYNC_LATENCY_BUCKETS],
}

/// Upper bounds, in seconds, of [`StoreStats::sync_latency`]'s buckets (the last bucket is +Inf).
pub const SYNC_LATENCY_BOUNDS: [f64; SYNC_LATENCY_BUCKETS - 1] =
    [0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// How many buckets [`StoreStats::sync_latency`] has.
pub const SYNC_LATENCY_BUCKETS: usize = 15;

impl StoreStats {
    /// Syncs per applied batch (0 if nothing was applied): the cost of durability per refresh step.
    pub fn syncs_per_batch(&self) -> f64 {
        if self.batches_applied == 0 {
            0.0
        } else {
            self.syncs as f64 / self.batches_applied as f64
        }
    }
}
