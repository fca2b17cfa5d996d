//! The store handle.

use crate::backend::disk::SledBackend;
use crate::backend::mem::{Image, MemBackend};
use crate::backend::{Backend, Expired};
use crate::commit::{self, Request};
use crate::config::{CompactReport, History, OpenReport, RecoveryMode, ScanReport, StoreConfig, StoreStats};
use crate::error::StoreError;
use crate::keys::{KeyId, KeyRing};
use crate::layout::{self, Tree};
use crate::seal::{self, OpenError, Slot};
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
use zeroize::{Zeroize, Zeroizing};

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
/// store was created. A fingerprint key sealed under an older key of the ring is re-sealed under the
/// active key (one atomic, synced write: either envelope opens with the ring).
fn prepare(backend: &Backend, keys: &KeyRing, dir: Option<&Path>) -> Result<(FingerprintKey, bool), StoreError> {
    let put = |entries: &[(&[u8], &[u8])]| -> Result<(), StoreError> {
        match backend {
            Backend::Sled(s) => {
                for (k, v) in entries {
                    s.put_raw(Tree::Meta, k, v)?;
                }
                s.sync_creation()
            }
            Backend::Memory(m) => {
                for (k, v) in entries {
                    m.put_durable(Tree::Meta, k, v);
                }
                Ok(())
            }
        }
    };
    let created = match backend.get(Tree::Meta, layout::META_FORMAT)? {
        Some(f) if f == layout::FORMAT.as_bytes() => false,
        Some(f) if f == layout::FORMAT_1.as_bytes() => {
            return Err(StoreError::PlaintextFormat { path: dir.map(Path::to_path_buf).unwrap_or_default() })
        }
        Some(f) => return Err(StoreError::UnsupportedFormat { found: sanitize(&f), expected: layout::FORMAT }),
        None => {
            let has_data = backend.last_key(Tree::Grants)?.is_some() || backend.last_key(Tree::Journal)?.is_some();
            if has_data {
                return Err(StoreError::UnsupportedFormat { found: "(missing)".into(), expected: layout::FORMAT });
            }
            let mut key = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(key.as_mut());
            let sealed = seal::seal(keys, Slot::FingerprintKey, 0, key.as_ref());
            // The format marker goes last: a store whose creation was interrupted has none, holds no
            // data, and is created afresh by the next open.
            put(&[
                (layout::META_FINGERPRINT_KEY, &sealed),
                (layout::META_GRANT_COUNT, &0u64.to_be_bytes()),
                (layout::META_LSN_FLOOR, &0u64.to_be_bytes()),
                (layout::META_FORMAT, layout::FORMAT.as_bytes()),
            ])?;
            true
        }
    };
    let what = || String::from_utf8_lossy(layout::META_FINGERPRINT_KEY).into_owned();
    let sealed = backend.get(Tree::Meta, layout::META_FINGERPRINT_KEY)?.unwrap_or_default();
    let (header, key) = match seal::open(keys, Slot::FingerprintKey, &sealed) {
        Ok(opened) => opened,
        Err(OpenError::UnknownKey(key_id)) => {
            return Err(StoreError::KeyUnavailable { what: format!("meta/{}", what()), key_id, ring: keys.ids() })
        }
        Err(OpenError::Corrupt(source)) => {
            return Err(StoreError::Corrupt { what: format!("meta/{}", what()), source })
        }
    };
    let key: [u8; 32] = key.as_slice().try_into().map_err(|_| StoreError::Corrupt {
        what: format!("meta/{}", what()),
        source: CodecError::Truncated { len: key.len() },
    })?;
    if header.key_id != keys.active_id() {
        let resealed = seal::seal(keys, Slot::FingerprintKey, 0, &key);
        put(&[(layout::META_FINGERPRINT_KEY, &resealed)])?;
        tracing::info!(from = %header.key_id, to = %keys.active_id(), "fingerprint key re-sealed under the active store key");
    }
    Ok((FingerprintKey::from_bytes(key), created))
}

/// What [`Store::reseal`] did to one grant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Reseal {
    /// The state was already sealed under the active key: nothing written.
    AlreadyActive,
    /// The state was re-sealed under the active key (durably).
    Resealed,
    /// The grant does not exist.
    Missing,
}

/// Which store keys seal what: the answer of [`Store::key_usage`]. Read from the clear headers,
/// without decrypting anything.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct KeyUsage {
    /// Grant states per sealing key id.
    pub grants: BTreeMap<KeyId, usize>,
    /// The key id sealing the fingerprint key.
    pub fingerprint_key: Option<KeyId>,
    /// Grant states whose envelope fails its checksum (`grants/<key>`).
    pub corrupt: Vec<String>,
}

impl KeyUsage {
    /// Values (grant states and the fingerprint key) sealed under a key other than `active`.
    pub fn remaining_under_other_keys(&self, active: KeyId) -> usize {
        let grants: usize = self.grants.iter().filter(|(id, _)| **id != active).map(|(_, n)| n).sum();
        grants + usize::from(self.fingerprint_key.is_some_and(|id| id != active))
    }
}

impl Store {
    /// Opens (or creates, with mode 0700 on unix) the sled-backed store in directory `path`.
    ///
    /// Opening reads only the open-attempt index, never every grant, so it stays fast with a
    /// million grants. Entries of that index that fail their checks are reported in
    /// [`OpenReport::corrupt`], not fatal. A directory holding another store format is refused with
    /// [`StoreError::UnsupportedFormat`]; one open by another process or handle with
    /// [`StoreError::Locked`].
    ///
    /// Every grant state and the fingerprint key are sealed under `keys` (the active key seals, any
    /// key of the ring opens). A store sealed under a key the ring lacks fails with
    /// [`StoreError::KeyUnavailable`] naming the key id it needs; a format-1 (unencrypted) store with
    /// [`StoreError::PlaintextFormat`].
    pub fn open(
        path: impl AsRef<Path>,
        keys: &KeyRing,
        config: StoreConfig,
    ) -> Result<(Store, OpenReport), StoreError> {
        let started = Instant::now();
        let backend = Backend::Sled(SledBackend::open(path.as_ref(), &config)?);
        Store::start(backend, keys.clone(), config, started, Some(path.as_ref()))
    }

    /// An in-memory store with the default configuration: the same semantics as the sled store
    /// (compare-and-swap, index, history, compaction, stats, group commit, sealing under an
    /// ephemeral key), plus crash images.
    pub fn in_memory() -> Store {
        Store::in_memory_with(StoreConfig::default())
    }

    /// An in-memory store with `config`, sealed under an ephemeral key ([`KeyRing::ephemeral`]).
    pub fn in_memory_with(config: StoreConfig) -> Store {
        let backend = Backend::Memory(MemBackend::from_image(Image::default()));
        Store::start(backend, KeyRing::ephemeral(), config, Instant::now(), None)
            .expect("an empty in-memory store always opens")
            .0
    }

    /// Converts a format-1 store (grant states and the fingerprint key in the clear) in directory
    /// `path` to format 2 in place: every state frame and the fingerprint key are sealed under the
    /// active key of `keys`, synced, and only then is the format marker switched. Crash-safe and
    /// resumable: a re-run skips what is already sealed. Returns the number of values sealed (0 for a
    /// store already in format 2). The store must not be open elsewhere (it is locked).
    ///
    /// The plaintext tokens may survive in the free space of sled's log until sled reuses it: treat
    /// the disk (and older backups) as holding them, see `docs/security.md`.
    pub fn upgrade_format1(path: impl AsRef<Path>, keys: &KeyRing, config: StoreConfig) -> Result<usize, StoreError> {
        let sled = SledBackend::open(path.as_ref(), &config)?;
        match sled.get(Tree::Meta, layout::META_FORMAT)? {
            Some(f) if f == layout::FORMAT.as_bytes() => return Ok(0),
            Some(f) if f == layout::FORMAT_1.as_bytes() => {}
            Some(f) => return Err(StoreError::UnsupportedFormat { found: sanitize(&f), expected: layout::FORMAT_1 }),
            None => {
                return Err(StoreError::UnsupportedFormat { found: "(missing)".into(), expected: layout::FORMAT_1 })
            }
        }
        let mut plain = Vec::new();
        let mut corrupt = None;
        sled.scan(Tree::Grants, &[], &mut |k, v| {
            if v.starts_with(&codec::STATE_MAGIC) {
                match codec::decode_state(v) {
                    Ok(_) => plain.push(k.to_vec()),
                    Err(source) => {
                        corrupt = Some(StoreError::Corrupt { what: layout::key_name(layout::GRANTS, k), source });
                        return false;
                    }
                }
            }
            true
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        let mut sealed = 0;
        for k in &plain {
            let Some(mut frame) = sled.get(Tree::Grants, k)? else { continue };
            let state = codec::decode_state(&frame)
                .map_err(|source| StoreError::Corrupt { what: layout::key_name(layout::GRANTS, k), source })?;
            sled.put_raw(Tree::Grants, k, &seal::seal(keys, Slot::State(k), state.version, &frame))?;
            frame.zeroize();
            sealed += 1;
        }
        if let Some(mut fk) = sled.get(Tree::Meta, layout::META_FINGERPRINT_KEY)? {
            if fk.len() == 32 {
                sled.put_raw(
                    Tree::Meta,
                    layout::META_FINGERPRINT_KEY,
                    &seal::seal(keys, Slot::FingerprintKey, 0, &fk),
                )?;
                sealed += 1;
            }
            fk.zeroize();
        }
        sled.sync_creation()?;
        sled.put_raw(Tree::Meta, layout::META_FORMAT, layout::FORMAT.as_bytes())?;
        sled.sync_creation()?;
        tracing::info!(sealed, "store upgraded to format tokenwal-store/2");
        Ok(sealed)
    }

    fn start(
        backend: Backend,
        keys: KeyRing,
        config: StoreConfig,
        started: Instant,
        dir: Option<&Path>,
    ) -> Result<(Store, OpenReport), StoreError> {
        let (fingerprint, created) = prepare(&backend, &keys, dir)?;
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
            match backend.get(Tree::Grants, k)?.map(|f| decode_grant(&keys, k, &f)) {
                Some(Ok(s)) if s.phase.is_open() => open_attempts += 1,
                Some(Ok(_)) => corrupt.push(layout::key_name(layout::OPEN, k)),
                Some(Err(e)) => {
                    let what = layout::key_name(layout::GRANTS, k);
                    tracing::error!(what = %what, error = %e, "unreadable grant state in the open index: quarantined");
                    corrupt.push(what);
                }
                None => corrupt.push(layout::key_name(layout::GRANTS, k)),
            }
        }

        let shared = Arc::new(Shared::new(backend, config, fingerprint, keys, grants));
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

    /// The ids of the store keys this handle holds (active first).
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.shared().keys.ids()
    }

    fn submit(&self, mut batch: WriteBatch) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        self.check()?;
        validate(&batch)?;
        // Seal on the caller's thread (the committer stays a single, short critical path) and wipe
        // the plaintext frame, which holds the tokens.
        let sealed = seal::seal(&self.shared().keys, Slot::State(&batch.grant), batch.new_version, &batch.state);
        let mut plain = std::mem::replace(&mut batch.state, sealed);
        plain.zeroize();
        self.send(batch)
    }

    fn send(&self, batch: WriteBatch) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
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
        frame.map(|f| decode_grant(&self.shared().keys, &key, &f)).transpose()
    }

    /// The stored envelope of `grant` as readers see it (pre-image first), with its durable open flag.
    fn stored_envelope(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let live = self.shared().backend.get(Tree::Grants, key)?;
        let frame = match lock(&self.shared().pending).get(key) {
            Some(pre) => pre.state.clone(),
            None => live,
        };
        self.check()?;
        Ok(frame)
    }

    /// Re-seals `grant`'s state under the active key if an older key sealed it: a compare-and-swap
    /// on the state's version through the committer, durable when this returns. The state's
    /// content and version are unchanged, so a concurrent writer is unaffected (if it wins, this
    /// answers [`StoreError::Conflict`] and a retry finds its state, sealed under the active key).
    ///
    /// Crash-safe and idempotent: before the sync either envelope is in place, and both open with a
    /// ring holding both keys. `tokenwal rekey` calls this for every grant.
    pub fn reseal_blocking(&self, grant: &GrantKey) -> Result<Reseal, StoreError> {
        self.check()?;
        let key = grant.to_bytes();
        let Some(sealed) = self.stored_envelope(&key)? else { return Ok(Reseal::Missing) };
        let keys = &self.shared().keys;
        let (header, plain) = seal::open(keys, Slot::State(&key), &sealed).map_err(|e| open_error(keys, &key, e))?;
        if header.key_id == keys.active_id() {
            return Ok(Reseal::AlreadyActive);
        }
        let state = codec::decode_state(&plain)
            .map_err(|source| StoreError::Corrupt { what: layout::key_name(layout::GRANTS, &key), source })?;
        let batch = WriteBatch {
            grant: key.clone(),
            expected_version: Some(header.version),
            new_version: header.version,
            state: seal::seal(keys, Slot::State(&key), header.version, &plain),
            open: state.phase.is_open(),
            records: Vec::new(),
        };
        let rx = self.send(batch)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)??;
        Ok(Reseal::Resealed)
    }

    /// Which key ids seal the grant states and the fingerprint key (from the clear headers: no
    /// decryption, a full scan of the grants).
    pub fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        self.check()?;
        let shared = self.shared();
        let mut usage = KeyUsage::default();
        if let Some(fk) = shared.backend.get(Tree::Meta, layout::META_FINGERPRINT_KEY)? {
            usage.fingerprint_key = seal::header(&fk).ok().map(|h| h.key_id);
        }
        shared.backend.scan(Tree::Grants, &[], &mut |k, v| {
            match seal::header(v) {
                Ok(h) => *usage.grants.entry(h.key_id).or_default() += 1,
                Err(_) => usage.corrupt.push(layout::key_name(layout::GRANTS, k)),
            }
            true
        })?;
        self.check()?;
        Ok(usage)
    }

    /// The keys of every grant whose state is sealed under a key other than the active one (from the
    /// clear headers), in key order: `tokenwal rekey`'s work list.
    pub fn grants_under_old_keys(&self) -> Result<Vec<GrantKey>, StoreError> {
        self.check()?;
        let active = self.shared().keys.active_id();
        let mut out = Vec::new();
        self.shared().backend.scan(Tree::Grants, &[], &mut |k, v| {
            if seal::header(v).is_ok_and(|h| h.key_id != active) {
                if let Ok(g) = GrantKey::from_bytes(k) {
                    out.push(g);
                }
            }
            true
        })?;
        Ok(out)
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
            match decode_grant(&self.shared().keys, &k, &f) {
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
                Some(Some(frame)) => decode_grant(&shared.keys, k, frame),
                None => decode_grant(&shared.keys, k, v),
            };
            match decoded {
                Ok(s) => {
                    report.grants += 1;
                    f(s);
                }
                Err(e) => {
                    let what = layout::key_name(layout::GRANTS, k);
                    tracing::error!(what = %what, error = %e, "unreadable grant state skipped by a scan");
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
                Store::start(backend, self.shared().keys.clone(), self.shared().config.clone(), Instant::now(), None)
                    .expect("a crash image of an in-memory store always opens")
                    .0
            }
            Backend::Sled(_) => panic!("crash_image is only available on an in-memory store"),
        }
    }

    /// Test hook: [`Store::crash_image`], reopened under the ring `keys` makes of this store's ring
    /// (e.g. a rotated one).
    ///
    /// # Panics
    ///
    /// If this store is not in-memory, or the new ring cannot open it.
    #[doc(hidden)]
    pub fn crash_image_with_keys(&self, keys: impl FnOnce(&KeyRing) -> KeyRing) -> Store {
        match &self.shared().backend {
            Backend::Memory(m) => {
                let backend = Backend::Memory(MemBackend::from_image(m.durable_image()));
                let keys = keys(&self.shared().keys);
                Store::start(backend, keys, self.shared().config.clone(), Instant::now(), None)
                    .expect("the crash image opens under the new ring")
                    .0
            }
            Backend::Sled(_) => panic!("crash_image_with_keys is only available on an in-memory store"),
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

fn open_error(keys: &KeyRing, key: &[u8], e: OpenError) -> StoreError {
    let what = layout::key_name(layout::GRANTS, key);
    match e {
        OpenError::Corrupt(source) => StoreError::Corrupt { what, source },
        OpenError::UnknownKey(key_id) => StoreError::KeyUnavailable { what, key_id, ring: keys.ids() },
    }
}

/// Opens a stored envelope and decodes the state frame inside. The plaintext is wiped after decoding.
fn decode_grant(keys: &KeyRing, key: &[u8], sealed: &[u8]) -> Result<GrantState, StoreError> {
    let (_, plain) = seal::open(keys, Slot::State(key), sealed).map_err(|e| open_error(keys, key, e))?;
    codec::decode_state(&plain)
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
