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
//! * [`config`]: [`SimConfig`], a `clap::Args` for the command line.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use tokenwal_sim::{serve, Fault, SimConfig};
//!
//! let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
//! let shop = "demo.myshopify.com";
//! let tokens = sim.seed_shop(shop);
//! sim.push_faults(shop, [Fault::RotateThenDrop]).unwrap();
//! // POST sim.token_url(shop) with grant_type=refresh_token and tokens.refresh_token:
//! // the rotation commits, the client sees 520 "error code: 520".
//! sim.advance_clock(31 * 24 * 3_600_000);
//! assert!(!sim.grant_alive(shop) || tokens.refresh_token_expires_in > 31 * 86_400);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod config;
mod control;
pub mod counters;
pub mod duration;
pub mod faults;
pub mod http;
pub mod jwt;
pub mod model;
pub mod reply;
pub mod request;
pub mod token;

pub use config::SimConfig;
pub use counters::{CounterSet, Counters};
pub use duration::SimDuration;
pub use faults::{Fault, FaultKind, FaultProbabilities, RandomFaults};
pub use http::{serve, serve_model, SimClock, SimHandle, REQUEST_ID_HEADER};
pub use jwt::{mint_session_token, validate_session_token, SessionTokenError};
pub use model::{
    AccessTokenView, AdminApi, GrantView, LegacyTokenView, MigrationErrorStyle, Model, ModelConfig, ModelError,
    RefreshTokenView, RejectionStyle, RetryReturns, RotationPolicy, ShopState, TokenStatus,
};
pub use reply::{AdminReply, Delivery, HttpReply, IssueKind, OAuthError, TokenOutcome, TokenReply};
pub use request::TokenParams;
pub use token::{ClientSecret, NonExpiringToken, SimToken, TokenSet};
