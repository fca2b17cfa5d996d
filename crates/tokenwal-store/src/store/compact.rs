//! Compaction: deleting journal records past retention, never what a cursor still needs.
//!
//! Nothing in the engine or the CLI calls it yet (docs/journal.md §6 "Retention"): until something
//! schedules it, the journal grows.

use super::Store;
use crate::backend::Expired;
use crate::config::CompactReport;
use crate::error::StoreError;
use crate::layout::{self, Tree};
use crate::shared::Counters;
use tokenwal_core::UnixMillis;

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
}
