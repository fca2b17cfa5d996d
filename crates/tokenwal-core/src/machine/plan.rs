//! Planning an attempt: the credential it presents and its intent, durable before anything is sent.

use super::{exchange_expired, Machine, Pending, Transition, Verdict};
use crate::domain::{AttemptId, Fingerprint, Generation, GrantKey};
use crate::record::{Acquisition, Ambiguity, AttemptKind, GrantState, Phase, ReauthReason, Record, Subject};
use crate::secret::{LegacyToken, RefreshToken, SessionToken};
use crate::time::UnixMillis;

/// The credential an attempt presents. Readable only through a [`Durable<AttemptRequest>`](super::Durable).
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
    /// The grant has no tokens: it was never installed (or a first acquisition never completed).
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
    /// An install would put a pair older than the one held (generation `held`) over it.
    #[error("the grant holds a newer pair (generation {})", .held.0)]
    OlderPair {
        /// The generation held.
        held: Generation,
    },
}

/// What an intent is drafted from.
struct Draft<'a> {
    /// The state the attempt starts from (the current one, or a fresh or acquisition-carrying copy).
    base: GrantState,
    /// The durable state the intent must replace (`None`: the grant is new).
    current: Option<&'a GrantState>,
    kind: AttemptKind,
    credential: Credential,
    presented: Fingerprint,
    /// The ambiguity this attempt retries, if any.
    resolving: Option<Ambiguity>,
}

impl Machine {
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
            let draft = Draft { base: s.clone(), current: Some(s), kind: acq.kind(), credential, presented, resolving };
            return Ok(self.intent(draft, now));
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
        let credential = Credential::RefreshToken(tokens.refresh_token.clone());
        let draft = Draft { base, current: Some(s), kind: AttemptKind::Refresh, credential, presented, resolving };
        Ok(self.intent(draft, now))
    }

    fn subject_credential(&self, subject: &Subject) -> (Credential, Fingerprint) {
        match subject {
            Subject::SessionToken { token, .. } => {
                (Credential::SessionToken(token.clone()), self.fingerprints.session_token(token))
            }
            Subject::LegacyToken { token } => {
                (Credential::LegacyToken(token.clone()), self.fingerprints.legacy_token(token))
            }
        }
    }

    /// The intent transition from `draft.current` (its version; `None`: the grant is new) to
    /// `draft.base` moved to `Refreshing`, releasing the credential once durable.
    fn intent(&self, draft: Draft<'_>, now: UnixMillis) -> Pending<AttemptRequest> {
        let Draft { base, current, kind, credential, presented, resolving } = draft;
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
                prior_phase: current.map(|c| c.phase.name()),
                state,
                records: vec![record],
                events: vec![],
                verdict: Verdict::Intent,
            },
            value: request,
        }
    }

    pub(super) fn fresh_state(grant: GrantKey, now: UnixMillis) -> GrantState {
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
        let kind = AttemptKind::TokenExchange;
        Ok(self.intent(Draft { base, current, kind, credential, presented, resolving }, now))
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
        let kind = AttemptKind::Migration;
        Ok(self.intent(Draft { base, current, kind, credential, presented, resolving: None }, now))
    }
}
