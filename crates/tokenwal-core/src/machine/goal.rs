//! What a driver asks of a grant ([`Goal`]) and what the machine decides to do about it
//! ([`Decision`]): the one entry point a driver needs. It reads the grant's durable state, calls
//! [`Machine::decide`], performs the decision (make durable; for [`Decision::Send`] also send and
//! settle with [`Machine::on_outcome`]), and on a version conflict re-reads and decides again.

use super::{Machine, Pending, Refusal, Transition};
use crate::domain::{AttemptId, GrantKey, TokenSet};
use crate::machine::AttemptRequest;
use crate::record::{AttemptKind, GrantState, InstallSource, Phase};
use crate::secret::{LegacyToken, SessionToken};
use crate::time::UnixMillis;
use std::fmt;

/// What a driver wants done to one grant.
#[derive(Clone)]
#[non_exhaustive]
pub enum Goal {
    /// Refresh with the newest durable credential (or retry the open ambiguity), respecting backoff.
    Refresh,
    /// Recovery's probe of an open ambiguity: like `Refresh`, but an ambiguous grant's backoff does
    /// not delay it.
    Recover,
    /// Recovery's probe of `attempt`, an attempt a stop interrupted (the grant was found
    /// `Refreshing` it and no live process holds it): while the grant is still `Refreshing` that
    /// very attempt, **one** transition records the interruption (as
    /// [`Machine::recover_interrupted`]) and the retry's intent, with one compare-and-swap
    /// ([`Machine::retry_interrupted`]). Otherwise — the grant moved on, or the interruption does not
    /// leave an ambiguity to retry (an exchange that falls back) — like `Recover`, which refuses an
    /// attempt in flight: the caller then writes the interruption by itself.
    RecoverInterrupted {
        /// The interrupted attempt.
        attempt: AttemptId,
    },
    /// Token exchange of an App Bridge session token (validated by the caller) expiring at
    /// `expires_at`.
    Exchange {
        /// The session token.
        session: SessionToken,
        /// Its `exp`.
        expires_at: UnixMillis,
    },
    /// Migration of a legacy non-expiring offline token.
    Migrate {
        /// The legacy token.
        legacy: LegacyToken,
    },
    /// Install a token set acquired elsewhere. Refused if the grant holds a newer pair (by access
    /// expiry) unless `force`; a no-op if it holds this very pair.
    Install {
        /// The tokens.
        tokens: TokenSet,
        /// Where they came from (journaled).
        source: InstallSource,
        /// Install even over a newer pair (an operator's explicit decision).
        force: bool,
    },
    /// The app was uninstalled, at `as_of` if the webhook's trigger time is known: an uninstall
    /// older than the grant's newest acquisition (done or in flight) is ignored.
    Uninstall {
        /// When the uninstall happened.
        as_of: Option<UnixMillis>,
    },
    /// The granted scopes changed.
    UpdateScopes {
        /// The comma-separated scope list.
        scope: String,
    },
    /// Mark the grant needs-reauth (an operator or the application decided).
    MarkNeedsReauth {
        /// Why (journaled; control characters dropped, at most 200 characters).
        note: String,
    },
}

impl Goal {
    /// A short name (`refresh`, `recover`, `recover-interrupted`, `exchange`, `migrate`, `install`, `uninstall`,
    /// `update-scopes`, `mark-needs-reauth`).
    pub fn name(&self) -> &'static str {
        match self {
            Goal::Refresh => "refresh",
            Goal::Recover => "recover",
            Goal::RecoverInterrupted { .. } => "recover-interrupted",
            Goal::Exchange { .. } => "exchange",
            Goal::Migrate { .. } => "migrate",
            Goal::Install { .. } => "install",
            Goal::Uninstall { .. } => "uninstall",
            Goal::UpdateScopes { .. } => "update-scopes",
            Goal::MarkNeedsReauth { .. } => "mark-needs-reauth",
        }
    }
}

impl fmt::Debug for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Goals carry credentials: only the name is shown.
        write!(f, "Goal::{}", self.name())
    }
}

/// What the machine decided for a goal.
#[derive(Debug)]
#[must_use = "a decision does nothing until the driver carries it out"]
pub enum Decision {
    /// Make this intent durable, then send its request and settle the answer.
    Send(Pending<AttemptRequest>),
    /// Make this transition durable; nothing is sent. Its value is the token set it installs, if any.
    Write(Pending<Option<TokenSet>>),
    /// Nothing to write: the goal is met already or does not apply.
    Nothing(NoChange),
    /// The goal cannot be carried out now.
    Refuse(Refusal),
}

/// Why a goal needs no write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum NoChange {
    /// tokenwal has never seen the grant (an uninstall of an unknown shop).
    Unknown,
    /// The grant is uninstalled already (a duplicate uninstall).
    AlreadyUninstalled,
    /// A late uninstall: the grant was (re)acquired, or an acquisition started, at `acquired` after
    /// the uninstall's time.
    AcquiredSince {
        /// The newest acquisition's time.
        acquired: UnixMillis,
    },
    /// The grant holds this very pair already (an install or import run twice).
    SamePair,
    /// The grant moved on (another process of a shared store wrote it) since the caller read the
    /// state it decided on: nothing was done; decide again from the new state.
    Moved,
}

impl Machine {
    /// Decides what to do about `goal` for `grant`, whose durable state is `current` (`None`: never
    /// seen). Pure, like every function of the machine.
    pub fn decide(&self, current: Option<&GrantState>, grant: &GrantKey, goal: &Goal, now: UnixMillis) -> Decision {
        let planned = match goal {
            Goal::Refresh | Goal::Recover | Goal::RecoverInterrupted { .. } => {
                let Some(s) = current else { return Decision::Refuse(Refusal::NoTokens) };
                if let Goal::RecoverInterrupted { attempt } = goal {
                    if let Some(p) = self.retry_interrupted(s, *attempt, now) {
                        return Decision::Send(p);
                    }
                }
                let planned = if matches!(goal, Goal::Recover | Goal::RecoverInterrupted { .. }) {
                    self.plan_recovery_attempt(s, now)
                } else {
                    self.plan_attempt(s, now)
                };
                if let Err(Refusal::SubjectExpired) = planned {
                    // An unresolved exchange whose session token expired falls back (nothing is sent).
                    return match self.expire_acquisition(s, now) {
                        Some(p) => Decision::Write(p),
                        None => Decision::Refuse(Refusal::InFlight),
                    };
                }
                planned
            }
            Goal::Exchange { session, expires_at } => {
                self.plan_token_exchange(current, grant.clone(), session.clone(), *expires_at, now)
            }
            Goal::Migrate { legacy } => self.plan_migration(current, grant.clone(), legacy.clone(), now),
            Goal::Install { tokens, source, force } => {
                if let Some(d) = check_install(current, tokens, *force) {
                    return d;
                }
                let p = self.install(current, grant.clone(), tokens.clone(), *source, now);
                return Decision::Write(Pending { transition: p.transition, value: Some(p.value) });
            }
            Goal::Uninstall { as_of } => {
                let Some(s) = current else { return Decision::Nothing(NoChange::Unknown) };
                if let (Some(at), Some(acquired)) = (as_of, newest_acquisition(s)) {
                    if acquired > *at {
                        return Decision::Nothing(NoChange::AcquiredSince { acquired });
                    }
                }
                return match self.uninstall(s, now) {
                    Some(t) => write(t),
                    None => Decision::Nothing(NoChange::AlreadyUninstalled),
                };
            }
            Goal::UpdateScopes { scope } => {
                return match current {
                    Some(s) => write(self.scopes_updated(s, scope, now)),
                    None => Decision::Refuse(Refusal::NoTokens),
                };
            }
            Goal::MarkNeedsReauth { note } => {
                return match current {
                    Some(s) => write(self.mark_needs_reauth(s, note, now)),
                    None => Decision::Refuse(Refusal::NoTokens),
                };
            }
        };
        match planned {
            Ok(p) => Decision::Send(p),
            Err(r) => Decision::Refuse(r),
        }
    }
}

fn write(t: Transition) -> Decision {
    Decision::Write(Pending { transition: t, value: None })
}

/// An install from outside must never put an older pair over a newer one (a re-run import after
/// the worker rotated would hand the server a superseded refresh token). "Older" is judged by the
/// access token's expiry: a provider issues access tokens of a fixed lifetime, so a pair issued
/// later expires later. `None`: go ahead.
fn check_install(current: Option<&GrantState>, tokens: &TokenSet, force: bool) -> Option<Decision> {
    let s = current?;
    if let Some(held) = &s.tokens {
        if held.refresh_token == tokens.refresh_token && held.access_token == tokens.access_token {
            return Some(Decision::Nothing(NoChange::SamePair));
        }
        if !force && tokens.access_expires_at < held.access_expires_at {
            return Some(Decision::Refuse(Refusal::OlderPair { held: s.generation }));
        }
    }
    if let Phase::Uninstalled { since } = s.phase {
        // A pair whose access token had expired before the uninstall was issued before it.
        if !force && tokens.access_expires_at <= since {
            return Some(Decision::Refuse(Refusal::OlderPair { held: s.generation }));
        }
    }
    None
}

/// When the grant's newest acquisition happened or started: its last install or committed
/// exchange/migration, or an exchange or migration in flight or unresolved.
fn newest_acquisition(s: &GrantState) -> Option<UnixMillis> {
    let open = match (&s.phase, &s.acquisition) {
        (Phase::Refreshing { kind, started_at, .. }, _) if *kind != AttemptKind::Refresh => Some(*started_at),
        (Phase::Ambiguous(amb), Some(_)) => Some(amb.since),
        _ => None,
    };
    s.acquired_at.max(open)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{FingerprintKey, ShopDomain};
    use crate::secret::{AccessToken, RefreshToken};
    use std::time::Duration;

    const T0: UnixMillis = UnixMillis(1_800_000_000_000);

    fn machine() -> Machine {
        Machine::shopify(FingerprintKey::from_bytes([7; 32]))
    }

    fn grant() -> GrantKey {
        GrantKey::shopify(&ShopDomain::parse("goal.myshopify.com").unwrap())
    }

    fn pair(name: &str, expires: UnixMillis) -> TokenSet {
        TokenSet {
            access_token: AccessToken::new(format!("access-{name}")),
            access_expires_at: expires,
            refresh_token: RefreshToken::new(format!("refresh-{name}")),
            refresh_expires_at: None,
            scope: None,
        }
    }

    fn after(t: UnixMillis, s: u64) -> UnixMillis {
        t.saturating_add(Duration::from_secs(s))
    }

    fn installed(m: &Machine, tokens: TokenSet, at: UnixMillis) -> GrantState {
        m.install(None, grant(), tokens, InstallSource::Import, at).transition.state
    }

    fn install(tokens: TokenSet, force: bool) -> Goal {
        Goal::Install { tokens, source: InstallSource::Import, force }
    }

    #[test]
    fn an_install_of_an_older_pair_is_refused_unless_forced() {
        let m = machine();
        let held = installed(&m, pair("new", after(T0, 3600)), T0);
        let older = pair("old", after(T0, 1800));
        let d = m.decide(Some(&held), &grant(), &install(older.clone(), false), after(T0, 10));
        assert!(matches!(d, Decision::Refuse(Refusal::OlderPair { held: g }) if g == held.generation), "{d:?}");
        let d = m.decide(Some(&held), &grant(), &install(older, true), after(T0, 10));
        assert!(matches!(d, Decision::Write(_)), "forced: {d:?}");
        // A newer pair is installed.
        let newer = pair("newer", after(T0, 7200));
        assert!(matches!(m.decide(Some(&held), &grant(), &install(newer, false), T0), Decision::Write(_)));
        // Nothing held yet: installed.
        assert!(matches!(m.decide(None, &grant(), &install(pair("x", T0), false), T0), Decision::Write(_)));
    }

    #[test]
    fn installing_the_pair_held_changes_nothing() {
        let m = machine();
        let tokens = pair("same", after(T0, 3600));
        let held = installed(&m, tokens.clone(), T0);
        for force in [false, true] {
            let d = m.decide(Some(&held), &grant(), &install(tokens.clone(), force), after(T0, 5));
            assert!(matches!(d, Decision::Nothing(NoChange::SamePair)), "{d:?}");
        }
    }

    #[test]
    fn after_an_uninstall_only_a_pair_issued_since_is_installed() {
        let m = machine();
        let held = installed(&m, pair("a", after(T0, 3600)), T0);
        let gone = m.uninstall(&held, after(T0, 60)).unwrap().state;
        // Its access token expired before the uninstall: issued before it.
        let stale = pair("stale", after(T0, 30));
        assert!(matches!(m.decide(Some(&gone), &grant(), &install(stale, false), after(T0, 90)), Decision::Refuse(_)));
        let fresh = pair("fresh", after(T0, 3690));
        assert!(matches!(m.decide(Some(&gone), &grant(), &install(fresh, false), after(T0, 90)), Decision::Write(_)));
    }

    #[test]
    fn a_late_uninstall_loses_to_an_exchange_in_flight_started_after_it() {
        let m = machine();
        let held = installed(&m, pair("a", after(T0, 3600)), T0);
        let webhook_at = after(T0, 10);
        let started = after(T0, 20);
        let session = SessionToken::new("session".to_owned());
        let intent = m
            .plan_token_exchange(Some(&held), grant(), session, after(T0, 80), started)
            .expect("an exchange is planned")
            .transition
            .state;
        assert!(matches!(intent.phase, Phase::Refreshing { kind: AttemptKind::TokenExchange, .. }));
        let late = Goal::Uninstall { as_of: Some(webhook_at) };
        let d = m.decide(Some(&intent), &grant(), &late, after(T0, 25));
        assert!(matches!(d, Decision::Nothing(NoChange::AcquiredSince { acquired }) if acquired == started), "{d:?}");
        // An uninstall triggered after the exchange started applies.
        let d = m.decide(Some(&intent), &grant(), &Goal::Uninstall { as_of: Some(after(T0, 21)) }, after(T0, 25));
        assert!(matches!(d, Decision::Write(_)), "{d:?}");
        // Without a trigger time (the plain `uninstalled` call), it applies.
        let d = m.decide(Some(&intent), &grant(), &Goal::Uninstall { as_of: None }, after(T0, 25));
        assert!(matches!(d, Decision::Write(_)), "{d:?}");
        // A refresh in flight is not an acquisition: an uninstall after the install applies.
        let refresh = m.plan_attempt(&held, started).unwrap().transition.state;
        let d = m.decide(Some(&refresh), &grant(), &late, after(T0, 25));
        assert!(matches!(d, Decision::Write(_)), "{d:?}");
    }

    /// Recovery's fold: one transition from the interrupted intent's version carries the
    /// interruption's records, then the retry's intent, and is the same as the two written apart.
    #[test]
    fn an_interrupted_attempt_is_interrupted_and_retried_in_one_transition() {
        let m = machine();
        let held = installed(&m, pair("a", after(T0, 3600)), T0);
        let live = m.plan_attempt(&held, after(T0, 10)).unwrap().transition.state;
        let Phase::Refreshing { attempt, .. } = live.phase else { panic!("{:?}", live.phase) };
        let at = after(T0, 100);
        let goal = Goal::RecoverInterrupted { attempt };
        let Decision::Send(folded) = m.decide(Some(&live), &grant(), &goal, at) else { panic!("not sent") };
        let t = folded.transition();
        assert_eq!(t.expected_version(), Some(live.version), "one compare-and-swap, on the interrupted state");
        assert_eq!(t.state().version, live.version + 1);
        assert_eq!(t.verdict(), crate::machine::Verdict::Intent);
        // The same as writing the interruption, then planning the retry from it.
        let apart = m.recover_interrupted(&live, at, 0).unwrap();
        let retry = m.plan_recovery_attempt(&apart.state, at).unwrap();
        let mut records = apart.records().to_vec();
        records.extend(retry.transition().records().iter().cloned());
        assert_eq!(t.records(), &records[..]);
        assert!(matches!(t.records().last(), Some(crate::record::Record::Intent { .. })), "the intent comes last");
        assert!(t.records().len() >= 2);
        let mut events = apart.events().to_vec();
        events.extend(retry.transition().events().iter().cloned());
        assert_eq!(t.events(), &events[..]);
        assert_eq!(folded.value.refresh_token(), retry.value.refresh_token(), "the same old credential");
        let expected = GrantState { version: live.version + 1, ..retry.transition().state().clone() };
        assert_eq!(t.state(), &expected);

        // Another attempt than the one found interrupted (a live one): refused, nothing written.
        let other = crate::domain::AttemptId(attempt.0 + 1);
        let d = m.decide(Some(&live), &grant(), &Goal::RecoverInterrupted { attempt: other }, at);
        assert!(matches!(d, Decision::Refuse(Refusal::InFlight)), "{d:?}");
        // The grant moved on to an ambiguity: planned like `Recover`.
        let d = m.decide(Some(&apart.state), &grant(), &goal, at);
        assert!(
            matches!(&d, Decision::Send(p) if p.transition().expected_version() == Some(apart.state.version)),
            "{d:?}"
        );
    }

    #[test]
    fn goals_show_only_their_name() {
        let g = install(pair("secret-value", T0), false);
        assert_eq!(format!("{g:?}"), "Goal::install");
    }
}
