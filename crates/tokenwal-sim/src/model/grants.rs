//! Grants and tokens: control operations that seed and revoke them, and the helpers that mint,
//! acquire, retire and revoke.

use super::state::{AccessRecord, GrantKey, LegacyRecord, RefreshRecord, RefreshState};
use super::*;

impl Model {
    /// Creates (or replaces) the grant of `client_id` (default app when `None`) on `shop` as if
    /// by a token exchange, and returns its token set. Not subject to faults.
    pub fn seed_grant(&mut self, now: u64, shop: &str, client_id: Option<&str>) -> Result<TokenSet, ModelError> {
        let client_id = self.resolve_app(client_id)?;
        let key = GrantKey::new(&client_id, shop);
        let (a, r) = self.acquire(now, &key, None);
        Ok(self.token_set(now, &a, &r))
    }

    /// Like [`Model::seed_grant`], but the pair's strings are `access` and `refresh` instead of
    /// minted ones: for a test that must tell the server tokens a client already holds (e.g. a
    /// committed fixture store whose grants were written with known tokens). The pair is a new
    /// acquisition of the grant (older refresh tokens are retired), active, with lifetimes from the
    /// configuration counted from `now`. Not subject to faults. [`ModelError::DuplicateToken`] if
    /// either string is already in use (or they are equal).
    pub fn seed_grant_with_tokens(
        &mut self,
        now: u64,
        shop: &str,
        client_id: Option<&str>,
        access: &str,
        refresh: &str,
    ) -> Result<TokenSet, ModelError> {
        let client_id = self.resolve_app(client_id)?;
        if access == refresh || self.token_exists(access) || self.token_exists(refresh) {
            return Err(ModelError::DuplicateToken);
        }
        let key = GrantKey::new(&client_id, shop);
        let generation = self.begin_acquisition(&key);
        self.record_pair(now, &key, generation, None, None, (access.to_owned(), refresh.to_owned()));
        Ok(self.token_set(now, access, refresh))
    }

    /// Seeds a non-expiring offline token for `client_id` (default app when `None`) on `shop`;
    /// a random `shpat_` string unless `token` is given.
    pub fn seed_legacy_token(
        &mut self,
        shop: &str,
        client_id: Option<&str>,
        token: Option<&str>,
    ) -> Result<SimToken, ModelError> {
        let client_id = self.resolve_app(client_id)?;
        let token = match token {
            Some(t) if self.token_exists(t) => return Err(ModelError::DuplicateToken),
            Some(t) => t.to_owned(),
            None => self.mint("shpat_"),
        };
        self.legacy.insert(
            token.clone(),
            LegacyRecord { key: GrantKey::new(&client_id, shop), revoked: false, migration: None },
        );
        Ok(SimToken::new(token))
    }

    /// Mints a session token for `shop`, signed with the secret of `client_id` (default app
    /// when `None`), valid from `now` for `lifetime_ms`.
    pub fn session_token(
        &self,
        now: u64,
        shop: &str,
        client_id: Option<&str>,
        lifetime_ms: u64,
    ) -> Result<String, ModelError> {
        let client_id = self.resolve_app(client_id)?;
        let secret = &self.apps[&client_id];
        Ok(mint_session_token(shop, &client_id, secret.expose(), now, lifetime_ms))
    }

    /// Simulates an uninstall: every token of every app on `shop` (expiring and non-expiring)
    /// is revoked. Returns whether anything was revoked.
    pub fn uninstall(&mut self, shop: &str) -> bool {
        let keys: Vec<GrantKey> = self.grants.keys().filter(|k| k.shop == shop).cloned().collect();
        let mut any = !keys.is_empty();
        for key in keys {
            self.revoke_grant(&key);
        }
        for rec in self.legacy.values_mut().filter(|l| l.key.shop == shop) {
            any |= !rec.revoked;
            rec.revoked = true;
        }
        any
    }
    pub(super) fn token_exists(&self, t: &str) -> bool {
        self.refresh.contains_key(t) || self.access.contains_key(t) || self.legacy.contains_key(t)
    }

    /// A random-looking opaque token, unique among all tokens this model knows.
    pub(super) fn mint(&mut self, prefix: &str) -> String {
        loop {
            let bytes: [u8; 16] = self.rng.gen();
            let mut s = String::with_capacity(prefix.len() + 32);
            s.push_str(prefix);
            for b in bytes {
                s.push_str(&format!("{b:02x}"));
            }
            if !self.token_exists(&s) {
                return s;
            }
        }
    }

    /// Mints and records an access/refresh pair in `key`'s grant.
    pub(super) fn mint_pair(
        &mut self,
        now: u64,
        key: &GrantKey,
        generation: u64,
        parent: Option<&str>,
        short_ttl: Option<u64>,
    ) -> (String, String) {
        let pair = if key.customer.is_some() {
            (self.mint("shcat_"), self.mint("shcrt_"))
        } else {
            (self.mint("shpat_"), self.mint("shprt_"))
        };
        self.record_pair(now, key, generation, parent, short_ttl, pair)
    }

    /// Records the access/refresh pair `(a, r)` in `key`'s grant.
    fn record_pair(
        &mut self,
        now: u64,
        key: &GrantKey,
        generation: u64,
        parent: Option<&str>,
        short_ttl: Option<u64>,
        (a, r): (String, String),
    ) -> (String, String) {
        let refresh_ttl = short_ttl.unwrap_or(self.config.refresh_ttl_ms);
        self.access.insert(
            a.clone(),
            AccessRecord {
                key: key.clone(),
                generation,
                issued_at: now,
                expires_at: now.saturating_add(self.config.access_ttl_ms),
                revoked: false,
                minted_by: parent.map(str::to_owned),
            },
        );
        self.refresh.insert(
            r.clone(),
            RefreshRecord {
                key: key.clone(),
                generation,
                issued_at: now,
                expires_at: now.saturating_add(refresh_ttl),
                first_used_at: None,
                replacement: None,
                replacement_access: None,
                predecessor: parent.map(str::to_owned),
                state: RefreshState::Active,
            },
        );
        let grant = self.grants.entry(key.clone()).or_default();
        grant.access_tokens.push(a.clone());
        grant.refresh_tokens.push(r.clone());
        (a, r)
    }

    /// A new acquisition: bump the generation, retire older refresh tokens (and optionally
    /// revoke older access tokens), mint a pair.
    pub(super) fn acquire(&mut self, now: u64, key: &GrantKey, short_ttl: Option<u64>) -> (String, String) {
        let generation = self.begin_acquisition(key);
        self.mint_pair(now, key, generation, None, short_ttl)
    }

    /// The bookkeeping of a new acquisition before its pair is recorded: bumps and returns the
    /// generation, retires older refresh tokens (and optionally revokes older access tokens).
    fn begin_acquisition(&mut self, key: &GrantKey) -> u64 {
        let grant = self.grants.entry(key.clone()).or_default();
        grant.generation += 1;
        let generation = grant.generation;
        for t in &grant.refresh_tokens {
            let r = self.refresh.get_mut(t).expect("grant lists known tokens");
            if r.state == RefreshState::Active {
                r.state = RefreshState::Retired;
            }
        }
        if self.config.revoke_old_access_on_acquisition {
            for t in &grant.access_tokens {
                self.access.get_mut(t).expect("grant lists known tokens").revoked = true;
            }
        }
        self.counters.bump(&key.shop, |c| c.acquisitions += 1);
        generation
    }

    pub(super) fn set_refresh_state(&mut self, token: &str, state: RefreshState) {
        if let Some(r) = self.refresh.get_mut(token) {
            if r.state == RefreshState::Active {
                r.state = state;
            }
        }
    }

    pub(super) fn retire_if_active(&mut self, token: &str) {
        self.set_refresh_state(token, RefreshState::Retired);
    }

    /// Revokes every refresh and access token of the grant.
    pub(super) fn revoke_grant(&mut self, key: &GrantKey) {
        let Some(grant) = self.grants.get(key) else {
            return;
        };
        for t in &grant.refresh_tokens {
            self.refresh.get_mut(t).expect("known").state = RefreshState::Revoked;
        }
        for t in &grant.access_tokens {
            self.access.get_mut(t).expect("known").revoked = true;
        }
    }

    /// The answer body for a pair, with lifetimes counted from `now`.
    pub(super) fn token_set(&self, now: u64, access: &str, refresh: &str) -> TokenSet {
        let a = &self.access[access];
        let r = &self.refresh[refresh];
        TokenSet {
            access_token: SimToken::new(access),
            expires_in: a.expires_at.saturating_sub(now) / 1000,
            refresh_token: SimToken::new(refresh),
            refresh_token_expires_in: r.expires_at.saturating_sub(now) / 1000,
            scope: if r.key.customer.is_some() {
                customer::CUSTOMER_SCOPE.to_owned()
            } else {
                self.config.scope.clone()
            },
            session: (self.config.include_session_field && r.key.customer.is_none())
                .then(|| format!("sim-session-{}-{}-{}", r.key.client_id, r.key.shop, r.generation)),
        }
    }
}
