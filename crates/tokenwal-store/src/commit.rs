//! The committer: the one thread that writes.
//!
//! It blocks for the first request, drains whatever else is queued (up to `max_batch`), applies
//! the group in one transaction (each batch checked on its own: a conflict writes nothing of that
//! batch and answers only that writer; the memory backend applies one batch at a time), then
//! makes the whole group durable with one flush and one sync, and only then answers every writer.
//! Concurrent writers therefore share syncs: that is the design, not an optimisation (concurrent
//! `flush()` calls do not batch in sled).
//!
//! Readers never see a write before it is durable: before a group's first write to a grant becomes
//! visible, the grant's durable state is recorded in [`Shared::pending`], which readers prefer to the
//! live trees; the entries are dropped only after the sync.
//!
//! Fail-stop: the first failed transaction or sync poisons the store. Every writer of that group
//! whose batch was (or may have been) written gets [`StoreError::Io`] (it may already be durable);
//! every later request gets [`StoreError::Poisoned`].
//!
//! One transaction per group (sled and PostgreSQL, [`crate::backend::DurableBackend::whole_groups`]):
//! a sled transaction writes out the log's I/O buffer when it starts, so its cost is per transaction
//! far more than per key (see `SledBackend::whole_groups`). A failed group transaction may have
//! written any of its batches: every writer of the group gets the failure and the store is poisoned.

use crate::backend::{ApplyError, BatchResult};
use crate::error::StoreError;
use crate::hooks::FaultPoint;
use crate::layout::{self, Tree};
use crate::lock::lock;
use crate::shared::{Counters, PreImage, Shared};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;
use tokenwal_core::WriteBatch;
use tokio::sync::oneshot;

/// A write and where to send its answer.
pub(crate) struct Request {
    pub batch: WriteBatch,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
}

/// What became of one batch of a group.
enum Answer {
    /// Written (or, if it failed in the attempt, possibly written): `Ok` once the group is synced.
    Written,
    /// Refused without writing anything.
    Refused(StoreError),
}

/// The committer thread's body. `next_lsn` is the first unused LSN.
pub(crate) fn run(shared: Arc<Shared>, rx: Receiver<Request>, mut next_lsn: u64) {
    let max = shared.config.max_batch.max(1);
    let mut group = Vec::new();
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < max {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        commit_group(&shared, &mut next_lsn, &mut group);
    }
}

/// Records the durable state of `grant` before the group's first write to it becomes visible.
/// Every LSN from `first_lsn` on belongs to the group, so history readers stop below it.
fn capture_preimage(shared: &Shared, grant: &[u8], first_lsn: u64) -> Result<(), StoreError> {
    let mut pending = lock(&shared.pending);
    if pending.contains_key(grant) {
        // An earlier batch of this group touched it: the captured image is still the durable one.
        return Ok(());
    }
    let state = shared.backend.get(Tree::Grants, grant)?;
    let open = shared.backend.get(Tree::Open, grant)?.is_some();
    pending.insert(grant.to_vec(), PreImage { state, open, first_lsn });
    Ok(())
}

/// Writes one batch in its own transaction. The outer `Err` is a failure (the batch may have been
/// written); the inner one a refusal (nothing written).
fn write_one(shared: &Shared, b: &WriteBatch, lsn: u64, group_lsn: u64) -> Result<BatchResult, StoreError> {
    shared.hooks.fault(FaultPoint::BeforeWrite).map_err(|source| StoreError::Io { op: "transaction", source })?;
    capture_preimage(shared, &b.grant, group_lsn)?;
    let started = Instant::now();
    let result = shared.backend.apply(&shared.keys, b, lsn);
    Counters::add_time(&shared.counters.write_nanos, started);
    let result = result?;
    shared.hooks.fault(FaultPoint::AfterWrite).map_err(|source| StoreError::Io { op: "transaction", source })?;
    Ok(result)
}

/// Writes a whole group in one backend call (one transaction), for a backend that prefers it. The
/// pre-images are captured first unless the backend's readers see only durable data anyway.
fn write_whole(
    shared: &Shared,
    group: &[Request],
    first_lsn: u64,
) -> Result<std::collections::VecDeque<BatchResult>, StoreError> {
    shared.hooks.fault(FaultPoint::BeforeWrite).map_err(|source| StoreError::Io { op: "transaction", source })?;
    if !shared.backend.readers_see_only_durable() {
        for r in group {
            capture_preimage(shared, &r.batch.grant, first_lsn)?;
        }
    }
    let batches: Vec<&WriteBatch> = group.iter().map(|r| &r.batch).collect();
    let started = Instant::now();
    let results = shared.backend.apply_group(&shared.keys, &batches, first_lsn);
    Counters::add_time(&shared.counters.write_nanos, started);
    let results = results?;
    shared.hooks.fault(FaultPoint::AfterWrite).map_err(|source| StoreError::Io { op: "transaction", source })?;
    Ok(results.into())
}

fn commit_group(shared: &Shared, next_lsn: &mut u64, group: &mut Vec<Request>) {
    if shared.is_poisoned() {
        for r in group.drain(..) {
            let _ = r.reply.send(Err(StoreError::Poisoned));
        }
        return;
    }
    let c = &shared.counters;
    let group_lsn = *next_lsn;
    let mut answers = Vec::with_capacity(group.len());
    let mut failure: Option<StoreError> = None;
    let (mut written, mut records, mut new_grants) = (0u64, 0u64, 0u64);
    // A backend that writes a whole group in one transaction (PostgreSQL) gets it in one call.
    let mut whole = if shared.backend.whole_groups() { Some(write_whole(shared, group, *next_lsn)) } else { None };
    for req in group.iter() {
        let b = &req.batch;
        let result = match &mut whole {
            None => write_one(shared, b, *next_lsn, group_lsn),
            Some(Ok(results)) => Ok(results.pop_front().expect("one result per batch")),
            Some(Err(e)) => {
                // The group's transaction failed: any of its batches may have been written.
                failure = Some(e.duplicate());
                answers.extend(group.iter().map(|_| Answer::Written));
                break;
            }
        };
        match result {
            Ok(Ok(new)) => {
                let n = b.records.len() as u64;
                *next_lsn += n;
                written += 1;
                records += n;
                new_grants += u64::from(new);
                answers.push(Answer::Written);
            }
            Ok(Err(ApplyError::Conflict { found })) => {
                Counters::add(&c.conflicts, 1);
                answers.push(Answer::Refused(StoreError::Conflict {
                    grant: String::from_utf8_lossy(&b.grant).into_owned(),
                    expected: b.expected_version,
                    found,
                }));
            }
            Ok(Err(ApplyError::Busy(member))) => {
                Counters::add(&c.conflicts, 1);
                answers.push(Answer::Refused(StoreError::Busy {
                    grant: String::from_utf8_lossy(&b.grant).into_owned(),
                    member,
                }));
            }
            Ok(Err(ApplyError::UnknownKey(key_id))) => {
                Counters::add(&c.corrupt_refusals, 1);
                let what = layout::key_name(layout::GRANTS, &b.grant);
                tracing::error!(what = %what, key_id = %key_id, "write refused: stored state is sealed under a key not in the ring");
                answers.push(Answer::Refused(StoreError::KeyUnavailable { what, key_id, ring: shared.keys.ids() }));
            }
            Ok(Err(ApplyError::Corrupt(source))) => {
                Counters::add(&c.corrupt_refusals, 1);
                let what = layout::key_name(layout::GRANTS, &b.grant);
                tracing::error!(what = %what, error = %source, "write refused: stored state is corrupt");
                answers.push(Answer::Refused(StoreError::Corrupt { what, source }));
            }
            Err(e) => {
                // This batch may have been written; the ones after it are never attempted.
                *next_lsn += b.records.len() as u64;
                failure = Some(e);
                answers.push(Answer::Written);
                break;
            }
        }
    }
    if failure.is_none() && written > 0 {
        shared.hooks.park_if_held();
        let started = Instant::now();
        let synced = shared
            .hooks
            .fault(FaultPoint::Sync)
            .map_err(|source| StoreError::Io { op: "sync", source })
            .and_then(|()| shared.backend.sync());
        let took = started.elapsed();
        Counters::add(&c.sync_nanos, u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        match synced {
            Ok(()) => {
                c.observe_sync(took);
                Counters::add(&c.syncs, 1);
                Counters::add(&c.commit_groups, 1);
                Counters::add(&c.batches_applied, written);
                Counters::add(&c.records_appended, records);
                shared.durable_grants.fetch_add(new_grants, Ordering::Relaxed);
            }
            Err(e) => failure = Some(e),
        }
    }
    if failure.is_some() || written == 0 {
        // Nothing of this group will be synced: a backend holding it open (PostgreSQL's group
        // transaction, with the fence's lock) lets it go.
        shared.backend.end_unsynced_group();
    }
    if let Some(f) = &failure {
        shared.poison(f);
        tracing::error!(error = %f, "store poisoned: a write or sync failed; reopen it to recover");
    }
    lock(&shared.pending).clear();
    let mut answers = answers.into_iter();
    for req in group.drain(..) {
        let answer = match (answers.next(), &failure) {
            (Some(Answer::Written), None) => Ok(()),
            (Some(Answer::Written), Some(f)) => Err(f.duplicate()),
            (Some(Answer::Refused(e)), _) => Err(e),
            // Never attempted: the group failed before it.
            (None, _) => Err(StoreError::Poisoned),
        };
        let _ = req.reply.send(answer);
    }
}
