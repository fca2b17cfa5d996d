//! Settling an answer: what an attempt's outcome does to its grant, what recovery does to an attempt
//! that never got one, and where an acquisition that can no longer be retried falls back to.

use super::{exchange_expired, resolved, AttemptRequest, Durable, Event, Machine, Pending, Transition, Verdict};
use crate::domain::{AttemptId, TokenSet};
use crate::protocol::Outcome;
use crate::record::{
    Acquisition, Ambiguity, AmbiguityReason, AttemptKind, GrantState, Phase, ReauthReason, Record, RefusalReason,
    Resolution, Subject, TokenSummary,
};
use crate::time::UnixMillis;
use std::time::Duration;

/// The `StaleOutcome` label of an attempt abandoned between its durable intent and its send
/// ([`Machine::abandon`]).
pub const ABANDONED: &str = "abandoned-before-send";

impl Machine {
    /// An unresolved token exchange whose session token has expired (or was refused on a retry) can
    /// no longer be retried: the grant falls back (`docs/journal.md` §3). Returns the transition, or
    /// `None` if `s` is not such an exchange at `now`.
    pub fn expire_acquisition(&self, s: &GrantState, now: UnixMillis) -> Option<Pending<Option<TokenSet>>> {
        if !exchange_expired(s, now) {
            return None;
        }
        let Phase::Ambiguous(amb) = &s.phase else { return None };
        let mut t = Transition::replacing(s, self.next_state(s, now), Verdict::FellBack);
        fall_back(&mut t, s, amb, Resolution::WindowElapsed, now);
        Some(Pending { transition: t, value: None })
    }

    /// Applies the outcome of a sent attempt to the grant's *current* durable state (re-read it if a
    /// write conflicted). `entropy` is any random u64 (for backoff jitter).
    pub fn on_outcome(
        &self,
        current: &GrantState,
        sent: &Durable<AttemptRequest>,
        outcome: Outcome,
        now: UnixMillis,
        entropy: u64,
    ) -> Pending<Option<TokenSet>> {
        if !self.is_live(current, sent.value()) {
            return self.stale(current, sent.value(), outcome.label(), now);
        }
        Settle::new(self, current, now, entropy).apply(outcome)
    }

    /// Whether `request`'s attempt is still the grant's live attempt in `current`: the grant is
    /// `Refreshing` that very attempt at that generation. Once it is not (an install, an uninstall or
    /// a fall-back was written since the intent), its credential may have been replaced: its outcome
    /// is stale, and a request not yet sent must not go (a server that revokes the whole grant family
    /// on reuse would revoke the replacement).
    pub fn is_live(&self, current: &GrantState, request: &AttemptRequest) -> bool {
        matches!(&current.phase, Phase::Refreshing { attempt, .. } if *attempt == request.attempt())
            && current.generation == request.generation()
    }

    /// The driver's re-check between a durable intent and its send: if the attempt is no longer live
    /// in `current` (see [`Machine::is_live`]), the transition that journals it as abandoned — a
    /// `StaleOutcome` whose outcome is `abandoned-before-send`, changing nothing else — and the
    /// request is never sent. `None`: still live, send it.
    pub fn abandon(
        &self,
        current: &GrantState,
        permit: &Durable<AttemptRequest>,
        now: UnixMillis,
    ) -> Option<Pending<Option<TokenSet>>> {
        let req = permit.value();
        (!self.is_live(current, req)).then(|| self.stale(current, req, ABANDONED, now))
    }

    fn stale(
        &self,
        current: &GrantState,
        req: &AttemptRequest,
        outcome: &str,
        now: UnixMillis,
    ) -> Pending<Option<TokenSet>> {
        let mut state = self.next_state(current, now);
        state.updated_at = current.updated_at.max(now);
        let mut t = Transition::replacing(current, state, Verdict::Stale);
        t.records.push(Record::StaleOutcome {
            grant: current.grant.clone(),
            at: now,
            attempt: req.attempt(),
            outcome: outcome.to_owned(),
        });
        Pending { transition: t, value: None }
    }

    /// Recovery: a grant found `Refreshing` after a restart had an intent durable and no outcome;
    /// its request may have been processed. Returns the transition to `Ambiguous` (never straight to
    /// needs-reauth, even past the retry window: the request may never have left the process, and the
    /// probe that follows tells); `None` if the grant is not `Refreshing`. An interrupted token
    /// exchange whose session token has expired meanwhile falls back in the same transition.
    pub fn recover_interrupted(&self, s: &GrantState, now: UnixMillis, entropy: u64) -> Option<Transition> {
        if !matches!(s.phase, Phase::Refreshing { .. }) {
            return None;
        }
        let outcome = Outcome::Ambiguous { reason: AmbiguityReason::Interrupted, request_id: None };
        let mut t = Settle::new(self, s, now, entropy).apply(outcome).transition;
        t.verdict = Verdict::Interrupted;
        // A restart is not evidence of a server problem: the retry may go at once.
        if let Phase::Ambiguous(_) = t.state.phase {
            t.state.not_before = None;
        }
        if let Phase::Ambiguous(amb) = t.state.phase.clone() {
            if exchange_expired(&t.state, now) {
                let before = t.state.clone();
                fall_back(&mut t, &before, &amb, Resolution::WindowElapsed, now);
                t.verdict = Verdict::FellBack;
            }
        }
        Some(t)
    }

    /// Recovery's interruption of `attempt` and its retry, **folded into one transition**: from `s`,
    /// still `Refreshing` `attempt`, straight to `Refreshing` the retry, carrying both records in
    /// order — the interruption's (exactly those of [`Machine::recover_interrupted`]: the history
    /// reads `Interrupted`, then the retry's intent) and the retry's intent (as
    /// [`Machine::plan_recovery_attempt`] plans it from the ambiguity) — and both transitions'
    /// events, conditioned on `s.version` alone. The ambiguity in between is never stored: a crash
    /// before the write leaves `s` (`Refreshing`, interrupted: the next recovery does this again), a
    /// crash after it leaves the retry's intent (interrupted in turn). One durable write instead of
    /// two; the credential is released, as always, only once it is durable.
    ///
    /// `None` if `s` is not `Refreshing` `attempt`, or the interruption does not leave an ambiguity
    /// that may be retried now (an exchange whose session token expired falls back instead): then
    /// the interruption is written by itself ([`Machine::recover_interrupted`]).
    pub fn retry_interrupted(
        &self,
        s: &GrantState,
        attempt: AttemptId,
        now: UnixMillis,
    ) -> Option<Pending<AttemptRequest>> {
        match &s.phase {
            Phase::Refreshing { attempt: a, .. } if *a == attempt => {}
            _ => return None,
        }
        // The entropy only jitters a backoff, and the interruption clears it.
        let interrupted = self.recover_interrupted(s, now, 0)?;
        if interrupted.verdict != Verdict::Interrupted || !matches!(interrupted.state.phase, Phase::Ambiguous(_)) {
            return None;
        }
        let mut retry = self.plan_recovery_attempt(&interrupted.state, now).ok()?;
        let t = &mut retry.transition;
        t.expected_version = Some(s.version);
        t.prior_phase = Some(s.phase.name());
        t.state.version = s.version + 1;
        let mut records = interrupted.records;
        records.append(&mut t.records);
        t.records = records;
        let mut events = interrupted.events;
        events.append(&mut t.events);
        t.events = events;
        Some(retry)
    }
}

/// Where an unresolved token exchange that can no longer be retried leaves the grant. The exchange
/// may or may not have been processed, so:
/// * a prior live pair (`Healthy`) is probed: it becomes an ambiguity on the stored refresh token (if
///   the exchange was processed the server now rejects it — definitive — else it rotates);
/// * a prior refresh ambiguity, needs-reauth or uninstall is restored as it was;
/// * a grant that had nothing needs re-auth (the merchant's next session token).
///
/// `s` is the state the acquisition is read from; `t` already holds the next state.
fn fall_back(t: &mut Transition, s: &GrantState, amb: &Ambiguity, how: Resolution, now: UnixMillis) {
    let grant = s.grant.clone();
    let Some(acq) = s.acquisition.clone() else { return };
    let deadline = match &acq.subject {
        Subject::SessionToken { expires_at, .. } => *expires_at,
        Subject::LegacyToken { .. } => now,
    };
    resolved(&mut t.records, &mut t.events, &grant, now, amb.first_attempt, how);
    let state = &mut t.state;
    state.acquisition = None;
    state.not_before = None;
    state.phase = match acq.prior {
        Phase::Healthy if state.tokens.is_some() => {
            let probe = Ambiguity {
                first_attempt: amb.first_attempt,
                since: now,
                last_reason: amb.last_reason.clone(),
                tries: 0,
            };
            t.events.push(Event::Ambiguous { grant: grant.clone(), reason: amb.last_reason.clone() });
            Phase::Ambiguous(probe)
        }
        Phase::Ambiguous(prior) if state.tokens.is_some() => Phase::Ambiguous(prior),
        p @ (Phase::NeedsReauth { .. } | Phase::Uninstalled { .. }) => p,
        _ => {
            let reason = ReauthReason::RetryWindowElapsed { first_presented_at: amb.since, deadline };
            t.records.push(Record::NeedsReauth { grant: grant.clone(), at: now, reason: reason.clone() });
            t.events.push(Event::NeedsReauth { grant, reason: reason.clone() });
            Phase::NeedsReauth { reason, since: now }
        }
    };
}

/// One live attempt being settled: the durable state it started from (`Refreshing` it) and the
/// transition being built.
struct Settle<'a> {
    machine: &'a Machine,
    /// The durable state, `Refreshing` this attempt.
    s: &'a GrantState,
    attempt: AttemptId,
    kind: AttemptKind,
    started_at: UnixMillis,
    /// The ambiguity this attempt retried, if it was a retry.
    resolving: Option<Ambiguity>,
    /// The acquisition this attempt belongs to (`None` for a refresh).
    acq: Option<Acquisition>,
    now: UnixMillis,
    entropy: u64,
    t: Transition,
}

impl<'a> Settle<'a> {
    fn new(machine: &'a Machine, s: &'a GrantState, now: UnixMillis, entropy: u64) -> Settle<'a> {
        let Phase::Refreshing { attempt, kind, started_at, resolving, .. } = &s.phase else {
            unreachable!("only a Refreshing grant is settled")
        };
        let acq = s.acquisition.clone().filter(|_| *kind != AttemptKind::Refresh);
        Settle {
            machine,
            s,
            attempt: *attempt,
            kind: *kind,
            started_at: *started_at,
            resolving: resolving.clone(),
            acq,
            now,
            entropy,
            // The verdict is set by the outcome's handler.
            t: Transition::replacing(s, machine.next_state(s, now), Verdict::Ambiguous),
        }
    }

    fn apply(mut self, outcome: Outcome) -> Pending<Option<TokenSet>> {
        let grant = self.s.grant.clone();
        let (now, attempt) = (self.now, self.attempt);
        let mut value = None;
        match outcome {
            Outcome::Success { tokens, request_id } => value = Some(self.succeeded(tokens, request_id)),
            Outcome::NotSent(why) => {
                self.t.records.push(Record::NotSent { grant, at: now, attempt, why });
                self.not_processed(None);
            }
            Outcome::Throttled { retry_after, request_id } => {
                let retry_after_ms = retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                let why = RefusalReason::Throttled { retry_after_ms };
                self.t.records.push(Record::Refused { grant: grant.clone(), at: now, attempt, why, request_id });
                let until = self.not_processed(retry_after);
                self.t.events.push(Event::Throttled { grant, until });
            }
            Outcome::BadCredentials { status, error, request_id } => {
                let why = RefusalReason::AppCredentials { status, error: error.clone() };
                self.t.records.push(Record::Refused { grant: grant.clone(), at: now, attempt, why, request_id });
                self.not_processed(None);
                self.t.events.push(Event::AppCredentialsRejected { grant, status, error });
            }
            Outcome::Rejected { status, error, description, request_id } => {
                let record =
                    Record::Rejected { grant, at: now, attempt, status, error: error.clone(), description, request_id };
                self.t.records.push(record);
                self.rejected(status, error);
            }
            Outcome::Ambiguous { reason, request_id } => {
                let why = reason.clone();
                self.t.records.push(Record::Ambiguous { grant, at: now, attempt, why, request_id });
                self.ambiguous(reason);
            }
        }
        Pending { transition: self.t, value }
    }

    fn succeeded(&mut self, tokens: TokenSet, request_id: Option<String>) -> TokenSet {
        let (s, now, grant) = (self.s, self.now, self.s.grant.clone());
        let generation = s.generation.next();
        let t = &mut self.t;
        t.verdict = Verdict::Committed;
        t.records.push(Record::Committed {
            grant: grant.clone(),
            at: now,
            attempt: self.attempt,
            generation,
            tokens: TokenSummary::of(&tokens, &self.machine.fingerprints),
            request_id,
        });
        if let Some(amb) = &self.resolving {
            resolved(
                &mut t.records,
                &mut t.events,
                &grant,
                now,
                amb.first_attempt,
                Resolution::Succeeded { generation },
            );
        }
        match &self.acq {
            None => t.events.push(Event::Refreshed { grant, generation }),
            Some(a) => {
                // A new acquisition supersedes a refresh ambiguity it started from.
                if let Phase::Ambiguous(prior) = &a.prior {
                    let how = Resolution::Superseded { generation };
                    resolved(&mut t.records, &mut t.events, &grant, now, prior.first_attempt, how);
                }
                if matches!(a.prior, Phase::NeedsReauth { .. } | Phase::Uninstalled { .. }) {
                    t.events.push(Event::Recovered { grant: grant.clone(), generation });
                }
                t.events.push(Event::Acquired { grant, generation, kind: self.kind });
                t.state.acquired_at = Some(now);
            }
        }
        let state = &mut t.state;
        state.generation = generation;
        state.tokens = Some(tokens.clone());
        state.phase = Phase::Healthy;
        state.acquisition = None;
        state.credential_first_presented_at = None;
        state.consecutive_failures = 0;
        state.not_before = None;
        tokens
    }

    fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> UnixMillis {
        self.now.saturating_add(self.machine.policy.backoff.delay(failures, retry_after, self.entropy))
    }

    /// The answer proves the credential was not processed: a retry stays ambiguous (an acquisition
    /// keeps its durable subject); a first attempt returns to where it started (a first
    /// acquisition's subject is dropped: nothing may have been processed). Returns when the next
    /// attempt may go.
    fn not_processed(&mut self, retry_after: Option<Duration>) -> UnixMillis {
        let s = self.s;
        self.t.verdict = Verdict::NotProcessed;
        let (phase, acquisition) = self.prior();
        self.t.state.phase = phase;
        self.t.state.acquisition = acquisition;
        // A first acquisition's not-processed answer concerns only the acquisition: the grant's own
        // refresh schedule (failures, backoff) is left as it was.
        let until = if self.resolving.is_none() && self.acq.is_some() {
            self.t.state.consecutive_failures = s.consecutive_failures;
            self.t.state.not_before = s.not_before;
            self.backoff(1, retry_after)
        } else {
            let failures = s.consecutive_failures.saturating_add(1);
            let until = self.backoff(failures, retry_after);
            self.t.state.consecutive_failures = failures;
            self.t.state.not_before = Some(until);
            until
        };
        // Undo "first presented" if this attempt was the credential's first presentation.
        if self.kind == AttemptKind::Refresh
            && self.resolving.is_none()
            && s.credential_first_presented_at == Some(self.started_at)
        {
            self.t.state.credential_first_presented_at = None;
        }
        until
    }

    /// Where an answer proving the credential was not processed leaves the grant's phase and
    /// acquisition.
    fn prior(&self) -> (Phase, Option<Acquisition>) {
        match (&self.resolving, &self.acq) {
            (Some(amb), _) => (Phase::Ambiguous(amb.clone()), self.acq.clone()),
            (None, Some(a)) => (a.prior.clone(), None),
            (None, None) => (Phase::Healthy, None),
        }
    }

    fn rejected(&mut self, status: u16, error: String) {
        let (s, now, grant) = (self.s, self.now, self.s.grant.clone());
        match (self.kind, self.resolving.clone()) {
            // A refused session token is the caller's problem, not a dead grant: a first exchange
            // leaves the grant as it was.
            (AttemptKind::TokenExchange, None) => {
                self.t.verdict = Verdict::NotProcessed;
                self.t.state.phase = self.prior().0;
                self.t.state.acquisition = None;
            }
            // A refused retry: the first attempt may have been processed; fall back.
            (AttemptKind::TokenExchange, Some(amb)) => {
                self.t.verdict = Verdict::FellBack;
                fall_back(&mut self.t, s, &amb, Resolution::Rejected, now);
            }
            // Refresh or migration: the newest durable credential is dead.
            (_, resolving) => {
                let t = &mut self.t;
                t.verdict = Verdict::Dead;
                if let Some(amb) = &resolving {
                    resolved(&mut t.records, &mut t.events, &grant, now, amb.first_attempt, Resolution::Rejected);
                }
                let reason = ReauthReason::CredentialRejected { status, error, after_ambiguity: resolving.is_some() };
                t.records.push(Record::NeedsReauth { grant: grant.clone(), at: now, reason: reason.clone() });
                t.events.push(Event::NeedsReauth { grant, reason: reason.clone() });
                t.state.phase = Phase::NeedsReauth { reason, since: now };
                t.state.acquisition = None;
                t.state.not_before = None;
            }
        }
    }

    fn ambiguous(&mut self, reason: AmbiguityReason) {
        let s = self.s;
        let amb = match &self.resolving {
            Some(a) => Ambiguity { last_reason: reason.clone(), tries: a.tries.saturating_add(1), ..a.clone() },
            None => {
                Ambiguity { first_attempt: self.attempt, since: self.started_at, last_reason: reason.clone(), tries: 1 }
            }
        };
        let failures = s.consecutive_failures.saturating_add(1);
        let until = self.backoff(failures, None);
        let t = &mut self.t;
        t.verdict = Verdict::Ambiguous;
        t.state.consecutive_failures = failures;
        t.state.not_before = Some(until);
        t.state.phase = Phase::Ambiguous(amb);
        // An acquisition keeps its subject durable (`state.acquisition` is unchanged).
        // Time alone never ends an ambiguity, not even past the provider's retry window: a probe past
        // the window gets a definitive answer whenever it matters (a processed, lost rotation is
        // rejected; a never-processed token is accepted), and a server that answers nothing
        // definitive for that long is down, not a dead grant. (A token exchange is the exception:
        // its session token expires, see `fall_back`.)
        t.events.push(Event::Ambiguous { grant: s.grant.clone(), reason });
    }
}
