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
///
/// With a backend whose sync may run beside the next group's writes
/// ([`crate::backend::DurableBackend::pipelined_sync`], sled), the sync runs on a second thread:
/// group N+1 is written while group N is synced, and at most one group waits written for its
/// sync. A group that writes a grant of the group being synced waits for that sync first, so
/// every grant has at most one unsynced writer group (its pre-image is the durable state).
pub(crate) fn run(shared: Arc<Shared>, rx: Receiver<Request>, mut next_lsn: u64) {
    let max = shared.config.max_batch.max(1);
    let pipelined = shared.backend.pipelined_sync();
    std::thread::scope(|scope| {
        let mut syncer: Option<Syncer> = None;
        if pipelined {
            let (tx, srx) = std::sync::mpsc::sync_channel::<Written>(0);
            let shared = &shared;
            let spawned = std::thread::Builder::new().name("tokenwal-sync".into()).spawn_scoped(scope, move || {
                let mut first_failure = None;
                while let Ok(w) = srx.recv() {
                    sync_and_answer(shared, w, &mut first_failure);
                }
            });
            match spawned {
                Ok(_) => syncer = Some(Syncer { tx, last: None }),
                Err(e) => tracing::warn!(error = %e, "no sync thread: syncing on the committer"),
            }
        }
        let mut group = Vec::new();
        // The failure that poisoned the store, as seen by this thread's syncs (no sync thread).
        let mut first_failure = None;
        while let Ok(first) = rx.recv() {
            if let Some(s) = &mut syncer {
                s.park_if_held(&shared);
            }
            group.push(first);
            while group.len() < max {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            match &mut syncer {
                None => {
                    let w = write_group(&shared, &mut next_lsn, &mut group);
                    sync_and_answer(&shared, w, &mut first_failure);
                }
                Some(s) => {
                    s.wait_if_shared(&shared, &group);
                    let w = write_group(&shared, &mut next_lsn, &mut group);
                    let (done_tx, done_rx) = std::sync::mpsc::channel();
                    let w = Written { done: Some(done_tx), ..w };
                    if let Err(back) = s.tx.send(w) {
                        // The sync thread is gone (it panicked): sync here.
                        sync_and_answer(&shared, back.0, &mut first_failure);
                        continue;
                    }
                    s.last = Some(done_rx);
                }
            }
        }
    });
}

/// The committer's handle on the sync thread.
struct Syncer {
    tx: std::sync::mpsc::SyncSender<Written>,
    /// The signal that the last group handed over was settled (synced or failed, its pre-images
    /// dropped; its writers are answered right after).
    last: Option<Receiver<()>>,
}

impl Syncer {
    /// The last group handed over, if it is not settled yet.
    fn in_flight(&mut self) -> Option<&Receiver<()>> {
        let done = self.last.as_ref()?;
        if matches!(done.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)) {
            self.last.as_ref()
        } else {
            self.last = None;
            None
        }
    }

    /// A test's ack hold (no-op in builds without the `test-hooks` feature): while acks are held,
    /// this thread parks too and then waits for the held group to settle, so that writes queue up
    /// behind the held group exactly as they would without the sync thread.
    fn park_if_held(&mut self, shared: &Shared) {
        if self.in_flight().is_some() && shared.hooks.park_writer_if_held() {
            if let Some(done) = self.last.take() {
                let _ = done.recv();
            }
        }
    }

    /// Waits for the last group handed over to be synced and answered if `group` writes one of
    /// its grants: those are the grants with a pre-image now (the group being synced is the only
    /// unsynced one, and its pre-images go only after its sync).
    fn wait_if_shared(&mut self, shared: &Shared, group: &[Request]) {
        let Some(done) = self.in_flight() else { return };
        let shares = {
            let pending = lock(&shared.pending);
            group.iter().any(|r| pending.contains_key(&r.batch.grant))
        };
        if shares {
            // `Err`: the sync thread dropped the signal, i.e. it answered the group (or is gone).
            let _ = done.recv();
            self.last = None;
        }
    }
}

/// A group written (or refused, or failed) and not yet synced: what the sync step needs.
struct Written {
    group: Vec<Request>,
    answers: Vec<Answer>,
    failure: Option<StoreError>,
    written: u64,
    records: u64,
    new_grants: u64,
    /// Dropped once the group is settled, just before its writers are answered.
    done: Option<std::sync::mpsc::Sender<()>>,
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

/// Writes `group` (taking its requests): every batch is applied or refused, or the write failed.
/// Nothing is synced or answered yet.
fn write_group(shared: &Shared, next_lsn: &mut u64, group: &mut Vec<Request>) -> Written {
    let group: Vec<Request> = std::mem::take(group);
    let mut w =
        Written { group, answers: Vec::new(), failure: None, written: 0, records: 0, new_grants: 0, done: None };
    if shared.is_poisoned() {
        // Nothing is attempted: every writer gets `Poisoned`.
        return w;
    }
    let group = &w.group;
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
    w.answers = answers;
    w.failure = failure;
    (w.written, w.records, w.new_grants) = (written, records, new_grants);
    w
}

/// Makes a written group durable with one sync (unless it wrote nothing or failed), then answers
/// its writers and drops its pre-images. A group written while an earlier group's sync failed (the
/// pipelined sync) is not synced: its writers get that earlier failure (`first_failure`, kept by
/// the thread that syncs), which says "may already be durable", as their writes may be.
fn sync_and_answer(shared: &Shared, w: Written, first_failure: &mut Option<StoreError>) {
    let Written { group, answers, mut failure, written, records, new_grants, done } = w;
    let c = &shared.counters;
    if failure.is_none() && written > 0 && shared.is_poisoned() {
        failure = Some(first_failure.as_ref().map_or_else(
            || StoreError::Io {
                op: "sync",
                source: std::io::Error::other("an earlier commit group failed: the store is poisoned"),
            },
            StoreError::duplicate,
        ));
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
        if first_failure.is_none() {
            *first_failure = Some(f.duplicate());
        }
        if !shared.is_poisoned() {
            tracing::error!(error = %f, "store poisoned: a write or sync failed; reopen it to recover");
        }
        shared.poison(f);
    }
    {
        // Only this group's pre-images: a group written since holds its own (on other grants).
        let mut pending = lock(&shared.pending);
        for r in &group {
            pending.remove(&r.batch.grant);
        }
    }
    // The committer learns that this group is settled before any of its writers does: a writer
    // that got its answer and writes again never finds this group still "in flight" (which would
    // make a test's ack hold park the committer instead of the next group's sync).
    drop(done);
    let mut answers = answers.into_iter();
    for req in group {
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
