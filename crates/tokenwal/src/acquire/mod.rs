//! Re-acquisition: token exchange of App Bridge session tokens, and migration of legacy non-expiring
//! offline tokens. Both go through the journal protocol of refreshes (intent durable → send → durable
//! commit before use; see `docs/journal.md` §3 "Acquisitions").

mod error;

pub use error::{AcquireError, ExchangeError, MigrateError};

use crate::clock::now;
use crate::driver::Driven;
use crate::engine::Engine;
use crate::error::Error;
use crate::serve::refusal;
use crate::session::{self, SessionTokenProblem};
use error::not_sent_detail;
use std::fmt;
use tokenwal_core::{
    AmbiguityReason, AttemptKind, Generation, Goal, GrantState, LegacyToken, Outcome, Phase, Refusal, SessionToken,
    ShopDomain, Subject, UnixMillis, Verdict,
};
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
        let flight = inner.slots.get_or_create(grant.account()).flight().await;
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
        let goal = Goal::Migrate { legacy: legacy_token };
        // Decided first on `current`, read under the flight lock (no second read).
        let (driven, _flight) = inner.drive_owned_from(grant.clone(), goal, flight, current, false).await?;
        let (settled, outcome) = match driven? {
            Driven::Attempted { settled, outcome } => (settled, outcome),
            Driven::Refused { refusal: r, state } => {
                return match r {
                    Refusal::AlreadyMigrated(generation) => Ok(MigrateOutcome::AlreadyMigrated { generation }),
                    Refusal::Uninstalled => Err(MigrateError::Uninstalled { shop: shop.clone() }),
                    Refusal::BackingOff(until) => {
                        let reason = match state.as_ref().map(|s| &s.phase) {
                            Some(Phase::Ambiguous(a)) => a.last_reason.clone(),
                            _ => AmbiguityReason::Interrupted,
                        };
                        Err(MigrateError::Ambiguous { shop: shop.clone(), reason, retry_at: until })
                    }
                    Refusal::InFlight | Refusal::AcquisitionOpen(_) => Err(MigrateError::Busy { shop: shop.clone() }),
                    other => Err(refusal(&grant, other).into()),
                };
            }
            Driven::Paused { until } => return Err(MigrateError::AppCredentials { until }),
            other => return Err(Error::Internal(format!("{grant}: migration ended as {other:?}")).into()),
        };
        let state = settled.state();
        if settled.verdict() == Verdict::Stale {
            // A newer install or an uninstall won while the request was out.
            return if state.has_live_pair() {
                Ok(MigrateOutcome::AlreadyMigrated { generation: state.generation })
            } else if matches!(state.phase, Phase::Uninstalled { .. }) {
                Err(MigrateError::Uninstalled { shop: shop.clone() })
            } else {
                Err(MigrateError::Busy { shop: shop.clone() })
            };
        }
        match outcome {
            Outcome::Success { .. } => {
                let generation = state.generation;
                info!(%grant, generation = generation.0, resumed = resuming, "migrated");
                Ok(if resuming {
                    MigrateOutcome::Resumed { generation }
                } else {
                    MigrateOutcome::Migrated { generation }
                })
            }
            other => Err(answer_error(shop, AttemptKind::Migration, other, state, inner.paused(now()))),
        }
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
        let mut flight = inner.slots.get_or_create(grant.account()).flight().await;
        let deadline = checked.usable_until.min(now().saturating_add(inner.max_wait));
        let mut last_ambiguity = None;
        for _ in 0..16 {
            if *inner.shutdown.borrow() {
                return Err(Error::ShuttingDown.into());
            }
            let goal = Goal::Exchange { session: session_token.clone(), expires_at: checked.usable_until };
            let (driven, f) = inner.drive_owned(grant.clone(), goal, flight).await?;
            flight = f;
            let (settled, outcome) = match driven? {
                Driven::Attempted { settled, outcome } => (settled, outcome),
                Driven::Refused { refusal: Refusal::AcquisitionOpen(_), .. } => {
                    // An unresolved migration: resolve it first with its durable legacy token.
                    let (driven, f) = inner.drive_owned(grant.clone(), Goal::Refresh, flight).await?;
                    flight = f;
                    match driven {
                        Ok(Driven::Attempted { settled, .. })
                            if !matches!(settled.state().phase, Phase::Ambiguous(_)) =>
                        {
                            continue
                        }
                        _ => return Err(ExchangeError::Busy { shop: shop.clone() }),
                    }
                }
                Driven::Refused { refusal: Refusal::SubjectExpired, .. } => {
                    // The unresolved exchange can no longer be retried: fall back (nothing is sent).
                    let (_, _flight) = inner.drive_owned(grant.clone(), Goal::Refresh, flight).await?;
                    return Err(match last_ambiguity {
                        Some((reason, retry_at)) => ExchangeError::Ambiguous { shop: shop.clone(), reason, retry_at },
                        None => ExchangeError::InvalidSessionToken {
                            shop: shop.clone(),
                            problem: SessionTokenProblem::Expired,
                        },
                    });
                }
                Driven::Refused { refusal: Refusal::InFlight, .. } => {
                    return Err(ExchangeError::Busy { shop: shop.clone() })
                }
                Driven::Refused { refusal: r, .. } => return Err(refusal(&grant, r).into()),
                Driven::Paused { until } => return Err(ExchangeError::AppCredentials { until }),
                other => return Err(Error::Internal(format!("{grant}: token exchange ended as {other:?}")).into()),
            };
            let state = settled.state();
            if settled.verdict() == Verdict::Stale {
                // A newer install (which wins) or an uninstall happened while the request was out.
                return if state.has_live_pair() {
                    Ok(state.generation)
                } else {
                    Err(ExchangeError::Busy { shop: shop.clone() })
                };
            }
            match outcome {
                Outcome::Success { .. } => {
                    info!(%grant, generation = state.generation.0, "token exchange committed");
                    return Ok(state.generation);
                }
                Outcome::Ambiguous { reason, .. } => {
                    let retry_at = state.not_before.unwrap_or_else(now);
                    if retry_at >= deadline {
                        return Err(ExchangeError::Ambiguous { shop: shop.clone(), reason, retry_at });
                    }
                    last_ambiguity = Some((reason, retry_at));
                    tokio::time::sleep(retry_at.since(now())).await;
                }
                other => return Err(answer_error(shop, AttemptKind::TokenExchange, other, state, inner.paused(now()))),
            }
        }
        let (reason, retry_at) = last_ambiguity.unwrap_or((AmbiguityReason::Interrupted, now()));
        Err(ExchangeError::Ambiguous { shop: shop.clone(), reason, retry_at })
    }
}

/// The error for an acquisition's answer other than a success.
fn answer_error(
    shop: &ShopDomain,
    kind: AttemptKind,
    outcome: Outcome,
    state: &GrantState,
    paused: Option<UnixMillis>,
) -> AcquireError {
    let shop = shop.clone();
    match outcome {
        Outcome::Rejected { status, error, description, .. } => {
            AcquireError::Rejected { shop, kind, status, error, description }
        }
        Outcome::Throttled { retry_after, .. } => AcquireError::Throttled { shop, retry_after },
        Outcome::BadCredentials { .. } => AcquireError::AppCredentials { until: paused.unwrap_or_else(now) },
        Outcome::NotSent(why) => AcquireError::NotSent { shop, detail: not_sent_detail(&why) },
        Outcome::Ambiguous { reason, .. } => {
            AcquireError::Ambiguous { shop, reason, retry_at: state.not_before.unwrap_or_else(now) }
        }
        Outcome::Success { .. } => AcquireError::Engine(Error::Internal("a success reported as a failure".into())),
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
