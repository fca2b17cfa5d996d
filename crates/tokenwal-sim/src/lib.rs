//! A faithful, fault-injecting simulator of Shopify's OAuth token endpoint (refresh, token
//! exchange, migration of non-expiring tokens) and of enough of the Admin API to tell a valid
//! access token from a dead one; and a Customer Account API mode (per-customer grants of a public
//! client, see below).
//!
//! Behaviour follows `shared/docs/shopify-token-protocol.md`; every point that document marks
//! UNCONFIRMED is a switch in [`ModelConfig`], never a baked-in guess.
//!
//! # Layout
//!
//! * [`model`]: the deterministic core. No IO, no clock (`now` is a parameter), seeded RNG.
//!   Apps, grants, rotation policies, token exchange and migration, the Admin API check,
//!   counters, and fault selection. Returns a [`Delivery`] the front end realises.
//! * [`faults`]: the fault vocabulary, per-shop scripts and seeded random draws.
//! * [`jwt`]: App Bridge session tokens (HS256) — minting for tests, validation for the model.
//! * [`request`] / [`reply`] / [`token`]: request parsing (JSON and form), answers, token types.
//! * [`http`]: axum routes over a hand-driven hyper accept loop that can hang or reset a
//!   connection; [`serve`] returns a [`SimHandle`].
//! * `control`: the `/_sim/` JSON control API (documented in the `control` module source).
//! * `shared` (the model, clock, holds and shutdown signal both front ends use) and `hold`
//!   (holding a shop's next token answer until a test releases it: [`SimHandle::hold`]) are
//!   leaves: `http` and `control` depend on them, not on each other.
//! * [`config`]: [`SimConfig`], a `clap::Args` for the command line.
//!
//! # Customer Account API mode
//!
//! Beside the Admin API's `/admin/oauth/access_token`, the same server answers
//! `POST /authentication/{shop_id}/oauth/token` (the path of tokenwal's `shopify-customer-account`
//! profile; [`SimHandle::customer_token_url_template`] is that profile's `token_url`): per-customer
//! grants keyed by shop id + customer id, seeded by [`SimHandle::seed_customer`] (as the app's PKCE
//! code exchange would) or `POST /_sim/customers`; a public client (`client_id` only —
//! `--public-client-id`, default `sim-public-client-id`; a request with a secret or an
//! `Authorization` header, or a wrong `client_id`, gets 401 `invalid_client`); a dead or reused
//! refresh token gets 400 `invalid_grant` (or 401 `invalid_token`, a switch) with a JSON body; strict
//! single use by default (`--customer-policy`); the same faults. A customer's grant is named
//! `{shop_id}:{customer_id}` ([`model::customer_grant`]) wherever the simulator names a shop:
//! scripted faults, counters, holds, [`SimHandle::shop_state`], `/_sim/shops/{shop}/…`. Details in
//! the `model::customer` module source.
//!
//! # Overlapping token requests
//!
//! Every token request is counted *in flight* for its grant (the shop for the Admin API, the
//! customer for the Customer Account API: [`TokenReply::grant`]) from its arrival until its answer
//! is handed to the connection (or the connection is dropped: a hang, a reset, a client that gave
//! up). A request that arrives while another request for the same grant is in flight is an
//! *overlap*: two refreshers racing one grant. Per grant and in total, [`Counters`] reports
//!
//! * `overlapping_token_requests`: how many requests arrived while another for the same grant was
//!   in flight (the total is the sum over grants, so requests to two different grants never count);
//! * `max_concurrent_token_requests`: the most requests for one grant in flight at once (the total
//!   is the maximum over grants).
//!
//! Read them with [`SimHandle::counters`] (`counters.total.overlapping_token_requests`,
//! `counters.shop(grant)`, [`CounterSet::overlapping_grants`]) or, from another process,
//! `GET /_sim/counters` (`{"total":{"overlapping_token_requests":N,"max_concurrent_token_requests":M,…},
//! "shops":{"<grant>":{…}}}`); `POST /_sim/counters/reset` zeroes them (requests in flight stay in
//! flight). [`Model::begin_token_request`] / [`Model::end_token_request`] are the same bracket for
//! callers of the model alone. A hung answer stays in flight until the simulator's hang cap or the
//! client's disconnect, so a client's retry after its own timeout may count as an overlap.
//!
//! # Example
//!
//! A refresh whose answer is lost after the server committed the rotation, and the retry that
//! recovers it:
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use tokenwal_sim::{serve, Fault, SimConfig, TokenSet};
//!
//! let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
//! let shop = "demo.myshopify.com";
//! let first = sim.seed_shop(shop); // as if by token exchange
//! sim.push_faults(shop, [Fault::RotateThenDrop]).unwrap();
//!
//! let http = reqwest::Client::builder().no_proxy().build().unwrap();
//! let body = serde_json::json!({
//!     "client_id": "sim-client-id",
//!     "client_secret": "sim-client-secret",
//!     "grant_type": "refresh_token",
//!     "refresh_token": first.refresh_token.as_str(),
//! });
//! let lost = http.post(sim.token_url(shop)).json(&body).send().await.unwrap();
//! assert_eq!(lost.status().as_u16(), 520); // "error code: 520", text/plain
//!
//! // The same refresh token still works: the committed pair comes back.
//! let retry: TokenSet = http.post(sim.token_url(shop)).json(&body).send().await.unwrap()
//!     .json().await.unwrap();
//! let committed = sim.shop_state(shop).refresh_token(first.refresh_token.as_str()).unwrap()
//!     .replacement.clone().unwrap();
//! assert_eq!(retry.refresh_token, committed);
//!
//! // 31 days later the old token is out of retention, but the new one is unused: recoverable.
//! sim.advance_clock(31 * 86_400_000);
//! assert!(sim.grant_alive(shop));
//! sim.shutdown().await;
//! # });
//! ```
#![deny(missing_docs)]

pub mod config;
mod control;
pub mod counters;
pub mod duration;
pub mod faults;
mod hold;
pub mod http;
pub mod jwt;
pub mod model;
pub mod reply;
pub mod request;
mod shared;
pub mod token;

pub use config::SimConfig;
pub use counters::{CounterSet, Counters};
pub use duration::SimDuration;
pub use faults::{Fault, FaultKind, FaultProbabilities, RandomFaults};
pub use hold::HoldStatus;
pub use http::{serve, serve_model, SimClock, SimHandle, REQUEST_ID_HEADER};
pub use jwt::{mint_session_token, validate_session_token, SessionTokenError};
pub use model::{
    customer_grant, AccessTokenView, AdminApi, CustomerAccountConfig, CustomerRejectionStyle, GrantView,
    LegacyTokenView, MigrationErrorStyle, Model, ModelConfig, ModelError, RefreshTokenView, RejectionStyle,
    RetryReturns, RotationPolicy, ShopState, TokenStatus,
};
pub use reply::{AdminReply, Delivery, HttpReply, IssueKind, OAuthError, TokenOutcome, TokenReply};
pub use request::TokenParams;
pub use token::{ClientSecret, NonExpiringToken, SimToken, TokenSet};
