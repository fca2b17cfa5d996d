//! `tokenwal serve`: the engine as a local token broker for apps in any language.
//!
//! HTTP/1.1 over a Unix socket (mode 0600; the default) or loopback TCP; every request carries the
//! broker's bearer token. The API (v1) is described by `docs/broker-openapi.json` and explained in
//! `docs/broker.md`.
//!
//! # Lifecycle
//!
//! 1. The bearer token, the credentials and the store key are checked (exit 78 without them) and the
//!    listener is bound; `listening on unix:/path` (or `tcp:ADDR`) goes to stderr.
//! 2. The engine opens in the background: while recovery runs (or a PostgreSQL store that cannot be
//!    reached yet is retried, as `run` does), token calls and `/readyz` answer 503 `recovering` (with
//!    `Retry-After`).
//! 3. Then it serves, with the proactive scheduler and the sweep of `tokenwal run`.
//! 4. SIGINT/SIGTERM: stop accepting, let requests and refreshes in flight finish within the grace
//!    period, exit 0. A store that fail-stops ends the process with 74, as `run` does.
//!
//! # Layout
//!
//! * `listen` — `--listen`: the Unix socket (0600, stale file replaced, live one refused) or loopback TCP.
//! * `auth` — the bearer token: loaded once, compared in constant time.
//! * `routes` — the API, its bodies, and the mapping of every engine error to a status.
//! * `metrics` — the broker's Prometheus metrics.

mod auth;
mod listen;
mod metrics;
mod routes;

pub use listen::Listen;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use tokenwal::core::{AccessToken, GrantKey, ShopDomain, UnixMillis};
use tokenwal::Engine;
use tracing::{info, warn};

use crate::commands::{fail_stop_at_open, keep_running, open_retrying, report_line, shutdown_signal, wind_down};
use crate::error::CliError;
use crate::settings::Settings;

/// `tokenwal serve`'s options (the rest come from [`Settings`]).
pub struct ServeOptions {
    /// `--listen`; `None`: [`Listen::default_for`] the store.
    pub listen: Option<Listen>,
    /// `--token-file`; `None`: `TOKENWAL_BROKER_TOKEN`.
    pub token_file: Option<PathBuf>,
    /// The sweep period (as `run`).
    pub sweep: Duration,
    /// The grace period at shutdown (as `run`).
    pub grace: Duration,
}

/// What the token answer needs beyond the engine's access token: its expiry, and the answer's body
/// rendered once around its only part that changes with time (`expires_in`), so that a cached call
/// does no JSON work. Immutable: a new token (a refresh, a rotation after a 401 report, an install)
/// is a new `Details`, and [`Broker::details`] hands one out only for the token the engine just
/// answered with, so a body can never carry a superseded token.
struct Details {
    token: AccessToken,
    expires_at: UnixMillis,
    /// `{"shop":…,"access_token":…,"expires_at":…,"expires_in":`
    head: Box<[u8]>,
    /// `,"scope":…}`
    tail: Box<[u8]>,
}

/// The rendered answer holds the token: wiped when the entry goes (as `AccessToken` zeroizes itself).
impl Drop for Details {
    fn drop(&mut self) {
        self.head.fill(0);
        std::hint::black_box(&self.head);
    }
}

impl Details {
    fn new(shop: &ShopDomain, token: AccessToken, expires_at: UnixMillis, scope: Option<&str>) -> Details {
        let (head, tail) = routes::token_body_parts(shop, &token, expires_at, scope);
        Details { token, expires_at, head, tail }
    }

    /// The token answer's body with `expires_in` seconds left: exactly what serialising
    /// `{shop, access_token, expires_at, expires_in, scope}` with serde_json gives (a unit test in
    /// `routes` compares them). One allocation of the exact size.
    fn body(&self, expires_in: u64) -> Vec<u8> {
        let digits = expires_in.checked_ilog10().map_or(1, |d| d as usize + 1);
        let mut out = Vec::with_capacity(self.head.len() + digits + self.tail.len());
        out.extend_from_slice(&self.head);
        // serde_json writes the number as it would inside the object (writing to a Vec cannot fail).
        let _ = serde_json::to_writer(&mut out, &expires_in);
        out.extend_from_slice(&self.tail);
        out
    }
}

/// The state the handlers share.
pub struct Broker {
    /// Set once recovery is done.
    engine: OnceLock<Engine>,
    /// Set once shutdown began.
    stopping: AtomicBool,
    bearer: auth::Bearer,
    app_handle: Option<String>,
    /// The engine's refresh margin: no token with less life left is handed out.
    margin: Duration,
    metrics: metrics::Metrics,
    /// The expiry and scope of the newest token seen per shop, so that a cached token's answer does
    /// no I/O. Read from the durable state when the engine hands out a token not seen yet.
    details: RwLock<HashMap<String, Arc<Details>>>,
}

impl Broker {
    fn new(bearer: auth::Bearer, app_handle: Option<String>, margin: Duration) -> Broker {
        Broker {
            engine: OnceLock::new(),
            stopping: AtomicBool::new(false),
            bearer,
            app_handle,
            margin,
            metrics: metrics::Metrics::new(),
            details: RwLock::new(HashMap::new()),
        }
    }

    /// The details of `token` if it is the one last seen for `shop`.
    fn details(&self, shop: &ShopDomain, token: &AccessToken) -> Option<Arc<Details>> {
        let map = self.details.read().unwrap_or_else(|p| p.into_inner());
        map.get(shop.as_str()).filter(|d| d.token == *token).cloned()
    }

    /// Reads `token`'s details from the durable state (one store read per new token).
    fn load_details(
        &self,
        engine: &Engine,
        shop: &ShopDomain,
        token: &AccessToken,
    ) -> Result<Arc<Details>, routes::ApiError> {
        let state = engine.state(&GrantKey::shopify(shop)).map_err(|e| self.engine_error(e))?;
        // The engine handed `token` out from this state or an older one: a newer durable pair (a
        // refresh committed in between) is served instead, it is at least as fresh.
        let tokens = state
            .and_then(|s| s.tokens)
            .ok_or_else(|| self.engine_error(tokenwal::Error::NotInstalled { grant: GrantKey::shopify(shop) }))?;
        if tokens.access_token != *token {
            info!(shop = %shop, "a newer token was committed while answering: serving it");
        }
        let d = Arc::new(Details::new(
            shop,
            tokens.access_token.clone(),
            tokens.access_expires_at,
            tokens.scope.as_deref(),
        ));
        self.details.write().unwrap_or_else(|p| p.into_inner()).insert(shop.as_str().to_owned(), Arc::clone(&d));
        Ok(d)
    }
}

/// `tokenwal serve`.
pub async fn serve(settings: &Settings, o: ServeOptions) -> Result<(), CliError> {
    let bearer = auth::Bearer::load(o.token_file.as_deref())?;
    // Credentials and store key before binding: a misconfigured broker must not look alive.
    let margin = settings.engine_config(true)?.refresh_margin;
    let listen = match (o.listen, settings.postgres()) {
        (Some(l), _) => l,
        (None, None) => Listen::default_for(&settings.db),
        (None, Some(_)) => match std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from) {
            Some(dir) if dir.is_absolute() => Listen::Unix(dir.join("tokenwal.sock")),
            _ => {
                return Err(CliError::Usage(
                    "with a PostgreSQL store there is no data directory to put the socket beside: pass --listen \
                     unix:/path/to/tokenwal.sock (or set XDG_RUNTIME_DIR)"
                        .into(),
                ))
            }
        },
    };
    listen.check()?;
    let broker = Arc::new(Broker::new(bearer, settings.app_handle().map(str::to_owned), margin));
    let bound = listen.bind()?;
    let shown = bound.describe();
    let app = routes::router(Arc::clone(&broker));
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let graceful = async move {
        let mut rx = http_stopped;
        let _ = rx.wait_for(|s| *s).await;
    };
    let (server, _socket_file) = match bound {
        listen::Bound::Unix(l, file) => {
            (tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(graceful).await }), Some(file))
        }
        listen::Bound::Tcp(l, _) => {
            (tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(graceful).await }), None)
        }
    };
    eprintln!("listening on {shown}");
    info!(listen = %shown, "broker listening; opening the store (recovery runs first)");

    let stop = shutdown_signal();
    tokio::pin!(stop);
    let opened = tokio::select! {
        opened = open_retrying(settings, true) => opened.map_err(fail_stop_at_open),
        _ = &mut stop => {
            warn!("stopped during recovery: what it had not finished stays journaled for the next start");
            let _ = stop_http.send(true);
            let _ = tokio::time::timeout(o.grace, server).await;
            return Ok(());
        }
    };
    let (engine, report) = opened?;
    info!(store = %settings.db_display(), "{}", report_line(&report));
    broker.metrics.register_with(|r| engine.metrics().register(r));
    let _ = broker.engine.set(engine.clone());
    broker.metrics.set_ready(true);
    let failed = engine.fail_stopped();
    tokio::pin!(failed);
    let result = keep_running(&engine, stop.as_mut(), failed.as_mut(), o.sweep).await;
    broker.metrics.set_ready(false);
    broker.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    // Exit 74 at once on a fail-stop (the supervisor restarts the broker; recovery runs at open).
    result?;
    let _ = stop_http.send(true);
    wind_down(&engine, o.grace).await;
    match tokio::time::timeout(o.grace.max(Duration::from_secs(1)), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "the HTTP server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "the HTTP server task failed"),
        Err(_) => warn!("connections still open after the grace period: closed"),
    }
    drop(engine);
    Ok(())
}
