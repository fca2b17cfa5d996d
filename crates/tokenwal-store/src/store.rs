//! The store handle.

use crate::backend::disk::SledBackend;
use crate::backend::mem::{Image, MemBackend};
use crate::backend::{Backend, Expired};
use crate::commit::{self, Request};
use crate::config::{CompactReport, History, OpenReport, RecoveryMode, ScanReport, StoreConfig, StoreStats};
use crate::error::StoreError;
use crate::layout::{self, Tree};
use crate::shared::{lock, Counters, FaultPoint, Hold, Shared};
use rand::RngCore;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokenwal_core::{
    codec, CodecError, DurableLog, FingerprintKey, GrantKey, GrantState, Record, UnixMillis, WriteBatch,
};
use tokio::sync::oneshot;

/// The durable journal and token store: a cheap, cloneable handle.
///
/// One committer thread owns all writes ([`Store::apply`]); reads run on the caller's thread and
/// see only durable state. Dropping the last handle stops the committer (after it answers the
/// writes already queued) and closes the backend.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Request>>,
    committer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A test's ack hold must not keep the committer parked forever.
        self.shared.hold.shutdown();
        drop(self.tx.take());
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match self.shared().backend {
            Backend::Sled(_) => "sled",
            Backend::Memory(_) => "memory",
        };
        f.debug_struct("Store")
            .field("backend", &backend)
            .field("grants", &self.grant_count())
            .field("poisoned", &self.shared().is_poisoned())
            .finish_non_exhaustive()
    }
}

/// Checks that a batch is self-consistent before it reaches the committer.
fn validate(b: &WriteBatch) -> Result<(), StoreError> {
    let s = codec::decode_state(&b.state)?;
    if s.grant.to_bytes() != b.grant {
        return Err(StoreError::InvalidBatch { reason: "the state frame names another grant" });
    }
    if s.version != b.new_version {
        return Err(StoreError::InvalidBatch { reason: "the state frame's version is not new_version" });
    }
    if b.expected_version.is_some_and(|e| b.new_version <= e) {
        return Err(StoreError::InvalidBatch { reason: "new_version does not advance expected_version" });
    }
    if s.phase.is_open() != b.open {
        return Err(StoreError::InvalidBatch { reason: "the open flag disagrees with the state's phase" });
    }
    for (at, frame) in &b.records {
        let r = codec::decode_record(frame)?;
        if r.grant() != &s.grant {
            return Err(StoreError::InvalidBatch { reason: "a record names another grant" });
        }
        if r.at() != *at {
            return Err(StoreError::InvalidBatch { reason: "a record's timestamp differs from its frame's" });
        }
    }
    Ok(())
}

fn sanitize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().filter(|c| !c.is_control()).take(64).collect()
}

/// Reads (or, for an empty store, writes) the meta tree. Returns the fingerprint key and whether the
/// store was created.
fn prepare(backend: &Backend) -> Result<(FingerprintKey, bool), StoreError> {
    let created = match backend.get(Tree::Meta, layout::META_FORMAT)? {
        Some(f) if f == layout::FORMAT.as_bytes() => false,
        Some(f) => return Err(StoreError::UnsupportedFormat { found: sanitize(&f), expected: layout::FORMAT }),
        None => {
            let has_data = backend.last_key(Tree::Grants)?.is_some() || backend.last_key(Tree::Journal)?.is_some();
            if has_data {
                return Err(StoreError::UnsupportedFormat { found: "(missing)".into(), expected: layout::FORMAT });
            }
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            // The format marker goes last: a store whose creation was interrupted has none, holds no
            // data, and is created afresh by the next open.
            let entries: [(&[u8], &[u8]); 4] = [
                (layout::META_FINGERPRINT_KEY, &key),
                (layout::META_GRANT_COUNT, &0u64.to_be_bytes()),
                (layout::META_LSN_FLOOR, &0u64.to_be_bytes()),
                (layout::META_FORMAT, layout::FORMAT.as_bytes()),
            ];
            match backend {
                Backend::Sled(s) => {
                    for (k, v) in entries {
                        s.put_raw(Tree::Meta, k, v)?;
                    }
                    s.sync_creation()?;
                }
                Backend::Memory(m) => {
                    for (k, v) in entries {
                        m.put_durable(Tree::Meta, k, v);
                    }
                }
            }
            true
        }
    };
    let key = backend.get(Tree::Meta, layout::META_FINGERPRINT_KEY)?.unwrap_or_default();
    let key: [u8; 32] = key.as_slice().try_into().map_err(|_| StoreError::Corrupt {
        what: "meta/fingerprint_key".into(),
        source: CodecError::Truncated { len: key.len() },
    })?;
    Ok((FingerprintKey::from_bytes(key), created))
}

impl Store {
    /// Opens (or creates, with mode 0700 on unix) the sled-backed store in directory `path`.
    ///
    /// Opening reads only the open-attempt index, never every grant, so it stays fast with a
    /// million grants. Entries of that index that fail their checks are reported in
    /// [`OpenReport::corrupt`], not fatal. A directory holding another store format is refused with
    /// [`StoreError::UnsupportedFormat`]; one open by another process or handle with
    /// [`StoreError::Locked`].
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<(Store, OpenReport), StoreError> {
        let started = Instant::now();
        let backend = Backend::Sled(SledBackend::open(path.as_ref(), &config)?);
        Store::start(backend, config, started)
    }

    /// An in-memory store with the default configuration: the same semantics as the sled store
    /// (compare-and-swap, index, history, compaction, stats, group commit), plus crash images.
    pub fn in_memory() -> Store {
        Store::in_memory_with(StoreConfig::default())
    }

    /// An in-memory store with `config`.
    pub fn in_memory_with(config: StoreConfig) -> Store {
        let backend = Backend::Memory(MemBackend::from_image(Image::default()));
        Store::start(backend, config, Instant::now()).expect("an empty in-memory store always opens").0
    }

    fn start(backend: Backend, config: StoreConfig, started: Instant) -> Result<(Store, OpenReport), StoreError> {
        let (fingerprint, created) = prepare(&backend)?;
        let meta_u64 = |k: &[u8]| -> Result<u64, StoreError> {
            Ok(backend.get(Tree::Meta, k)?.as_deref().and_then(layout::be_u64).unwrap_or(0))
        };
        let grants = meta_u64(layout::META_GRANT_COUNT)?;
        let floor = meta_u64(layout::META_LSN_FLOOR)?;
        let last = backend.last_key(Tree::Journal)?.as_deref().and_then(layout::be_u64);
        let next_lsn = last.map_or(0, |l| l + 1).max(floor).max(1);

        let mut open_keys = Vec::new();
        backend.scan(Tree::Open, &[], &mut |k, _| {
            open_keys.push(k.to_vec());
            true
        })?;
        let mut corrupt = Vec::new();
        let mut open_attempts = 0;
        for k in &open_keys {
            match backend.get(Tree::Grants, k)?.map(|f| codec::decode_state(&f)) {
                Some(Ok(s)) if s.phase.is_open() => open_attempts += 1,
                Some(Ok(_)) => corrupt.push(layout::key_name(layout::OPEN, k)),
                Some(Err(e)) => {
                    let what = layout::key_name(layout::GRANTS, k);
                    tracing::error!(what = %what, error = %e, "corrupt grant state in the open index: quarantined");
                    corrupt.push(what);
                }
                None => corrupt.push(layout::key_name(layout::GRANTS, k)),
            }
        }

        let shared = Arc::new(Shared::new(backend, config, fingerprint, grants));
        let (tx, rx) = mpsc::channel();
        let worker = Arc::clone(&shared);
        let committer = std::thread::Builder::new()
            .name("tokenwal-commit".into())
            .spawn(move || commit::run(worker, rx, next_lsn))
            .map_err(|source| StoreError::Io { op: "spawn committer", source })?;
        let store = Store { inner: Arc::new(Inner { shared, tx: Some(tx), committer: Some(committer) }) };
        let report = OpenReport {
            grants: grants as usize,
            open_attempts,
            corrupt,
            elapsed: started.elapsed(),
            created,
            next_lsn,
        };
        tracing::info!(
            grants = report.grants,
            open_attempts = report.open_attempts,
            corrupt = report.corrupt.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "store opened"
        );
        Ok((store, report))
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if self.shared().is_poisoned() {
            Err(StoreError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// The key of credential fingerprints: 32 random bytes created with the store, persisted in it.
    pub fn fingerprint_key(&self) -> FingerprintKey {
        self.shared().fingerprint.clone()
    }

    fn submit(&self, batch: WriteBatch) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        self.check()?;
        validate(&batch)?;
        let (reply, rx) = oneshot::channel();
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Request { batch, reply }).map_err(|_| StoreError::Closed)?;
        Counters::add(&self.shared().counters.submitted, 1);
        Ok(rx)
    }

    /// Writes `batch` atomically (compare-and-swap on the grant's version) and returns once it is
    /// durable. Concurrent calls share one sync (group commit).
    ///
    /// Errors: [`StoreError::Conflict`] (nothing written: re-read and recompute),
    /// [`StoreError::Corrupt`] (the stored state is quarantined; nothing written),
    /// [`StoreError::Io`] (**may already be durable**; the store is now poisoned),
    /// [`StoreError::Poisoned`], [`StoreError::InvalidBatch`], [`StoreError::Codec`].
    ///
    /// Dropping the future does not cancel the write: once submitted it is applied, and may become
    /// durable, whether or not anyone awaits the answer.
    pub async fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let rx = self.submit(batch)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// [`Store::apply`] for callers outside async code: blocks the calling thread until the batch is
    /// durable.
    ///
    /// # Panics
    ///
    /// If called from a thread that is running a tokio runtime (it would block the runtime): from
    /// async code use [`Store::apply`], or this inside `tokio::task::spawn_blocking`.
    pub fn apply_blocking(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let rx = self.submit(batch)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// The grant's durable state (`None` if it does not exist).
    ///
    /// A state whose frame fails its checks is [`StoreError::Corrupt`]; other grants are unaffected.
    pub fn get(&self, grant: &GrantKey) -> Result<Option<GrantState>, StoreError> {
        self.check()?;
        let key = grant.to_bytes();
        // Read the live tree first, then the pre-images: a write that became visible before this
        // read has its pre-image registered until it is durable (see `commit`).
        let live = self.shared().backend.get(Tree::Grants, &key)?;
        let frame = match lock(&self.shared().pending).get(&key) {
            Some(pre) => pre.state.clone(),
            None => live,
        };
        // A group that failed after this read started may have cleared its pre-images: the store
        // was poisoned before that, so checking again keeps a non-durable state from escaping.
        self.check()?;
        frame.map(|f| decode_grant(&key, &f)).transpose()
    }

    /// The durable states of every grant in an open phase (an intent without outcome, or an
    /// ambiguity), in key order: recovery's work list. Reads only the open index, so the cost is
    /// proportional to the open grants, not to all grants or the history.
    ///
    /// Entries that fail their checks are skipped (and logged): they were reported by
    /// [`Store::open`] in [`OpenReport::corrupt`], and [`Store::get`] answers `Corrupt` for them.
    pub fn open_grants(&self) -> Result<Vec<GrantState>, StoreError> {
        self.check()?;
        let backend = &self.shared().backend;
        let mut keys = Vec::new();
        backend.scan(Tree::Open, &[], &mut |k, _| {
            keys.push(k.to_vec());
            true
        })?;
        let mut frames = BTreeMap::new();
        for k in keys {
            let f = backend.get(Tree::Grants, &k)?;
            frames.insert(k, f);
        }
        for (k, pre) in lock(&self.shared().pending).iter() {
            frames.remove(k);
            if pre.open {
                frames.insert(k.clone(), pre.state.clone());
            }
        }
        let mut out = Vec::with_capacity(frames.len());
        for (k, f) in frames {
            let Some(f) = f else {
                tracing::error!(what = %layout::key_name(layout::OPEN, &k), "open index entry without a state");
                continue;
            };
            match decode_grant(&k, &f) {
                Ok(s) if s.phase.is_open() => out.push(s),
                Ok(_) => {
                    tracing::error!(what = %layout::key_name(layout::OPEN, &k), "open index entry of a closed state")
                }
                Err(e) => tracing::error!(error = %e, "skipping a corrupt open grant"),
            }
        }
        self.check()?; // see `get`
        Ok(out)
    }

    /// Calls `f` with the durable state of every grant, in key order (a full scan). States that fail
    /// their checks are skipped and listed in the report.
    pub fn for_each_grant(&self, mut f: impl FnMut(GrantState)) -> Result<ScanReport, StoreError> {
        self.check()?;
        let shared = self.shared();
        let mut report = ScanReport::default();
        shared.backend.scan(Tree::Grants, &[], &mut |k, v| {
            let pre = lock(&shared.pending).get(k).map(|p| p.state.clone());
            let decoded = match &pre {
                // A grant whose first write is not durable yet does not exist.
                Some(None) => return true,
                Some(Some(frame)) => codec::decode_state(frame),
                None => codec::decode_state(v),
            };
            match decoded {
                Ok(s) => {
                    report.grants += 1;
                    f(s);
                }
                Err(e) => {
                    let what = layout::key_name(layout::GRANTS, k);
                    tracing::error!(what = %what, error = %e, "corrupt grant state skipped by a scan");
                    report.corrupt.push(what);
                }
            }
            true
        })?;
        self.check()?; // see `get`: a scan that raced a failed group reports the failure
        Ok(report)
    }

    /// The grant's durable journal records, `(lsn, record)` in LSN order (records older than the
    /// retention may have been compacted away).
    ///
    /// A record that fails its checks is [`StoreError::Corrupt`] under [`RecoveryMode::Strict`];
    /// under [`RecoveryMode::SkipCorruptRecords`] it is skipped and logged (see
    /// [`Store::history_report`] for the list).
    pub fn history(&self, grant: &GrantKey) -> Result<Vec<(u64, Record)>, StoreError> {
        Ok(self.history_report(grant)?.records)
    }

    /// [`Store::history`], also listing the LSNs of skipped corrupt records.
    pub fn history_report(&self, grant: &GrantKey) -> Result<History, StoreError> {
        self.check()?;
        let shared = self.shared();
        let key = grant.to_bytes();
        let mut lsns = Vec::new();
        shared.backend.scan(Tree::History, &layout::history_prefix(&key), &mut |k, _| {
            lsns.extend(layout::trailing_lsn(k));
            true
        })?;
        if let Some(pre) = lock(&shared.pending).get(&key) {
            lsns.retain(|l| *l < pre.first_lsn);
        }
        let mut out = History::default();
        for lsn in lsns {
            // Absent: compacted since the index was read.
            let Some(frame) = shared.backend.get(Tree::Journal, &layout::journal_key(lsn))? else { continue };
            match codec::decode_record(&frame) {
                Ok(r) => out.records.push((lsn, r)),
                Err(source) => {
                    let what = format!("{}/{lsn}", layout::JOURNAL);
                    if shared.config.recovery == RecoveryMode::Strict {
                        return Err(StoreError::Corrupt { what, source });
                    }
                    tracing::warn!(what = %what, error = %source, "skipping a corrupt journal record");
                    out.skipped.push(lsn);
                }
            }
        }
        Ok(out)
    }

    /// Deletes journal records (with their index entries) strictly older than
    /// `now - config.retention`, oldest first, at most `config.compact_chunk` per call; call again
    /// while [`CompactReport::more`]. Grant states are never deleted.
    ///
    /// Compaction is not synced by itself: the next commit group's sync (or sled's background
    /// flush) makes it durable, and a crash before that merely undoes it, to be redone.
    pub fn compact(&self, now: UnixMillis) -> Result<CompactReport, StoreError> {
        self.check()?;
        let shared = self.shared();
        let cutoff = now.saturating_sub(shared.config.retention);
        let end = cutoff.0.to_be_bytes();
        let chunk = shared.config.compact_chunk.max(1);
        // Records a cursor's consumer has not consumed yet are kept (see `cursor`).
        let keep_from = self.lowest_cursor()?.unwrap_or(u64::MAX);
        let mut entries = Vec::new();
        shared.backend.scan(Tree::Expiry, &[], &mut |k, v| {
            if k >= &end[..] || entries.len() >= chunk || layout::trailing_lsn(k).is_some_and(|l| l >= keep_from) {
                return false;
            }
            if let (Ok(key), Some(lsn)) = (<[u8; 16]>::try_from(k), layout::trailing_lsn(k)) {
                entries.push(Expired { key, lsn, grant: v.to_vec() });
            }
            true
        })?;
        if !entries.is_empty() {
            if let Err(e) = shared.backend.delete_expired(&entries) {
                shared.poison();
                tracing::error!(error = %e, "store poisoned: compaction failed; reopen it to recover");
                return Err(e);
            }
            Counters::add(&shared.counters.compacted, entries.len() as u64);
        }
        Ok(CompactReport { removed: entries.len(), cutoff, more: entries.len() == chunk })
    }

    /// Counters since open (batches applied, records, syncs, conflicts, …).
    pub fn stats(&self) -> StoreStats {
        self.shared().counters.snapshot()
    }

    /// The number of durable grants (kept as a counter: O(1)).
    pub fn grant_count(&self) -> usize {
        self.shared().durable_grants.load(Ordering::Relaxed) as usize
    }

    /// Whether an earlier write or sync failed (every call now fails until the store is reopened).
    pub fn is_poisoned(&self) -> bool {
        self.shared().is_poisoned()
    }

    /// A new in-memory store holding exactly what this store has durably acknowledged: what a
    /// restart after a power cut at this instant would find. Writes applied but not yet synced are
    /// absent. The crash image is not poisoned, whatever this store is.
    ///
    /// # Panics
    ///
    /// If this store is not in-memory ([`Store::in_memory`]).
    pub fn crash_image(&self) -> Store {
        match &self.shared().backend {
            Backend::Memory(m) => {
                let backend = Backend::Memory(MemBackend::from_image(m.durable_image()));
                Store::start(backend, self.shared().config.clone(), Instant::now())
                    .expect("a crash image of an in-memory store always opens")
                    .0
            }
            Backend::Sled(_) => panic!("crash_image is only available on an in-memory store"),
        }
    }

    /// Test hook: holds every commit group between its writes and its sync until the returned guard
    /// is released or dropped. Writers are not answered meanwhile.
    #[doc(hidden)]
    pub fn hold_acks(&self) -> AckHold {
        let hold = Arc::clone(&self.shared().hold);
        hold.set(true);
        AckHold { hold }
    }

    /// Test hook: makes the `nth` (1 = next) visit of `point` fail with an I/O error.
    #[doc(hidden)]
    pub fn inject_fault(&self, point: FaultPoint, nth: u64) {
        self.shared().arm_fault(point, nth);
    }

    /// Test hook: overwrites one raw entry of the in-memory store's live and durable images
    /// (`tree` is one of the [`layout`] tree names). Returns `false` for a sled store or an unknown
    /// tree.
    #[doc(hidden)]
    pub fn put_raw_for_test(&self, tree: &str, key: &[u8], value: &[u8]) -> bool {
        let Some(t) = Tree::ALL.into_iter().find(|t| t.name() == tree) else { return false };
        match &self.shared().backend {
            Backend::Memory(m) => {
                m.put_durable(t, key, value);
                true
            }
            Backend::Sled(_) => false,
        }
    }
}

fn decode_grant(key: &[u8], frame: &[u8]) -> Result<GrantState, StoreError> {
    codec::decode_state(frame)
        .map_err(|source| StoreError::Corrupt { what: layout::key_name(layout::GRANTS, key), source })
}

/// Test hook returned by [`Store::hold_acks`]: while it lives, commit groups are written but not
/// synced, and their writers are not answered.
#[doc(hidden)]
#[must_use = "the hold ends when this guard is dropped"]
pub struct AckHold {
    hold: Arc<Hold>,
}

impl AckHold {
    /// Waits until a commit group is parked at the hold (written, not synced). `false` on timeout.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        self.hold.wait_parked(timeout)
    }

    /// Lets the parked group (and every later one) sync.
    pub fn release(self) {}
}

impl Drop for AckHold {
    fn drop(&mut self) {
        self.hold.set(false);
    }
}

impl fmt::Debug for AckHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AckHold")
    }
}

impl DurableLog for Store {
    type Error = StoreError;

    fn apply(&self, batch: WriteBatch) -> impl std::future::Future<Output = Result<(), StoreError>> + Send {
        Store::apply(self, batch)
    }
}
