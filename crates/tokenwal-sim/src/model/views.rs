//! Queries: liveness of grants and tokens, and the [`ShopState`] snapshot.

use super::admin::AdminVerdict;
use super::refresh::Decision;
use super::state::{Grant, GrantKey, RefreshState};
use super::*;

impl Model {
    /// True iff some refresh token of some app's current grant on `shop` would be accepted at
    /// `now` (fresh, or as a retry). False means the shop is locked out until a new
    /// acquisition.
    pub fn grant_alive(&self, shop: &str, now: u64) -> bool {
        self.grants.keys().filter(|k| k.shop == shop).any(|k| self.key_alive(k, now))
    }

    /// [`grant_alive`](Self::grant_alive) for one app.
    pub fn grant_alive_for(&self, client_id: &str, shop: &str, now: u64) -> bool {
        self.key_alive(&GrantKey::new(client_id, shop), now)
    }

    pub(super) fn key_alive(&self, key: &GrantKey, now: u64) -> bool {
        self.grants.get(key).is_some_and(|g| {
            g.refresh_tokens.iter().any(|rt| !matches!(self.evaluate(rt, key, now), Decision::Reject { .. }))
        })
    }

    /// Whether presenting `refresh_token` to `shop` as `client_id` at `now` would succeed.
    pub fn refresh_token_accepted(&self, client_id: &str, shop: &str, refresh_token: &str, now: u64) -> bool {
        !matches!(self.evaluate(refresh_token, &GrantKey::new(client_id, shop), now), Decision::Reject { .. })
    }

    /// Whether the Admin API would accept `access_token` for `shop` at `now`.
    pub fn access_token_valid(&self, shop: &str, access_token: &str, now: u64) -> bool {
        self.admin_check(shop, access_token, now) == AdminVerdict::Ok
    }

    /// Everything known about `shop` at `now`.
    pub fn shop_state(&self, shop: &str, now: u64) -> ShopState {
        let grants: Vec<GrantView> =
            self.grants.iter().filter(|(k, _)| k.shop == shop).map(|(k, g)| self.grant_view(k, g, now)).collect();
        let legacy_tokens = self
            .legacy
            .iter()
            .filter(|(_, l)| l.key.shop == shop)
            .map(|(t, l)| LegacyTokenView {
                token: SimToken::new(t.clone()),
                client_id: l.key.client_id.clone(),
                status: if l.revoked { TokenStatus::Revoked } else { TokenStatus::Active },
                migrated_at_ms: l.migration.as_ref().map(|m| m.at),
                migration_retry_open: l.migration.as_ref().is_some_and(|m| self.migration_retry_open(&l.key, m, now)),
            })
            .collect();
        ShopState {
            shop: shop.to_owned(),
            now_ms: now,
            alive: grants.iter().any(|g| g.alive),
            grants,
            legacy_tokens,
            pending_faults: self.faults.pending(shop),
        }
    }

    pub(super) fn grant_view(&self, key: &GrantKey, grant: &Grant, now: u64) -> GrantView {
        let refresh_tokens: Vec<RefreshTokenView> = grant
            .refresh_tokens
            .iter()
            .map(|t| {
                let r = &self.refresh[t];
                let decision = self.evaluate(t, key, now);
                let accepted_now = !matches!(decision, Decision::Reject { .. });
                let status = match r.state {
                    RefreshState::Revoked => TokenStatus::Revoked,
                    _ if now >= r.expires_at => TokenStatus::Expired,
                    RefreshState::Retired => TokenStatus::Retired,
                    RefreshState::Active if accepted_now => TokenStatus::Active,
                    RefreshState::Active => TokenStatus::Retired,
                };
                RefreshTokenView {
                    token: SimToken::new(t.clone()),
                    generation: r.generation,
                    issued_at_ms: r.issued_at,
                    expires_at_ms: r.expires_at,
                    first_used_at_ms: r.first_used_at,
                    replacement: r.replacement.clone().map(SimToken::new),
                    predecessor: r.predecessor.clone().map(SimToken::new),
                    status,
                    accepted_now,
                }
            })
            .collect();
        let access_tokens = grant
            .access_tokens
            .iter()
            .map(|t| {
                let a = &self.access[t];
                AccessTokenView {
                    token: SimToken::new(t.clone()),
                    generation: a.generation,
                    issued_at_ms: a.issued_at,
                    expires_at_ms: a.expires_at,
                    status: if a.revoked {
                        TokenStatus::Revoked
                    } else if now >= a.expires_at {
                        TokenStatus::Expired
                    } else {
                        TokenStatus::Active
                    },
                }
            })
            .collect();
        GrantView {
            client_id: key.client_id.clone(),
            generation: grant.generation,
            alive: refresh_tokens.iter().any(|r| r.accepted_now),
            refresh_tokens,
            access_tokens,
        }
    }
}
