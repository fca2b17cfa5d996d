//! The deterministic core: apps, grants, tokens, rotation policies, faults and counters.
//!
//! No IO and no clock: every operation takes `now` (unix milliseconds). Token strings come
//! from a ChaCha RNG seeded at construction, so one seed and one sequence of requests always
//! mint the same tokens.
//!
//! ```
//! use tokenwal_sim::{Model, ModelConfig, TokenParams, TokenOutcome};
//!
//! let mut m = Model::new(ModelConfig::default(), 42);
//! m.register_app("cid", "secret");
//! let now = 1_800_000_000_000;
//! let first = m.seed_grant(now, "demo.myshopify.com", None).unwrap();
//! let req = TokenParams::refresh("cid", "secret", first.refresh_token.as_str());
//! let reply = m.handle_token_params(now, "demo.myshopify.com", &req);
//! let next = reply.outcome.tokens().expect("rotated");
//! assert_ne!(next.refresh_token, first.refresh_token);
//! // A retry with the old refresh token returns the same pair while the new one is unused.
//! let retry = m.handle_token_params(now + 1_000, "demo.myshopify.com", &req);
//! assert_eq!(retry.outcome.tokens().unwrap().refresh_token, next.refresh_token);
//! assert!(m.grant_alive("demo.myshopify.com", now));
//! ```

mod config;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use config::{MigrationErrorStyle, ModelConfig, RejectionStyle, RetryReturns, RotationPolicy, DAY_MS, MINUTE_MS};
pub use state::{AccessTokenView, GrantView, LegacyTokenView, RefreshTokenView, ShopState, TokenStatus};

use crate::counters::CounterSet;
use crate::faults::{validate_fault, Fault, FaultConfigError, FaultInjector, RandomFaults};
use crate::jwt::{mint_session_token, validate_session_token};
use crate::reply::{AdminReply, Delivery, HttpReply, IssueKind, OAuthError, TokenOutcome, TokenReply};
use crate::request::{
    parse_expiring, TokenParams, GRANT_AUTHORIZATION_CODE, GRANT_REFRESH_TOKEN, GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_OFFLINE, TOKEN_TYPE_ONLINE,
};
use crate::token::{ClientSecret, NonExpiringToken, SimToken, TokenSet};
use state::{AccessRecord, Grant, GrantKey, LegacyRecord, Migration, RefreshRecord, RefreshState};

/// Body of the Admin API's 401.
pub const ADMIN_UNAUTHORIZED: &str = "[API] Invalid API key or access token (unrecognized login or wrong password)";
/// `error_description` of the observed inactive-refresh-token rejection.
pub const ACTIVE_REFRESH_TOKEN_REQUIRED: &str = "This request requires an active refresh_token";
/// `error_description` of the `invalid_grant` rejection style.
pub const REFRESH_TOKEN_INVALID_OR_EXPIRED: &str = "The refresh token is invalid or expired";
/// Body of the Admin API's 403 for non-expiring tokens after enforcement.
pub const NON_EXPIRING_REFUSED: &str = "[API] Non-expiring access tokens are no longer accepted for the Admin API. Start using expiring offline tokens: https://shopify.dev/docs/apps/build/authentication-authorization/access-tokens/offline-access-tokens#expiring-vs-non-expiring-offline-tokens";
/// Body of the 520 edge error.
pub const EDGE_520_BODY: &str = "error code: 520";

/// Misuse of the model's control operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// No app is registered under this client id.
    #[error("unknown app {0}")]
    UnknownApp(String),
    /// No client id was given and no app is registered.
    #[error("no app registered")]
    NoApp,
    /// A seeded token string is already in use.
    #[error("token already exists")]
    DuplicateToken,
}

/// Which Admin API endpoint a request went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminApi {
    /// `GET /admin/api/{version}/shop.json`.
    RestShop,
    /// `POST /admin/api/{version}/graphql.json`.
    GraphQl,
}

/// How the Admin API treats a presented access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AdminVerdict {
    Ok,
    Unauthorized,
    NonExpiringRefused,
}

/// What presenting a refresh token would do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// First use: rotate.
    Fresh,
    /// Used and still retained: answer from retention.
    Replay,
    /// Refused. `reuse`: the token was used or retired within the current acquisition, which
    /// is what family revocation reacts to (a token retired by a newer acquisition is merely
    /// stale).
    Reject { reuse: bool },
}

/// The simulated server state. See the [module docs](self).
pub struct Model {
    config: ModelConfig,
    apps: BTreeMap<String, ClientSecret>,
    default_client_id: Option<String>,
    grants: BTreeMap<GrantKey, Grant>,
    refresh: HashMap<String, RefreshRecord>,
    access: HashMap<String, AccessRecord>,
    legacy: BTreeMap<String, LegacyRecord>,
    faults: FaultInjector,
    counters: CounterSet,
    rng: ChaCha8Rng,
    seed: u64,
    requests: u64,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .field("grants", &self.grants.len())
            .field("refresh_tokens", &self.refresh.len())
            .field("access_tokens", &self.access.len())
            .field("legacy_tokens", &self.legacy.len())
            .field("seed", &self.seed)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// A model with no apps, no grants, and token RNG seeded with `seed`.
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        Self {
            config,
            apps: BTreeMap::new(),
            default_client_id: None,
            grants: BTreeMap::new(),
            refresh: HashMap::new(),
            access: HashMap::new(),
            legacy: BTreeMap::new(),
            faults: FaultInjector::new(),
            counters: CounterSet::default(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
            requests: 0,
        }
    }

    // ---------------------------------------------------------------- configuration

    /// The current behaviour switches.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Replaces the behaviour switches. Existing tokens keep their stored expiries; the new
    /// policy applies to every later request.
    pub fn set_config(&mut self, config: ModelConfig) {
        self.config = config;
    }

    /// Registers (or re-keys) an app. The first app registered is the default one used by
    /// control operations that name no client id.
    pub fn register_app(&mut self, client_id: &str, client_secret: &str) {
        self.apps.insert(client_id.to_owned(), ClientSecret::new(client_secret));
        if self.default_client_id.is_none() {
            self.default_client_id = Some(client_id.to_owned());
        }
    }

    /// The default app's client id.
    pub fn default_client_id(&self) -> Option<&str> {
        self.default_client_id.as_deref()
    }

    /// The secret of a registered app.
    pub fn client_secret(&self, client_id: &str) -> Option<&ClientSecret> {
        self.apps.get(client_id)
    }

    fn resolve_app(&self, client_id: Option<&str>) -> Result<String, ModelError> {
        match client_id {
            Some(id) if self.apps.contains_key(id) => Ok(id.to_owned()),
            Some(id) => Err(ModelError::UnknownApp(id.to_owned())),
            None => self.default_client_id.clone().ok_or(ModelError::NoApp),
        }
    }

    // ---------------------------------------------------------------- faults and counters

    /// Appends scripted faults to `shop`'s queue; each applies to one later token request to
    /// that shop, in order.
    pub fn push_faults(&mut self, shop: &str, faults: impl IntoIterator<Item = Fault>) -> Result<(), FaultConfigError> {
        let faults: Vec<Fault> = faults.into_iter().collect();
        faults.iter().try_for_each(validate_fault)?;
        self.faults.push(shop, faults);
        Ok(())
    }

    /// Drops `shop`'s queued scripted faults.
    pub fn clear_faults(&mut self, shop: &str) {
        self.faults.clear(shop);
    }

    /// Scripted faults still queued for `shop`.
    pub fn pending_faults(&self, shop: &str) -> Vec<Fault> {
        self.faults.pending(shop)
    }

    /// Enables (or with `None` disables) random faults. Resets the fault RNG to the seed.
    pub fn set_random_faults(&mut self, random: Option<RandomFaults>) -> Result<(), FaultConfigError> {
        if let Some(r) = &random {
            r.validate()?;
        }
        self.faults.set_random(random);
        Ok(())
    }

    /// The random-fault configuration in force, if any.
    pub fn random_faults(&self) -> Option<RandomFaults> {
        self.faults.random()
    }

    /// Counters since construction or the last [`reset_counters`](Self::reset_counters).
    pub fn counters(&self) -> &CounterSet {
        &self.counters
    }

    /// Zeroes all counters.
    pub fn reset_counters(&mut self) {
        self.counters = CounterSet::default();
    }

    /// A fresh unique `x-request-id`.
    pub fn next_request_id(&mut self) -> String {
        self.requests += 1;
        format!("sim-{:08x}-{:010}", self.seed as u32, self.requests)
    }

    // ---------------------------------------------------------------- control operations

    /// Creates (or replaces) the grant of `client_id` (default app when `None`) on `shop` as if
    /// by a token exchange, and returns its token set. Not subject to faults.
    pub fn seed_grant(&mut self, now: u64, shop: &str, client_id: Option<&str>) -> Result<TokenSet, ModelError> {
        let client_id = self.resolve_app(client_id)?;
        let key = GrantKey::new(&client_id, shop);
        let (a, r) = self.acquire(now, &key, None);
        Ok(self.token_set(now, &a, &r))
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

    // ---------------------------------------------------------------- queries

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

    fn key_alive(&self, key: &GrantKey, now: u64) -> bool {
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

    fn grant_view(&self, key: &GrantKey, grant: &Grant, now: u64) -> GrantView {
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

    // ---------------------------------------------------------------- token endpoint

    /// Handles a raw token request body (JSON or form; see [`TokenParams::parse`]).
    pub fn handle_token_request(
        &mut self,
        now: u64,
        shop: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> TokenReply {
        let params = TokenParams::parse(content_type, body);
        self.handle(now, shop, params.map_err(|e| e.to_string()))
    }

    /// Handles a parsed token request.
    pub fn handle_token_params(&mut self, now: u64, shop: &str, params: &TokenParams) -> TokenReply {
        self.handle(now, shop, Ok(params.clone()))
    }

    fn handle(&mut self, now: u64, shop: &str, params: Result<TokenParams, String>) -> TokenReply {
        let request_id = self.next_request_id();
        self.counters.bump(shop, |c| c.token_requests += 1);
        let fault = self.faults.next(shop);
        if let Some(f) = fault {
            let kind = f.kind().as_str();
            self.counters.bump(shop, |c| *c.faults.entry(kind.to_owned()).or_default() += 1);
        }

        let outcome = match fault {
            Some(Fault::FailBeforeProcessing { status, json }) => {
                return TokenReply {
                    delivery: Delivery::Respond { reply: server_error_reply(status, json, &request_id), delay_ms: 0 },
                    request_id,
                    outcome: TokenOutcome::NotProcessed,
                    fault,
                };
            }
            Some(Fault::Throttle { retry_after_secs }) => {
                let mut reply = HttpReply::json(
                    429,
                    &serde_json::json!({"errors": "Exceeded rate limit for the token endpoint. Retry later."}),
                );
                reply.headers.push(("Retry-After", retry_after_secs.to_string()));
                return TokenReply {
                    delivery: Delivery::Respond { reply, delay_ms: 0 },
                    request_id,
                    outcome: TokenOutcome::NotProcessed,
                    fault,
                };
            }
            Some(Fault::InvalidClient) => TokenOutcome::Rejected(self.invalid_client()),
            _ => {
                let short_ttl = match fault {
                    Some(Fault::ShortRefreshTtl { secs }) => Some(secs.saturating_mul(1000)),
                    _ => None,
                };
                match params {
                    Ok(p) => self.process(now, shop, &p, short_ttl),
                    Err(msg) => TokenOutcome::Rejected(OAuthError::invalid_request(&msg)),
                }
            }
        };

        if let TokenOutcome::Rejected(e) = &outcome {
            let code = e.error.clone();
            let invalid_client = code == "invalid_client";
            self.counters.bump(shop, |c| {
                *c.rejections.entry(code.clone()).or_default() += 1;
                if invalid_client {
                    c.invalid_client += 1;
                }
            });
        }

        let reply = match &outcome {
            TokenOutcome::Issued { tokens, .. } => HttpReply::json(200, tokens),
            TokenOutcome::IssuedNonExpiring(t) => HttpReply::json(200, t),
            TokenOutcome::Rejected(e) => e.to_reply(),
            TokenOutcome::NotProcessed => unreachable!("handled above"),
        };
        let delivery = realise_fault(fault, reply, &outcome);
        TokenReply { request_id, outcome, fault, delivery }
    }

    fn invalid_client(&self) -> OAuthError {
        OAuthError::new(self.config.invalid_client_status, "invalid_client", "Client credentials are invalid")
    }

    fn inactive_refresh_error(&self) -> OAuthError {
        match self.config.rejection_style {
            RejectionStyle::InvalidRequest => OAuthError::new(401, "invalid_request", ACTIVE_REFRESH_TOKEN_REQUIRED),
            RejectionStyle::InvalidGrant => OAuthError::new(400, "invalid_grant", REFRESH_TOKEN_INVALID_OR_EXPIRED),
        }
    }

    fn migration_error(&self) -> OAuthError {
        match self.config.migration_error {
            MigrationErrorStyle::InvalidSubjectToken => OAuthError::bare(400, "invalid_subject_token"),
            MigrationErrorStyle::InvalidRequest => OAuthError::new(400, "invalid_request", "Invalid subject token"),
        }
    }

    fn process(&mut self, now: u64, shop: &str, params: &TokenParams, short_ttl: Option<u64>) -> TokenOutcome {
        let (Some(client_id), Some(secret)) = (params.get("client_id"), params.get("client_secret")) else {
            return TokenOutcome::Rejected(OAuthError::invalid_request("Missing client_id or client_secret"));
        };
        if self.apps.get(client_id).map(ClientSecret::expose) != Some(secret) {
            return TokenOutcome::Rejected(self.invalid_client());
        }
        let key = GrantKey::new(client_id, shop);
        match params.get("grant_type") {
            None => TokenOutcome::Rejected(OAuthError::invalid_request("Missing grant_type")),
            Some(GRANT_REFRESH_TOKEN) => self.refresh_grant(now, &key, params, short_ttl),
            Some(GRANT_TOKEN_EXCHANGE) => self.token_exchange(now, &key, params, short_ttl),
            Some(GRANT_AUTHORIZATION_CODE) => TokenOutcome::Rejected(OAuthError::invalid_request(
                "The authorization code was not found or was already used",
            )),
            Some(_) => TokenOutcome::Rejected(OAuthError::bare(400, "unsupported_grant_type")),
        }
    }

    // ---------------------------------------------------------------- refresh grant

    fn evaluate(&self, token: &str, key: &GrantKey, now: u64) -> Decision {
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
        let retained_until = match self.config.policy {
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

    fn refresh_grant(
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
                TokenOutcome::Rejected(self.inactive_refresh_error())
            }
        }
    }

    /// First use of `token`: mint A′/R′ and link them.
    fn rotate(&mut self, now: u64, token: &str, short_ttl: Option<u64>) -> TokenSet {
        let rec = &self.refresh[token];
        let (key, generation, predecessor) = (rec.key.clone(), rec.generation, rec.predecessor.clone());
        let (a, r) = self.mint_pair(now, &key, generation, Some(token), short_ttl);
        let policy = self.config.policy;
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
    fn replay(&mut self, now: u64, token: &str, short_ttl: Option<u64>) -> TokenOutcome {
        let rec = &self.refresh[token];
        let a = rec.replacement_access.clone().expect("used token has a replacement");
        let r = rec.replacement.clone().expect("used token has a replacement");
        let (key, generation) = (rec.key.clone(), rec.generation);
        match self.config.policy {
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

    // ---------------------------------------------------------------- token exchange

    fn token_exchange(
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

    fn migrate(&mut self, now: u64, key: &GrantKey, subject: &str, short_ttl: Option<u64>) -> TokenOutcome {
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
    fn migration_retry_open(&self, key: &GrantKey, m: &Migration, now: u64) -> bool {
        let r = &self.refresh[&m.refresh];
        now < m.at.saturating_add(self.config.migration_retry_ms)
            && self.grants.get(key).map(|g| g.generation) == Some(m.generation)
            && r.first_used_at.is_none()
            && r.state == RefreshState::Active
            && now < r.expires_at
    }

    // ---------------------------------------------------------------- admin API

    /// Handles an Admin API request carrying `X-Shopify-Access-Token: token`.
    pub fn handle_admin(&mut self, now: u64, shop: &str, token: Option<&str>, api: AdminApi) -> AdminReply {
        let request_id = self.next_request_id();
        let verdict = token.map_or(AdminVerdict::Unauthorized, |t| self.admin_check(shop, t, now));
        let reply = match verdict {
            AdminVerdict::Ok => {
                self.counters.bump(shop, |c| c.admin_ok += 1);
                if self.config.admin_use_retires_previous {
                    self.retire_on_admin_use(token.expect("authorized"));
                }
                match api {
                    AdminApi::RestShop => {
                        HttpReply::json(200, &serde_json::json!({"shop": {"myshopify_domain": shop, "name": shop}}))
                    }
                    AdminApi::GraphQl => HttpReply::json(
                        200,
                        &serde_json::json!({"data": {"shop": {"myshopifyDomain": shop, "name": shop}}}),
                    ),
                }
            }
            AdminVerdict::Unauthorized => {
                self.counters.bump(shop, |c| c.admin_unauthorized += 1);
                HttpReply::json(401, &serde_json::json!({"errors": ADMIN_UNAUTHORIZED}))
            }
            AdminVerdict::NonExpiringRefused => {
                self.counters.bump(shop, |c| c.admin_forbidden += 1);
                HttpReply::json(403, &serde_json::json!({"errors": NON_EXPIRING_REFUSED}))
            }
        };
        AdminReply { request_id, authorized: verdict == AdminVerdict::Ok, reply }
    }

    fn admin_check(&self, shop: &str, token: &str, now: u64) -> AdminVerdict {
        let live = if let Some(a) = self.access.get(token) {
            a.key.shop == shop && !a.revoked && now < a.expires_at
        } else if self.legacy.get(token).is_some_and(|l| l.key.shop == shop && !l.revoked) {
            if self.config.reject_non_expiring_admin {
                return AdminVerdict::NonExpiringRefused;
            }
            true
        } else {
            false
        };
        if live {
            AdminVerdict::Ok
        } else {
            AdminVerdict::Unauthorized
        }
    }

    /// UNCONFIRMED switch: API use of A′ retires the R whose first use minted A′.
    fn retire_on_admin_use(&mut self, access: &str) {
        let Some(parent) = self.access.get(access).and_then(|a| a.minted_by.clone()) else {
            return;
        };
        let is_current = self.refresh.get(&parent).is_some_and(|r| r.replacement_access.as_deref() == Some(access));
        if is_current {
            self.retire_if_active(&parent);
        }
    }

    // ---------------------------------------------------------------- state helpers

    fn token_exists(&self, t: &str) -> bool {
        self.refresh.contains_key(t) || self.access.contains_key(t) || self.legacy.contains_key(t)
    }

    /// A random-looking opaque token, unique among all tokens this model knows.
    fn mint(&mut self, prefix: &str) -> String {
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
    fn mint_pair(
        &mut self,
        now: u64,
        key: &GrantKey,
        generation: u64,
        parent: Option<&str>,
        short_ttl: Option<u64>,
    ) -> (String, String) {
        let a = self.mint("shpat_");
        let r = self.mint("shprt_");
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
    fn acquire(&mut self, now: u64, key: &GrantKey, short_ttl: Option<u64>) -> (String, String) {
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
        self.mint_pair(now, key, generation, None, short_ttl)
    }

    fn set_refresh_state(&mut self, token: &str, state: RefreshState) {
        if let Some(r) = self.refresh.get_mut(token) {
            if r.state == RefreshState::Active {
                r.state = state;
            }
        }
    }

    fn retire_if_active(&mut self, token: &str) {
        self.set_refresh_state(token, RefreshState::Retired);
    }

    /// Revokes every refresh and access token of the grant.
    fn revoke_grant(&mut self, key: &GrantKey) {
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
    fn token_set(&self, now: u64, access: &str, refresh: &str) -> TokenSet {
        let a = &self.access[access];
        let r = &self.refresh[refresh];
        TokenSet {
            access_token: SimToken::new(access),
            expires_in: a.expires_at.saturating_sub(now) / 1000,
            refresh_token: SimToken::new(refresh),
            refresh_token_expires_in: r.expires_at.saturating_sub(now) / 1000,
            scope: self.config.scope.clone(),
            session: self
                .config
                .include_session_field
                .then(|| format!("sim-session-{}-{}-{}", r.key.client_id, r.key.shop, r.generation)),
        }
    }
}

/// The 5xx answer of [`Fault::FailBeforeProcessing`].
fn server_error_reply(status: u16, json: bool, request_id: &str) -> HttpReply {
    let reason = match status {
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Server Error",
    };
    if json {
        HttpReply::json(status, &serde_json::json!({"errors": reason}))
    } else {
        HttpReply::text(
            status,
            format!("Internal error. Looks like something went wrong on our end.\nRequest ID: {request_id}\n"),
        )
    }
}

/// Applies a post-processing fault to the committed outcome's reply.
fn realise_fault(fault: Option<Fault>, mut reply: HttpReply, outcome: &TokenOutcome) -> Delivery {
    let respond = |reply| Delivery::Respond { reply, delay_ms: 0 };
    match fault {
        Some(Fault::RotateThenDrop) => respond(HttpReply::text(520, EDGE_520_BODY)),
        Some(Fault::RotateThenHang) => Delivery::Hang,
        Some(Fault::RotateThenReset) => Delivery::Reset,
        Some(Fault::Slow { delay_ms }) => Delivery::Respond { reply, delay_ms },
        Some(Fault::Truncated) => {
            let keep = reply.body.len() / 2;
            reply.body.truncate(keep);
            respond(reply)
        }
        Some(Fault::Malformed) => {
            reply.body = b"<!DOCTYPE html><html><body><h1>Something went wrong</h1></body></html>".to_vec();
            respond(reply)
        }
        Some(f @ (Fault::MissingExpiresIn | Fault::MissingRefreshTokenExpiresIn)) => {
            if let TokenOutcome::Issued { tokens, .. } = outcome {
                let field = if f == Fault::MissingExpiresIn { "expires_in" } else { "refresh_token_expires_in" };
                let mut v = serde_json::to_value(tokens).expect("serialises");
                if let Some(obj) = v.as_object_mut() {
                    obj.remove(field);
                }
                reply = HttpReply::json(200, &v);
            }
            respond(reply)
        }
        Some(
            Fault::FailBeforeProcessing { .. }
            | Fault::Throttle { .. }
            | Fault::InvalidClient
            | Fault::ShortRefreshTtl { .. },
        )
        | None => respond(reply),
    }
}

#[cfg(test)]
mod tests;
