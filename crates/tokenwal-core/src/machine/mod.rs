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

//!
//! # Layout
//!
//! * [`transition`](Transition): what the machine hands to a store (a [`Transition`] and its
//!   [`WriteBatch`]), what it announces ([`Event`]), what it decided ([`Verdict`]), and the
//!   [`Pending`]/[`Durable`] pair that holds values back until a transition is durable;
//! * `plan`: the credential an attempt presents and its intent ([`Machine::plan_attempt`],
//!   [`Machine::plan_token_exchange`], [`Machine::plan_migration`]);
//! * `settle`: what an answer does ([`Machine::on_outcome`], [`Machine::recover_interrupted`],
//!   [`Machine::expire_acquisition`]);
//! * `commands`: install, uninstall, marks and scopes;
//! * `goal`: [`Machine::decide`], the one entry point of a driver ([`Goal`] → [`Decision`]).

mod commands;
mod goal;
mod plan;
mod settle;
mod transition;

pub use goal::{Decision, Goal, NoChange};
pub use plan::{AttemptRequest, Credential, Refusal};
pub use settle::ABANDONED;
pub use transition::{Durable, DurableLog, Event, Pending, Prior, Transition, Verdict, WriteBatch};

use crate::domain::{AttemptId, FingerprintKey, GrantKey, TokenSet};
use crate::policy::RetryPolicy;
use crate::record::{Acquisition, GrantState, Phase, Record, Resolution, Subject};
use crate::time::UnixMillis;
use std::time::Duration;

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
pub(super) fn exchange_expired(s: &GrantState, now: UnixMillis) -> bool {
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

    pub(super) fn next_state(&self, s: &GrantState, now: UnixMillis) -> GrantState {
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
}

/// Records that the ambiguity first seen at `attempt` ended `how`, and emits the matching event.
pub(super) fn resolved(
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

/// The first attempts of everything open on `s`: its attempt in flight or ambiguity, and the refresh
/// ambiguity an open acquisition started from.
pub(super) fn open_attempts(s: &GrantState) -> Vec<AttemptId> {
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
