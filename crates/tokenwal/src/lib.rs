//! # tokenwal
//!
//! Crash-safe rotating OAuth refresh tokens for long-running async workers, for Shopify's expiring
//! offline tokens first. Every token request first writes an intent to a journal and syncs it, then
//! sends, then durably commits the result before anyone may use it; recovery at startup resolves
//! every ambiguous rotation by retrying the old token, and only truly dead grants are sent to
//! re-acquisition.
//!
//! ## Layout
//!
//! * [`Engine`] — the handle an app embeds: [`Engine::open`] (runs recovery, within
//!   [`Config::recovery_budget`]; the rest goes on in the background: [`Engine::recovering`]), [`Engine::access_token`],
//!   [`Engine::install`], [`Engine::on_unauthorized`], [`Engine::uninstalled`], events.
//! * Re-acquisition: [`Engine::exchange_session_token`] (token exchange of an App Bridge session
//!   token: the way back for a dead grant) and [`Engine::migrate`] (legacy non-expiring token →
//!   expiring pair), both journaled like refreshes; [`Engine::scopes_updated`].
//! * [`webhook`] — [`webhook::verify_shopify_hmac`] for apps forwarding webhooks.
//! * [`config`] — [`Config`], endpoints (Shopify, a loopback test server, generic OAuth 2.0), timeouts.
//! * `transport` — sends a [`tokenwal_core::protocol::Request`] (built by the wire format in
//!   `tokenwal-core`) with the reqwest client; the body size cap and the "sent or not" mapping of
//!   its errors.
//! * [`Driver`] — the one place that carries a goal (refresh, recover, exchange, migrate, install,
//!   uninstall, …) for a grant through the machine, the store and the network, retrying on version
//!   conflicts; the engine's attempts run in tasks it owns (`serve`, `inner`), so a caller that goes
//!   away never strands a grant mid-attempt. [`Offline`] drives the write-only goals for tools.
//! * `scheduler` — the proactive refresher (`schedule` is its handle).
//! * `cache` — the sharded, lock-free-read token cache.
//! * [`webhook_sink`] — the optional webhook sink (needs-reauth, recovered, app-credentials-rejected),
//!   at least once across restarts, driven by a durable journal cursor.
//!
//! The rules live in `tokenwal-core` (pure) and the disk in `tokenwal-store`; the durability contract is
//! `docs/journal.md`.
//!
//! ## Example
//!
//! ```no_run
//! use tokenwal::{Config, Engine, StoreLocation};
//! use tokenwal_core::{ClientSecret, ShopDomain};
//!
//! # async fn run() -> Result<(), tokenwal::Error> {
//! // The store is sealed under the key in TOKENWAL_STORE_KEY or the key file named by
//! // TOKENWAL_STORE_KEY_FILE (`tokenwal keygen FILE`); see docs/security.md.
//! let config = Config::shopify(
//!     StoreLocation::Path("/var/lib/my-app/tokenwal".into()),
//!     std::env::var("SHOPIFY_API_KEY").unwrap(),
//!     ClientSecret::new(std::env::var("SHOPIFY_API_SECRET").unwrap()),
//! );
//! let (engine, report) = Engine::open(config).await?;
//! println!("recovered {} ambiguous rotations", report.resolved);
//! let shop = ShopDomain::parse("my-shop.myshopify.com")?;
//! let token = engine.access_token(&shop).await?;
//! // use token.expose_secret() in the X-Shopify-Access-Token header
//! # let _ = token; Ok(()) }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod acquire;
mod cache;
mod clock;
mod compactor;
pub mod config;
mod driver;
mod engine;
mod error;
pub mod failpoint;
mod health;
mod inner;
pub mod metrics;
mod net;
mod recover;
mod schedule;
mod scheduler;
mod serve;
mod session;
mod transport;
pub mod webhook;
pub mod webhook_sink;

pub use acquire::{AcquireError, ExchangeError, MigrateError, MigrateOutcome, MigrationState};
pub use config::{check_profile, ClientAuth, Compaction, Config, Endpoint, StoreLocation, Timeouts};
pub use driver::{Driven, Driver, Io, Offline};
pub use engine::{Engine, RecoveryReport};
pub use error::Error;
pub use health::Health;
pub use metrics::Metrics;
/// The metrics crate the engine registers into ([`Metrics::register`]), re-exported so a caller's
/// registry is of the same version.
pub use prometheus_client;
pub use session::{SessionTokenProblem, SESSION_TOKEN_LEEWAY};
pub use tokenwal_core as core;
pub use tokenwal_store as store;
pub use tokenwal_store::{KeyRing, KeySource};
pub use webhook_sink::WebhookConfig;
