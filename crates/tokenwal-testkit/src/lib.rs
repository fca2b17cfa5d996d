//! Test support shared by tokenwal's suites, so that they stop copying it between them.
//!
//! # Layout
//!
//! * the crate root: the simulator's default app ([`CLIENT_ID`], [`SECRET`]), shop names,
//!   a simulator on loopback ([`sim`]), an engine configuration pointed at it
//!   ([`engine_config`]), an engine on a temporary on-disk store ([`temp_engine`]), tokens
//!   seeded in the simulator as tokenwal sees them ([`seed`]), and inspection helpers.
//! * [`backend`]: a fresh durable store of either backend ([`TestStore`]: sled directory or
//!   PostgreSQL scratch schema) and [`on_both_backends!`], which runs one test on both.
//! * [`cli`]: runs the `tokenwal` binary with a clean environment and the test store key.
//! * [`broker`]: a `tokenwal serve` process and an HTTP/1.1 client over its Unix socket.
//! * [`oidc`]: the real OAuth 2.0 server (node, `oidc-provider`) of the oidc suites.
//!
//! Nothing here is for production: the store key is the fixed public test key.
//!
//! ```no_run
//! # async fn t() {
//! use tokenwal_testkit::{engine_config, seed, shop, sim, SECRET};
//! let sim = sim().await;
//! let config = engine_config(&sim.base_url(), tokenwal::StoreLocation::InMemory, SECRET);
//! let (engine, _) = tokenwal::Engine::open(config).await.unwrap();
//! engine.install(&shop("demo"), seed(&sim, "demo")).await.unwrap();
//! # }
//! ```
#![deny(missing_docs)]

pub mod backend;
pub mod broker;
pub mod cli;
pub mod oidc;

pub use backend::{Backend, TestStore};

use std::time::Duration;

use tokenwal::core::{
    AccessToken, ClientSecret, Event, GrantKey, GrantState, Record, RefreshToken, ShopDomain, TokenSet, UnixMillis,
};
use tokenwal::{Config, Engine, StoreLocation};
use tokenwal_sim::{serve, SimConfig, SimHandle};

/// The simulator's default app's client id.
pub const CLIENT_ID: &str = "sim-client-id";
/// The simulator's default app's client secret.
pub const SECRET: &str = "sim-client-secret";

/// `{name}.myshopify.com`.
pub fn shop(name: &str) -> ShopDomain {
    ShopDomain::parse(&format!("{name}.myshopify.com")).unwrap()
}

/// Wall-clock now.
pub fn now() -> UnixMillis {
    UnixMillis::from_system_time(std::time::SystemTime::now())
}

/// A simulator with the default configuration on a free loopback port.
pub async fn sim() -> SimHandle {
    sim_with(SimConfig::default()).await
}

/// A simulator with `config` on a free loopback port.
pub async fn sim_with(config: SimConfig) -> SimHandle {
    serve(config, "127.0.0.1:0".parse().unwrap()).await.unwrap()
}

/// An engine configuration for tests against the simulator at `base`: the default app's client id
/// with `secret`, the fixed test store key, no proactive refresh, short timeouts and backoff.
pub fn engine_config(base: &str, store: StoreLocation, secret: &str) -> Config {
    let mut c = Config::shopify(store, CLIENT_ID, ClientSecret::new(secret))
        .with_insecure_test_endpoint(url::Url::parse(base).unwrap())
        .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
    c.proactive = false;
    c.max_wait = Duration::from_secs(10);
    c.timeouts.connect = Duration::from_secs(2);
    c.timeouts.total = Duration::from_secs(3);
    c.policy.backoff.base = Duration::from_millis(40);
    c.policy.backoff.cap = Duration::from_millis(400);
    c
}

/// An engine on a fresh on-disk store in a temporary directory (kept alive by the returned
/// guard), configured by [`engine_config`] for `sim`.
pub async fn temp_engine(sim: &SimHandle) -> (Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = engine_config(&sim.base_url(), StoreLocation::Path(dir.path().join("db")), SECRET);
    let (engine, _) = Engine::open(config).await.unwrap();
    (engine, dir)
}

/// Seeds `name` in the simulator and returns its tokens as tokenwal sees them, with the access
/// token already expired (so the next `access_token` must refresh).
pub fn seed(sim: &SimHandle, name: &str) -> TokenSet {
    let t = sim.seed_shop(&shop(name).to_string());
    TokenSet {
        access_token: AccessToken::new(t.access_token.as_str()),
        access_expires_at: now(),
        refresh_token: RefreshToken::new(t.refresh_token.as_str()),
        refresh_expires_at: Some(now().saturating_add(Duration::from_secs(t.refresh_token_expires_in))),
        scope: Some(t.scope.clone()),
    }
}

/// Whether the simulator's Admin API accepts `token` for `name` now.
pub fn accepted(sim: &SimHandle, name: &str, token: &AccessToken) -> bool {
    let now = sim.now_ms();
    sim.with_model(|m| m.access_token_valid(&shop(name).to_string(), token.expose_secret(), now))
}

/// The journal records of `name`'s grant, oldest first.
pub fn history(engine: &Engine, name: &str) -> Vec<Record> {
    engine.store().history(&GrantKey::shopify(&shop(name))).unwrap().into_iter().map(|(_, r)| r).collect()
}

/// The durable state of `name`'s grant.
pub fn state(engine: &Engine, name: &str) -> Option<GrantState> {
    engine.state(&GrantKey::shopify(&shop(name))).unwrap()
}

/// Token requests the simulator received for `name`.
pub fn requests(sim: &SimHandle, name: &str) -> u64 {
    sim.counters().shop(&shop(name).to_string()).token_requests
}

/// The events received so far, without waiting.
pub fn drain(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        out.push(e);
    }
    out
}

/// A simulator on its own runtime, for synchronous tests (the CLI suites drive real processes
/// from plain `#[test]`s). Dropping it shuts the simulator down.
pub struct BlockingSim {
    rt: tokio::runtime::Runtime,
    handle: Option<SimHandle>,
}

impl BlockingSim {
    /// The default configuration, one worker thread.
    pub fn start() -> BlockingSim {
        BlockingSim::start_with(SimConfig::default(), 1)
    }

    /// `config`, on a runtime with `workers` worker threads.
    pub fn start_with(config: SimConfig, workers: usize) -> BlockingSim {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap();
        let handle = rt.block_on(sim_with(config));
        BlockingSim { rt, handle: Some(handle) }
    }

    /// The simulator.
    pub fn h(&self) -> &SimHandle {
        self.handle.as_ref().unwrap()
    }

    /// The simulator's runtime (to `block_on` its async helpers).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }
}

impl Drop for BlockingSim {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.rt.block_on(h.shutdown());
        }
    }
}
