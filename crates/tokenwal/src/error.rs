//! The engine's error, typed by what the caller can do about it.

use tokenwal_core::{AmbiguityReason, Generation, GrantKey, ReauthReason, ShopDomainError, UnixMillis};
use tokenwal_store::StoreError;

/// Why the engine could not give a token or carry out an operation.
///
/// Messages are short, lowercase, name the grant, and never contain a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No tokens were ever installed for this grant.
    #[error("{grant}: not installed")]
    NotInstalled {
        /// The grant.
        grant: GrantKey,
    },
    /// The grant is dead; token exchange is needed (the merchant must open the app).
    #[error("{grant}: needs re-auth ({reason})")]
    NeedsReauth {
        /// The grant.
        grant: GrantKey,
        /// Why.
        reason: ReauthReason,
    },
    /// The app is uninstalled from this shop.
    #[error("{grant}: uninstalled")]
    Uninstalled {
        /// The grant.
        grant: GrantKey,
    },
    /// A rotation's outcome is unknown and the access token has expired; tokenwal keeps retrying the
    /// old credential in the background. Transient: try again after `retry_at`.
    #[error("{grant}: refresh outcome unknown ({reason}); retrying with the old token at {retry_at}")]
    Ambiguous {
        /// The grant.
        grant: GrantKey,
        /// Why.
        reason: AmbiguityReason,
        /// When the next retry goes.
        retry_at: UnixMillis,
    },
    /// The engine is still recovering this grant from the last stop (its recovery outlived the
    /// open's budget, e.g. because the token endpoint hangs); it keeps recovering in the background
    /// while every other grant is served. Transient: try again after `retry_after`, or configure
    /// [`crate::Config::wait_for_recovery`] to wait for it.
    #[error("{grant}: still recovering from the last stop; try again in {}s", .retry_after.as_secs_f64())]
    Recovering {
        /// The grant.
        grant: GrantKey,
        /// A hint: ask again after this long.
        retry_after: std::time::Duration,
    },
    /// The token endpoint is unreachable or throttling, and the access token has expired. Transient.
    #[error("{grant}: token endpoint unavailable; next attempt at {retry_at}")]
    Unavailable {
        /// The grant.
        grant: GrantKey,
        /// When the next attempt goes.
        retry_at: UnixMillis,
    },
    /// The token endpoint refused the app's client credentials (`invalid_client`); refreshing is
    /// paused fleet-wide. Fix the app's configuration. No shop is marked for re-auth because of this.
    #[error("app credentials rejected by the token endpoint; refreshing paused until {until}")]
    AppCredentialsRejected {
        /// When refreshing resumes.
        until: UnixMillis,
    },
    /// An attempt for this grant is in flight in an unexpected way (an earlier task died mid-attempt);
    /// recovery at the next start resolves it.
    #[error("{grant}: an attempt is already in flight")]
    InFlight {
        /// The grant.
        grant: GrantKey,
    },
    /// An install from outside was refused: the grant holds a newer pair (generation `held`, by
    /// access-token expiry). Installing the older pair would put a superseded refresh token back in
    /// use. Nothing was written. Install with `force` only if you know the held pair is dead.
    #[error("{grant}: holds a newer pair (generation {}); the older pair was not installed", .held.0)]
    OlderPair {
        /// The grant.
        grant: GrantKey,
        /// The generation held.
        held: Generation,
    },
    /// The store failed. After an I/O error it is fail-stop: restart the engine.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A shop domain was invalid.
    #[error("invalid shop domain: {0}")]
    InvalidShop(#[from] ShopDomainError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// An internal task of the engine failed (it panicked, or was cancelled by a runtime shutting
    /// down). Nothing durable is lost: a grant left mid-attempt is resolved by recovery.
    #[error("internal: {0}")]
    Internal(String),
    /// The engine is shutting down.
    #[error("engine is shutting down")]
    ShuttingDown,
}

impl Error {
    /// Whether trying again later can succeed without anyone doing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Ambiguous { .. } | Error::Unavailable { .. } | Error::InFlight { .. } | Error::Recovering { .. }
        )
    }
}
