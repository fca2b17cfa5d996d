//! The refresh grant: what presenting a refresh token does under the rotation policy (rotate,
//! replay from retention, reject), and family revocation on reuse.

use super::state::{GrantKey, RefreshState};
use super::*;

/// What presenting a refresh token would do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// First use: rotate.
    Fresh,
    /// Used and still retained: answer from retention.
    Replay,
    /// Refused. `reuse`: the token was used or retired within the current acquisition, which
    /// is what family revocation reacts to (a token retired by a newer acquisition is merely
    /// stale).
    Reject { reuse: bool },
}

impl Model {
    /// The rotation policy of `key`'s grant: the Customer Account API mode's for a customer.
    pub(super) fn policy_for(&self, key: &GrantKey) -> RotationPolicy {
        if key.customer.is_some() {
            self.config.customer_account.policy
        } else {
            self.config.policy
        }
    }

    pub(super) fn evaluate(&self, token: &str, key: &GrantKey, now: u64) -> Decision {
        let Some(rec) = self.refresh.get(token) else {
            return Decision::Reject { reuse: false };
        };
        if rec.key != *key || rec.state == RefreshState::Revoked || now >= rec.expires_at {
            return Decision::Reject { reuse: false };
        }
        let current = self.grants.get(key).map_or(0, |g| g.generation);
        if rec.generation != current {
            return Decision::Reject { reuse: false };
        }
        if rec.state == RefreshState::Retired {
            return Decision::Reject { reuse: true };
        }
        let Some(first_used) = rec.first_used_at else {
            return Decision::Fresh;
        };
        let retained_until = match self.policy_for(key) {
            RotationPolicy::Strict => return Decision::Reject { reuse: true },
            RotationPolicy::Window { window_ms } => first_used.saturating_add(window_ms),
            RotationPolicy::RetainUntilReplacementUsed { max_retention_ms, .. } => {
                first_used.saturating_add(max_retention_ms)
            }
        };
        if now < retained_until {
            Decision::Replay
        } else {
            Decision::Reject { reuse: true }
        }
    }

    pub(super) fn refresh_grant(
        &mut self,
        now: u64,
        key: &GrantKey,
        params: &TokenParams,
        short_ttl: Option<u64>,
    ) -> TokenOutcome {
        let Some(token) = params.get("refresh_token") else {
            return TokenOutcome::Rejected(OAuthError::invalid_request("Missing refresh_token"));
        };
        match self.evaluate(token, key, now) {
            Decision::Fresh => {
                let tokens = self.rotate(now, token, short_ttl);
                self.counters.bump(&key.shop, |c| c.rotations += 1);
                TokenOutcome::Issued { tokens, kind: IssueKind::Rotation }
            }
            Decision::Replay => {
                self.counters.bump(&key.shop, |c| c.replays += 1);
                self.replay(now, token, short_ttl)
            }
            Decision::Reject { reuse } => {
                if reuse {
                    self.set_refresh_state(token, RefreshState::Retired);
                    if self.config.revoke_family_on_reuse {
                        self.revoke_grant(key);
                        self.counters.bump(&key.shop, |c| c.family_revocations += 1);
                    }
                }
                TokenOutcome::Rejected(self.inactive_refresh_error(key))
            }
        }
    }

    /// First use of `token`: mint A′/R′ and link them.
    pub(super) fn rotate(&mut self, now: u64, token: &str, short_ttl: Option<u64>) -> TokenSet {
        let rec = &self.refresh[token];
        let (key, generation, predecessor) = (rec.key.clone(), rec.generation, rec.predecessor.clone());
        let (a, r) = self.mint_pair(now, &key, generation, Some(token), short_ttl);
        let policy = self.policy_for(&key);
        let rec = self.refresh.get_mut(token).expect("evaluated above");
        rec.first_used_at = Some(now);
        rec.replacement = Some(r.clone());
        rec.replacement_access = Some(a.clone());
        match policy {
            RotationPolicy::Strict => rec.state = RefreshState::Retired,
            RotationPolicy::RetainUntilReplacementUsed { .. } => {
                // Using the replacement retires the token it replaced.
                if let Some(p) = predecessor {
                    self.retire_if_active(&p);
                }
            }
            RotationPolicy::Window { .. } => {}
        }
        self.token_set(now, &a, &r)
    }

    /// A retry of a used, retained `token`.
    pub(super) fn replay(&mut self, now: u64, token: &str, short_ttl: Option<u64>) -> TokenOutcome {
        let rec = &self.refresh[token];
        let a = rec.replacement_access.clone().expect("used token has a replacement");
        let r = rec.replacement.clone().expect("used token has a replacement");
        let (key, generation) = (rec.key.clone(), rec.generation);
        match self.policy_for(&key) {
            RotationPolicy::RetainUntilReplacementUsed { retry_returns: RetryReturns::NewPair, .. } => {
                self.retire_if_active(&r);
                let (a2, r2) = self.mint_pair(now, &key, generation, Some(token), short_ttl);
                let rec = self.refresh.get_mut(token).expect("exists");
                rec.replacement = Some(r2.clone());
                rec.replacement_access = Some(a2.clone());
                TokenOutcome::Issued { tokens: self.token_set(now, &a2, &r2), kind: IssueKind::ReplayNewPair }
            }
            RotationPolicy::RetainUntilReplacementUsed { extend_access_expiry, .. } => {
                if extend_access_expiry {
                    let ttl = self.config.access_ttl_ms;
                    let acc = self.access.get_mut(&a).expect("minted with pair");
                    acc.expires_at = acc.expires_at.max(now.saturating_add(ttl));
                }
                TokenOutcome::Issued { tokens: self.token_set(now, &a, &r), kind: IssueKind::ReplaySamePair }
            }
            RotationPolicy::Window { .. } => {
                TokenOutcome::Issued { tokens: self.token_set(now, &a, &r), kind: IssueKind::ReplaySamePair }
            }
            RotationPolicy::Strict => unreachable!("strict never replays"),
        }
    }
}
