//! Commands from outside the protocol: an install of tokens acquired elsewhere, an uninstall, a
//! needs-reauth mark, a scopes update. Each is one transition; none sends anything.

use super::{open_attempts, resolved, Event, Machine, Pending, Transition, Verdict};
use crate::domain::{Generation, GrantKey, TokenSet};
use crate::record::{GrantState, InstallSource, Phase, ReauthReason, Record, Resolution, TokenSummary};
use crate::time::UnixMillis;

impl Machine {
    /// superseded (a new acquisition retires older refresh tokens server-side).
    pub fn install(
        &self,
        current: Option<&GrantState>,
        grant: GrantKey,
        tokens: TokenSet,
        source: InstallSource,
        now: UnixMillis,
    ) -> Pending<TokenSet> {
        let mut records = Vec::new();
        let mut events = Vec::new();
        let state = match current {
            None => GrantState {
                version: 1,
                generation: Generation(1),
                tokens: Some(tokens.clone()),
                phase: Phase::Healthy,
                acquired_at: Some(now),
                ..Machine::fresh_state(grant.clone(), now)
            },
            Some(s) => {
                let generation = s.generation.next();
                for first in open_attempts(s) {
                    resolved(&mut records, &mut events, &grant, now, first, Resolution::Superseded { generation });
                }
                let dead = |p: &Phase| matches!(p, Phase::NeedsReauth { .. } | Phase::Uninstalled { .. });
                if dead(&s.phase) || s.acquisition.as_ref().is_some_and(|a| dead(&a.prior)) {
                    events.push(Event::Recovered { grant: grant.clone(), generation });
                }
                GrantState {
                    generation,
                    tokens: Some(tokens.clone()),
                    phase: Phase::Healthy,
                    credential_first_presented_at: None,
                    consecutive_failures: 0,
                    not_before: None,
                    acquisition: None,
                    acquired_at: Some(now),
                    ..self.next_state(s, now)
                }
            }
        };
        records.insert(
            0,
            Record::Installed {
                grant: grant.clone(),
                at: now,
                generation: state.generation,
                tokens: TokenSummary::of(&tokens, &self.fingerprints),
                source,
            },
        );
        events.push(Event::Installed { grant, generation: state.generation });
        Pending {
            transition: Transition {
                expected_version: current.map(|s| s.version),
                prior_phase: current.map(|s| s.phase.name()),
                state,
                records,
                events,
                verdict: Verdict::Installed,
            },
            value: tokens,
        }
    }

    /// Marks a grant as needing re-auth by operator or application decision. An open acquisition's
    /// subject credential is dropped.
    pub fn mark_needs_reauth(&self, s: &GrantState, note: &str, now: UnixMillis) -> Transition {
        let reason = ReauthReason::Manual { note: note.chars().filter(|c| !c.is_control()).take(200).collect() };
        let mut state = self.next_state(s, now);
        state.phase = Phase::NeedsReauth { reason: reason.clone(), since: now };
        state.not_before = None;
        state.acquisition = None;
        let grant = s.grant.clone();
        Transition {
            expected_version: Some(s.version),
            prior_phase: Some(s.phase.name()),
            state,
            records: vec![Record::NeedsReauth { grant: grant.clone(), at: now, reason: reason.clone() }],
            events: vec![Event::NeedsReauth { grant, reason }],
            verdict: Verdict::MarkedNeedsReauth,
        }
    }

    /// The app was uninstalled: stop refreshing and drop the secrets (tokens and any acquisition's
    /// subject credential), keeping the audit trail. Idempotent: `None` if already uninstalled.
    pub fn uninstall(&self, s: &GrantState, now: UnixMillis) -> Option<Transition> {
        if matches!(s.phase, Phase::Uninstalled { .. }) {
            return None;
        }
        let grant = s.grant.clone();
        let mut records = Vec::new();
        for first in open_attempts(s) {
            records.push(Record::Resolved {
                grant: grant.clone(),
                at: now,
                attempt: first,
                how: Resolution::Uninstalled,
            });
        }
        records.push(Record::Uninstalled { grant: grant.clone(), at: now });
        let mut state = self.next_state(s, now);
        state.tokens = None;
        state.phase = Phase::Uninstalled { since: now };
        state.acquisition = None;
        state.credential_first_presented_at = None;
        state.not_before = None;
        Some(Transition {
            expected_version: Some(s.version),
            prior_phase: Some(s.phase.name()),
            state,
            records,
            events: vec![Event::Uninstalled { grant }],
            verdict: Verdict::Uninstalled,
        })
    }

    /// The granted scopes changed (`app/scopes_update`): the stored token set's scope is replaced
    /// (a later token response's scope replaces it again). Journaled; changes nothing else (an
    /// attempt in flight stays live).
    pub fn scopes_updated(&self, s: &GrantState, scope: &str, now: UnixMillis) -> Transition {
        let scope: String = scope.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(4096).collect();
        let mut state = self.next_state(s, now);
        if let Some(t) = state.tokens.as_mut() {
            t.scope = Some(scope.clone());
        }
        let grant = s.grant.clone();
        Transition {
            expected_version: Some(s.version),
            prior_phase: Some(s.phase.name()),
            state,
            records: vec![Record::ScopesUpdated { grant: grant.clone(), at: now, scope }],
            events: vec![Event::ScopesUpdated { grant }],
            verdict: Verdict::ScopesUpdated,
        }
    }
}
