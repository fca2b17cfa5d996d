//! A faithful, fault-injecting simulator of Shopify's OAuth token endpoint (refresh, token
//! exchange, migration of non-expiring tokens) and of enough of the Admin API to tell a valid
//! access token from a dead one.
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
    AccessTokenView, AdminApi, GrantView, LegacyTokenView, MigrationErrorStyle, Model, ModelConfig, ModelError,
    RefreshTokenView, RejectionStyle, RetryReturns, RotationPolicy, ShopState, TokenStatus,
};
pub use reply::{AdminReply, Delivery, HttpReply, IssueKind, OAuthError, TokenOutcome, TokenReply};
pub use request::TokenParams;
pub use token::{ClientSecret, NonExpiringToken, SimToken, TokenSet};
