//! Serving tokens and keeping grants fresh: the slow path of [`crate::Engine::access_token`] (the fast
//! path is a cache read) and the background drive of the scheduler and recovery. Both hold the
//! grant's flight lock while they decide, and hand it to an engine-owned attempt task
//! ([`Inner::drive_owned`]) when an attempt is due: a caller that goes away never strands a grant
//! `Refreshing`.

use crate::cache::Flight;
use crate::clock::now;
use crate::driver::Driven;
use crate::error::Error;
use crate::inner::Inner;
use std::sync::Arc;
use tokenwal_core::{AccessToken, Durable, Goal, GrantKey, GrantState, Phase, Refusal, Step, TokenSet, UnixMillis};
use tracing::{debug, warn};

/// How many decide-and-act rounds one call of the slow path makes before it gives up.
const MAX_ROUNDS: usize = 64;

/// What an attempt the slow path or the scheduler asked for came to.
enum Ran {
    /// A transition was made durable (an attempt settled, or an exchange fell back).
    Settled(Box<Durable<Option<TokenSet>>>),
    /// Sending is paused fleet-wide until then; nothing was written.
    Paused(UnixMillis),
    /// Nothing was written: the machine refused (the state changed since it was read) or had
    /// nothing to do. Decide again from the durable state.
    Nothing(Option<Refusal>),
}

impl Inner {
    /// Runs `goal` for `grant` in an engine-owned task holding `flight`, and gives the lock back.
    /// `read`: the durable state the attempt was decided on, read under `flight`; the driver decides
    /// first on it rather than reading the store again (a write made since is caught by the
    /// compare-and-swap on its version). On a shared store, another process that moved the grant
    /// on since makes this a no-op (decide again), not a second refresh; so does any writer with
    /// `stop_if_moved` (a reading not taken under `flight`).
    async fn run_attempt(
        self: &Arc<Self>,
        grant: &GrantKey,
        goal: Goal,
        flight: Flight,
        read: GrantState,
        stop_if_moved: bool,
    ) -> Result<(Result<Ran, Error>, Flight), Error> {
        let stop = stop_if_moved || self.store.is_shared();
        let (driven, flight) = self.drive_owned_from(grant.clone(), goal, flight, Some(read), stop).await?;
        let ran = driven.map(|d| match d {
            Driven::Attempted { settled, .. } | Driven::Wrote(settled) => Ran::Settled(Box::new(settled)),
            Driven::Paused { until } => Ran::Paused(until),
            Driven::Refused { refusal, .. } => Ran::Nothing(Some(refusal)),
            Driven::Unchanged { .. } => Ran::Nothing(None),
        });
        Ok((ran, flight))
    }

    /// The slow path of `access_token` / `on_unauthorized`: a token usable now, refreshing first if
    /// the grant is due (or if `rejected` is its current access token).
    pub(crate) async fn slow_token(
        self: &Arc<Self>,
        grant: &GrantKey,
        rejected: Option<&AccessToken>,
    ) -> Result<AccessToken, Error> {
        let slot = self.slots.get_or_create(grant.account());
        let mut flight = match slot.try_flight() {
            Some(f) => f,
            None => {
                // Someone is refreshing this grant. A token that is still valid (merely inside the
                // refresh margin) is served at once rather than queueing behind that refresh.
                if rejected.is_none() && !self.store.is_poisoned() {
                    if let Some(t) = slot.still_valid(now()) {
                        return Ok(t);
                    }
                }
                slot.flight().await
            }
        };
        let deadline = now().saturating_add(self.max_wait);
        let mut force = rejected.is_some();
        let mut in_flight_waits = 0;
        for _ in 0..MAX_ROUNDS {
            if *self.shutdown.borrow() {
                return Err(Error::ShuttingDown);
            }
            let now = now();
            // Double-checked: another caller may have refreshed while we waited for the lock.
            if !force && !self.store.is_poisoned() {
                if let Some(t) = self.slots.fresh(grant.account(), now) {
                    return Ok(t);
                }
            }
            let state = self.store.get(grant)?.ok_or_else(|| Error::NotInstalled { grant: grant.clone() })?;
            let tokens = state.tokens.as_ref();
            // A token the caller just saw rejected is never "still valid", whatever its expiry says.
            let still_valid = tokens
                .filter(|t| now < t.access_expires_at && Some(&t.access_token) != rejected)
                .map(|t| t.access_token.clone());
            if let (true, Some(rej), Some(t)) = (force, rejected, tokens) {
                if t.access_token != *rej {
                    // Someone already replaced the rejected token.
                    self.refresh_cache(&slot, &state);
                    return Ok(t.access_token.clone());
                }
            }
            let step = match self.machine.step(&state, now) {
                Step::Idle { .. } if force => Step::Attempt,
                s => s,
            };
            match step {
                Step::Idle { .. } => {
                    self.refresh_cache(&slot, &state);
                    return still_valid.ok_or_else(|| Error::Unavailable { grant: grant.clone(), retry_at: now });
                }
                Step::Attempt => {
                    force = false;
                    let (ran, f) = self.run_attempt(grant, Goal::Refresh, flight, state, false).await?;
                    flight = f;
                    let done = match ran {
                        Ok(Ran::Settled(done)) => done,
                        Ok(Ran::Paused(until)) => return still_valid.ok_or(Error::AppCredentialsRejected { until }),
                        Ok(Ran::Nothing(Some(r))) => match refusal(grant, r) {
                            e if e.is_transient() => continue,
                            e => return Err(e),
                        },
                        Ok(Ran::Nothing(None)) => continue,
                        Err(e) if e.is_transient() => continue,
                        Err(e) => return Err(e),
                    };
                    if let Some(t) = done.value() {
                        return Ok(t.access_token.clone());
                    }
                    // No tokens: ambiguous, refused or dead. Loop to decide (wait, serve, or fail).
                    if let Phase::NeedsReauth { .. } = done.state().phase {
                        continue;
                    }
                    if let Some(t) = &still_valid {
                        if !matches!(self.machine.step(done.state(), crate::clock::now()), Step::Attempt) {
                            return Ok(t.clone());
                        }
                    }
                }
                Step::Wait { until } => {
                    if let Some(t) = still_valid {
                        return Ok(t);
                    }
                    if until > deadline {
                        return Err(match &state.phase {
                            Phase::Ambiguous(a) => Error::Ambiguous {
                                grant: grant.clone(),
                                reason: a.last_reason.clone(),
                                retry_at: until,
                            },
                            _ => Error::Unavailable { grant: grant.clone(), retry_at: until },
                        });
                    }
                    tokio::time::sleep(until.since(now)).await;
                }
                // A valid token is still served. Under the flight lock, an attempt in flight is
                // another process's (a shared store: wait for it to commit, or for its lease to
                // run out and the orphan sweep to take it over) or one whose task died (recovery
                // at the next start resolves it).
                Step::InFlight => match still_valid {
                    Some(t) => return Ok(t),
                    None if self.store.is_shared() && now < deadline => {
                        crate::driver::busy_pause(&mut in_flight_waits).await;
                    }
                    None => return Err(Error::InFlight { grant: grant.clone() }),
                },
                Step::Dormant => return dormant(grant, &state, still_valid, rejected.is_some()),
            }
        }
        Err(Error::Unavailable { grant: grant.clone(), retry_at: now() })
    }

    /// Drives a grant until it needs nothing now (the scheduler, recovery and `refresh_due`). Errors
    /// are logged, not returned: the next schedule retries. `resolve_only`: only an open attempt (an
    /// ambiguity) is driven, and its first probe goes at once, whatever backoff a stopped process
    /// set (recovery).
    ///
    /// `read`: a reading of the grant its caller already has (recovery's, taken before the flight
    /// lock): the first decision to **attempt** is made on it without reading the store again. That
    /// is safe because the attempt's intent is a compare-and-swap on the reading's version: if the
    /// grant moved on (an install, another process), nothing is written or sent, the drive stops
    /// there, and the decision is made again on the durable state — so an install that landed in
    /// between is not refreshed by a probe, exactly as without a reading. Any other decision (no
    /// attempt) is not made on the reading either: the store is read, so that nothing stale reaches
    /// the cache.
    ///
    /// Returns the grant's durable state when it stopped, if it knows it (the state it read last, or
    /// the one its attempt settled in); `None` when it does not (an error, a pause, shutdown, an
    /// attempt the driver found nothing to do for).
    pub(crate) async fn keep_fresh(
        self: &Arc<Self>,
        grant: &GrantKey,
        resolve_only: bool,
        mut read: Option<GrantState>,
    ) -> Option<GrantState> {
        let slot = self.slots.get_or_create(grant.account());
        let mut flight = slot.flight().await;
        let mut first = true;
        for _ in 0..4 {
            // Recovery stops at shutdown: a probe that settled unresolved is not sent again (under
            // load its backoff may already be over by the time it is looked at).
            if resolve_only && *self.shutdown.borrow() {
                return None;
            }
            let given = read.take();
            let from_caller = given.is_some();
            let read_now = match given {
                Some(s) => Ok(Some(s)),
                None => self.store.get(grant),
            };
            let state = match read_now {
                Ok(Some(s)) => s,
                Ok(None) => return None,
                Err(e) => {
                    warn!(%grant, error = %e, "cannot read grant");
                    return None;
                }
            };
            if resolve_only && !state.phase.is_open() {
                if from_caller {
                    continue; // decided on the durable state instead
                }
                return Some(state);
            }
            let now = now();
            let recovery = resolve_only && first;
            first = false;
            // Recovery's probe of an attempt a stop interrupted writes the interruption with its
            // intent (`recover.rs`), while the grant is still `Refreshing` that attempt.
            let fold = match (&state.phase, if recovery { self.recovering.folding(grant) } else { None }) {
                (Phase::Refreshing { attempt, .. }, Some(interrupted)) if *attempt == interrupted => Some(interrupted),
                _ => None,
            };
            let step = match self.machine.step(&state, now) {
                // Recovery probes an ambiguity at once.
                Step::Wait { .. } if recovery && matches!(state.phase, Phase::Ambiguous(_)) => Step::Attempt,
                Step::InFlight if fold.is_some() => Step::Attempt,
                s => s,
            };
            if !matches!(step, Step::Attempt) {
                if from_caller {
                    // Decide again on the durable state (this is still the first decision).
                    first = true;
                    continue;
                }
                self.refresh_cache(&slot, &state);
                self.scheduler.notify(&state, &self.machine, now);
                return Some(state);
            }
            let goal = match fold {
                Some(attempt) => Goal::RecoverInterrupted { attempt },
                None if recovery => Goal::Recover,
                None => Goal::Refresh,
            };
            let ran = match self.run_attempt(grant, goal, flight, state, from_caller).await {
                Ok((ran, f)) => {
                    flight = f;
                    ran
                }
                Err(e) => {
                    warn!(%grant, error = %e, "attempt task failed");
                    return None;
                }
            };
            match ran {
                Ok(Ran::Settled(done)) if done.value().is_some() => return Some(done.state().clone()),
                // Not resolved yet: go again only if no backoff applies.
                Ok(Ran::Settled(done)) => {
                    if !matches!(self.machine.step(done.state(), crate::clock::now()), Step::Attempt) {
                        return Some(done.state().clone());
                    }
                }
                Ok(Ran::Paused(until)) => {
                    // Fleet-wide pause after invalid_client: look again when it ends.
                    self.scheduler.notify_at(grant, until);
                    return None;
                }
                // Nothing written on the caller's reading (the grant moved on from it, or the attempt
                // was refused): decide again on the durable state, still as the first decision.
                Ok(Ran::Nothing(_)) if from_caller => first = true,
                Ok(Ran::Nothing(why)) => {
                    debug!(%grant, ?why, "nothing to attempt");
                    return None;
                }
                Err(e) => {
                    warn!(%grant, error = %e, "attempt failed");
                    return None;
                }
            }
        }
        None
    }
}

/// The answer for a grant nothing will ever be due for.
fn dormant(
    grant: &GrantKey,
    state: &GrantState,
    still_valid: Option<AccessToken>,
    rejected: bool,
) -> Result<AccessToken, Error> {
    match &state.phase {
        Phase::NeedsReauth { reason, .. } => match still_valid {
            // The last access token is valid until its own expiry; only then is the grant unusable.
            Some(t) if !rejected => Ok(t),
            _ => Err(Error::NeedsReauth { grant: grant.clone(), reason: reason.clone() }),
        },
        Phase::Uninstalled { .. } => Err(Error::Uninstalled { grant: grant.clone() }),
        _ => Err(Error::NotInstalled { grant: grant.clone() }),
    }
}

/// The error for a refused refresh.
pub(crate) fn refusal(grant: &GrantKey, r: Refusal) -> Error {
    let grant = grant.clone();
    match r {
        Refusal::NeedsReauth(reason) => Error::NeedsReauth { grant, reason },
        Refusal::Uninstalled => Error::Uninstalled { grant },
        // Never installed, or a first acquisition never completed: not an uninstall.
        Refusal::NoTokens => Error::NotInstalled { grant },
        Refusal::InFlight | Refusal::AcquisitionOpen(_) => Error::InFlight { grant },
        Refusal::BackingOff(until) => Error::Unavailable { grant, retry_at: until },
        Refusal::OlderPair { held } => Error::OlderPair { grant, held },
        other => Error::Internal(format!("{grant}: unexpected refusal: {other}")),
    }
}
