//! Re-acquisition: token exchange of App Bridge session tokens, and migration of legacy non-expiring
//! offline tokens. Both go through the journal protocol of refreshes (intent durable → send → durable
//! commit before use; see `docs/journal.md` §3 "Acquisitions").

use crate::engine::{now, Engine};
use crate::error::Error;
use crate::session::{self, SessionTokenProblem};
use std::fmt;
use std::time::Duration;
use tokenwal_core::{
    AmbiguityReason, AttemptKind, Generation, GrantState, LegacyToken, NotSentReason, Outcome, Phase, Refusal,
    SessionToken, ShopDomain, Subject, UnixMillis,
};
use tokenwal_store::StoreError;
use tracing::{info, warn};

/// How [`Engine::migrate`] ended for a shop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrateOutcome {
    /// The legacy token was exchanged; the new expiring pair is durable as `generation`.
    Migrated {
        /// The committed generation.
        generation: Generation,
    },
    /// The shop already holds a live expiring pair: nothing was sent.
    AlreadyMigrated {
        /// The current generation.
        generation: Generation,
    },
    /// An interrupted or ambiguous migration was completed with its *durable* legacy token (the one
    /// the server may have processed); the pair is durable as `generation`.
    Resumed {
        /// The committed generation.
        generation: Generation,
    },
}

impl MigrateOutcome {
    /// The shop's generation after the call.
    pub fn generation(&self) -> Generation {
        match self {
            MigrateOutcome::Migrated { generation }
            | MigrateOutcome::AlreadyMigrated { generation }
            | MigrateOutcome::Resumed { generation } => *generation,
        }
    }

    /// `migrated`, `already-migrated` or `resumed` (for reports).
    pub fn label(&self) -> &'static str {
        match self {
            MigrateOutcome::Migrated { .. } => "migrated",
            MigrateOutcome::AlreadyMigrated { .. } => "already-migrated",
            MigrateOutcome::Resumed { .. } => "resumed",
        }
    }
}

/// Why a migration did not complete. Messages name the shop and never contain a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The legacy token is not a plausible token (empty, too long, whitespace or control characters).
    /// Nothing was sent or stored. Not retryable.
    #[error("{shop}: legacy token refused locally: {problem}")]
    InvalidLegacyToken {
        /// The shop.
        shop: ShopDomain,
        /// What is wrong (never the token).
        problem: &'static str,
    },
    /// 429: nothing was processed. Retryable after `retry_after` (the server's `Retry-After`, if any).
    #[error("{shop}: throttled by the token endpoint{}", retry_after_text(.retry_after))]
    Throttled {
        /// The shop.
        shop: ShopDomain,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The server definitively refused the legacy token (revoked, unknown, already migrated more than
    /// 7 days ago). The shop is now marked needs-reauth (the merchant must open the app). Not
    /// retryable.
    #[error("{shop}: legacy token rejected ({status} {error}{}); shop needs re-auth", description_text(.description))]
    Rejected {
        /// The shop.
        shop: ShopDomain,
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The OAuth `error_description`, sanitised.
        description: Option<String>,
    },
    /// The outcome is unknown (lost answer, 5xx, timeout, interrupted). The legacy token is durable;
    /// the migration is retried with it (by the engine's scheduler and recovery, or by calling
    /// [`Engine::migrate`] again at or after `retry_at`, which returns `Resumed`). Retryable.
    #[error("{shop}: migration outcome unknown ({reason}); will retry with the same legacy token at {retry_at}")]
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
    /// The app was uninstalled from the shop (which revokes the legacy token too). Not retryable.
    #[error("{shop}: uninstalled")]
    Uninstalled {
        /// The shop.
        shop: ShopDomain,
    },
    /// Another attempt or a token exchange is in progress for this shop. Retryable.
    #[error("{shop}: another attempt is in progress")]
    Busy {
        /// The shop.
        shop: ShopDomain,
    },
    /// The engine failed (store, configuration, shutting down).
    #[error(transparent)]
    Engine(#[from] Error),
}

impl MigrateError {
    /// Whether calling [`Engine::migrate`] again later can succeed without anyone changing anything
    /// (`AppCredentials` needs the app's configuration fixed first).
    pub fn is_retryable(&self) -> bool {
        match self {
            MigrateError::Throttled { .. }
            | MigrateError::Ambiguous { .. }
            | MigrateError::NotSent { .. }
            | MigrateError::Busy { .. } => true,
            MigrateError::Engine(e) => e.is_transient(),
            _ => false,
        }
    }

    /// How long to wait before retrying, if the error says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            MigrateError::Throttled { retry_after, .. } => *retry_after,
            MigrateError::Ambiguous { retry_at, .. } => Some(retry_at.since(now())),
            _ => None,
        }
    }
}

/// Why a token exchange did not complete. Messages name the shop and never contain the session token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The session token failed local validation; nothing was sent or stored. The caller's error
    /// (get a fresh session token from App Bridge). Not retryable with this token.
    #[error("{shop}: {problem}; nothing was sent")]
    InvalidSessionToken {
        /// The shop.
        shop: ShopDomain,
        /// What is wrong.
        problem: SessionTokenProblem,
    },
    /// The server refused the session token (`invalid_subject_token`). The caller's error, not a dead
    /// grant: the shop's state is unchanged (see `docs/journal.md` for a refusal after a lost answer).
    /// Not retryable with this token.
    #[error("{shop}: session token rejected by the token endpoint ({status} {error}{})", description_text(.description))]
    Rejected {
        /// The shop.
        shop: ShopDomain,
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The OAuth `error_description`, sanitised.
        description: Option<String>,
    },
    /// 429: nothing was processed. Retryable (with a fresh session token if this one expires).
    #[error("{shop}: throttled by the token endpoint{}", retry_after_text(.retry_after))]
    Throttled {
        /// The shop.
        shop: ShopDomain,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The outcome is unknown. The engine keeps retrying with the same (durable) session token while it
    /// is valid; after that the shop falls back (`docs/journal.md` §3). Retryable with a fresh session
    /// token.
    #[error("{shop}: token exchange outcome unknown ({reason}); retrying until the session token expires")]
    Ambiguous {
        /// The shop.
        shop: ShopDomain,
        /// Why.
        reason: AmbiguityReason,
        /// When the next retry may go.
        retry_at: UnixMillis,
    },
    /// The token endpoint refused the app's own client credentials (`invalid_client`): fleet-wide.
    #[error("app credentials rejected by the token endpoint; paused until {until}")]
    AppCredentials {
        /// When sending resumes.
        until: UnixMillis,
    },
    /// The request never reached the server. Retryable.
    #[error("{shop}: token endpoint not reached ({detail})")]
    NotSent {
        /// The shop.
        shop: ShopDomain,
        /// What failed (no secret material).
        detail: String,
    },
    /// Another attempt is in progress for this shop (an unresolved migration could not be resolved
    /// first, or an attempt was orphaned). Retryable.
    #[error("{shop}: another attempt is in progress")]
    Busy {
        /// The shop.
        shop: ShopDomain,
    },
    /// The engine failed (store, configuration, shutting down).
    #[error(transparent)]
    Engine(#[from] Error),
}

impl ExchangeError {
    /// Whether trying again (with a fresh session token where the old one expired) can succeed
    /// without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            ExchangeError::Throttled { .. }
            | ExchangeError::Ambiguous { .. }
            | ExchangeError::NotSent { .. }
            | ExchangeError::Busy { .. } => true,
            ExchangeError::Engine(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Where a shop stands with respect to migration (for dry runs and reports; reads only).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationState {
    /// tokenwal holds no live expiring pair: [`Engine::migrate`] would send.
    NotMigrated,
    /// A live expiring pair is durable: [`Engine::migrate`] returns `AlreadyMigrated`.
    Migrated {
        /// The current generation.
        generation: Generation,
    },
    /// A migration's outcome is unknown; [`Engine::migrate`] resumes it with the durable legacy token.
    Unresolved {
        /// When the ambiguity began.
        since: UnixMillis,
        /// Attempts so far.
        tries: u32,
    },
    /// An attempt is in flight or a token exchange is unresolved.
    Busy,
    /// The app is uninstalled from the shop.
    Uninstalled,
}

fn retry_after_text(d: &Option<Duration>) -> String {
    d.map(|d| format!(" (retry after {} s)", d.as_secs())).unwrap_or_default()
}

fn description_text(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

fn not_sent_detail(why: &NotSentReason) -> String {
    match why {
        NotSentReason::Connect { detail } | NotSentReason::Build { detail } => detail.clone(),
    }
}

/// The longest legacy token accepted.
const MAX_LEGACY_LEN: usize = 1024;

fn check_legacy(t: &LegacyToken) -> Result<(), &'static str> {
    let raw = t.expose_secret();
    if raw.is_empty() {
        return Err("empty");
    }
    if raw.len() > MAX_LEGACY_LEN {
        return Err("longer than 1024 bytes");
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("contains whitespace, control or non-ASCII characters");
    }
    Ok(())
}

impl Engine {
    fn require_shopify(&self) -> Result<(), Error> {
        if self.inner.is_shopify {
            Ok(())
        } else {
            Err(Error::Config(
                "token exchange and migration are Shopify grants; this engine serves another provider".into(),
            ))
        }
    }

    /// Where `shop` stands with respect to migration (no I/O beyond a store read).
    pub fn migration_state(&self, shop: &ShopDomain) -> Result<MigrationState, Error> {
        let Some(s) = self.inner.store.get(&self.grant_of(shop))? else { return Ok(MigrationState::NotMigrated) };
        Ok(migration_state_of(&s))
    }

    /// Migrates `shop`'s legacy non-expiring offline token to an expiring pair (Shopify's token
    /// exchange with `subject_token_type = requested_token_type = …offline-access-token`,
    /// `expiring=1`), through the journal: the legacy token is durable before it is sent, and the shop
    /// is migrated only once the new pair is durable.
    ///
    /// Idempotent, for bulk runs: a shop that already holds a live expiring pair returns
    /// `AlreadyMigrated` without sending; an interrupted or ambiguous migration is resumed with its
    /// durable legacy token (`Resumed`). One attempt per call (no internal retry): an ambiguous answer
    /// returns [`MigrateError::Ambiguous`] with the time the retry may go. Note that
    /// [`Engine::open`] already resumes interrupted migrations during recovery (they then show as
    /// `AlreadyMigrated`), and the scheduler retries ambiguous ones in the background.
    pub async fn migrate(&self, shop: &ShopDomain, legacy_token: LegacyToken) -> Result<MigrateOutcome, MigrateError> {
        self.require_shopify()?;
        check_legacy(&legacy_token)
            .map_err(|problem| MigrateError::InvalidLegacyToken { shop: shop.clone(), problem })?;
        let grant = self.grant_of(shop);
        let inner = &self.inner;
        let slot = inner.slots.get_or_create(grant.account());
        let _flight = slot.flight.lock().await;
        for _ in 0..16 {
            if *inner.shutdown.borrow() {
                return Err(Error::ShuttingDown.into());
            }
            let current = inner.store.get(&grant).map_err(Error::from)?;
            let resuming = current.as_ref().is_some_and(|s| {
                matches!(s.phase, Phase::Ambiguous(_))
                    && s.acquisition.as_ref().is_some_and(|a| a.kind() == AttemptKind::Migration)
            });
            if resuming {
                let same = current
                    .as_ref()
                    .and_then(|s| s.acquisition.as_ref())
                    .is_some_and(|a| matches!(&a.subject, Subject::LegacyToken { token } if *token == legacy_token));
                if !same {
                    warn!(%grant, "an unresolved migration is resumed with its durable legacy token, not the one given");
                }
            }
            let planned = inner.machine.plan_migration(current.as_ref(), grant.clone(), legacy_token.clone(), now());
            let pending = match planned {
                Ok(p) => p,
                Err(Refusal::AlreadyMigrated(generation)) => return Ok(MigrateOutcome::AlreadyMigrated { generation }),
                Err(Refusal::Uninstalled) => return Err(MigrateError::Uninstalled { shop: shop.clone() }),
                Err(Refusal::BackingOff(until)) => {
                    let reason = match current.as_ref().map(|s| &s.phase) {
                        Some(Phase::Ambiguous(a)) => a.last_reason.clone(),
                        _ => AmbiguityReason::Interrupted,
                    };
                    return Err(MigrateError::Ambiguous { shop: shop.clone(), reason, retry_at: until });
                }
                Err(Refusal::InFlight | Refusal::AcquisitionOpen(_)) => {
                    return Err(MigrateError::Busy { shop: shop.clone() })
                }
                Err(other) => return Err(Error::Config(other.to_string()).into()),
            };
            if let Some(until) = inner.paused(now()) {
                return Err(MigrateError::AppCredentials { until });
            }
            let (done, outcome, applied) = match inner.run(pending).await {
                Ok(x) => x,
                Err(Error::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e.into()),
            };
            let state = done.state();
            return match outcome {
                // Stale: a newer install or an uninstall won while the request was out.
                _ if !applied => {
                    if state.has_live_pair() {
                        Ok(MigrateOutcome::AlreadyMigrated { generation: state.generation })
                    } else if matches!(state.phase, Phase::Uninstalled { .. }) {
                        Err(MigrateError::Uninstalled { shop: shop.clone() })
                    } else {
                        Err(MigrateError::Busy { shop: shop.clone() })
                    }
                }
                Outcome::Success { .. } => {
                    let generation = state.generation;
                    info!(%grant, generation = generation.0, resumed = resuming, "migrated");
                    Ok(if resuming {
                        MigrateOutcome::Resumed { generation }
                    } else {
                        MigrateOutcome::Migrated { generation }
                    })
                }
                Outcome::Rejected { status, error, description, .. } => {
                    Err(MigrateError::Rejected { shop: shop.clone(), status, error, description })
                }
                Outcome::Throttled { retry_after, .. } => {
                    Err(MigrateError::Throttled { shop: shop.clone(), retry_after })
                }
                Outcome::BadCredentials { .. } => {
                    Err(MigrateError::AppCredentials { until: inner.paused(now()).unwrap_or_else(now) })
                }
                Outcome::NotSent(why) => {
                    Err(MigrateError::NotSent { shop: shop.clone(), detail: not_sent_detail(&why) })
                }
                Outcome::Ambiguous { reason, .. } => Err(MigrateError::Ambiguous {
                    shop: shop.clone(),
                    reason,
                    retry_at: state.not_before.unwrap_or_else(now),
                }),
            };
        }
        Err(MigrateError::Busy { shop: shop.clone() })
    }

    /// Exchanges an App Bridge session token for a new expiring offline pair (Shopify token exchange:
    /// `subject_token_type=…id_token`, `requested_token_type=…offline-access-token`, `expiring=1`):
    /// the way back for a shop that needs re-auth, and a first install.
    ///
    /// The token is validated locally first (HS256 signature with the client secret, `dest` = the
    /// shop, `aud` = the client id, `exp`/`nbf` with a 5 s leeway): a bad token is refused with
    /// nothing sent. Then it goes through the journal like a refresh. On success the shop has a new
    /// generation, leaves needs-reauth, and `Event::Acquired` (plus `Event::Recovered` if it needed
    /// re-auth or was uninstalled) fires. Each successful exchange is a new acquisition that retires
    /// the previous pair server-side; a newer [`Engine::install`] wins over an exchange still in
    /// flight (its result is then journaled as stale and this returns the newer generation).
    ///
    /// On an ambiguous answer the exchange is retried with the same session token while it is valid
    /// (within `max_wait`); what happens after that is in `docs/journal.md` §3.
    pub async fn exchange_session_token(
        &self,
        shop: &ShopDomain,
        session_token: SessionToken,
    ) -> Result<Generation, ExchangeError> {
        self.require_shopify()?;
        let inner = &self.inner;
        let checked = session::validate(&session_token, shop, &inner.client_id, &inner.client_secret, now())
            .map_err(|problem| ExchangeError::InvalidSessionToken { shop: shop.clone(), problem })?;
        let grant = self.grant_of(shop);
        let slot = inner.slots.get_or_create(grant.account());
        let _flight = slot.flight.lock().await;
        let deadline = checked.usable_until.min(now().saturating_add(inner.max_wait));
        let mut last_ambiguity = None;
        for _ in 0..16 {
            if *inner.shutdown.borrow() {
                return Err(Error::ShuttingDown.into());
            }
            let current = inner.store.get(&grant).map_err(Error::from)?;
            let planned = inner.machine.plan_token_exchange(
                current.as_ref(),
                grant.clone(),
                session_token.clone(),
                checked.usable_until,
                now(),
            );
            let pending = match planned {
                Ok(p) => p,
                Err(Refusal::AcquisitionOpen(_)) => {
                    // An unresolved migration: resolve it first with its durable legacy token.
                    let s = current.expect("an open acquisition has a state");
                    let done = inner.attempt(&s, false).await;
                    match done {
                        Ok(d) if matches!(d.state().phase, Phase::Ambiguous(_)) => {
                            return Err(ExchangeError::Busy { shop: shop.clone() })
                        }
                        Ok(_) => continue,
                        Err(_) => return Err(ExchangeError::Busy { shop: shop.clone() }),
                    }
                }
                Err(Refusal::SubjectExpired) => {
                    if let Some(s) = &current {
                        if inner.machine.expire_acquisition(s, now()).is_some() {
                            let _ = inner.expire(s).await;
                        }
                    }
                    return Err(match last_ambiguity {
                        Some((reason, retry_at)) => ExchangeError::Ambiguous { shop: shop.clone(), reason, retry_at },
                        None => ExchangeError::InvalidSessionToken {
                            shop: shop.clone(),
                            problem: SessionTokenProblem::Expired,
                        },
                    });
                }
                Err(Refusal::InFlight) => return Err(ExchangeError::Busy { shop: shop.clone() }),
                Err(other) => return Err(Error::Config(other.to_string()).into()),
            };
            if let Some(until) = inner.paused(now()) {
                return Err(ExchangeError::AppCredentials { until });
            }
            let (done, outcome, applied) = match inner.run(pending).await {
                Ok(x) => x,
                Err(Error::Store(StoreError::Conflict { .. })) => continue,
                Err(e) => return Err(e.into()),
            };
            let state = done.state();
            match outcome {
                // Stale: a newer install (which wins) or an uninstall happened while the request was out.
                _ if !applied => {
                    return if state.has_live_pair() {
                        Ok(state.generation)
                    } else {
                        Err(ExchangeError::Busy { shop: shop.clone() })
                    };
                }
                Outcome::Success { .. } => {
                    info!(%grant, generation = state.generation.0, "token exchange committed");
                    return Ok(state.generation);
                }
                Outcome::Rejected { status, error, description, .. } => {
                    return Err(ExchangeError::Rejected { shop: shop.clone(), status, error, description })
                }
                Outcome::Throttled { retry_after, .. } => {
                    return Err(ExchangeError::Throttled { shop: shop.clone(), retry_after })
                }
                Outcome::BadCredentials { .. } => {
                    return Err(ExchangeError::AppCredentials { until: inner.paused(now()).unwrap_or_else(now) })
                }
                Outcome::NotSent(why) => {
                    return Err(ExchangeError::NotSent { shop: shop.clone(), detail: not_sent_detail(&why) })
                }
                Outcome::Ambiguous { reason, .. } => {
                    let retry_at = state.not_before.unwrap_or_else(now);
                    if retry_at >= deadline {
                        return Err(ExchangeError::Ambiguous { shop: shop.clone(), reason, retry_at });
                    }
                    last_ambiguity = Some((reason, retry_at));
                    tokio::time::sleep(retry_at.since(now())).await;
                }
            }
        }
        let (reason, retry_at) = last_ambiguity.unwrap_or((AmbiguityReason::Interrupted, now()));
        Err(ExchangeError::Ambiguous { shop: shop.clone(), reason, retry_at })
    }
}

fn migration_state_of(s: &GrantState) -> MigrationState {
    if s.has_live_pair() {
        return MigrationState::Migrated { generation: s.generation };
    }
    match (&s.phase, s.acquisition.as_ref().map(|a| a.kind())) {
        (Phase::Ambiguous(a), Some(AttemptKind::Migration)) => {
            MigrationState::Unresolved { since: a.since, tries: a.tries }
        }
        (Phase::Refreshing { .. } | Phase::Ambiguous(_), _) => MigrationState::Busy,
        (Phase::Uninstalled { .. }, _) => MigrationState::Uninstalled,
        _ => MigrationState::NotMigrated,
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationState::NotMigrated => f.write_str("not migrated"),
            MigrationState::Migrated { generation } => write!(f, "migrated (generation {})", generation.0),
            MigrationState::Unresolved { tries, .. } => write!(f, "unresolved after {tries} attempt(s)"),
            MigrationState::Busy => f.write_str("busy"),
            MigrationState::Uninstalled => f.write_str("uninstalled"),
        }
    }
}
