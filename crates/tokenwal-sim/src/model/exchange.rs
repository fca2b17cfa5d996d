//! Token exchange: App Bridge session tokens for expiring (or non-expiring) offline tokens, and
//! the migration of non-expiring tokens with its retry window.

use super::state::{GrantKey, LegacyRecord, Migration, RefreshState};
use super::*;

impl Model {
    pub(super) fn token_exchange(
        &mut self,
        now: u64,
        key: &GrantKey,
        params: &TokenParams,
        short_ttl: Option<u64>,
    ) -> TokenOutcome {
        let reject = |msg: &str| TokenOutcome::Rejected(OAuthError::invalid_request(msg));
        let Some(subject) = params.get("subject_token") else {
            return reject("Missing subject_token");
        };
        let Some(subject_type) = params.get("subject_token_type") else {
            return reject("Missing subject_token_type");
        };
        let requested = params.get("requested_token_type").unwrap_or(TOKEN_TYPE_OFFLINE);
        let Some(expiring) = parse_expiring(params.get("expiring")) else {
            return reject("expiring must be 0 or 1");
        };
        match subject_type {
            TOKEN_TYPE_ID_TOKEN => {
                let secret = self.apps[&key.client_id].expose();
                if validate_session_token(
                    subject,
                    &key.shop,
                    &key.client_id,
                    secret,
                    now,
                    self.config.session_token_leeway_ms,
                )
                .is_err()
                {
                    return TokenOutcome::Rejected(OAuthError::bare(400, "invalid_subject_token"));
                }
                match requested {
                    TOKEN_TYPE_OFFLINE => {}
                    TOKEN_TYPE_ONLINE => return reject("Online access tokens are not simulated"),
                    _ => return reject("Unsupported requested_token_type"),
                }
                if expiring {
                    let (a, r) = self.acquire(now, key, short_ttl);
                    TokenOutcome::Issued { tokens: self.token_set(now, &a, &r), kind: IssueKind::Acquisition }
                } else {
                    // A non-expiring acquisition does not touch the expiring grant (unknown
                    // what Shopify does; the docs describe only expiring→expiring retirement).
                    let token = self.mint("shpat_");
                    self.legacy
                        .insert(token.clone(), LegacyRecord { key: key.clone(), revoked: false, migration: None });
                    self.counters.bump(&key.shop, |c| c.acquisitions += 1);
                    TokenOutcome::IssuedNonExpiring(NonExpiringToken {
                        access_token: SimToken::new(token),
                        scope: self.config.scope.clone(),
                    })
                }
            }
            TOKEN_TYPE_OFFLINE => {
                if requested != TOKEN_TYPE_OFFLINE {
                    return reject("Unsupported requested_token_type");
                }
                if !expiring {
                    return reject("expiring must be 1 to migrate a non-expiring token");
                }
                self.migrate(now, key, subject, short_ttl)
            }
            _ => reject("Unsupported subject_token_type"),
        }
    }

    pub(super) fn migrate(&mut self, now: u64, key: &GrantKey, subject: &str, short_ttl: Option<u64>) -> TokenOutcome {
        let Some(rec) = self.legacy.get(subject).filter(|l| l.key == *key) else {
            return TokenOutcome::Rejected(self.migration_error());
        };
        match rec.migration.clone() {
            None if rec.revoked => TokenOutcome::Rejected(self.migration_error()),
            None => {
                let (a, r) = self.acquire(now, key, short_ttl);
                let generation = self.grants[key].generation;
                let rec = self.legacy.get_mut(subject).expect("checked");
                rec.revoked = true;
                rec.migration = Some(Migration { at: now, generation, access: a.clone(), refresh: r.clone() });
                self.counters.bump(&key.shop, |c| c.migrations += 1);
                TokenOutcome::Issued { tokens: self.token_set(now, &a, &r), kind: IssueKind::Migration }
            }
            Some(m) if self.migration_retry_open(key, &m, now) => {
                let ttl = self.config.access_ttl_ms;
                let acc = self.access.get_mut(&m.access).expect("minted with pair");
                acc.expires_at = acc.expires_at.max(now.saturating_add(ttl));
                self.counters.bump(&key.shop, |c| c.migration_replays += 1);
                TokenOutcome::Issued {
                    tokens: self.token_set(now, &m.access, &m.refresh),
                    kind: IssueKind::MigrationReplay,
                }
            }
            Some(_) => TokenOutcome::Rejected(self.migration_error()),
        }
    }

    /// A migration retry returns the same pair within the retry period, until the pair has
    /// been refreshed once or a later acquisition replaced it (or the grant was revoked).
    pub(super) fn migration_retry_open(&self, key: &GrantKey, m: &Migration, now: u64) -> bool {
        let r = &self.refresh[&m.refresh];
        now < m.at.saturating_add(self.config.migration_retry_ms)
            && self.grants.get(key).map(|g| g.generation) == Some(m.generation)
            && r.first_used_at.is_none()
            && r.state == RefreshState::Active
            && now < r.expires_at
    }
}
