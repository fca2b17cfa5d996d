//! The recovery planner: what to do, at startup (or after a server outage), for every open grant.
//!
//! Input: the grant states the store's open-attempt index yields (`Refreshing` or `Ambiguous`),
//! never the whole history. Output: for each, the transition to write first (if any) and what to do
//! after it. The plan is a pure function of the states and `now`:
//!
//! * `Refreshing` — an intent was durable and no outcome was: the request may have been processed.
//!   Write `Ambiguous { Interrupted }`, then resolve by retrying the same old credential. For an
//!   acquisition that credential is its durable subject (the legacy token of a migration, the session
//!   token of an exchange); an exchange whose session token expired meanwhile falls back in the same
//!   transition (`docs/journal.md` §3).
//! * `Ambiguous` — resolve by retrying the same old credential (respecting backoff), even past the
//!   retry window: only a definitive answer (or a newer install) settles it. (An exchange whose session
//!   token has expired is settled by `Machine::expire_acquisition` when the engine comes to retry it.)
//!
//! Recovery is idempotent: after writing a plan's transitions, planning again yields the same
//! intentions and no further transitions; a crash in the middle leaves each grant either before or
//! after its transition (they are atomic), and planning again completes the rest.

use crate::domain::GrantKey;
use crate::machine::{Machine, Step, Transition};
use crate::record::{GrantState, Phase, ReauthReason};
use crate::time::UnixMillis;

/// What recovery intends for one grant, once its transition (if any) is durable.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Intention {
    /// Retry the same old credential to resolve an ambiguous rotation, not before `not_before`.
    Resolve {
        /// The earliest instant of the retry.
        not_before: Option<UnixMillis>,
    },
    /// The grant is dead.
    NeedsReauth(ReauthReason),
    /// Nothing (the grant is not open).
    Nothing,
}

/// One grant's recovery.
#[derive(Clone, Debug)]
pub struct RecoveryItem {
    /// The grant.
    pub grant: GrantKey,
    /// The phase found (`refreshing`, `ambiguous`, …).
    pub found: &'static str,
    /// The transition to write first.
    pub transition: Option<Transition>,
    /// What to do after it.
    pub intention: Intention,
}

/// The plan for all open grants.
#[derive(Clone, Debug, Default)]
pub struct RecoveryPlan {
    /// One item per open grant, in input order.
    pub items: Vec<RecoveryItem>,
}

impl RecoveryPlan {
    /// Counts of (interrupted intents, ambiguous to resolve, marked needs-reauth).
    pub fn summary(&self) -> (usize, usize, usize) {
        let interrupted = self.items.iter().filter(|i| i.found == "refreshing").count();
        let resolve = self.items.iter().filter(|i| matches!(i.intention, Intention::Resolve { .. })).count();
        let dead = self.items.iter().filter(|i| matches!(i.intention, Intention::NeedsReauth(_))).count();
        (interrupted, resolve, dead)
    }
}

fn intention_after(machine: &Machine, s: &GrantState, now: UnixMillis) -> (Option<Transition>, Intention) {
    match machine.step(s, now) {
        Step::Attempt => (None, Intention::Resolve { not_before: None }),
        Step::Wait { until } => (None, Intention::Resolve { not_before: Some(until) }),
        _ => (None, Intention::Nothing),
    }
}

/// Plans recovery of `states` at `now`. `entropy` seeds backoff jitter.
pub fn plan<'a>(
    machine: &Machine,
    states: impl IntoIterator<Item = &'a GrantState>,
    now: UnixMillis,
    entropy: u64,
) -> RecoveryPlan {
    let mut items = Vec::new();
    for s in states {
        let found = s.phase.name();
        let (transition, intention) = match &s.phase {
            Phase::Refreshing { .. } => {
                let t = machine.recover_interrupted(s, now, entropy).expect("refreshing grants recover");
                let intention = match t.phase() {
                    Phase::NeedsReauth { reason, .. } => Intention::NeedsReauth(reason.clone()),
                    _ => Intention::Resolve { not_before: None },
                };
                (Some(t), intention)
            }
            Phase::Ambiguous(_) => intention_after(machine, s, now),
            _ => (None, Intention::Nothing),
        };
        items.push(RecoveryItem { grant: s.grant.clone(), found, transition, intention });
    }
    RecoveryPlan { items }
}
