//! Why an acquisition (a token exchange or a migration) did not complete: one error for both.

use crate::clock::now;
use crate::error::Error;
use crate::session::SessionTokenProblem;
use std::time::Duration;
use tokenwal_core::{AmbiguityReason, AttemptKind, NotSentReason, ShopDomain, UnixMillis};

/// Why an acquisition ([`crate::Engine::exchange_session_token`] or [`crate::Engine::migrate`]) did
/// not complete. Messages name the shop and never contain a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// The legacy token is not a plausible token (empty, too long, whitespace or control characters).
    /// Nothing was sent or stored. Not retryable.
    #[error("{shop}: legacy token refused locally: {problem}")]
    InvalidLegacyToken {
        /// The shop.
        shop: ShopDomain,
        /// What is wrong (never the token).
        problem: &'static str,
    },
    /// The session token failed local validation; nothing was sent or stored. The caller's error
    /// (get a fresh session token from App Bridge). Not retryable with this token.
    #[error("{shop}: {problem}; nothing was sent")]
    InvalidSessionToken {
        /// The shop.
        shop: ShopDomain,
        /// What is wrong.
        problem: SessionTokenProblem,
    },
    /// The server definitively refused the credential. For a migration (the legacy token revoked,
    /// unknown, or migrated more than 7 days ago) the shop is now marked needs-reauth (the merchant
    /// must open the app). For a token exchange (`invalid_subject_token`) it is the caller's error,
    /// not a dead grant: the shop's state is unchanged (see `docs/journal.md` for a refusal after a
    /// lost answer). Not retryable with this credential.
    #[error(
        "{shop}: {} rejected by the token endpoint ({status} {error}{}){}",
        subject_text(*.kind),
        description_text(.description),
        consequence_text(*.kind)
    )]
    Rejected {
        /// The shop.
        shop: ShopDomain,
        /// Which acquisition was refused ([`AttemptKind::Migration`] or
        /// [`AttemptKind::TokenExchange`]).
        kind: AttemptKind,
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The OAuth `error_description`, sanitised.
        description: Option<String>,
    },
    /// 429: nothing was processed. Retryable after `retry_after` (the server's `Retry-After`, if
    /// any; a token exchange may need a fresh session token by then).
    #[error("{shop}: throttled by the token endpoint{}", retry_after_text(.retry_after))]
    Throttled {
        /// The shop.
        shop: ShopDomain,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The outcome is unknown (lost answer, 5xx, timeout, interrupted). The credential is durable and
    /// the acquisition is retried with it: a migration by the engine's scheduler and recovery, or by
    /// calling [`crate::Engine::migrate`] again at or after `retry_at` (which returns `Resumed`); a
    /// token exchange while its session token is valid, after which the shop falls back
    /// (`docs/journal.md` §3). Retryable.
    #[error("{shop}: acquisition outcome unknown ({reason}); will retry with the same credential at {retry_at}")]
    Ambiguous {
        /// The shop.
        shop: ShopDomain,
        /// Why.
        reason: AmbiguityReason,
        /// When the next retry may go.
        retry_at: UnixMillis,
    },
    /// The token endpoint refused the app's own client credentials (`invalid_client`): fleet-wide, fix
    /// the configuration. Sending is paused until `until`. Retryable after the fix.
    #[error("app credentials rejected by the token endpoint; paused until {until}")]
    AppCredentials {
        /// When sending resumes.
        until: UnixMillis,
    },
    /// The request never reached the server (connect, DNS, TLS). Nothing was processed. Retryable.
    #[error("{shop}: token endpoint not reached ({detail})")]
    NotSent {
        /// The shop.
        shop: ShopDomain,
        /// What failed (no secret material).
        detail: String,
    },
    /// The app was uninstalled from the shop (which revokes a legacy token too). Not retryable.
    #[error("{shop}: uninstalled")]
    Uninstalled {
        /// The shop.
        shop: ShopDomain,
    },
    /// Another attempt or acquisition is in progress for this shop (an unresolved migration could
    /// not be resolved first, or an attempt was orphaned). Retryable.
    #[error("{shop}: another attempt is in progress")]
    Busy {
        /// The shop.
        shop: ShopDomain,
    },
    /// The engine failed (store, configuration, shutting down, an internal task).
    #[error(transparent)]
    Engine(#[from] Error),
}

/// [`crate::Engine::migrate`]'s error (the same type as the token exchange's).
pub type MigrateError = AcquireError;

/// [`crate::Engine::exchange_session_token`]'s error (the same type as the migration's).
pub type ExchangeError = AcquireError;

impl AcquireError {
    /// Whether trying again later (with a fresh session token where the old one expired) can succeed
    /// without anyone changing anything (`AppCredentials` needs the app's configuration fixed first).
    pub fn is_retryable(&self) -> bool {
        match self {
            AcquireError::Throttled { .. }
            | AcquireError::Ambiguous { .. }
            | AcquireError::NotSent { .. }
            | AcquireError::Busy { .. } => true,
            AcquireError::Engine(e) => e.is_transient(),
            _ => false,
        }
    }

    /// How long to wait before retrying, if the error says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AcquireError::Throttled { retry_after, .. } => *retry_after,
            AcquireError::Ambiguous { retry_at, .. } => Some(retry_at.since(now())),
            _ => None,
        }
    }
}

fn subject_text(kind: AttemptKind) -> &'static str {
    match kind {
        AttemptKind::Migration => "legacy token",
        AttemptKind::TokenExchange => "session token",
        AttemptKind::Refresh => "refresh token",
    }
}

fn consequence_text(kind: AttemptKind) -> &'static str {
    match kind {
        AttemptKind::Migration => "; shop needs re-auth",
        _ => "",
    }
}

fn retry_after_text(d: &Option<Duration>) -> String {
    d.map(|d| format!(" (retry after {} s)", d.as_secs())).unwrap_or_default()
}

fn description_text(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

pub(super) fn not_sent_detail(why: &NotSentReason) -> String {
    match why {
        NotSentReason::Connect { detail } | NotSentReason::Build { detail } => detail.clone(),
    }
}
