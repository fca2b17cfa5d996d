//! Recovery at [`crate::Engine::open`]: batched through the store's group commit, and bounded by a
//! time budget.
//!
//! 0. **What is open.** On a store that is not shared, the open grants are known at once from the
//!    open index's keys ([`tokenwal_store::Store::open_keys`]: no state is read or decrypted); they
//!    are *recovering* from then on. Reading their states and planning is the background task's
//!    first step, inside the budget like the rest (a shared store claims its orphans a chunk at a
//!    time, [`tokenwal_store::Store::claim_orphans`], and reads them then).
//! 1. **Interrupted attempts, folded into their probes.** A grant found `Refreshing` (an intent
//!    without outcome) that can be probed now gets **one** durable write: its probe's intent, which
//!    carries the interruption's records before it and replaces the interrupted intent with one
//!    compare-and-swap ([`tokenwal_core::Goal::RecoverInterrupted`],
//!    [`tokenwal_core::Machine::retry_interrupted`]).
//!    The history reads exactly as if written apart: `Interrupted`, then the retry's intent.
//! 2. **Interruptions written alone.** The rest — a grant whose retry must wait (a dead process's
//!    request on a shared store that has not timed out yet), one the interruption settles without a
//!    retry (an exchange that falls back), every grant planned after open's budget ran out and every
//!    probe still waiting for a permit then (so that a hanging endpoint leaves them `Ambiguous`, as
//!    before) — get their `Refreshing` → `Ambiguous{Interrupted}` transition by itself, issued
//!    concurrently (at most [`TRANSITION_WINDOW`] at a time) so that the store's single committer makes
//!    each group of them durable with one sync. Each is decided under the grant's flight lock from
//!    the state read then: a `Refreshing` state seen there is no live attempt of this process.
//! 3. **Probes.** Every ambiguous grant is retried once with its old credential, at most
//!    `max_concurrent_refreshes` at a time (the engine's permits), each attempt in an engine-owned
//!    task (intent durable before send, commit durable before use, as always).
//!
//! All of it runs in one engine-owned background task. `Engine::open` waits for it at most the
//! recovery budget, counted from before the open index is read; the grants it has not finished by
//! then are *recovering*: callers for them get [`Error::Recovering`] (or wait, by
//! [`crate::Config::wait_for_recovery`]), every other grant is served at once. Shutdown stops the task
//! (no new probe starts; a probe on the wire runs to its durable outcome); what it did not finish
//! stays open in the store and the next open recovers it.

use crate::clock::now;
use crate::error::Error;
use crate::failpoint;
use crate::inner::Inner;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenwal_core::{recovery, AttemptId, GrantKey, GrantState, Intention, Phase, RecoveryItem, UnixMillis};
use tokenwal_store::StoreError;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// The most recovery transitions waiting for the committer at once (two of its groups).
const TRANSITION_WINDOW: usize = 2048;

/// The retry hint of [`Error::Recovering`].
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The grants whose recovery is still running.
pub(crate) struct Recovering {
    grants: Mutex<HashSet<GrantKey>>,
    /// How many grants are still recovering (every change wakes waiters).
    left: watch::Sender<usize>,
    /// Whether callers wait for a recovering grant (up to `max_wait`) instead of being answered
    /// [`Error::Recovering`] at once.
    pub(crate) wait: bool,
    /// Interrupted attempts whose interruption is folded into their probe.
    fold: Mutex<Fold>,
}

/// Recovery's interrupted attempts whose interruption is written with their probe's intent
/// (module docs, step 1): each is *deferred* (its interruption not written, its probe waiting for a
/// permit), then either *armed* by its probe (which folds it) or *flushed* when open's budget runs
/// out (its interruption is then written alone), never both: both moves happen under one lock.
#[derive(Default)]
struct Fold {
    /// Whether interruptions may still be deferred (until open's budget runs out).
    open: bool,
    deferred: HashMap<GrantKey, AttemptId>,
    armed: HashMap<GrantKey, AttemptId>,
}

impl Recovering {
    pub(crate) fn new(wait: bool) -> Recovering {
        Recovering {
            grants: Mutex::new(HashSet::new()),
            left: watch::channel(0).0,
            wait,
            fold: Mutex::new(Fold::default()),
        }
    }

    fn start(&self, grants: impl IntoIterator<Item = GrantKey>) {
        let mut set = lock(&self.grants);
        set.extend(grants);
        self.left.send_replace(set.len());
    }

    fn finish(&self, grant: &GrantKey) {
        let mut set = lock(&self.grants);
        if set.remove(grant) {
            self.left.send_replace(set.len());
        }
    }

    /// Defers `grant`'s interruption of `attempt` to its probe; `false` (nothing deferred) once
    /// open's budget has run out.
    fn defer(&self, grant: &GrantKey, attempt: AttemptId) -> bool {
        let mut f = lock(&self.fold);
        if f.open {
            f.deferred.insert(grant.clone(), attempt);
        }
        f.open
    }

    /// `grant`'s probe starts: folds its deferred interruption, unless it was flushed.
    fn arm(&self, grant: &GrantKey) -> bool {
        let mut f = lock(&self.fold);
        match f.deferred.remove(grant) {
            Some(attempt) => {
                f.armed.insert(grant.clone(), attempt);
                true
            }
            None => false,
        }
    }

    fn disarm(&self, grant: &GrantKey) {
        lock(&self.fold).armed.remove(grant);
    }

    /// The interrupted attempt `grant`'s running recovery probe folds into its intent, if any.
    pub(crate) fn folding(&self, grant: &GrantKey) -> Option<AttemptId> {
        lock(&self.fold).armed.get(grant).copied()
    }

    /// Whether deferring is allowed, at the start of a recovery: only with a budget (with none,
    /// open returns at once and every interruption is written alone, as before the fold).
    fn allow_fold(&self, allow: bool) {
        lock(&self.fold).open = allow;
    }

    /// Open's budget ran out: nothing more is deferred, and the interruptions whose probes have not
    /// started are returned, to be written alone.
    fn close_fold(&self) -> Vec<(GrantKey, AttemptId)> {
        let mut f = lock(&self.fold);
        f.open = false;
        f.deferred.drain().collect()
    }

    /// How many grants are still recovering.
    pub(crate) fn count(&self) -> usize {
        *self.left.borrow()
    }

    /// Whether `grant`'s recovery is still running.
    pub(crate) fn contains(&self, grant: &GrantKey) -> bool {
        self.count() > 0 && lock(&self.grants).contains(grant)
    }

    /// Waits up to `timeout` for `grant`'s recovery to end; whether it did.
    pub(crate) async fn wait_for(&self, grant: &GrantKey, timeout: Duration) -> bool {
        let mut rx = self.left.subscribe();
        let ended = async {
            while self.contains(grant) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, ended).await.is_ok()
    }
}

/// What recovery has found and done so far (the background task keeps counting after open).
#[derive(Default)]
struct Tally {
    open: AtomicUsize,
    interrupted: AtomicUsize,
    resolved: AtomicUsize,
    still_ambiguous: AtomicUsize,
    needs_reauth: AtomicUsize,
}

/// The counts of [`crate::RecoveryReport`] that recovery fills.
pub(crate) struct Counts {
    pub(crate) open: usize,
    pub(crate) interrupted: usize,
    pub(crate) resolved: usize,
    pub(crate) still_ambiguous: usize,
    pub(crate) needs_reauth: usize,
    /// Grants still recovering in the background when the budget ran out.
    pub(crate) pending: usize,
}

/// One batch of recovery work: the plan for some open grants, and when each probe may be sent.
struct Batch {
    items: Vec<RecoveryItem>,
    /// The attempts found interrupted (`Refreshing`), by grant.
    interrupted: HashMap<GrantKey, AttemptId>,
    not_before: HashMap<GrantKey, UnixMillis>,
    /// The states the plan was made from, by grant: a probe that nothing wrote before it decides on
    /// its grant's reading instead of reading it again (`Inner::keep_fresh`).
    read: HashMap<GrantKey, GrantState>,
}

/// What the background task starts from.
enum First {
    /// A planned batch (a shared store's first claim).
    Batch(Batch),
    /// The open grants, by key only (their states are read in the background).
    Keys(Vec<GrantKey>),
}

/// How many orphaned attempts one claim of a shared store takes: enough to keep this process's
/// probes busy (four rounds of its permits), few enough that the other processes of a fleet
/// restarted at once find work too.
fn claim_chunk(inner: &Inner) -> usize {
    (inner.max_refreshes * 4).clamp(64, 2048)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("recovery task failed: {e}")))
}

/// The next batch of a shared store: orphaned attempts claimed for this process (at most a chunk;
/// empty when none is left).
async fn next_batch(inner: &Arc<Inner>, tally: &Tally) -> Result<Batch, Error> {
    let store = inner.store.clone();
    let chunk = claim_chunk(inner);
    let open = blocking(move || store.claim_orphans(chunk)).await??;
    tally.open.fetch_add(open.len(), Ordering::SeqCst);
    let batch = plan(inner, &open, tally);
    inner.recovering.start(batch.items.iter().map(|i| i.grant.clone()));
    Ok(batch)
}

/// The batch of a store that is not shared: the states of `keys` (recovering since open), read now.
async fn read_batch(inner: &Arc<Inner>, keys: Vec<GrantKey>, tally: &Tally) -> Result<Batch, Error> {
    let store = inner.store.clone();
    let (open, keys) = blocking(move || (store.open_grants_among(&keys), keys)).await?;
    let open = open?;
    let batch = plan(inner, &open, tally);
    // A grant no longer open (or unreadable: reported at open) has nothing left to recover.
    let planned: HashSet<&GrantKey> = batch.items.iter().map(|i| &i.grant).collect();
    for k in keys.iter().filter(|k| !planned.contains(k)) {
        inner.recovering.finish(k);
    }
    Ok(batch)
}

/// The plan for `open`.
fn plan(inner: &Arc<Inner>, open: &[GrantState], tally: &Tally) -> Batch {
    let plan = recovery::plan(&inner.machine, open, now(), rand::random());
    let (interrupted, _, _) = plan.summary();
    tally.interrupted.fetch_add(interrupted, Ordering::SeqCst);
    // A shared store: the process that left an attempt open may have died with its request still
    // on the wire; its probe waits until that request would have timed out, so that the server
    // never sees two requests for the grant at once. (A lease that ran out covers that already:
    // it is more than twice the timeout.)
    let timeout = inner.transport.total_timeout();
    let shared = inner.store.is_shared();
    let mut not_before = HashMap::new();
    let mut found = HashMap::new();
    let read = open.iter().map(|s| (s.grant.clone(), s.clone())).collect();
    for s in open {
        if let Phase::Refreshing { attempt, started_at, .. } = &s.phase {
            found.insert(s.grant.clone(), *attempt);
            if shared {
                not_before.insert(s.grant.clone(), started_at.saturating_add(timeout));
            }
        }
    }
    Batch { items: plan.items, interrupted: found, not_before, read }
}

/// Runs recovery, waiting for it at most `budget`; the rest goes on in the background.
///
/// On a shared store, recovery works through orphaned attempts *claimed* for this process a chunk at
/// a time ([`tokenwal_store::Store::claim_orphans`]): the processes of a fleet restarted at once
/// recover disjoint grants in parallel, and a process claims its next chunk only when its probes are
/// running short of work.
pub(crate) async fn run(inner: &Arc<Inner>, budget: Duration) -> Result<Counts, Error> {
    // The budget counts from here: reading the open index and the states is recovery's work too.
    let deadline = tokio::time::Instant::now() + budget;
    let tally = Arc::new(Tally::default());
    inner.recovering.allow_fold(!budget.is_zero());
    let first = if inner.store.is_shared() {
        First::Batch(next_batch(inner, &tally).await?)
    } else {
        let store = inner.store.clone();
        let keys = blocking(move || store.open_keys()).await??;
        tally.open.fetch_add(keys.len(), Ordering::SeqCst);
        inner.recovering.start(keys.iter().cloned());
        First::Keys(keys)
    };
    let ticket = inner.attempt_ticket();
    let task = tokio::spawn({
        let (inner, tally) = (Arc::clone(inner), Arc::clone(&tally));
        async move {
            // The engine's state (and the store's file lock with it) goes before the ticket that
            // shutdown waits for.
            let r = recover(inner, first, tally).await;
            drop(ticket);
            r
        }
    });
    let finished = match tokio::time::timeout_at(deadline, task).await {
        Ok(joined) => {
            joined.map_err(|e| Error::Internal(format!("recovery task failed: {e}")))??;
            true
        }
        Err(_) => false,
    };
    if !finished {
        // The probes still waiting for a permit leave their grants `Ambiguous` now, as recovery
        // did before the fold: a hanging endpoint must not keep them `Refreshing` for long.
        spawn_flush(inner, inner.recovering.close_fold());
    }
    let pending = inner.recovering.count();
    debug_assert!(!finished || pending == 0);
    Ok(Counts {
        open: tally.open.load(Ordering::SeqCst),
        interrupted: tally.interrupted.load(Ordering::SeqCst),
        resolved: tally.resolved.load(Ordering::SeqCst),
        still_ambiguous: tally.still_ambiguous.load(Ordering::SeqCst),
        needs_reauth: tally.needs_reauth.load(Ordering::SeqCst),
        pending,
    })
}

/// Writes the interruptions of `flushed` alone (group-committed, in an engine-owned task that
/// shutdown stops and waits for).
fn spawn_flush(inner: &Arc<Inner>, flushed: Vec<(GrantKey, AttemptId)>) {
    if flushed.is_empty() {
        return;
    }
    let ticket = inner.attempt_ticket();
    let inner = Arc::clone(inner);
    tokio::spawn(async move {
        let mut writes = JoinSet::new();
        for (grant, attempt) in flushed {
            if *inner.shutdown.borrow() || inner.store.is_poisoned() {
                break;
            }
            while writes.len() >= TRANSITION_WINDOW {
                writes.join_next().await;
            }
            let inner = Arc::clone(&inner);
            writes.spawn(async move {
                if let Err(e) = interrupt(&inner, &grant, attempt).await {
                    warn!(%grant, error = %e, "recovery: an interruption could not be written; the next open retries");
                }
            });
        }
        while writes.join_next().await.is_some() {}
        drop(ticket);
    });
}

/// Writes `grant`'s `Refreshing` → `Ambiguous{Interrupted}` transition if it is still `Refreshing`
/// `attempt`, decided under the grant's flight lock from the state read there (so never over a live
/// attempt of this process). Whether this process wrote it.
async fn interrupt(inner: &Arc<Inner>, grant: &GrantKey, attempt: AttemptId) -> Result<bool, Error> {
    let slot = inner.slots.get_or_create(grant.account());
    let _flight = slot.flight().await;
    let Some(s) = inner.store.get(grant)? else { return Ok(false) };
    if !matches!(&s.phase, Phase::Refreshing { attempt: a, .. } if *a == attempt) {
        return Ok(false);
    }
    let Some(t) = inner.machine.recover_interrupted(&s, now(), rand::random()) else { return Ok(false) };
    match inner.commit_transition(t).await {
        Ok(()) => {
            failpoint::hit("during-recovery");
            Ok(true)
        }
        // A caller wrote the grant first (an install, an uninstall, after open returned): what is
        // durable now supersedes the plan.
        Err(Error::Store(StoreError::Conflict { .. })) => {
            debug!(%grant, "recovery transition superseded by a newer write");
            Ok(false)
        }
        // Another process of a shared store took this attempt over first and holds it.
        Err(Error::Store(StoreError::Busy { .. })) => {
            debug!(%grant, "recovery transition: another live process holds the attempt");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// A shared store (a fleet): every `every`, recovers the attempts that processes which are gone left
/// open, as recovery at open does for the ones found then. Each orphan is taken over by whichever
/// process's compare-and-swap commits first; the others find it held (`Busy`) or moved on
/// (`Conflict`) and leave it. Skips a round while an earlier recovery is still running.
pub(crate) fn spawn_orphan_sweep(inner: &Arc<Inner>, every: Duration) {
    let weak = Arc::downgrade(inner);
    let mut stop = inner.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let Some(inner) = weak.upgrade() else { return };
            if *inner.shutdown.borrow() || inner.store.is_poisoned() {
                return;
            }
            if inner.recovering.count() > 0 {
                continue;
            }
            match run(&inner, Duration::ZERO).await {
                Ok(c) if c.open > 0 => {
                    info!(
                        orphaned = c.open,
                        interrupted = c.interrupted,
                        "recovering attempts left open by processes that are gone"
                    )
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "orphan sweep failed; retrying next round"),
            }
        }
    });
}

/// The background task: for each batch, the interruptions written alone through group commit, then
/// its probes.
/// On a shared store the next batch is claimed once fewer than half a chunk of probes are left.
async fn recover(inner: Arc<Inner>, first: First, tally: Arc<Tally>) -> Result<(), Error> {
    let mut stop = inner.shutdown.subscribe();
    let mut probes = JoinSet::new();
    let mut result = Ok(());
    let mut batch = match first {
        First::Batch(b) => Some(b),
        First::Keys(keys) => match read_batch(&inner, keys, &tally).await {
            Ok(b) => Some(b),
            Err(e) => {
                result = Err(e);
                None
            }
        },
    };
    while let Some(b) = batch.take() {
        if let Err(e) = transitions_then_probes(&inner, b, &tally, &mut probes).await {
            result = Err(e);
            break;
        }
        if !inner.store.is_shared() {
            break;
        }
        let low = claim_chunk(&inner) / 2;
        while probes.len() > low {
            probes.join_next().await;
        }
        if *stop.borrow_and_update() || inner.store.is_poisoned() {
            break;
        }
        match next_batch(&inner, &tally).await {
            Ok(b) if b.items.is_empty() => {}
            Ok(b) => batch = Some(b),
            // Not fatal here: what is not claimed stays orphaned for the next sweep (or another
            // process); a store that failed is fail-stopped by its own error path.
            Err(e) => warn!(error = %e, "could not claim more orphaned attempts; the next sweep retries"),
        }
    }
    while probes.join_next().await.is_some() {}
    if let Err(e) = result {
        // The store is fail-stop after a failed read or write: nothing more can be done in this
        // process.
        warn!(error = %e, "recovery stopped: the open grants could not be read or a transition written");
        return Err(e);
    }
    if *stop.borrow_and_update() {
        info!(left = inner.recovering.count(), "recovery stopped by shutdown; the next open resumes it");
    } else {
        info!(
            grants = tally.open.load(Ordering::SeqCst),
            resolved = tally.resolved.load(Ordering::SeqCst),
            still_ambiguous = tally.still_ambiguous.load(Ordering::SeqCst),
            needs_reauth = tally.needs_reauth.load(Ordering::SeqCst),
            "recovery finished"
        );
    }
    Ok(())
}

/// One batch: the interruptions that are not folded durable (group-committed), then a probe per
/// grant to resolve spawned into `probes` (a deferred interruption goes with its probe's intent).
async fn transitions_then_probes(
    inner: &Arc<Inner>,
    batch: Batch,
    tally: &Arc<Tally>,
    probes: &mut JoinSet<()>,
) -> Result<(), Error> {
    let Batch { items, interrupted, not_before, mut read } = batch;
    let not_before = Arc::new(not_before);
    // The grants whose attempt this process took over (its transition committed): only their probes
    // wait out the dead request. Another process that took a grant over first owns it now.
    let took: Arc<Mutex<HashSet<GrantKey>>> = Arc::new(Mutex::new(HashSet::new()));
    let mut to_resolve = Vec::new();
    let mut commits = JoinSet::new();
    let mut first_error: Option<Error> = None;
    let at = now();
    for item in items {
        let resolves = matches!(item.intention, Intention::Resolve { .. });
        match item.intention {
            Intention::Resolve { .. } => {}
            Intention::NeedsReauth(_) => {
                tally.needs_reauth.fetch_add(1, Ordering::SeqCst);
            }
            Intention::Nothing => {}
        }
        let found = interrupted.get(&item.grant).copied();
        let Some(attempt) = found.filter(|_| item.transition.is_some()) else {
            if resolves {
                let reading = read.remove(&item.grant);
                to_resolve.push((item.grant, None, reading));
            } else {
                inner.recovering.finish(&item.grant);
            }
            continue;
        };
        // Probed now (no dead request to wait out): the interruption goes with the probe's intent.
        let may_go = not_before.get(&item.grant).is_none_or(|nb| *nb <= at);
        if resolves && may_go && inner.recovering.defer(&item.grant, attempt) {
            let reading = read.remove(&item.grant);
            to_resolve.push((item.grant, Some(attempt), reading));
            continue;
        }
        while commits.len() >= TRANSITION_WINDOW {
            note(&mut first_error, commits.join_next().await);
        }
        let (inner, grant, took) = (Arc::clone(inner), item.grant.clone(), Arc::clone(&took));
        commits.spawn(async move {
            if interrupt(&inner, &grant, attempt).await? {
                lock(&took).insert(grant.clone());
            }
            if !resolves {
                inner.recovering.finish(&grant);
            }
            Ok(())
        });
        if resolves {
            // Its interruption is written alone first: the plan's reading will be stale.
            to_resolve.push((item.grant, Some(attempt), None));
        }
    }
    while let Some(r) = commits.join_next().await {
        note(&mut first_error, Some(r));
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Every interruption written alone is durable: now the probes.
    for (grant, found, reading) in to_resolve {
        let inner = Arc::clone(inner);
        let tally = Arc::clone(tally);
        let not_before = Arc::clone(&not_before);
        let took = lock(&took).contains(&grant);
        let mut stop = inner.shutdown.subscribe();
        probes.spawn(async move {
            if let Some(at) = not_before.get(&grant).filter(|_| took) {
                let wait = at.since(now());
                if !wait.is_zero() {
                    debug!(%grant, wait_ms = wait.as_millis() as u64, "probe waits for the dead process's request to time out");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
            let _permit = tokio::select! {
                p = inner.permits.acquire() => p,
                _ = stop.wait_for(|s| *s) => return,
            };
            if *inner.shutdown.borrow() {
                return;
            }
            let folds = inner.recovering.arm(&grant);
            let known = inner.keep_fresh(&grant, true, reading).await;
            if folds {
                inner.recovering.disarm(&grant);
            }
            let mut phase = phase_now(&inner, &grant, known);
            // Still the interrupted attempt: its fold did not happen (it was flushed at the
            // budget and not written yet, sending is paused, the machine refused). Interrupt it
            // alone, then probe the ambiguity.
            if let (Some(attempt), Some(Phase::Refreshing { attempt: a, .. })) = (found, &phase) {
                if *a == attempt && !*inner.shutdown.borrow() {
                    let known = match interrupt(&inner, &grant, attempt).await {
                        Ok(_) => inner.keep_fresh(&grant, true, None).await,
                        Err(e) => {
                            warn!(%grant, error = %e, "recovery: an interruption could not be written; the next open retries");
                            None
                        }
                    };
                    phase = phase_now(&inner, &grant, known);
                }
            }
            match phase {
                Some(Phase::Healthy) => tally.resolved.fetch_add(1, Ordering::SeqCst),
                Some(Phase::NeedsReauth { .. }) => tally.needs_reauth.fetch_add(1, Ordering::SeqCst),
                Some(_) => tally.still_ambiguous.fetch_add(1, Ordering::SeqCst),
                None => 0,
            };
            inner.recovering.finish(&grant);
        });
    }
    Ok(())
}

/// The grant's phase after its probe: the state the probe knew it left durable, else read now.
fn phase_now(inner: &Inner, grant: &GrantKey, known: Option<GrantState>) -> Option<Phase> {
    known.or_else(|| inner.store.get(grant).ok().flatten()).map(|s| s.phase)
}

fn note(first: &mut Option<Error>, joined: Option<Result<Result<(), Error>, tokio::task::JoinError>>) {
    let e = match joined {
        Some(Ok(Ok(()))) | None => return,
        Some(Ok(Err(e))) => e,
        Some(Err(e)) => Error::Internal(format!("a recovery transition task failed: {e}")),
    };
    first.get_or_insert(e);
}
