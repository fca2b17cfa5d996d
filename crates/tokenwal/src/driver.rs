//! The driver: the one place that carries a [`Goal`] for one grant through the machine, the store and
//! the network. It reads the grant's durable state, asks the machine what to do
//! ([`Machine::decide`]), does it — a write, or an attempt: intent durable → send → outcome durable
//! (`docs/journal.md` §2) — and on a version conflict re-reads and decides again. The engine, its
//! acquisitions and the CLI all drive grants through it; none of them writes a transition itself.
//!
//! In the engine, attempts are owned by the engine, not by the caller's future
//! ([`Inner::drive_owned`]): once a decision to send is taken, the attempt runs to its durable
//! outcome (or to ambiguity) whatever happens to the caller.

use crate::cache::Flight;
use crate::clock::now;
use crate::error::Error;
use crate::failpoint;
use crate::inner::Inner;
use std::future::Future;
use std::sync::Arc;
use tokenwal_core::{
    AttemptRequest, Decision, Durable, Goal, GrantKey, GrantState, Machine, NoChange, NotSentReason, Outcome, Pending,
    Refusal, TokenSet, UnixMillis, ABANDONED,
};
use tokenwal_store::{Store, StoreError};
use tracing::{info, warn, Instrument};

/// What a request must leave of the membership lease beyond its own timeout.
const LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);
/// The `NotSent` detail of a request withheld because the lease would not outlive it.
const LEASE_TOO_SHORT: &str = "not sent: the store lease would not outlive the request";

/// How many version conflicts in a row a goal survives before the driver gives up (each one means
/// another writer won; under the engine's per-grant flight lock they are rare).
const MAX_CONFLICTS: usize = 64;

/// The driver's I/O: how a request is sent, what follows a durable transition, and whether sending
/// is allowed now.
pub trait Io: Sync {
    /// Sends the request of a durable intent. Never fails: every failure is an [`Outcome`].
    fn send(&self, request: &Durable<AttemptRequest>) -> impl Future<Output = Outcome> + Send;
    /// Runs after every durable transition (cache, events, scheduler).
    fn after_durable<T>(&self, done: &Durable<T>);
    /// `Some(until)`: sending is paused fleet-wide (the app's credentials were refused); a decision
    /// to send is not carried out (nothing is written).
    fn paused(&self) -> Option<UnixMillis>;
}

/// An [`Io`] with no network, for tools that only install, uninstall or mark (`tokenwal import`). A
/// decision to send is never carried out: such tools drive only goals that write.
pub struct Offline;

impl Io for Offline {
    async fn send(&self, _: &Durable<AttemptRequest>) -> Outcome {
        Outcome::NotSent(NotSentReason::Build { detail: "offline driver: no network".into() })
    }
    fn after_durable<T>(&self, _: &Durable<T>) {}
    fn paused(&self) -> Option<UnixMillis> {
        // Offline: nothing may be sent, ever.
        Some(UnixMillis(u64::MAX))
    }
}

/// What driving a goal did.
#[derive(Debug)]
#[non_exhaustive]
pub enum Driven {
    /// Nothing was written: the goal was met already or does not apply.
    Unchanged {
        /// Why.
        why: NoChange,
        /// The durable state it was decided on.
        state: Option<GrantState>,
    },
    /// The goal cannot be carried out now; nothing was written.
    Refused {
        /// Why.
        refusal: Refusal,
        /// The durable state it was decided on.
        state: Option<GrantState>,
    },
    /// An attempt was due, but sending is paused fleet-wide; nothing was written.
    Paused {
        /// When sending resumes.
        until: UnixMillis,
    },
    /// A transition was made durable; nothing was sent. Its verdict says what it was.
    Wrote(Durable<Option<TokenSet>>),
    /// An attempt ran: its answer, and the durable transition that settled it (its verdict says
    /// whether it applied; new tokens are released only by it).
    Attempted {
        /// The durable settlement.
        settled: Durable<Option<TokenSet>>,
        /// The answer.
        outcome: Outcome,
    },
}

/// Drives goals for grants of one store.
pub struct Driver<'a, I> {
    store: &'a Store,
    machine: &'a Machine,
    io: &'a I,
}

impl<'a, I: Io> Driver<'a, I> {
    /// A driver over `store`, deciding with `machine`, doing I/O through `io`.
    pub fn new(store: &'a Store, machine: &'a Machine, io: &'a I) -> Driver<'a, I> {
        Driver { store, machine, io }
    }

    /// Carries out `goal` for `grant`, deciding first on the grant's state as read now.
    pub async fn drive(&self, grant: &GrantKey, goal: &Goal) -> Result<Driven, Error> {
        self.run(grant, goal, None, None).await
    }

    /// [`Driver::drive`] for a caller that has just read the grant's durable state (`read`; `None`:
    /// no such grant) and chose `goal` from it: the first decision is taken on `read` instead of a
    /// second read of the store. That is safe because every write is a compare-and-swap on the
    /// state version `read` carries: if the grant moved on since, the write is refused
    /// ([`StoreError::Conflict`]; for an intent, nothing is sent) and the driver re-reads and
    /// decides again, as after any conflict.
    ///
    /// `stop_if_moved`: once the grant is found moved on from `read` (another process of a shared
    /// store refreshed it), nothing more is done ([`NoChange::Moved`]) and the caller decides again
    /// — so a refresh the fleet already made is not made twice.
    pub async fn drive_from(
        &self,
        grant: &GrantKey,
        goal: &Goal,
        read: Option<GrantState>,
        stop_if_moved: bool,
    ) -> Result<Driven, Error> {
        let seen = stop_if_moved.then(|| read.as_ref().map(|s| s.version));
        self.run(grant, goal, Some(read), seen).await
    }

    /// The decide-and-act loop. `first`: the state to decide on first (`None`: read it); `seen`: the
    /// version (or absence) the caller decided on, if the grant moving on from it ends the drive.
    async fn run(
        &self,
        grant: &GrantKey,
        goal: &Goal,
        mut first: Option<Option<GrantState>>,
        seen: Option<Option<u64>>,
    ) -> Result<Driven, Error> {
        let mut busy = 0;
        for _ in 0..MAX_CONFLICTS {
            // The caller's reading first; after a conflict or a busy wait, the store's.
            let current = match first.take() {
                Some(read) => read,
                None => self.store.get(grant)?,
            };
            // Checked again after every conflict or busy wait: whoever wrote in between moved it on.
            // (On the caller's own reading it holds trivially; a move the caller did not see shows as
            // the conflict of the first write, and then here.)
            if let Some(seen) = seen {
                if current.as_ref().map(|s| s.version) != seen {
                    return Ok(Driven::Unchanged { why: NoChange::Moved, state: current });
                }
            }
            let decision = self.machine.decide(current.as_ref(), grant, goal, now());
            let written = match decision {
                Decision::Nothing(why) => return Ok(Driven::Unchanged { why, state: current }),
                Decision::Refuse(refusal) => return Ok(Driven::Refused { refusal, state: current }),
                Decision::Write(pending) => self.write(pending).await.map(Driven::Wrote),
                Decision::Send(pending) => match self.io.paused() {
                    Some(until) => return Ok(Driven::Paused { until }),
                    None => self.attempt(pending).await,
                },
            };
            match written {
                // Someone else wrote first (for an intent: nothing was sent): re-read and decide again.
                Err(Error::Store(StoreError::Conflict { .. })) => continue,
                // Another process of a shared store has an attempt in flight for this grant: nothing
                // was written; give it a moment to settle, then re-read and decide again.
                Err(Error::Store(StoreError::Busy { .. })) => busy_pause(&mut busy).await,
                other => return other,
            }
        }
        Err(Error::Internal(format!("{grant}: {} gave up after {MAX_CONFLICTS} write conflicts", goal.name())))
    }

    async fn write(&self, pending: Pending<Option<TokenSet>>) -> Result<Durable<Option<TokenSet>>, Error> {
        let done = pending.make_durable(self.store).await?;
        self.io.after_durable(&done);
        Ok(done)
    }

    /// One attempt: intent durable → send → outcome durable. A conflict on the intent is returned as
    /// `Error::Store(Conflict)` (nothing was sent); a conflict on the outcome re-reads the grant and
    /// settles against what is there now.
    async fn attempt(&self, pending: Pending<AttemptRequest>) -> Result<Driven, Error> {
        let grant = pending.transition().grant().clone();
        failpoint::hit("before-intent");
        // Journal before network: the request exists only once the intent is durable.
        let permit = pending.make_durable(self.store).await?;
        failpoint::hit("after-intent");
        self.io.after_durable(&permit);
        // Re-check before sending: an install or an uninstall may have landed since the intent (it
        // may replace a `Refreshing` state). Then the intent's credential may be retired; it is not
        // sent (a server that revokes the grant family on reuse would revoke the replacement), and
        // the attempt is journaled as abandoned.
        if let Some(settled) = self.abandon_if_replaced(&grant, &permit).await? {
            return Ok(settled);
        }
        let outcome = self.io.send(&permit).await;
        failpoint::hit("after-response");
        let mut current = permit.state().clone();
        for _ in 0..MAX_CONFLICTS {
            let pending = self.machine.on_outcome(&current, &permit, outcome.clone(), now(), rand::random());
            failpoint::hit("before-commit");
            // Commit before use: tokens are released only by a durable commit.
            match pending.make_durable(self.store).await {
                Ok(settled) => {
                    failpoint::hit("after-commit");
                    self.io.after_durable(&settled);
                    return Ok(Driven::Attempted { settled, outcome });
                }
                Err(StoreError::Conflict { .. }) => {
                    // Someone else wrote (an install, an uninstall): re-read before settling.
                    current = self.store.get(&grant)?.ok_or_else(|| Error::NotInstalled { grant: grant.clone() })?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Internal(format!("{grant}: settling an answer gave up after {MAX_CONFLICTS} write conflicts")))
    }
}

impl<I: Io> Driver<'_, I> {
    /// Journals `permit`'s attempt as abandoned if it is no longer the grant's live attempt.
    ///
    /// This costs a store read per attempt (on PostgreSQL a round trip, on sled a get, an
    /// authenticated decrypt and a decode), and it stays one on purpose: installs, uninstalls and
    /// scope updates drive without the flight lock, so only the durable state says whether one
    /// landed since the intent, and no cheaper signal here is as strong. Not the engine's
    /// `after_durable` bookkeeping: it runs after a write is durable (a write durable before this
    /// check but not yet announced would be missed, where the read sees it) and misses writes not
    /// made through the driver. Not the sealed envelope's plaintext header (its version) without
    /// authenticating it: a corrupt or tampered state that stops the send today (the read fails)
    /// would let it go. What would be as strong, on a store with one writing process: a per-grant
    /// mark set by `Store::apply` *before* a batch is queued, so that "no write for this grant was
    /// submitted since the intent" proves the read would return the intent's own state; that is a
    /// change of the store's write path, not made here. On a shared store the read stays in any
    /// case: other processes write it.
    async fn abandon_if_replaced(
        &self,
        grant: &GrantKey,
        permit: &Durable<AttemptRequest>,
    ) -> Result<Option<Driven>, Error> {
        for _ in 0..MAX_CONFLICTS {
            let current = self.store.get(grant)?.ok_or_else(|| Error::NotInstalled { grant: grant.clone() })?;
            let Some(pending) = self.machine.abandon(&current, permit, now()) else { return Ok(None) };
            match pending.make_durable(self.store).await {
                Ok(settled) => {
                    info!(%grant, attempt = permit.value().attempt().0, "attempt abandoned before sending: its credential was replaced");
                    self.io.after_durable(&settled);
                    let outcome = Outcome::NotSent(NotSentReason::Build { detail: ABANDONED.into() });
                    return Ok(Some(Driven::Attempted { settled, outcome }));
                }
                Err(StoreError::Conflict { .. } | StoreError::Busy { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Internal(format!("{grant}: abandoning an attempt gave up after {MAX_CONFLICTS} write conflicts")))
    }
}

/// Waits before re-reading a grant another process holds in flight: 20 ms doubling to 640 ms (its
/// attempt lasts at most the request timeout; the caller's round budget bounds the total wait).
pub(crate) async fn busy_pause(n: &mut u32) {
    let ms = 20u64 << (*n).min(5);
    *n += 1;
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

impl Io for Inner {
    async fn send(&self, request: &Durable<AttemptRequest>) -> Outcome {
        // A shared store: the attempt is this process's only while its membership lease lives;
        // once the lease runs out another process may take the attempt over and send. A request
        // that might outlive the lease is not sent (the check is local and conservative: the lease
        // is counted from when its last renewal was sent).
        if let Some(left) = self.store.lease_left() {
            let needed = self.transport.total_timeout() + LEASE_MARGIN;
            if left < needed {
                warn!(grant = %request.value().grant(), lease_left_ms = left.as_millis() as u64, "not sending: this process's lease of the store would not outlive the request");
                return Outcome::NotSent(NotSentReason::Connect { detail: LEASE_TOO_SHORT.into() });
            }
        }
        let started = std::time::Instant::now();
        let (outcome, status) = self.transport.send(request.value(), now).await;
        self.metrics.observe_attempt(request.value().kind(), &outcome, started.elapsed());
        log_outcome(request.value(), status, &outcome);
        outcome
    }

    fn after_durable<T>(&self, done: &Durable<T>) {
        Inner::after_durable(self, done)
    }

    fn paused(&self) -> Option<UnixMillis> {
        Inner::paused(self, now())
    }
}

impl Inner {
    /// The engine's driver.
    pub(crate) fn driver(&self) -> Driver<'_, Inner> {
        Driver::new(&self.store, &self.machine, self)
    }

    /// Carries out `goal` in a task the engine owns, holding the grant's flight lock. The caller
    /// hands its lock in and gets it back with the result; if the caller goes away (a timeout, a
    /// disconnected client, an aborted task), the task still runs the attempt to its durable outcome
    /// and then releases the lock. Shutdown waits for these tasks.
    ///
    /// The outer error is the task's own failure (it panicked): the lock is released, and a grant
    /// left `Refreshing` is resolved by recovery at the next start.
    pub(crate) async fn drive_owned(
        self: &Arc<Self>,
        grant: GrantKey,
        goal: Goal,
        flight: Flight,
    ) -> Result<(Result<Driven, Error>, Flight), Error> {
        self.spawn_drive(grant, goal, flight, None).await
    }

    /// [`Inner::drive_owned`] deciding first on the state the caller read under `flight`
    /// ([`Driver::drive_from`]'s `read` and `stop_if_moved`).
    pub(crate) async fn drive_owned_from(
        self: &Arc<Self>,
        grant: GrantKey,
        goal: Goal,
        flight: Flight,
        read: Option<GrantState>,
        stop_if_moved: bool,
    ) -> Result<(Result<Driven, Error>, Flight), Error> {
        self.spawn_drive(grant, goal, flight, Some((read, stop_if_moved))).await
    }

    /// The engine-owned task of [`Inner::drive_owned`] and [`Inner::drive_owned_from`].
    async fn spawn_drive(
        self: &Arc<Self>,
        grant: GrantKey,
        goal: Goal,
        flight: Flight,
        from: Option<(Option<GrantState>, bool)>,
    ) -> Result<(Result<Driven, Error>, Flight), Error> {
        let inner = Arc::clone(self);
        let ticket = self.attempt_ticket();
        let span = tracing::info_span!("attempt", %grant, goal = goal.name());
        let task = tokio::spawn(
            async move {
                let driven = match from {
                    Some((read, stop_if_moved)) => inner.driver().drive_from(&grant, &goal, read, stop_if_moved).await,
                    None => inner.driver().drive(&grant, &goal).await,
                };
                // The engine's state (and the store's file lock with it) goes before the ticket
                // that shutdown waits for.
                drop(inner);
                drop(ticket);
                (driven, flight)
            }
            .instrument(span),
        );
        task.await.map_err(|e| {
            let what = if e.is_panic() { "panicked" } else { "was cancelled" };
            Error::Internal(format!("an attempt task {what}"))
        })
    }
}

fn log_outcome(req: &AttemptRequest, status: Option<u16>, outcome: &Outcome) {
    let request_id = outcome.request_id();
    let (grant, attempt) = (req.grant(), req.attempt().0);
    info!(%grant, attempt, status, request_id, outcome = outcome.label(), "token endpoint answered");
}
