//! Journal records and the durable per-grant state.
//!
//! The journal is the audit trail: one [`Record`] per event, appended in the same atomic write as the
//! grant's new [`GrantState`]. Recovery reads only grant states (through the store's open-attempt
//! index), never the whole history; the records explain how each state came to be.
//!
//! Both types are encoded with [`crate::codec`] (versioned, checksummed frames). Changing any type
//! reachable from them changes the format: bump [`crate::codec::RECORD_VERSION`] /
//! [`crate::codec::STATE_VERSION`], keep the old shapes decodable, and update `docs/journal.md`.

use crate::domain::{AttemptId, Fingerprint, FingerprintKey, Generation, GrantKey, TokenSet};
use crate::time::UnixMillis;
use serde::{Deserialize, Serialize};
use std::fmt;

mod state;

pub(crate) use state::GrantStateV1;
pub use state::{Acquisition, Ambiguity, GrantState, Phase, Subject};

/// What an attempt asks the token endpoint for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Hash)]
pub enum AttemptKind {
    /// `grant_type=refresh_token` with the grant's current refresh token.
    Refresh,
    /// Token exchange of a session token (re-acquisition of a dead grant).
    TokenExchange,
    /// Token exchange of a legacy non-expiring offline token into an expiring pair.
    Migration,
}

impl fmt::Display for AttemptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttemptKind::Refresh => "refresh",
            AttemptKind::TokenExchange => "token-exchange",
            AttemptKind::Migration => "migration",
        })
    }
}

/// Why the outcome of an attempt is unknown: the server may or may not have rotated.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AmbiguityReason {
    /// A 5xx answer (Shopify's edge answers 520 with a plain-text body).
    ServerError {
        /// The HTTP status.
        status: u16,
    },
    /// A status that is neither success nor a recognised definitive answer.
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
    },
    /// A 2xx whose body is not a complete token response.
    UnparseableSuccess {
        /// The HTTP status.
        status: u16,
        /// What was wrong with the body (no secret material).
        detail: String,
    },
    /// The response body exceeded the size cap.
    BodyTooLarge {
        /// The HTTP status.
        status: u16,
    },
    /// No answer within the timeout after the request may have been written.
    Timeout,
    /// The connection failed after the request may have been written.
    ConnectionLost,
    /// The process stopped with the intent durable and no outcome recorded (found by recovery).
    Interrupted,
}

impl fmt::Display for AmbiguityReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmbiguityReason::ServerError { status } => write!(f, "server error {status}"),
            AmbiguityReason::UnexpectedStatus { status } => write!(f, "unexpected status {status}"),
            AmbiguityReason::UnparseableSuccess { status, detail } => {
                write!(f, "unusable {status} response: {detail}")
            }
            AmbiguityReason::BodyTooLarge { status } => write!(f, "oversized {status} response"),
            AmbiguityReason::Timeout => f.write_str("timed out"),
            AmbiguityReason::ConnectionLost => f.write_str("connection lost mid-request"),
            AmbiguityReason::Interrupted => f.write_str("interrupted by a stop"),
        }
    }
}

/// Why an attempt certainly never reached the server's token logic.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum NotSentReason {
    /// Connection refused, DNS failure, TLS handshake failure or connect timeout.
    Connect {
        /// A short description (no secret material).
        detail: String,
    },
    /// The request could not be built (a local bug or misconfiguration).
    Build {
        /// A short description (no secret material).
        detail: String,
    },
}

/// A definitive answer that did not process the credential: the credential is unchanged.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum RefusalReason {
    /// 429 Too Many Requests.
    Throttled {
        /// The server's `Retry-After`, in milliseconds, if it gave one.
        retry_after_ms: Option<u64>,
    },
    /// `invalid_client` / `unauthorized_client`: the *app's* credentials were refused. A fleet-wide
    /// alarm; never evidence that the shop's grant is dead.
    AppCredentials {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
    },
}

/// Why a grant needs re-acquisition (token exchange when the merchant next opens the app).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ReauthReason {
    /// The server definitively rejected the newest durable credential.
    CredentialRejected {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// Whether the rejection came while resolving an ambiguous rotation.
        after_ambiguity: bool,
    },
    /// An ambiguous attempt stayed unresolved past its retry window. Produced only for a token exchange
    /// of a shop with no prior tokens whose session token expired before a definitive answer; refresh
    /// and migration ambiguities are probed until a definitive answer (docs/journal.md §3).
    RetryWindowElapsed {
        /// When the credential was first presented.
        first_presented_at: UnixMillis,
        /// The deadline that passed.
        deadline: UnixMillis,
    },
    /// An operator or the application said so.
    Manual {
        /// Free text (no secret material).
        note: String,
    },
}

impl ReauthReason {
    /// Whether this reason says the grant's credential was refused by the server (as opposed to an
    /// operator's mark or an unresolved acquisition).
    pub fn is_rejection(&self) -> bool {
        matches!(self, ReauthReason::CredentialRejected { .. })
    }
}

impl fmt::Display for ReauthReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReauthReason::CredentialRejected { status, error, after_ambiguity } => {
                write!(f, "credential rejected ({status} {error})")?;
                if *after_ambiguity {
                    f.write_str(" while resolving an ambiguous attempt")?;
                }
                Ok(())
            }
            ReauthReason::RetryWindowElapsed { deadline, .. } => {
                write!(f, "ambiguous acquisition unresolved when its subject credential expired at {deadline}")
            }
            ReauthReason::Manual { note } => write!(f, "marked by operator: {note}"),
        }
    }
}

/// How an ambiguous attempt ended.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Resolution {
    /// A retry with the same credential succeeded; the result was committed as this generation.
    Succeeded {
        /// The committed generation.
        generation: Generation,
    },
    /// A retry with the same credential was definitively rejected. For a token exchange this ends
    /// the exchange's ambiguity (the session token is refused) and the grant falls back to its prior
    /// phase (docs/journal.md §3, "Token exchange").
    Rejected,
    /// A newer token set was installed before the ambiguity resolved.
    Superseded {
        /// The installed generation.
        generation: Generation,
    },
    /// The retry window elapsed without a definitive answer. Produced only for token exchanges (the
    /// session token expired before a retry got a definitive answer; the grant then falls back to its
    /// prior phase). Refresh and migration ambiguities are probed until a definitive answer.
    WindowElapsed,
    /// The grant was uninstalled.
    Uninstalled,
}

/// Where an installed token set came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum InstallSource {
    /// `tokenwal import`.
    Import,
    /// The application (e.g. its front end did token exchange or the OAuth install).
    Application,
    /// tokenwal's own token exchange.
    TokenExchange,
    /// tokenwal's own migration of a legacy token.
    Migration,
}

/// One journal record. Every record names its grant and the instant it was written.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Record {
    /// A token set acquired outside the refresh loop became the grant's current set.
    Installed {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The new generation.
        generation: Generation,
        /// What was installed (no secrets).
        tokens: TokenSummary,
        /// Where they came from.
        source: InstallSource,
    },
    /// An attempt is about to be sent. Durable before the first byte leaves.
    Intent {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The attempt.
        attempt: AttemptId,
        /// The generation whose credential is presented.
        generation: Generation,
        /// What is asked for.
        kind: AttemptKind,
        /// Keyed fingerprint of the credential presented (never the credential).
        presented: Fingerprint,
    },
    /// The attempt succeeded; its tokens are the grant's new current set. Durable before any use.
    Committed {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The attempt.
        attempt: AttemptId,
        /// The new generation.
        generation: Generation,
        /// What was committed (no secrets; the tokens live only in the grant state).
        tokens: TokenSummary,
        /// The server's `x-request-id`.
        request_id: Option<String>,
    },
    /// The server definitively rejected the presented credential.
    Rejected {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The attempt.
        attempt: AttemptId,
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The OAuth `error_description`, if any.
        description: Option<String>,
        /// The server's `x-request-id`.
        request_id: Option<String>,
    },
    /// The server answered without processing the credential (429, `invalid_client`).
    Refused {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The attempt.
        attempt: AttemptId,
        /// Why.
        why: RefusalReason,
        /// The server's `x-request-id`.
        request_id: Option<String>,
    },
    /// The outcome is unknown: the server may have rotated.
    Ambiguous {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The attempt.
        attempt: AttemptId,
        /// Why.
        why: AmbiguityReason,
        /// The server's `x-request-id`, if a response arrived.
        request_id: Option<String>,
    },
    /// The request certainly never reached the server.
    NotSent {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The attempt.
        attempt: AttemptId,
        /// Why.
        why: NotSentReason,
    },
    /// An ambiguous attempt (named by its first attempt id) ended.
    Resolved {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The first ambiguous attempt.
        attempt: AttemptId,
        /// How.
        how: Resolution,
    },
    /// The grant is dead; re-acquisition is needed.
    NeedsReauth {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// Why.
        reason: ReauthReason,
    },
    /// The app was uninstalled from the shop; secrets were dropped.
    Uninstalled {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
    },
    /// The outcome of an attempt arrived after the grant had moved on; it changed nothing.
    StaleOutcome {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The attempt.
        attempt: AttemptId,
        /// What the outcome was (e.g. "success", "rejected"); no secret material.
        outcome: String,
    },
    /// The granted scopes changed (Shopify's `app/scopes_update` webhook). Format 2.
    ScopesUpdated {
        /// The grant.
        grant: GrantKey,
        /// When.
        at: UnixMillis,
        /// The new scopes, comma-separated.
        scope: String,
    },
}

impl Record {
    /// The grant the record belongs to.
    pub fn grant(&self) -> &GrantKey {
        match self {
            Record::Installed { grant, .. }
            | Record::Intent { grant, .. }
            | Record::Committed { grant, .. }
            | Record::Rejected { grant, .. }
            | Record::Refused { grant, .. }
            | Record::Ambiguous { grant, .. }
            | Record::NotSent { grant, .. }
            | Record::Resolved { grant, .. }
            | Record::NeedsReauth { grant, .. }
            | Record::Uninstalled { grant, .. }
            | Record::StaleOutcome { grant, .. }
            | Record::ScopesUpdated { grant, .. } => grant,
        }
    }

    /// When the record was written.
    pub fn at(&self) -> UnixMillis {
        match self {
            Record::Installed { at, .. }
            | Record::Intent { at, .. }
            | Record::Committed { at, .. }
            | Record::Rejected { at, .. }
            | Record::Refused { at, .. }
            | Record::Ambiguous { at, .. }
            | Record::NotSent { at, .. }
            | Record::Resolved { at, .. }
            | Record::NeedsReauth { at, .. }
            | Record::Uninstalled { at, .. }
            | Record::StaleOutcome { at, .. }
            | Record::ScopesUpdated { at, .. } => *at,
        }
    }

    /// A short name of the record's kind (for listings).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Record::Installed { .. } => "installed",
            Record::Intent { .. } => "intent",
            Record::Committed { .. } => "committed",
            Record::Rejected { .. } => "rejected",
            Record::Refused { .. } => "refused",
            Record::Ambiguous { .. } => "ambiguous",
            Record::NotSent { .. } => "not-sent",
            Record::Resolved { .. } => "resolved",
            Record::NeedsReauth { .. } => "needs-reauth",
            Record::Uninstalled { .. } => "uninstalled",
            Record::StaleOutcome { .. } => "stale-outcome",
            Record::ScopesUpdated { .. } => "scopes-updated",
        }
    }
}

/// What the journal keeps of a token set: expiries, scope and a fingerprint of the refresh token.
/// Journal records never hold a secret; the only copy of a token on disk is in the grant state.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TokenSummary {
    /// Fingerprint of the refresh token.
    pub refresh: Fingerprint,
    /// When the access token expires.
    pub access_expires_at: UnixMillis,
    /// When the refresh token expires, if known.
    pub refresh_expires_at: Option<UnixMillis>,
    /// Granted scopes.
    pub scope: Option<String>,
}

impl TokenSummary {
    /// Summarises `t` under `key`.
    pub fn of(t: &TokenSet, key: &FingerprintKey) -> TokenSummary {
        TokenSummary {
            refresh: key.refresh_token(&t.refresh_token),
            access_expires_at: t.access_expires_at,
            refresh_expires_at: t.refresh_expires_at,
            scope: t.scope.clone(),
        }
    }
}
