//! Reading the journal in LSN order, and named durable cursors into it.
//!
//! A consumer that must see every journal record at least once (the webhook sink) reads records
//! from its cursor with [`Store::journal_from`], acts on them, and only then moves its cursor with
//! [`Store::set_cursor`]. A crash between the two replays the records: at least once, never lost.
//!
//! Cursors live in the `meta` tree under `cursor/{name}` (u64 BE: the first LSN not yet consumed).
//! [`Store::compact`] never deletes a record at or past the lowest cursor, so a consumer that is
//! down or failing holds compaction back instead of losing records; [`Store::delete_cursor`]
//! releases that hold when a consumer is retired.

use crate::config::RecoveryMode;
use crate::error::StoreError;
use crate::layout::{self, Tree};
use crate::lock::lock;
use crate::Store;
use tokenwal_core::{codec, Record};

/// The `meta` key prefix of cursors.
pub const META_CURSOR_PREFIX: &[u8] = b"cursor/";

/// Cursor names: `[a-z0-9_-]{1,64}`.
fn cursor_key(name: &str) -> Result<Vec<u8>, StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        return Err(StoreError::InvalidBatch { reason: "a cursor name must match [a-z0-9_-]{1,64}" });
    }
    let mut k = META_CURSOR_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    Ok(k)
}

impl Store {
    /// The first LSN that is not durable yet: every durable record has a smaller LSN, and LSNs are
    /// never reused. A consumer starting from scratch that wants only records written from now on
    /// starts here.
    pub fn journal_end(&self) -> Result<u64, StoreError> {
        self.check()?;
        let shared = self.shared();
        let last = shared.backend.last_key(Tree::Journal)?.and_then(|k| layout::be_u64(&k)).map(|l| l + 1);
        let floor = shared.backend.get(Tree::Meta, layout::META_LSN_FLOOR)?.and_then(|v| layout::be_u64(&v));
        // A commit group not yet synced owns every LSN from its first one on (see `commit`).
        let pending = lock(&shared.pending).values().map(|p| p.first_lsn).min();
        self.check()?;
        // As the committer's first LSN (`Store::open`): LSN 0 is never used.
        let end = last.unwrap_or(0).max(floor.unwrap_or(0)).max(1);
        Ok(pending.map_or(end, |p| p.min(end)))
    }

    /// Up to `limit` durable journal records with an LSN at or above `from`, `(lsn, record)` in LSN
    /// order. Records not yet durable are never returned (the next call returns them once they
    /// are). Records compacted away are absent.
    ///
    /// A record that fails its checks is [`StoreError::Corrupt`] under [`RecoveryMode::Strict`];
    /// under [`RecoveryMode::SkipCorruptRecords`] it is skipped and logged.
    pub fn journal_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Record)>, StoreError> {
        let end = self.journal_end()?;
        let shared = self.shared();
        let mut out = Vec::new();
        let mut lsn = from;
        while lsn < end && out.len() < limit {
            // Point reads: LSNs are dense above the compaction floor; a gap (compacted, or a
            // batch that failed before the store was reopened) is simply absent.
            if let Some(frame) = shared.backend.get(Tree::Journal, &layout::journal_key(lsn))? {
                match codec::decode_record(&frame) {
                    Ok(r) => out.push((lsn, r)),
                    Err(source) => {
                        let what = format!("{}/{lsn}", layout::JOURNAL);
                        if shared.config.recovery == RecoveryMode::Strict {
                            return Err(StoreError::Corrupt { what, source });
                        }
                        tracing::warn!(what = %what, error = %source, "skipping a corrupt journal record");
                    }
                }
            }
            lsn += 1;
        }
        Ok(out)
    }

    /// The durable position of cursor `name` (the first LSN its consumer has not consumed), or
    /// `None` if it was never set.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.check()?;
        let key = cursor_key(name)?;
        let v = self.shared().backend.get(Tree::Meta, &key)?;
        Ok(v.and_then(|v| layout::be_u64(&v)))
    }

    /// Sets cursor `name` to `lsn` and returns once it is durable. Blocking: from async code call it
    /// inside `spawn_blocking`.
    ///
    /// The write goes to the `meta` tree outside the committer's groups (a cursor is not part of
    /// any grant's state, so it needs no compare-and-swap); a sync makes it durable. A failed write
    /// or sync poisons the store like any other I/O error (it may already be durable).
    pub fn set_cursor(&self, name: &str, lsn: u64) -> Result<(), StoreError> {
        self.check()?;
        let key = cursor_key(name)?;
        let shared = self.shared();
        if let Err(e) = shared.backend.put_meta(&key, Some(&lsn.to_be_bytes())) {
            shared.poison(&e);
            tracing::error!(error = %e, "store poisoned: a cursor write failed; reopen it to recover");
            return Err(e);
        }
        Ok(())
    }

    /// Removes cursor `name` (a retired consumer), releasing its hold on compaction. Durable on
    /// return (sled) like [`Store::set_cursor`].
    pub fn delete_cursor(&self, name: &str) -> Result<(), StoreError> {
        self.check()?;
        let key = cursor_key(name)?;
        let shared = self.shared();
        if let Err(e) = shared.backend.put_meta(&key, None) {
            shared.poison(&e);
            return Err(e);
        }
        Ok(())
    }

    /// The lowest LSN any cursor still needs (compaction keeps every record at or past it).
    pub fn lowest_cursor(&self) -> Result<Option<u64>, StoreError> {
        self.check()?;
        let mut low: Option<u64> = None;
        self.shared().backend.scan(Tree::Meta, META_CURSOR_PREFIX, &mut |_, v| {
            if let Some(l) = layout::be_u64(v) {
                low = Some(low.map_or(l, |x| x.min(l)));
            }
            true
        })?;
        Ok(low)
    }
}
