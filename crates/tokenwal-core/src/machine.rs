//! The per-grant state machine.
//!
//! Every function here is pure: `(state, input, now) -> transition`. A [`Transition`] is the new
//! durable state plus the journal records that explain it, and it is written by a [`DurableLog`]
//! atomically, conditioned on the state's version (compare-and-swap).
//!
//! # Ordering by construction
//!
//! Two rules make a lost response recoverable, and the types enforce both:
//!
//! * **Journal before network.** [`Machine::plan_attempt`] returns a [`Pending<AttemptRequest>`]. The
//!   request (and the credential in it) can only be read from a [`Durable<AttemptRequest>`], and the
//!   only way to get one is [`Pending::make_durable`], which returns after the log has made the
//!   intent durable.
//! * **Commit before use.** [`Machine::on_outcome`] returns a [`Pending<Option<TokenSet>>`]: the new
//!   tokens of a success are reachable only from the [`Durable`] that `make_durable` returns after the
//!   commit is durable.
//!
//! A log that lies about durability breaks the guarantee; nothing else can.
//!
//! # One attempt in flight
//!
//! A grant in [`Phase::Refreshing`] cannot plan another attempt, and every transition carries the
//! version it was computed from, so two racing planners cannot both write: the second one's
//! compare-and-swap fails, it re-reads, and sees `Refreshing`.
//!
//! # Acquisitions
//!
//! A token exchange ([`Machine::plan_token_exchange`]) or a migration of a legacy token
//! ([`Machine::plan_migration`]) goes through the same protocol. Its subject credential (the session
//! token or the legacy token) is kept in the durable [`GrantState::acquisition`] until the attempt
//! resolves, so that a lost answer or a crash is retried with the *same* credential. What a lost
//! answer leaves behind and how it is resolved is in `docs/journal.md` §3.
//!
//! # Stale results
//!
//! An outcome applies only while the grant is still `Refreshing` that very attempt at that generation.
//! After an install, an uninstall or anything else, the outcome is recorded as
//! [`Record::StaleOutcome`] and changes nothing: a slow worker can never store an older pair over a
//! newer one.

use crate::classify::Outcome;
use crate::codec::{self, CodecError};
use crate::domain::{AttemptId, FingerprintKey, Generation, GrantKey, TokenSet};
use crate::policy::RetryPolicy;
use crate::record::{
    Acquisition, Ambiguity, AmbiguityReason, AttemptKind, GrantState, InstallSource, Phase, ReauthReason, Record,
    RefusalReason, Resolution, Subject, TokenSummary,
};
use crate::secret::{LegacyToken, RefreshToken, SessionToken};
use crate::time::UnixMillis;
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// Something the application may want to know, emitted only after the transition is durable.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Event {
    /// A refresh committed a new token set.
    Refreshed {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
    },
    /// A token set acquired elsewhere was installed.
    Installed {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
    },
    /// A rotation's outcome is unknown; tokenwal will retry the old credential.
    Ambiguous {
        /// The grant.
        grant: GrantKey,
        /// Why.
        reason: AmbiguityReason,
    },
    /// An ambiguous rotation ended.
    Resolved {
        /// The grant.
        grant: GrantKey,
        /// How.
        how: Resolution,
    },
    /// The grant is dead: the merchant must open the app so that token exchange can run.
    NeedsReauth {
        /// The grant.
        grant: GrantKey,
        /// Why.
        reason: ReauthReason,
    },
    /// The app's client credentials were refused. Page someone: this is fleet-wide.
    AppCredentialsRejected {
        /// The grant whose attempt saw it.
        grant: GrantKey,
        /// The HTTP status.
        status: u16,
        /// The OAuth error code.
        error: String,
    },
    /// The server throttled an attempt.
    Throttled {
        /// The grant.
        grant: GrantKey,
        /// When the next attempt may go.
        until: UnixMillis,
    },
    /// A grant that needed re-auth (or was uninstalled) is healthy again.
    Recovered {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
    },
    /// The app was uninstalled from the shop.
    Uninstalled {
        /// The grant.
        grant: GrantKey,
    },
    /// tokenwal's own acquisition (token exchange or migration) committed a new token set.
    Acquired {
        /// The grant.
        grant: GrantKey,
        /// The new generation.
        generation: Generation,
        /// `TokenExchange` or `Migration`.
        kind: AttemptKind,
    },
    /// The granted scopes changed (`app/scopes_update`).
    ScopesUpdated {
        /// The grant.
        grant: GrantKey,
    },
}

/// One atomic write: the grant's new state and the records explaining it.
#[derive(Clone, PartialEq, Eq)]
pub struct Transition {
    expected_version: Option<u64>,
    state: GrantState,
    records: Vec<Record>,
    events: Vec<Event>,
}

impl fmt::Debug for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // GrantState's Debug is redacted already; this keeps Transition's output short.
        f.debug_struct("Transition")
            .field("grant", &self.state.grant)
            .field("expected_version", &self.expected_version)
            .field("phase", &self.state.phase.name())
            .field("records", &self.records.iter().map(Record::kind_name).collect::<Vec<_>>())
            .finish()
    }
}

/// The encoded form of a [`Transition`], for a store to write atomically.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteBatch {
    /// The grant key ([`GrantKey::to_bytes`]).
    pub grant: Vec<u8>,
    /// The version the stored state must have (`None`: the grant must not exist yet).
    pub expected_version: Option<u64>,
    /// The version of the new state.
    pub new_version: u64,
    /// The new state, as a [`codec`] frame.
    pub state: Vec<u8>,
    /// Whether the new state is open (an intent without outcome, or an ambiguity): the store indexes
    /// these so that recovery never scans all grants.
    pub open: bool,
    /// The journal records, as [`codec`] frames, each with its timestamp (for retention).
    pub records: Vec<(UnixMillis, Vec<u8>)>,
}

impl fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBatch")
            .field("grant", &String::from_utf8_lossy(&self.grant))
            .field("expected_version", &self.expected_version)
            .field("new_version", &self.new_version)
            .field("state_bytes", &self.state.len())
            .field("open", &self.open)
            .field("records", &self.records.len())
            .finish()
    }
}

impl Transition {
    /// The grant.
    pub fn grant(&self) -> &GrantKey {
        &self.state.grant
    }

    /// The version the stored state must have for this transition to apply.
    pub fn expected_version(&self) -> Option<u64> {
        self.expected_version
    }

    /// The phase after the transition.
    pub fn phase(&self) -> &Phase {
        &self.state.phase
    }

    /// The generation after the transition.
    pub fn generation(&self) -> Generation {
        self.state.generation
    }

    /// The records (they hold no secrets).
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The events to emit once durable.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Encodes the transition for a store.
    pub fn write_batch(&self) -> Result<WriteBatch, CodecError> {
        let records =
            self.records.iter().map(|r| codec::encode_record(r).map(|b| (r.at(), b))).collect::<Result<Vec<_>, _>>()?;
        Ok(WriteBatch {
            grant: self.state.grant.to_bytes(),
            expected_version: self.expected_version,
            new_version: self.state.version,
            state: codec::encode_state(&self.state)?,
            open: self.state.phase.is_open(),
            records,
        })
    }

    /// The state after the transition. Only tests may look before it is durable.
    #[cfg(test)]
    #[allow(dead_code)]
    pub(crate) fn state(&self) -> &GrantState {
        &self.state
    }
}

/// A log that makes transitions durable: the store's side of the ordering rules.
///
/// `apply` must return `Ok` only once the batch is durable (on disk, synced), and must write nothing
/// if the stored version differs from `batch.expected_version`.
pub trait DurableLog {
    /// The store's error (it must be able to carry an encoding failure).
    type Error: From<CodecError>;
    /// Writes `batch` atomically and durably.
    fn apply(&self, batch: WriteBatch) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A value held back until a transition is durable.
#[derive(Debug)]
#[must_use = "nothing happens until the transition is made durable"]
pub struct Pending<T> {
    transition: Transition,
    value: T,
}

impl<T> Pending<T> {
    /// The transition to make durable.
    pub fn transition(&self) -> &Transition {
        &self.transition
    }

    /// Makes the transition durable through `log`, then releases the value.
    pub async fn make_durable<L: DurableLog>(self, log: &L) -> Result<Durable<T>, L::Error> {
        let batch = self.transition.write_batch()?;
        log.apply(batch).await?;
        Ok(Durable { state: self.transition.state, events: self.transition.events, value: self.value })
    }
}

impl Pending<()> {
    /// Wraps a transition that releases nothing when durable (recovery, give-up, uninstall, marks).
    pub fn from_transition(transition: Transition) -> Pending<()> {
        Pending { transition, value: () }
    }
}

/// A value whose transition is durable. Only [`Pending::make_durable`] builds one.
#[derive(Debug)]
pub struct Durable<T> {
    state: GrantState,
    events: Vec<Event>,
    value: T,
}

impl<T> Durable<T> {
    /// The value.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Takes the value.
    pub fn into_value(self) -> T {
        self.value
    }

    /// The durable state the transition wrote.
    pub fn state(&self) -> &GrantState {
        &self.state
    }

    /// The events to emit now that the transition is durable.
    pub fn events(&self) -> &[Event] {
        &self.events
    }
}

/// The credential an attempt presents. Readable only through a [`Durable<AttemptRequest>`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A refresh (`grant_type=refresh_token`).
    RefreshToken(RefreshToken),
    /// A token exchange of an App Bridge session token (`subject_token_type=…id_token`).
    SessionToken(SessionToken),
    /// A migration of a legacy non-expiring offline token (`subject_token_type=…offline-access-token`).
    LegacyToken(LegacyToken),
}

impl Credential {
    /// The secret itself, for the request body only.
    pub fn expose_secret(&self) -> &str {
        match self {
            Credential::RefreshToken(t) => t.expose_secret(),
            Credential::SessionToken(t) => t.expose_secret(),
            Credential::LegacyToken(t) => t.expose_secret(),
        }
    }

    /// The refresh token, if this is a refresh.
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        match self {
            Credential::RefreshToken(t) => Some(t),
            _ => None,
        }
    }
}

/// A request the engine may send, once durable: the credential to present and whom it is for.
#[derive(Debug)]
pub struct AttemptRequest {
    grant: GrantKey,
    attempt: AttemptId,
    generation: Generation,
    kind: AttemptKind,
    credential: Credential,
}

impl AttemptRequest {
    /// The grant.
    pub fn grant(&self) -> &GrantKey {
        &self.grant
    }
    /// The attempt id.
    pub fn attempt(&self) -> AttemptId {
        self.attempt
    }
    /// The generation whose credential is presented.
    pub fn generation(&self) -> Generation {
        self.generation
    }
    /// What is asked for.
    pub fn kind(&self) -> AttemptKind {
        self.kind
    }
    /// The credential to present (its kind matches [`AttemptRequest::kind`]).
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The refresh token to present, if this is a refresh.
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        self.credential.refresh_token()
    }
}

/// Why an attempt cannot be planned now.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The grant has no tokens (uninstalled).
    #[error("grant has no tokens")]
    NoTokens,
    /// An attempt is already in flight.
    #[error("an attempt is already in flight")]
    InFlight,
    /// The grant needs re-auth.
    #[error("grant needs re-auth: {0}")]
    NeedsReauth(ReauthReason),
    /// The grant is uninstalled.
    #[error("grant is uninstalled")]
    Uninstalled,
    /// Backing off until the given instant.
    #[error("backing off until {0}")]
    BackingOff(UnixMillis),
    /// A migration was asked for a grant that already holds a live expiring pair.
    #[error("already migrated (generation {})", .0 .0)]
    AlreadyMigrated(Generation),
    /// The unresolved token exchange's session token has expired: nothing can be retried with it;
    /// [`Machine::expire_acquisition`] falls back.
    #[error("the session token of the unresolved token exchange has expired")]
    SubjectExpired,
    /// Another acquisition of this kind is unresolved (a migration while an exchange is open, or an
    /// exchange while a migration is open): resolve it first.
    #[error("a {0} is unresolved")]
    AcquisitionOpen(AttemptKind),
}

/// What a grant needs now (for schedulers and recovery).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Step {
    /// Nothing until `due` (`None`: never, e.g. no expiry known).
    Idle {
        /// When a refresh becomes due.
        due: Option<UnixMillis>,
    },
    /// Plan an attempt now.
    Attempt,
    /// An attempt may not go before this instant.
    Wait {
        /// The instant.
        until: UnixMillis,
    },
    /// An attempt is in flight.
    InFlight,
    /// Nothing will ever be due (needs re-auth, uninstalled, not installed).
    Dormant,
}

/// How long Shopify answers a migration retry with the same legacy token with the same pair
/// (informational: a migration ambiguity is probed until a definitive answer).
pub const MIGRATION_RETRY: Duration = Duration::from_secs(7 * 86_400);

/// Whether `s` is an unresolved token exchange whose session token has expired at `now`.
fn exchange_expired(s: &GrantState, now: UnixMillis) -> bool {
    matches!(
        (&s.phase, s.acquisition.as_ref().map(|a| &a.subject)),
        (Phase::Ambiguous(_), Some(Subject::SessionToken { expires_at, .. })) if now >= *expires_at
    )
}

/// Configuration of the machine.
#[derive(Clone, Debug)]
pub struct Machine {
    /// The provider's retry policy.
    pub policy: RetryPolicy,
    /// Refresh this long before the access token expires.
    pub refresh_margin: Duration,
    /// Refresh an idle grant this long before its refresh token expires.
    pub refresh_token_margin: Duration,
    /// Key of credential fingerprints.
    pub fingerprints: FingerprintKey,
}

impl Machine {
    /// A machine with Shopify's policy and margins (5 min before access expiry, 7 days before refresh
    /// expiry).
    pub fn shopify(fingerprints: FingerprintKey) -> Machine {
        Machine {
            policy: RetryPolicy::shopify(),
            refresh_margin: Duration::from_secs(300),
            refresh_token_margin: Duration::from_secs(7 * 86_400),
            fingerprints,
        }
    }

    fn next_state(&self, s: &GrantState, now: UnixMillis) -> GrantState {
        GrantState { version: s.version + 1, updated_at: now, ..s.clone() }
    }

    /// When a healthy grant's refresh becomes due: `refresh_margin` before the access token expires
    /// and `refresh_token_margin` before the refresh token does, but never before half of either
    /// token's remaining life since `obtained_at` (when the set was stored: the state's `updated_at`).
    /// Without that floor, a margin as long as the server's lifetimes (a 5-minute margin on
    /// 5-minute tokens, a 7-day margin on a 120-second refresh token) would refresh in a tight loop.
    pub fn due_at(&self, tokens: &TokenSet, obtained_at: UnixMillis) -> UnixMillis {
        let due = |expires: UnixMillis, margin: Duration| {
            let half_life = obtained_at.saturating_add(expires.since(obtained_at) / 2);
            expires.saturating_sub(margin).max(half_life)
        };
        let access = due(tokens.access_expires_at, self.refresh_margin);
        match tokens.refresh_expires_at {
            Some(r) => access.min(due(r, self.refresh_token_margin)),
            None => access,
        }
    }

    /// The provider's retry deadline of the ambiguity in `s`, if any: after it, a probe is likely to
    /// be rejected (for information and alerting; nothing is decided by it).
    pub fn retry_deadline(&self, s: &GrantState) -> Option<UnixMillis> {
        let Phase::Ambiguous(amb) = &s.phase else { return None };
        match s.acquisition.as_ref().map(|a| &a.subject) {
            // The session token's own expiry: then the exchange falls back.
            Some(Subject::SessionToken { expires_at, .. }) => return Some(*expires_at),
            // Shopify answers a migration retry with the same pair for up to 7 days.
            Some(Subject::LegacyToken { .. }) => return Some(amb.since.saturating_add(MIGRATION_RETRY)),
            None => {}
        }
        let first = s.credential_first_presented_at.unwrap_or(amb.since);
        self.policy.retry_deadline(first, s.tokens.as_ref().and_then(|t| t.refresh_expires_at))
    }

    /// What grant `s` needs at `now`.
    pub fn step(&self, s: &GrantState, now: UnixMillis) -> Step {
        match &s.phase {
            Phase::Refreshing { .. } => Step::InFlight,
            Phase::NeedsReauth { .. } | Phase::Uninstalled { .. } | Phase::NotInstalled { .. } => Step::Dormant,
            // An exchange whose session token expired falls back at once (no request is sent).
            Phase::Ambiguous(_) if exchange_expired(s, now) => Step::Attempt,
            // An ambiguity is always probed, even past its retry window: only an answer can tell a
            // dead credential from one the server never processed.
            Phase::Ambiguous(_) => match s.not_before {
                Some(nb) if now < nb => Step::Wait { until: nb },
                _ => Step::Attempt,
            },
            Phase::Healthy => {
                let Some(tokens) = &s.tokens else { return Step::Dormant };
                let due = self.due_at(tokens, s.updated_at);
                if now < due {
                    return Step::Idle { due: Some(due) };
                }
                match s.not_before {
                    Some(nb) if now < nb => Step::Wait { until: nb },
                    _ => Step::Attempt,
                }
            }
        }
    }

    /// Plans a refresh of `s` with its current (newest durable) refresh token.
    ///
    /// From `Healthy` this starts a rotation; from `Ambiguous` it retries the same old credential to
    /// resolve the ambiguity. `Healthy` grants are refreshed whenever asked (callers decide when; see
    /// [`Machine::step`]); backoff applies in both phases.
    pub fn plan_attempt(&self, s: &GrantState, now: UnixMillis) -> Result<Pending<AttemptRequest>, Refusal> {
        self.plan(s, now, true)
    }

    /// Recovery's retry of an ambiguous grant: like [`Machine::plan_attempt`], but an ambiguous grant's
    /// backoff (set by the process that stopped) does not delay it. A restart is when an ambiguity
    /// should be probed at once; every other rule still applies.
    pub fn plan_recovery_attempt(&self, s: &GrantState, now: UnixMillis) -> Result<Pending<AttemptRequest>, Refusal> {
        self.plan(s, now, !matches!(s.phase, Phase::Ambiguous(_)))
    }

    fn plan(&self, s: &GrantState, now: UnixMillis, respect_backoff: bool) -> Result<Pending<AttemptRequest>, Refusal> {
        let resolving = match &s.phase {
            Phase::Healthy => None,
            Phase::Ambiguous(amb) => Some(amb.clone()),
            Phase::Refreshing { .. } => return Err(Refusal::InFlight),
            Phase::NeedsReauth { reason, .. } => return Err(Refusal::NeedsReauth(reason.clone())),
            Phase::Uninstalled { .. } => return Err(Refusal::Uninstalled),
            Phase::NotInstalled { .. } => return Err(Refusal::NoTokens),
        };
        if let (Some(acq), Some(_)) = (&s.acquisition, &resolving) {
            // Retry an unresolved acquisition with its durable subject credential.
            if exchange_expired(s, now) {
                return Err(Refusal::SubjectExpired);
            }
            if let (true, Some(nb)) = (respect_backoff, s.not_before) {
                if now < nb {
                    return Err(Refusal::BackingOff(nb));
                }
            }
            let (credential, presented) = self.subject_credential(&acq.subject);
            return Ok(self.intent(s.clone(), s, acq.kind(), credential, presented, resolving, now));
        }
        let tokens = s.tokens.as_ref().ok_or(Refusal::NoTokens)?;
        if let (true, Some(nb)) = (respect_backoff, s.not_before) {
            if now < nb {
                return Err(Refusal::BackingOff(nb));
            }
        }
        let presented = self.fingerprints.refresh_token(&tokens.refresh_token);
        let mut base = s.clone();
        base.credential_first_presented_at = Some(s.credential_first_presented_at.unwrap_or(now));
        Ok(self.intent(
            base,
            s,
            AttemptKind::Refresh,
            Credential::RefreshToken(tokens.refresh_token.clone()),
            presented,
            resolving,
            now,
        ))
    }

    fn subject_credential(&self, subject: &Subject) -> (Credential, crate::domain::Fingerprint) {
        match subject {
            Subject::SessionToken { token, .. } => {
                (Credential::SessionToken(token.clone()), self.fingerprints.session_token(token))
            }
            Subject::LegacyToken { token } => {
                (Credential::LegacyToken(token.clone()), self.fingerprints.legacy_token(token))
            }
        }
    }

    /// The intent transition from `current` (its version; `None`: the grant is new) to `base` moved to
    /// `Refreshing`, releasing `credential` once durable.
    #[allow(clippy::too_many_arguments)]
    fn intent_from(
        &self,
        base: GrantState,
        current: Option<&GrantState>,
        kind: AttemptKind,
        credential: Credential,
        presented: crate::domain::Fingerprint,
        resolving: Option<Ambiguity>,
        now: UnixMillis,
    ) -> Pending<AttemptRequest> {
        let attempt = AttemptId(base.next_attempt);
        let mut state = GrantState {
            version: current.map_or(1, |c| c.version + 1),
            updated_at: now,
            next_attempt: base.next_attempt + 1,
            ..base
        };
        state.phase = Phase::Refreshing { attempt, kind, presented, started_at: now, resolving };
        let record = Record::Intent {
            grant: state.grant.clone(),
            at: now,
            attempt,
            generation: state.generation,
            kind,
            presented,
        };
        let request =
            AttemptRequest { grant: state.grant.clone(), attempt, generation: state.generation, kind, credential };
        Pending {
            transition: Transition {
                expected_version: current.map(|c| c.version),
                state,
                records: vec![record],
                events: vec![],
            },
            value: request,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn intent(
        &self,
        base: GrantState,
        current: &GrantState,
        kind: AttemptKind,
        credential: Credential,
        presented: crate::domain::Fingerprint,
        resolving: Option<Ambiguity>,
        now: UnixMillis,
    ) -> Pending<AttemptRequest> {
        self.intent_from(base, Some(current), kind, credential, presented, resolving, now)
    }

    fn fresh_state(grant: GrantKey, now: UnixMillis) -> GrantState {
        GrantState {
            grant,
            version: 0,
            generation: Generation(0),
            tokens: None,
            phase: Phase::NotInstalled { since: now },
            next_attempt: 1,
            credential_first_presented_at: None,
            consecutive_failures: 0,
            not_before: None,
            updated_at: now,
            acquisition: None,
            acquired_at: None,
        }
    }

    /// Plans a token exchange of `session` (an App Bridge session token whose `exp` is
    /// `session_expires_at`, validated by the caller) for `grant`, whose current durable state is
    /// `current` (`None`: tokenwal has never seen the grant).
    ///
    /// Allowed from every phase except an attempt in flight or an unresolved migration. From an
    /// unresolved exchange, the new session token replaces the old one as the retry's credential
    /// (any processed exchange is a new acquisition; a later one retires the earlier's pair). On
    /// success the grant gets a new generation; any other answer leaves the grant where it was
    /// (see `docs/journal.md` §3 for a lost answer).
    pub fn plan_token_exchange(
        &self,
        current: Option<&GrantState>,
        grant: GrantKey,
        session: SessionToken,
        session_expires_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<Pending<AttemptRequest>, Refusal> {
        if now >= session_expires_at {
            return Err(Refusal::SubjectExpired);
        }
        let subject = Subject::SessionToken { token: session, expires_at: session_expires_at };
        let (credential, presented) = self.subject_credential(&subject);
        let (base, resolving) = match current {
            None => {
                let base = Self::fresh_state(grant, now);
                let prior = base.phase.clone();
                (GrantState { acquisition: Some(Acquisition { subject, prior }), ..base }, None)
            }
            Some(s) => match (&s.phase, &s.acquisition) {
                (Phase::Refreshing { .. }, _) => return Err(Refusal::InFlight),
                (Phase::Ambiguous(_), Some(a)) if a.kind() == AttemptKind::Migration => {
                    return Err(Refusal::AcquisitionOpen(AttemptKind::Migration))
                }
                (Phase::Ambiguous(amb), Some(a)) => {
                    let acquisition = Some(Acquisition { subject, prior: a.prior.clone() });
                    (GrantState { acquisition, ..s.clone() }, Some(amb.clone()))
                }
                (phase, _) => {
                    let acquisition = Some(Acquisition { subject, prior: phase.clone() });
                    (GrantState { acquisition, ..s.clone() }, None)
                }
            },
        };
        Ok(self.intent_from(base, current, AttemptKind::TokenExchange, credential, presented, resolving, now))
    }

    /// Plans a migration of `legacy` (a non-expiring offline token) for `grant`, whose current durable
    /// state is `current` (`None`: tokenwal has never seen the grant).
    ///
    /// * A grant with a live expiring pair is refused with [`Refusal::AlreadyMigrated`] (nothing to
    ///   send).
    /// * An unresolved migration is retried with its *durable* legacy token (whatever `legacy` is:
    ///   the durable one is the one the server may have processed), respecting its backoff.
    /// * A grant that needs re-auth or was never installed is migrated; an uninstalled one is refused
    ///   (uninstalling revokes the legacy token too).
    pub fn plan_migration(
        &self,
        current: Option<&GrantState>,
        grant: GrantKey,
        legacy: LegacyToken,
        now: UnixMillis,
    ) -> Result<Pending<AttemptRequest>, Refusal> {
        let subject = Subject::LegacyToken { token: legacy };
        let (credential, presented) = self.subject_credential(&subject);
        let base = match current {
            None => {
                let base = Self::fresh_state(grant, now);
                let prior = base.phase.clone();
                GrantState { acquisition: Some(Acquisition { subject, prior }), ..base }
            }
            Some(s) if s.has_live_pair() => return Err(Refusal::AlreadyMigrated(s.generation)),
            Some(s) => match (&s.phase, &s.acquisition) {
                (Phase::Refreshing { .. }, _) => return Err(Refusal::InFlight),
                (Phase::Ambiguous(_), Some(a)) if a.kind() == AttemptKind::Migration => return self.plan(s, now, true),
                (Phase::Ambiguous(_), Some(a)) => return Err(Refusal::AcquisitionOpen(a.kind())),
                (Phase::Uninstalled { .. }, _) => return Err(Refusal::Uninstalled),
                (phase, _) => {
                    let acquisition = Some(Acquisition { subject, prior: phase.clone() });
                    GrantState { acquisition, ..s.clone() }
                }
            },
        };
        Ok(self.intent_from(base, current, AttemptKind::Migration, credential, presented, None, now))
    }

    /// An unresolved token exchange whose session token has expired (or was refused on a retry) can
    /// no longer be retried: the grant falls back (`docs/journal.md` §3). Returns the transition, or
    /// `None` if `s` is not such an exchange at `now`.
    pub fn expire_acquisition(&self, s: &GrantState, now: UnixMillis) -> Option<Pending<Option<TokenSet>>> {
        if !exchange_expired(s, now) {
            return None;
        }
        let Phase::Ambiguous(amb) = &s.phase else { return None };
        let mut state = self.next_state(s, now);
        let mut records = Vec::new();
        let mut events = Vec::new();
        self.fall_back(&mut state, &mut records, &mut events, s, amb, Resolution::WindowElapsed, now);
        Some(Pending {
            transition: Transition { expected_version: Some(s.version), state, records, events },
            value: None,
        })
    }

    /// Where an unresolved token exchange that can no longer be retried leaves the grant. The
    /// exchange may or may not have been processed, so:
    /// * a prior live pair (`Healthy`) is probed: it becomes an ambiguity on the stored refresh token
    ///   (if the exchange was processed the server now rejects it — definitive — else it rotates);
    /// * a prior refresh ambiguity, needs-reauth or uninstall is restored as it was;
    /// * a grant that had nothing needs re-auth (the merchant's next session token).
    #[allow(clippy::too_many_arguments)]
    fn fall_back(
        &self,
        state: &mut GrantState,
        records: &mut Vec<Record>,
        events: &mut Vec<Event>,
        s: &GrantState,
        amb: &Ambiguity,
        how: Resolution,
        now: UnixMillis,
    ) {
        let grant = s.grant.clone();
        let Some(acq) = s.acquisition.clone() else { return };
        let deadline = match &acq.subject {
            Subject::SessionToken { expires_at, .. } => *expires_at,
            Subject::LegacyToken { .. } => now,
        };
        resolved(records, events, &grant, now, amb.first_attempt, how);
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
                events.push(Event::Ambiguous { grant: grant.clone(), reason: amb.last_reason.clone() });
                Phase::Ambiguous(probe)
            }
            Phase::Ambiguous(prior) if state.tokens.is_some() => Phase::Ambiguous(prior),
            p @ (Phase::NeedsReauth { .. } | Phase::Uninstalled { .. }) => p,
            _ => {
                let reason = ReauthReason::RetryWindowElapsed { first_presented_at: amb.since, deadline };
                records.push(Record::NeedsReauth { grant: grant.clone(), at: now, reason: reason.clone() });
                events.push(Event::NeedsReauth { grant, reason: reason.clone() });
                Phase::NeedsReauth { reason, since: now }
            }
        };
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
        let req = sent.value();
        let live = matches!(&current.phase, Phase::Refreshing { attempt, .. } if *attempt == req.attempt)
            && current.generation == req.generation;
        if !live {
            let mut state = self.next_state(current, now);
            state.updated_at = current.updated_at.max(now);
            let record = Record::StaleOutcome {
                grant: current.grant.clone(),
                at: now,
                attempt: req.attempt,
                outcome: outcome.label().to_owned(),
            };
            return Pending {
                transition: Transition {
                    expected_version: Some(current.version),
                    state,
                    records: vec![record],
                    events: vec![],
                },
                value: None,
            };
        }
        self.settle(current, req.attempt, outcome, now, entropy)
    }

    /// Recovery: a grant found `Refreshing` after a restart had an intent durable and no outcome;
    /// its request may have been processed. Returns the transition to `Ambiguous` (never straight to
    /// needs-reauth, even past the retry window: the request may never have left the process, and the
    /// probe that follows tells); `None` if the grant is not `Refreshing`. An interrupted token
    /// exchange whose session token has expired meanwhile falls back in the same transition.
    pub fn recover_interrupted(&self, s: &GrantState, now: UnixMillis, entropy: u64) -> Option<Transition> {
        let Phase::Refreshing { attempt, .. } = &s.phase else { return None };
        let outcome = Outcome::Ambiguous { reason: AmbiguityReason::Interrupted, request_id: None };
        let mut t = self.settle(s, *attempt, outcome, now, entropy).transition;
        // A restart is not evidence of a server problem: the retry may go at once.
        if let Phase::Ambiguous(_) = t.state.phase {
            t.state.not_before = None;
        }
        if let Phase::Ambiguous(amb) = t.state.phase.clone() {
            if exchange_expired(&t.state, now) {
                let before = t.state.clone();
                self.fall_back(
                    &mut t.state,
                    &mut t.records,
                    &mut t.events,
                    &before,
                    &amb,
                    Resolution::WindowElapsed,
                    now,
                );
            }
        }
        Some(t)
    }

    fn settle(
        &self,
        s: &GrantState,
        attempt: AttemptId,
        outcome: Outcome,
        now: UnixMillis,
        entropy: u64,
    ) -> Pending<Option<TokenSet>> {
        let Phase::Refreshing { resolving, started_at, kind, .. } = &s.phase else {
            unreachable!("settle is only called on a Refreshing grant")
        };
        let kind = *kind;
        // The acquisition this attempt belongs to (`None` for a refresh).
        let acq = s.acquisition.clone().filter(|_| kind != AttemptKind::Refresh);
        let grant = s.grant.clone();
        let mut state = self.next_state(s, now);
        let mut records = Vec::new();
        let mut events = Vec::new();
        // Where an answer proving the credential was not processed leaves the grant: a retry stays
        // ambiguous (an acquisition keeps its durable subject); a first attempt returns to where it
        // started (a first acquisition's subject is dropped: nothing may have been processed).
        let (prior_phase, prior_acquisition) = match (resolving, &acq) {
            (Some(amb), _) => (Phase::Ambiguous(amb.clone()), acq.clone()),
            (None, Some(a)) => (a.prior.clone(), None),
            (None, None) => (Phase::Healthy, None),
        };
        // A first acquisition's not-processed answer concerns only the acquisition: the grant's own
        // refresh schedule (failures, backoff) is left as it was.
        let first_acquisition = resolving.is_none() && acq.is_some();
        // For answers that prove the credential was not processed: undo "first presented" if this
        // attempt was the credential's first presentation.
        let unpresent = |state: &mut GrantState| {
            if kind == AttemptKind::Refresh
                && resolving.is_none()
                && s.credential_first_presented_at == Some(*started_at)
            {
                state.credential_first_presented_at = None;
            }
        };
        let backoff = |failures: u32, retry_after: Option<Duration>| {
            now.saturating_add(self.policy.backoff.delay(failures, retry_after, entropy))
        };
        let not_processed = |state: &mut GrantState, retry_after: Option<Duration>| -> UnixMillis {
            state.phase = prior_phase.clone();
            state.acquisition = prior_acquisition.clone();
            if first_acquisition {
                state.consecutive_failures = s.consecutive_failures;
                state.not_before = s.not_before;
                backoff(1, retry_after)
            } else {
                state.consecutive_failures = s.consecutive_failures.saturating_add(1);
                let until = backoff(state.consecutive_failures, retry_after);
                state.not_before = Some(until);
                until
            }
        };
        let mut value = None;
        match outcome {
            Outcome::Success { tokens, request_id } => {
                state.generation = s.generation.next();
                records.push(Record::Committed {
                    grant: grant.clone(),
                    at: now,
                    attempt,
                    generation: state.generation,
                    tokens: TokenSummary::of(&tokens, &self.fingerprints),
                    request_id,
                });
                if let Some(amb) = resolving {
                    let how = Resolution::Succeeded { generation: state.generation };
                    resolved(&mut records, &mut events, &grant, now, amb.first_attempt, how);
                }
                match &acq {
                    None => events.push(Event::Refreshed { grant: grant.clone(), generation: state.generation }),
                    Some(a) => {
                        // A new acquisition supersedes a refresh ambiguity it started from.
                        if let Phase::Ambiguous(prior) = &a.prior {
                            let how = Resolution::Superseded { generation: state.generation };
                            resolved(&mut records, &mut events, &grant, now, prior.first_attempt, how);
                        }
                        if matches!(a.prior, Phase::NeedsReauth { .. } | Phase::Uninstalled { .. }) {
                            events.push(Event::Recovered { grant: grant.clone(), generation: state.generation });
                        }
                        events.push(Event::Acquired { grant: grant.clone(), generation: state.generation, kind });
                        state.acquired_at = Some(now);
                    }
                }
                state.tokens = Some(tokens.clone());
                state.phase = Phase::Healthy;
                state.acquisition = None;
                state.credential_first_presented_at = None;
                state.consecutive_failures = 0;
                state.not_before = None;
                value = Some(tokens);
            }
            Outcome::NotSent(why) => {
                records.push(Record::NotSent { grant: grant.clone(), at: now, attempt, why });
                not_processed(&mut state, None);
                unpresent(&mut state);
            }
            Outcome::Throttled { retry_after, request_id } => {
                let retry_after_ms = retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                records.push(Record::Refused {
                    grant: grant.clone(),
                    at: now,
                    attempt,
                    why: RefusalReason::Throttled { retry_after_ms },
                    request_id,
                });
                let until = not_processed(&mut state, retry_after);
                events.push(Event::Throttled { grant: grant.clone(), until });
                unpresent(&mut state);
            }
            Outcome::BadCredentials { status, error, request_id } => {
                records.push(Record::Refused {
                    grant: grant.clone(),
                    at: now,
                    attempt,
                    why: RefusalReason::AppCredentials { status, error: error.clone() },
                    request_id,
                });
                not_processed(&mut state, None);
                events.push(Event::AppCredentialsRejected { grant: grant.clone(), status, error });
                unpresent(&mut state);
            }
            Outcome::Rejected { status, error, description, request_id } => {
                records.push(Record::Rejected {
                    grant: grant.clone(),
                    at: now,
                    attempt,
                    status,
                    error: error.clone(),
                    description,
                    request_id,
                });
                match (kind, resolving) {
                    // A refused session token is the caller's problem, not a dead grant: a first
                    // exchange leaves the grant as it was.
                    (AttemptKind::TokenExchange, None) => {
                        state.phase = prior_phase;
                        state.acquisition = None;
                    }
                    // A refused retry: the first attempt may have been processed; fall back.
                    (AttemptKind::TokenExchange, Some(amb)) => {
                        self.fall_back(&mut state, &mut records, &mut events, s, amb, Resolution::Rejected, now);
                    }
                    // Refresh or migration: the newest durable credential is dead.
                    (_, resolving) => {
                        if let Some(amb) = resolving {
                            resolved(&mut records, &mut events, &grant, now, amb.first_attempt, Resolution::Rejected);
                        }
                        let reason =
                            ReauthReason::CredentialRejected { status, error, after_ambiguity: resolving.is_some() };
                        records.push(Record::NeedsReauth { grant: grant.clone(), at: now, reason: reason.clone() });
                        events.push(Event::NeedsReauth { grant: grant.clone(), reason: reason.clone() });
                        state.phase = Phase::NeedsReauth { reason, since: now };
                        state.acquisition = None;
                        state.not_before = None;
                    }
                }
            }
            Outcome::Ambiguous { reason, request_id } => {
                records.push(Record::Ambiguous {
                    grant: grant.clone(),
                    at: now,
                    attempt,
                    why: reason.clone(),
                    request_id,
                });
                let amb = match resolving {
                    Some(a) => Ambiguity { last_reason: reason.clone(), tries: a.tries.saturating_add(1), ..a.clone() },
                    None => {
                        Ambiguity { first_attempt: attempt, since: *started_at, last_reason: reason.clone(), tries: 1 }
                    }
                };
                state.consecutive_failures = s.consecutive_failures.saturating_add(1);
                state.not_before = Some(backoff(state.consecutive_failures, None));
                state.phase = Phase::Ambiguous(amb.clone());
                // An acquisition keeps its subject durable (`state.acquisition` is unchanged).
                // Time alone never ends an ambiguity, not even past the provider's retry window: a
                // probe past the window gets a definitive answer whenever it matters (a processed,
                // lost rotation is rejected; a never-processed token is accepted), and a server that
                // answers nothing definitive for that long is down, not a dead grant. (A token
                // exchange is the exception: its session token expires, see `fall_back`.)
                events.push(Event::Ambiguous { grant: grant.clone(), reason });
            }
        }
        Pending { transition: Transition { expected_version: Some(s.version), state, records, events }, value }
    }

    /// Installs a token set acquired elsewhere (OAuth install, the app's own token exchange, an
    /// import). It becomes a new generation; any attempt in flight becomes stale and any ambiguity is
    /// superseded (a new acquisition retires older refresh tokens server-side).
    pub fn install(
        &self,
        current: Option<&GrantState>,
        grant: GrantKey,
        tokens: TokenSet,
        source: InstallSource,
        now: UnixMillis,
    ) -> Pending<TokenSet> {
        let mut records = Vec::new();
        let mut events = Vec::new();
        let state = match current {
            None => GrantState {
                grant: grant.clone(),
                version: 1,
                generation: Generation(1),
                tokens: Some(tokens.clone()),
                phase: Phase::Healthy,
                next_attempt: 1,
                credential_first_presented_at: None,
                consecutive_failures: 0,
                not_before: None,
                updated_at: now,
                acquisition: None,
                acquired_at: Some(now),
            },
            Some(s) => {
                let generation = s.generation.next();
                for first in open_attempts(s) {
                    resolved(&mut records, &mut events, &grant, now, first, Resolution::Superseded { generation });
                }
                let dead = |p: &Phase| matches!(p, Phase::NeedsReauth { .. } | Phase::Uninstalled { .. });
                if dead(&s.phase) || s.acquisition.as_ref().is_some_and(|a| dead(&a.prior)) {
                    events.push(Event::Recovered { grant: grant.clone(), generation });
                }
                GrantState {
                    generation,
                    tokens: Some(tokens.clone()),
                    phase: Phase::Healthy,
                    credential_first_presented_at: None,
                    consecutive_failures: 0,
                    not_before: None,
                    acquisition: None,
                    acquired_at: Some(now),
                    ..self.next_state(s, now)
                }
            }
        };
        records.insert(
            0,
            Record::Installed {
                grant: grant.clone(),
                at: now,
                generation: state.generation,
                tokens: TokenSummary::of(&tokens, &self.fingerprints),
                source,
            },
        );
        events.push(Event::Installed { grant, generation: state.generation });
        Pending {
            transition: Transition { expected_version: current.map(|s| s.version), state, records, events },
            value: tokens,
        }
    }

    /// Marks a grant as needing re-auth by operator or application decision. An open acquisition's
    /// subject credential is dropped.
    pub fn mark_needs_reauth(&self, s: &GrantState, note: &str, now: UnixMillis) -> Transition {
        let reason = ReauthReason::Manual { note: note.chars().filter(|c| !c.is_control()).take(200).collect() };
        let mut state = self.next_state(s, now);
        state.phase = Phase::NeedsReauth { reason: reason.clone(), since: now };
        state.not_before = None;
        state.acquisition = None;
        let grant = s.grant.clone();
        Transition {
            expected_version: Some(s.version),
            state,
            records: vec![Record::NeedsReauth { grant: grant.clone(), at: now, reason: reason.clone() }],
            events: vec![Event::NeedsReauth { grant, reason }],
        }
    }

    /// The app was uninstalled: stop refreshing and drop the secrets (tokens and any acquisition's
    /// subject credential), keeping the audit trail. Idempotent: `None` if already uninstalled.
    pub fn uninstall(&self, s: &GrantState, now: UnixMillis) -> Option<Transition> {
        if matches!(s.phase, Phase::Uninstalled { .. }) {
            return None;
        }
        let grant = s.grant.clone();
        let mut records = Vec::new();
        for first in open_attempts(s) {
            records.push(Record::Resolved {
                grant: grant.clone(),
                at: now,
                attempt: first,
                how: Resolution::Uninstalled,
            });
        }
        records.push(Record::Uninstalled { grant: grant.clone(), at: now });
        let mut state = self.next_state(s, now);
        state.tokens = None;
        state.phase = Phase::Uninstalled { since: now };
        state.acquisition = None;
        state.credential_first_presented_at = None;
        state.not_before = None;
        Some(Transition {
            expected_version: Some(s.version),
            state,
            records,
            events: vec![Event::Uninstalled { grant }],
        })
    }

    /// The granted scopes changed (`app/scopes_update`): the stored token set's scope is replaced
    /// (a later token response's scope replaces it again). Journaled; changes nothing else (an
    /// attempt in flight stays live).
    pub fn scopes_updated(&self, s: &GrantState, scope: &str, now: UnixMillis) -> Transition {
        let scope: String = scope.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(4096).collect();
        let mut state = self.next_state(s, now);
        if let Some(t) = state.tokens.as_mut() {
            t.scope = Some(scope.clone());
        }
        let grant = s.grant.clone();
        Transition {
            expected_version: Some(s.version),
            state,
            records: vec![Record::ScopesUpdated { grant: grant.clone(), at: now, scope }],
            events: vec![Event::ScopesUpdated { grant }],
        }
    }
}

/// The first attempts of everything open on `s`: its attempt in flight or ambiguity, and the refresh
/// ambiguity an open acquisition started from.
/// Records that the ambiguity first seen at `attempt` ended `how`, and emits the matching event.
fn resolved(
    records: &mut Vec<Record>,
    events: &mut Vec<Event>,
    grant: &GrantKey,
    now: UnixMillis,
    attempt: AttemptId,
    how: Resolution,
) {
    records.push(Record::Resolved { grant: grant.clone(), at: now, attempt, how: how.clone() });
    events.push(Event::Resolved { grant: grant.clone(), how });
}

fn open_attempts(s: &GrantState) -> Vec<AttemptId> {
    let mut out = Vec::new();
    match &s.phase {
        Phase::Ambiguous(a) | Phase::Refreshing { resolving: Some(a), .. } => out.push(a.first_attempt),
        Phase::Refreshing { attempt, .. } => out.push(*attempt),
        _ => {}
    }
    if let Some(Acquisition { prior: Phase::Ambiguous(a), .. }) = &s.acquisition {
        out.push(a.first_attempt);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{AccessToken, RefreshToken};

    fn set(access_s: u64, refresh_s: Option<u64>, at: UnixMillis) -> TokenSet {
        TokenSet {
            access_token: AccessToken::new("a"),
            access_expires_at: at.saturating_add(Duration::from_secs(access_s)),
            refresh_token: RefreshToken::new("r"),
            refresh_expires_at: refresh_s.map(|r| at.saturating_add(Duration::from_secs(r))),
            scope: None,
        }
    }

    #[test]
    fn due_time_is_the_margin_before_expiry() {
        let m = Machine::shopify(FingerprintKey::from_bytes([1; 32]));
        let t0 = UnixMillis(1_000_000);
        // Shopify: 60 min access, 90 d refresh: due 5 minutes before the access token expires.
        assert_eq!(m.due_at(&set(3600, Some(7_776_000), t0), t0), t0.saturating_add(Duration::from_secs(3300)));
    }

    #[test]
    fn margins_longer_than_lifetimes_never_make_a_tight_loop() {
        let m = Machine::shopify(FingerprintKey::from_bytes([1; 32]));
        let t0 = UnixMillis(1_000_000);
        // 5-minute tokens with the 5-minute margin: due at half-life, not at once.
        assert_eq!(m.due_at(&set(300, None, t0), t0), t0.saturating_add(Duration::from_secs(150)));
        // A 120-second refresh token against the 7-day margin: due at 60 s.
        assert_eq!(m.due_at(&set(3600, Some(120), t0), t0), t0.saturating_add(Duration::from_secs(60)));
        // Already expired when stored: due at once.
        let expired = TokenSet { access_expires_at: UnixMillis(500), ..set(3600, None, t0) };
        assert_eq!(m.due_at(&expired, t0), t0);
    }
}
