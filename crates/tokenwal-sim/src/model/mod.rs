//! The deterministic core: apps, grants, tokens, rotation policies, faults and counters.
//!
//! No IO and no clock: every operation takes `now` (unix milliseconds). Token strings come
//! from a ChaCha RNG seeded at construction, so one seed and one sequence of requests always
//! mint the same tokens.
//!
//! By subject: `grants` (seeding, minting, acquisition, revocation), `endpoint` (the token
//! endpoint's dispatch and fault realisation), `refresh` (rotation policies), `exchange` (token
//! exchange and migration), `admin` (the Admin API check), `views` (queries and snapshots);
//! `config` and `state` hold the switches and the records.
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

mod admin;
mod config;
mod customer;
mod endpoint;
mod exchange;
mod grants;
mod refresh;
mod state;
mod views;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use config::{
    CustomerAccountConfig, CustomerRejectionStyle, MigrationErrorStyle, ModelConfig, RejectionStyle, RetryReturns,
    RotationPolicy, DAY_MS, MINUTE_MS,
};
pub use customer::{customer_grant, CUSTOMER_REFRESH_REFUSED, CUSTOMER_SCOPE, PUBLIC_CLIENT_MUST_NOT_AUTHENTICATE};
use endpoint::Endpoint;
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
use state::{AccessRecord, Grant, GrantKey, LegacyRecord, RefreshRecord};

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

/// The simulated server state. See the [module docs](self).
pub struct Model {
    config: ModelConfig,
    apps: BTreeMap<String, ClientSecret>,
    default_client_id: Option<String>,
    public_clients: BTreeSet<String>,
    default_public_client: Option<String>,
    /// Token requests being handled now, per grant name (see [`Model::begin_token_request`]).
    in_flight: HashMap<String, u64>,
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
            public_clients: BTreeSet::new(),
            default_public_client: None,
            in_flight: HashMap::new(),
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

    /// Zeroes all counters (requests in flight stay in flight).
    pub fn reset_counters(&mut self) {
        self.counters = CounterSet::default();
    }

    /// Marks a token request to `grant` (a [`TokenReply::grant`]) as being handled, until the
    /// matching [`end_token_request`](Self::end_token_request), and returns how many requests to
    /// that grant are being handled now, this one included. A count above one bumps the grant's
    /// [`overlapping_token_requests`](crate::Counters::overlapping_token_requests); every count
    /// raises its [`max_concurrent_token_requests`](crate::Counters::max_concurrent_token_requests).
    ///
    /// The HTTP front end calls this under the same lock as the request's handling, and ends it
    /// when the answer is handed to the connection (or the request is dropped: a hang, a reset, a
    /// client that gave up). Callers of the model alone may bracket requests the same way.
    pub fn begin_token_request(&mut self, grant: &str) -> u64 {
        let n = self.in_flight.entry(grant.to_owned()).or_default();
        *n += 1;
        let n = *n;
        self.counters.bump(grant, |c| {
            if n > 1 {
                c.overlapping_token_requests += 1;
            }
            c.max_concurrent_token_requests = c.max_concurrent_token_requests.max(n);
        });
        n
    }

    /// Ends one [`begin_token_request`](Self::begin_token_request) of `grant`.
    pub fn end_token_request(&mut self, grant: &str) {
        if let Some(n) = self.in_flight.get_mut(grant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(grant);
            }
        }
    }

    /// Token requests to `grant` being handled now.
    pub fn token_requests_in_flight(&self, grant: &str) -> u64 {
        self.in_flight.get(grant).copied().unwrap_or(0)
    }

    /// A fresh unique `x-request-id`.
    pub fn next_request_id(&mut self) -> String {
        self.requests += 1;
        format!("sim-{:08x}-{:010}", self.seed as u32, self.requests)
    }
}

#[cfg(test)]
mod tests;
