//! Recovery at [`crate::Engine::open`]: batched through the store's group commit, and bounded by a
//! time budget.
//!
//! 1. **Transitions.** The planner's transitions (`Refreshing` → `Ambiguous{Interrupted}`, or
//!    needs-reauth past the retry window) are issued concurrently, at most [`TRANSITION_WINDOW`] at
//!    a time, so that the store's single committer makes each group of them durable with one sync.
//!    Each is its own grant's compare-and-swap: no transition depends on another grant's, so their
//!    order across grants does not matter. Every transition is durable before any probe is sent.
//! 2. **Probes.** Every ambiguous grant is retried once with its old credential, at most
//!    `max_concurrent_refreshes` at a time (the engine's permits), each attempt in an engine-owned
//!    task (intent durable before send, commit durable before use, as always).
//!
//! Both steps run in one engine-owned background task. `Engine::open` waits for it at most the
//! recovery budget; the grants it has not finished by then are *recovering*: callers for them get
//! [`Error::Recovering`] (or wait, by [`crate::Config::wait_for_recovery`]), every other grant is
//! served at once. Shutdown stops the task (no new probe starts; a probe on the wire runs to its
//! durable outcome); what it did not finish stays open in the store and the next open recovers it.

use crate::clock::now;
use crate::error::Error;
use crate::failpoint;
use crate::inner::Inner;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenwal_core::{recovery, GrantKey, Intention, Phase, RecoveryItem, UnixMillis};
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
}

impl Recovering {
    pub(crate) fn new(wait: bool) -> Recovering {
        Recovering { grants: Mutex::new(HashSet::new()), left: watch::channel(0).0, wait }
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
    not_before: HashMap<GrantKey, UnixMillis>,
}

/// How many orphaned attempts one claim of a shared store takes: enough to keep this process's
/// probes busy (four rounds of its permits), few enough that the other processes of a fleet
/// restarted at once find work too.
fn claim_chunk(inner: &Inner) -> usize {
    (inner.max_refreshes * 4).clamp(64, 2048)
}

/// The next batch: on a shared store, orphaned attempts claimed for this process (at most a
/// chunk; empty when none is left); otherwise every open grant.
async fn next_batch(inner: &Arc<Inner>, tally: &Tally) -> Result<Batch, Error> {
    let store = inner.store.clone();
    let shared = store.is_shared();
    let chunk = claim_chunk(inner);
    let open =
        tokio::task::spawn_blocking(move || if shared { store.claim_orphans(chunk) } else { store.open_grants() })
            .await
            .map_err(|e| Error::Internal(format!("recovery task failed: {e}")))??;
    let plan = recovery::plan(&inner.machine, &open, now(), rand::random());
    let (interrupted, _, _) = plan.summary();
    tally.open.fetch_add(open.len(), Ordering::SeqCst);
    tally.interrupted.fetch_add(interrupted, Ordering::SeqCst);
    // A shared store: the process that left an attempt open may have died with its request still
    // on the wire; its probe waits until that request would have timed out, so that the server
    // never sees two requests for the grant at once. (A lease that ran out covers that already:
    // it is more than twice the timeout.)
    let timeout = inner.transport.total_timeout();
    let not_before = if shared {
        open.iter()
            .filter_map(|s| match &s.phase {
                Phase::Refreshing { started_at, .. } => Some((s.grant.clone(), started_at.saturating_add(timeout))),
                _ => None,
            })
            .collect()
    } else {
        HashMap::new()
    };
    inner.recovering.start(plan.items.iter().map(|i| i.grant.clone()));
    Ok(Batch { items: plan.items, not_before })
}

/// Runs recovery, waiting for it at most `budget`; the rest goes on in the background.
///
/// On a shared store, recovery works through orphaned attempts *claimed* for this process a chunk at
/// a time ([`tokenwal_store::Store::claim_orphans`]): the processes of a fleet restarted at once
/// recover disjoint grants in parallel, and a process claims its next chunk only when its probes are
/// running short of work.
pub(crate) async fn run(inner: &Arc<Inner>, budget: Duration) -> Result<Counts, Error> {
    let tally = Arc::new(Tally::default());
    let first = next_batch(inner, &tally).await?;
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
    let finished = match tokio::time::timeout(budget, task).await {
        Ok(joined) => {
            joined.map_err(|e| Error::Internal(format!("recovery task failed: {e}")))??;
            true
        }
        Err(_) => false,
    };
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

/// The background task: for each batch, its transitions through group commit, then its probes.
/// On a shared store the next batch is claimed once fewer than half a chunk of probes are left.
async fn recover(inner: Arc<Inner>, first: Batch, tally: Arc<Tally>) -> Result<(), Error> {
    let mut stop = inner.shutdown.subscribe();
    let mut probes = JoinSet::new();
    let mut batch = Some(first);
    let mut result = Ok(());
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
        // The store is fail-stop after a failed write: nothing more can be done in this process.
        warn!(error = %e, "recovery stopped: a transition could not be written");
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

/// One batch: every transition durable (group-committed), then a probe per ambiguous grant spawned
/// into `probes`.
async fn transitions_then_probes(
    inner: &Arc<Inner>,
    batch: Batch,
    tally: &Arc<Tally>,
    probes: &mut JoinSet<()>,
) -> Result<(), Error> {
    let Batch { items, not_before } = batch;
    let not_before = Arc::new(not_before);
    // The grants whose attempt this process took over (its transition committed): only their probes
    // wait out the dead request. Another process that took a grant over first owns it now.
    let took: Arc<Mutex<HashSet<GrantKey>>> = Arc::new(Mutex::new(HashSet::new()));
    let mut to_resolve = Vec::new();
    let mut commits = JoinSet::new();
    let mut first_error: Option<Error> = None;
    for item in items {
        match item.intention {
            Intention::Resolve { .. } => to_resolve.push(item.grant.clone()),
            Intention::NeedsReauth(_) => {
                tally.needs_reauth.fetch_add(1, Ordering::SeqCst);
            }
            Intention::Nothing => {}
        }
        let resolves = matches!(item.intention, Intention::Resolve { .. });
        let Some(t) = item.transition else {
            if !resolves {
                inner.recovering.finish(&item.grant);
            }
            continue;
        };
        while commits.len() >= TRANSITION_WINDOW {
            note(&mut first_error, commits.join_next().await);
        }
        let (inner, grant, took) = (Arc::clone(inner), item.grant, Arc::clone(&took));
        commits.spawn(async move {
            match inner.commit_transition(t).await {
                Ok(()) => {
                    lock(&took).insert(grant.clone());
                    failpoint::hit("during-recovery")
                }
                // Open returned (the budget ran out) and a caller wrote the grant first (an install,
                // an uninstall): what is durable now supersedes the plan. A planned probe reads it
                // afresh (and does nothing if the grant is no longer open).
                Err(Error::Store(StoreError::Conflict { .. })) => {
                    debug!(%grant, "recovery transition superseded by a newer write");
                }
                // Another process of a shared store took this attempt over first and holds it.
                Err(Error::Store(StoreError::Busy { .. })) => {
                    debug!(%grant, "recovery transition: another live process holds the attempt");
                }
                Err(e) => return Err(e),
            }
            if !resolves {
                inner.recovering.finish(&grant);
            }
            Ok(())
        });
    }
    while let Some(r) = commits.join_next().await {
        note(&mut first_error, Some(r));
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Every transition of the batch is durable: now its probes.
    for grant in to_resolve {
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
            inner.keep_fresh(&grant, true).await;
            match inner.store.get(&grant).ok().flatten().map(|s| s.phase) {
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

fn note(first: &mut Option<Error>, joined: Option<Result<Result<(), Error>, tokio::task::JoinError>>) {
    let e = match joined {
        Some(Ok(Ok(()))) | None => return,
        Some(Ok(Err(e))) => e,
        Some(Err(e)) => Error::Internal(format!("a recovery transition task failed: {e}")),
    };
    first.get_or_insert(e);
}
