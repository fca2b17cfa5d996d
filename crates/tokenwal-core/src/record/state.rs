//! The durable per-grant state ([`GrantState`]): its phase, an open ambiguity, an acquisition's
//! subject, and format 1's shape (kept decodable). See the parent module for the format rules.

use super::{AmbiguityReason, AttemptKind, ReauthReason};
use crate::domain::{AttemptId, Fingerprint, Generation, GrantKey, TokenSet};
use crate::secret::{LegacyToken, SessionToken};
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};

/// An unresolved rotation: an attempt whose outcome is unknown.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Ambiguity {
    /// The first attempt whose outcome was unknown (retries have later ids).
    pub first_attempt: AttemptId,
    /// When the ambiguity began.
    pub since: UnixMillis,
    /// The latest reason.
    pub last_reason: AmbiguityReason,
    /// Attempts made with the same credential since it began (including the first).
    pub tries: u32,
}

/// Where a grant is in its life.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Phase {
    /// The current token set is the newest the server issued (as far as anyone knows).
    Healthy,
    /// An intent is durable and its request may be on the wire.
    Refreshing {
        /// The attempt.
        attempt: AttemptId,
        /// What is asked for.
        kind: AttemptKind,
        /// Fingerprint of the credential presented.
        presented: Fingerprint,
        /// When the intent was written.
        started_at: UnixMillis,
        /// The ambiguity this attempt tries to resolve, if it is a retry.
        resolving: Option<Ambiguity>,
    },
    /// The outcome of a rotation is unknown; the stored (old) credential must be retried.
    Ambiguous(Ambiguity),
    /// The grant is dead; token exchange is needed.
    NeedsReauth {
        /// Why.
        reason: ReauthReason,
        /// Since when.
        since: UnixMillis,
    },
    /// The app is uninstalled; no secrets are kept.
    Uninstalled {
        /// Since when.
        since: UnixMillis,
    },
    /// No tokens were ever acquired: a first acquisition (migration or token exchange) was planned and
    /// certainly not processed (not sent, throttled, the app's credentials refused, the session token
    /// refused). Format 2.
    NotInstalled {
        /// Since when.
        since: UnixMillis,
    },
}

impl Phase {
    /// A short name (`healthy`, `refreshing`, `ambiguous`, `needs-reauth`, `uninstalled`,
    /// `not-installed`).
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Healthy => "healthy",
            Phase::Refreshing { .. } => "refreshing",
            Phase::Ambiguous(_) => "ambiguous",
            Phase::NeedsReauth { .. } => "needs-reauth",
            Phase::Uninstalled { .. } => "uninstalled",
            Phase::NotInstalled { .. } => "not-installed",
        }
    }

    /// Whether recovery must look at a grant in this phase (an intent without outcome, or an
    /// unresolved ambiguity). The store keeps an index of exactly these grants.
    pub fn is_open(&self) -> bool {
        matches!(self, Phase::Refreshing { .. } | Phase::Ambiguous(_))
    }
}

/// The durable current state of one grant, written atomically with the records that explain it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct GrantState {
    /// The grant.
    pub grant: GrantKey,
    /// Bumped by every write of this state: the store's compare-and-swap token.
    pub version: u64,
    /// The generation of `tokens`.
    pub generation: Generation,
    /// The newest durable token set; `None` once uninstalled.
    pub tokens: Option<TokenSet>,
    /// Where the grant is.
    pub phase: Phase,
    /// The next attempt id to use.
    pub next_attempt: u64,
    /// When the current refresh token was first presented (starts the provider's retry window).
    pub credential_first_presented_at: Option<UnixMillis>,
    /// Failed attempts since the last success (drives backoff).
    pub consecutive_failures: u32,
    /// No attempt before this instant (backoff, `Retry-After`).
    pub not_before: Option<UnixMillis>,
    /// When this state was written.
    pub updated_at: UnixMillis,
    /// An acquisition (token exchange or migration) whose attempt is in flight or whose outcome is
    /// unknown: the subject credential it presents, durable so that a lost answer or a crash is
    /// retried with the *same* credential. `Some` exactly while `phase` is `Refreshing` with an
    /// acquisition kind, or `Ambiguous` about one. Format 2 (`None` in states decoded from format 1).
    pub acquisition: Option<Acquisition>,
    /// When the current generation was acquired (install, token exchange, migration); refreshes do
    /// not change it. Lets a late `app/uninstalled` webhook be told from one that predates a
    /// reinstall. Format 2 (`None` in states decoded from format 1: unknown).
    pub acquired_at: Option<UnixMillis>,
}

impl GrantState {
    /// The kind of the open attempt or ambiguity, if any: an acquisition's kind while one is open,
    /// `Refresh` for a refresh attempt or ambiguity.
    pub fn open_kind(&self) -> Option<AttemptKind> {
        match &self.phase {
            Phase::Refreshing { kind, .. } => Some(*kind),
            Phase::Ambiguous(_) => Some(self.acquisition.as_ref().map_or(AttemptKind::Refresh, Acquisition::kind)),
            _ => None,
        }
    }

    /// Whether the grant holds an expiring pair that is in use (not dead, not uninstalled): what a
    /// migration of a legacy token would only replace.
    pub fn has_live_pair(&self) -> bool {
        let refresh_open = matches!(self.open_kind(), None | Some(AttemptKind::Refresh));
        self.tokens.is_some()
            && refresh_open
            && matches!(self.phase, Phase::Healthy | Phase::Refreshing { .. } | Phase::Ambiguous(_))
    }
}

/// The credential an acquisition presents (the token endpoint's `subject_token`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Subject {
    /// An App Bridge session token (token exchange).
    SessionToken {
        /// The token (a secret: redacted `Debug`, zeroized on drop).
        token: SessionToken,
        /// Its `exp` claim: a retry after this instant is pointless (the exchange then falls back).
        expires_at: UnixMillis,
    },
    /// A legacy non-expiring offline token (migration). Shopify answers a retry with the same
    /// legacy token with the same pair for up to 7 days.
    LegacyToken {
        /// The token (a secret).
        token: LegacyToken,
    },
}

/// An acquisition in flight or unresolved.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Acquisition {
    /// What is presented.
    pub subject: Subject,
    /// The phase the grant was in before the acquisition began (never `Refreshing`, never about
    /// another acquisition): restored when the acquisition ends without a new pair.
    pub prior: Phase,
}

impl Acquisition {
    /// `TokenExchange` or `Migration`.
    pub fn kind(&self) -> AttemptKind {
        match self.subject {
            Subject::SessionToken { .. } => AttemptKind::TokenExchange,
            Subject::LegacyToken { .. } => AttemptKind::Migration,
        }
    }
}

/// Format 1 of [`GrantState`] (before acquisitions), kept decodable.
#[derive(Deserialize)]
pub(crate) struct GrantStateV1 {
    grant: GrantKey,
    version: u64,
    generation: Generation,
    tokens: Option<TokenSet>,
    phase: Phase,
    next_attempt: u64,
    credential_first_presented_at: Option<UnixMillis>,
    consecutive_failures: u32,
    not_before: Option<UnixMillis>,
    updated_at: UnixMillis,
}

impl From<GrantStateV1> for GrantState {
    fn from(v: GrantStateV1) -> GrantState {
        GrantState {
            grant: v.grant,
            version: v.version,
            generation: v.generation,
            tokens: v.tokens,
            phase: v.phase,
            next_attempt: v.next_attempt,
            credential_first_presented_at: v.credential_first_presented_at,
            consecutive_failures: v.consecutive_failures,
            not_before: v.not_before,
            updated_at: v.updated_at,
            acquisition: None,
            acquired_at: None,
        }
    }
}
