//! Compaction: deleting journal records past retention, and a grant's records beyond the newest
//! `keep` ([`Store::trim_history`]); never what a cursor still needs. The engine schedules both in
//! the background (`tokenwal::Config::compaction`); `tokenwal compact` runs them now.

use super::Store;
use crate::backend::Expired;
use crate::config::CompactReport;
use crate::error::StoreError;
use crate::layout::{self, Tree};
use crate::lock::lock;
use crate::shared::Counters;
use tokenwal_core::{codec, GrantKey, UnixMillis};

impl Store {
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
                shared.poison(&e);
                tracing::error!(error = %e, "store poisoned: compaction failed; reopen it to recover");
                return Err(e);
            }
            Counters::add(&shared.counters.compacted, entries.len() as u64);
        }
        Ok(CompactReport { removed: entries.len(), cutoff, more: entries.len() == chunk })
    }

    /// Deletes `grant`'s journal records (with their index entries) beyond its newest `keep`, at
    /// most `config.compact_chunk` per call, and returns how many it deleted (call again while it
    /// returns a full chunk). Records a cursor's consumer has not consumed are kept, and so are
    /// records that fail their checks (they stay for `tokenwal inspect`, and for retention).
    ///
    /// Like [`Store::compact`]: not synced by itself, and a failure poisons the store.
    pub fn trim_history(&self, grant: &GrantKey, keep: usize) -> Result<usize, StoreError> {
        self.check()?;
        let shared = self.shared();
        let key = grant.to_bytes();
        let chunk = shared.config.compact_chunk.max(1);
        let keep_from = self.lowest_cursor()?.unwrap_or(u64::MAX);
        // A commit group not yet durable owns every LSN from its first one: never counted or touched.
        let below = lock(&shared.pending).get(&key).map_or(u64::MAX, |p| p.first_lsn);
        let (mut newer, mut lsns) = (0usize, Vec::new());
        let end = layout::history_key(&key, below);
        shared.backend.scan_rev(Tree::History, &layout::history_prefix(&key), &end, &mut |k, _| {
            let Some(lsn) = layout::trailing_lsn(k) else { return true };
            newer += 1;
            if newer > keep && lsn < keep_from {
                lsns.push(lsn);
            }
            lsns.len() < chunk
        })?;
        let mut entries = Vec::with_capacity(lsns.len());
        for lsn in lsns {
            // The record's time names its expiry entry; a record that is gone or unreadable is left.
            let Some(frame) = shared.backend.get(Tree::Journal, &layout::journal_key(lsn))? else { continue };
            let Ok(record) = codec::decode_record(&frame) else { continue };
            entries.push(Expired { key: layout::expiry_key(record.at().0, lsn), lsn, grant: key.clone() });
        }
        if !entries.is_empty() {
            if let Err(e) = shared.backend.delete_expired(&entries) {
                shared.poison(&e);
                tracing::error!(error = %e, "store poisoned: trimming a history failed; reopen it to recover");
                return Err(e);
            }
            Counters::add(&shared.counters.compacted, entries.len() as u64);
        }
        Ok(entries.len())
    }
}
