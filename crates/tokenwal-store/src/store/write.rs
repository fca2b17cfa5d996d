//! Writing: a batch is validated and sealed on the caller's thread, then handed to the committer.

use super::Store;
use crate::commit::Request;
use crate::error::StoreError;
use crate::seal::{self, Slot};
use crate::shared::Counters;
use tokenwal_core::{codec, WriteBatch};
use tokio::sync::oneshot;
use zeroize::Zeroize;

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

impl Store {
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

    pub(super) fn send(&self, batch: WriteBatch) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
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
}
