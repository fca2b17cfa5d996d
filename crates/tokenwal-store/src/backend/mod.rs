//! The backend seam ([`DurableBackend`]), its two implementations, and the write logic they share.
//!
//! A write batch and a compaction chunk are expressed once, over [`Kv`] (a transaction's view of the
//! six trees); each backend runs them atomically in its own way: sled in one cross-tree transaction,
//! the memory backend under its lock. A backend may reuse them (as both do) or implement the same
//! effects natively (a SQL backend: one transaction with `UPDATE … WHERE version = $expected`).

pub(crate) mod disk;
pub(crate) mod mem;
pub(crate) mod pg;

use crate::error::StoreError;
use crate::keys::{KeyId, KeyRing};
use crate::layout::{self, Tree};
use crate::seal::{self, OpenError, Slot};
use tokenwal_core::{CodecError, WriteBatch};

/// Why one batch was not written; it answers only that writer.
pub(crate) enum ApplyError {
    Conflict {
        found: Option<u64>,
    },
    Corrupt(CodecError),
    /// The stored state is sealed under a key the ring does not hold: it cannot be authenticated,
    /// so it is not overwritten.
    UnknownKey(KeyId),
    /// Another live writer of a shared store holds the grant's open intent (its member id).
    Busy(i64),
}

/// A transaction's view of the trees.
pub(crate) trait Kv {
    type Err;
    fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, Self::Err>;
    fn put(&self, t: Tree, k: &[u8], v: &[u8]) -> Result<(), Self::Err>;
    fn del(&self, t: Tree, k: &[u8]) -> Result<(), Self::Err>;

    /// The `open` entry's value for an intent this writer commits. Default: empty (one writer per
    /// store); a shared store names the writer (its member id) so that others can tell whether
    /// the attempt's process is alive.
    fn open_marker(&self) -> Vec<u8> {
        Vec::new()
    }

    /// The member id of another **live** writer holding `grant`'s open intent, if any: only that
    /// writer may write the grant until it settles or its lease runs out. Default: none.
    fn held_elsewhere(&self, _grant: &[u8]) -> Result<Option<i64>, Self::Err> {
        Ok(None)
    }

    /// Adds `n` to the durable grant count. Default: read and rewrite the `meta` entry (one writer
    /// per store); a shared store increments it atomically.
    fn add_grant_count(&self, n: u64) -> Result<(), Self::Err> {
        let v = self.get(Tree::Meta, layout::META_GRANT_COUNT)?;
        let v = v.as_deref().and_then(layout::be_u64).unwrap_or(0);
        self.put(Tree::Meta, layout::META_GRANT_COUNT, &(v + n).to_be_bytes())
    }
}

/// Why a transaction body stopped.
pub(crate) enum TxnFail<E> {
    Abort(ApplyError),
    Kv(E),
}

/// The version of the stored state envelope, checked against the batch's expectation. The stored
/// envelope is authenticated first (it names this grant and is intact), so a tampered or misplaced
/// state is never overwritten by a compare-and-swap.
pub(crate) fn check_version(
    keys: &KeyRing,
    grant: &[u8],
    stored: Option<&[u8]>,
    expected: Option<u64>,
) -> Result<(), ApplyError> {
    let found = match stored {
        None => None,
        Some(sealed) => match seal::open(keys, Slot::State(grant), sealed) {
            Ok((h, _)) => Some(h.version),
            Err(OpenError::Corrupt(e)) => return Err(ApplyError::Corrupt(e)),
            Err(OpenError::UnknownKey(id)) => return Err(ApplyError::UnknownKey(id)),
        },
    };
    if found == expected {
        Ok(())
    } else {
        Err(ApplyError::Conflict { found })
    }
}

/// Writes one batch (its `state` already sealed): compare-and-swap of the state, open index,
/// journal, history and expiry entries, and the grant count for a new grant. Returns whether the
/// grant is new.
pub(crate) fn write_batch<K: Kv>(
    kv: &K,
    keys: &KeyRing,
    b: &WriteBatch,
    first_lsn: u64,
) -> Result<bool, TxnFail<K::Err>> {
    let stored = kv.get(Tree::Grants, &b.grant).map_err(TxnFail::Kv)?;
    check_version(keys, &b.grant, stored.as_deref(), b.expected_version).map_err(TxnFail::Abort)?;
    if let Some(member) = kv.held_elsewhere(&b.grant).map_err(TxnFail::Kv)? {
        return Err(TxnFail::Abort(ApplyError::Busy(member)));
    }
    kv.put(Tree::Grants, &b.grant, &b.state).map_err(TxnFail::Kv)?;
    if b.open {
        kv.put(Tree::Open, &b.grant, &kv.open_marker()).map_err(TxnFail::Kv)?;
    } else {
        kv.del(Tree::Open, &b.grant).map_err(TxnFail::Kv)?;
    }
    for (i, (at, frame)) in b.records.iter().enumerate() {
        let lsn = first_lsn + i as u64;
        kv.put(Tree::Journal, &layout::journal_key(lsn), frame).map_err(TxnFail::Kv)?;
        kv.put(Tree::History, &layout::history_key(&b.grant, lsn), &[]).map_err(TxnFail::Kv)?;
        kv.put(Tree::Expiry, &layout::expiry_key(at.0, lsn), &b.grant).map_err(TxnFail::Kv)?;
    }
    let new = stored.is_none();
    if new {
        kv.add_grant_count(1).map_err(TxnFail::Kv)?;
    }
    Ok(new)
}

/// What became of one batch of a group written in one transaction.
pub(crate) type BatchResult = Result<bool, ApplyError>;

/// Writes a group of batches in one transaction: each batch is checked and written in order (a
/// later batch sees the earlier ones), and a batch refused by its check writes nothing and does not
/// affect the others. Successful batches take consecutive LSNs from `first_lsn`.
pub(crate) fn write_group<K: Kv>(
    kv: &K,
    keys: &KeyRing,
    batches: &[&WriteBatch],
    first_lsn: u64,
) -> Result<Vec<BatchResult>, K::Err> {
    let mut lsn = first_lsn;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        match write_batch(kv, keys, b, lsn) {
            Ok(new) => {
                lsn += b.records.len() as u64;
                out.push(Ok(new));
            }
            Err(TxnFail::Abort(a)) => out.push(Err(a)),
            Err(TxnFail::Kv(e)) => return Err(e),
        }
    }
    Ok(out)
}

/// One journal record past retention, found through the expiry index.
pub(crate) struct Expired {
    pub key: [u8; 16],
    pub lsn: u64,
    pub grant: Vec<u8>,
}

/// Deletes expired records with their index entries and raises the LSN floor above them.
pub(crate) fn delete_expired<K: Kv>(kv: &K, entries: &[Expired]) -> Result<(), K::Err> {
    let mut max = None;
    for e in entries {
        kv.del(Tree::Journal, &layout::journal_key(e.lsn))?;
        kv.del(Tree::History, &layout::history_key(&e.grant, e.lsn))?;
        kv.del(Tree::Expiry, &e.key)?;
        max = max.max(Some(e.lsn));
    }
    if let Some(max) = max {
        let floor = kv.get(Tree::Meta, layout::META_LSN_FLOOR)?;
        let floor = floor.as_deref().and_then(layout::be_u64).unwrap_or(0);
        if max + 1 > floor {
            kv.put(Tree::Meta, layout::META_LSN_FLOOR, &(max + 1).to_be_bytes())?;
        }
    }
    Ok(())
}

/// What a durable backend must provide: the seam between the store (group commit, pre-images,
/// sealing, fail-stop) and the storage engine under it. `docs/journal.md` §6 "Backend seam" is the
/// contract; a new backend (PostgreSQL next) implements exactly this.
///
/// Only the committer thread calls [`DurableBackend::apply_group`] and [`DurableBackend::sync`];
/// [`DurableBackend::delete_expired`] (compaction, on its caller's thread) and
/// [`DurableBackend::put_meta`] (cursors) may run beside it, so their atomic units must be isolated
/// from a group's; [`DurableBackend::init_meta`] runs at open, before the committer starts. Reads
/// run on any thread at any time.
pub(crate) trait DurableBackend: Send + Sync {
    /// The value of `k` in `t` as the last write left it, synced or not (the store hides unsynced
    /// grant states from its readers with its pre-images).
    fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Calls `f` with every entry of `t` whose key starts with `prefix`, in byte order of the keys,
    /// until it returns `false`. No lock that a writer needs may be held while `f` runs.
    fn scan(&self, t: Tree, prefix: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), StoreError>;

    /// Calls `f` with every entry of `t` whose key starts with `prefix` and is less than `below`, in
    /// **descending** byte order of the keys, until it returns `false`; the cost is the entries
    /// visited, not the prefix's. Same locking rule as [`DurableBackend::scan`].
    fn scan_rev(
        &self,
        t: Tree,
        prefix: &[u8],
        below: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;

    /// The greatest key of `t` (the last journal LSN at open).
    fn last_key(&self, t: Tree) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes `batches` with [`write_group`] **atomically**: all of it or none of it is ever visible
    /// or durable, with the compare-and-swap of each batch on its grant's stored version made inside
    /// the same atomic unit. Successful batches take consecutive LSNs from `first_lsn`. Visible at
    /// once, durable only after [`DurableBackend::sync`]. `Err`: the unit failed and **may** have
    /// been written.
    fn apply_group(
        &self,
        keys: &KeyRing,
        batches: &[&WriteBatch],
        first_lsn: u64,
    ) -> Result<Vec<BatchResult>, StoreError>;

    /// Deletes expired journal records with [`delete_expired`], atomically. Not durable by itself.
    fn delete_expired(&self, entries: &[Expired]) -> Result<(), StoreError>;

    /// Makes every write that returned before this call durable (it survives a power cut) before
    /// returning `Ok`. After an `Err`, nothing may be assumed either way.
    fn sync(&self) -> Result<(), StoreError>;

    /// The committer will not sync what it wrote since the last sync (the group failed, or wrote
    /// nothing): drop it if it is still pending. After a failure the store is poisoned, so whether
    /// it was written stays unknown to every caller either way. Default: nothing to do (sled and
    /// memory writes stay visible and are never synced by this handle again).
    fn end_unsynced_group(&self) {}

    /// Whether the committer should hand a whole group to one [`DurableBackend::apply_group`] call
    /// (one transaction) rather than one call per batch. Default `false` (the memory backend: a
    /// failure then names exactly the batches it may have written); sled: `true` (each transaction
    /// writes out sled's log buffer); PostgreSQL: `true` (round trips, not keys, are its cost).
    fn whole_groups(&self) -> bool {
        false
    }

    /// Whether [`DurableBackend::sync`] may run on another thread while the next group is applied
    /// (the sync then makes at least every write that returned before it started durable). The
    /// committer then writes group N+1 while group N is synced. Default `false`; sled: `true`.
    fn pipelined_sync(&self) -> bool {
        false
    }

    /// Whether readers can never see a write before [`DurableBackend::sync`] made it durable (so the
    /// store needs no pre-images). Default `false`; PostgreSQL: `true` (readers use other
    /// connections and see only committed data, and a commit is durable).
    fn readers_see_only_durable(&self) -> bool {
        false
    }

    /// Writes (`Some`) or deletes (`None`) one `meta` entry outside the commit groups (a journal
    /// cursor) and makes it durable before returning. It must not make a concurrent group's
    /// unsynced writes look durable to anyone but a reopen after a real crash.
    fn put_meta(&self, k: &[u8], v: Option<&[u8]>) -> Result<(), StoreError>;

    /// Writes `meta` entries at store creation (or a re-sealed fingerprint key) and makes them
    /// durable, **in order**: an entry is never durable before the ones listed before it (the
    /// format marker goes last). Also makes the store's own existence durable (directory entries).
    fn init_meta(&self, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError>;
}

/// The storage engine under a store: one of the two [`DurableBackend`]s.
pub(crate) enum Backend {
    Sled(disk::SledBackend),
    Memory(mem::MemBackend),
    Postgres(Box<pg::PgBackend>),
}

impl std::ops::Deref for Backend {
    type Target = dyn DurableBackend;

    fn deref(&self) -> &Self::Target {
        match self {
            Backend::Sled(s) => s,
            Backend::Memory(m) => m,
            Backend::Postgres(p) => p.as_ref(),
        }
    }
}

impl Backend {
    /// The backend's name, for `Debug`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Backend::Sled(_) => "sled",
            Backend::Memory(_) => "memory",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Writes one batch in one atomic unit: visible at once, durable only after
    /// [`DurableBackend::sync`]. The outer `Err` means the unit failed (it may or may not have been
    /// written).
    pub(crate) fn apply(&self, keys: &KeyRing, b: &WriteBatch, first_lsn: u64) -> Result<BatchResult, StoreError> {
        let mut results = self.apply_group(keys, &[b], first_lsn)?;
        Ok(results.pop().expect("one result per batch"))
    }
}
