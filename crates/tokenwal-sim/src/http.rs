//! The HTTP front end: axum routes over a hand-driven hyper accept loop.
//!
//! The accept loop is hand-written (rather than `axum::serve`) so that a handler can abort its
//! own connection: [`Delivery::Reset`] must close the socket with no HTTP response at all, and
//! [`Delivery::Hang`] must hold it and then reset. Each connection gets a `ConnControl` in its
//! request extensions; asking it to reset makes the connection task set `SO_LINGER` to zero
//! (so the close is an RST) and drop the connection.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::SimConfig;
use crate::counters::CounterSet;
use crate::faults::{Fault, FaultConfigError};
use crate::hold::{HoldStatus, Verdict};
use crate::model::{AdminApi, Model, ShopState};
use crate::reply::{Delivery, HttpReply, TokenReply};
pub use crate::shared::SimClock;
use crate::shared::{wait_shutdown, Shared};
use crate::token::TokenSet;

/// How long graceful shutdown waits for open connections before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Header carrying the request id on every token and Admin API answer.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Per-connection handle that lets a handler reset its own connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnControl(Arc<Notify>);

impl ConnControl {
    fn request_reset(&self) {
        // `notify_one` stores a permit if the connection task is not waiting yet.
        self.0.notify_one();
    }

    async fn reset_requested(&self) {
        self.0.notified().await;
    }
}

/// A running simulator. Dropping it stops the server (without waiting); prefer
/// [`SimHandle::shutdown`] in async code.
///
/// The HTTP routes lowercase shop domains, and so do this handle's helpers; calls made
/// directly on the [`Model`] through [`SimHandle::with_model`] compare shops exactly.
/// Helpers that need an app ([`seed_shop`](Self::seed_shop),
/// [`session_token`](Self::session_token)) use the default app and panic if the model has
/// none (only possible with [`serve_model`]).
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Builds the model from `config` and serves it on `addr` (port 0 picks a free port).
pub async fn serve(config: SimConfig, addr: SocketAddr) -> io::Result<SimHandle> {
    let model = config.build_model().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    serve_model(model, config.hang_cap.to_std(), addr).await
}

/// Serves an already-built model on `addr`. `hang_cap` bounds how long a hung answer holds
/// its connection.
pub async fn serve_model(model: Model, hang_cap: Duration, addr: SocketAddr) -> io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        model: Mutex::new(model),
        clock: SimClock::default(),
        holds: Default::default(),
        hang_cap,
        shutdown: shutdown_rx.clone(),
    });
    let router = router(shared.clone());
    let task = tokio::spawn(accept_loop(listener, router, shutdown_rx));
    tracing::info!(%addr, "token endpoint simulator listening");
    Ok(SimHandle { addr, shared, shutdown_tx: Some(shutdown_tx), task: Some(task) })
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://{addr}/shops/{shop}`: a per-shop base URL for clients that cannot set `Host`.
    /// Append `/admin/oauth/access_token` or `/admin/api/{version}/shop.json`.
    pub fn shop_base_url(&self, shop: &str) -> String {
        format!("http://{}/shops/{shop}", self.addr)
    }

    /// The token endpoint URL for `shop` (path-based shop resolution).
    pub fn token_url(&self, shop: &str) -> String {
        format!("{}/admin/oauth/access_token", self.shop_base_url(shop))
    }

    /// The Customer Account API's token URL template, `http://{addr}/authentication/{shop_id}/oauth/token`
    /// with `{shop_id}` left in: the `token_url` of a `shopify-customer-account` profile pointed at
    /// this simulator.
    pub fn customer_token_url_template(&self) -> String {
        format!("http://{}/authentication/{{shop_id}}/oauth/token", self.addr)
    }

    /// The Customer Account API's GraphQL URL of shop `shop_id` (answers 200 for a live customer
    /// access token in `Authorization`, else 401).
    pub fn customer_api_url(&self, shop_id: u64) -> String {
        format!("http://{}/{shop_id}/account/customer/api/2026-01/graphql", self.addr)
    }

    /// Seeds the grant of customer `customer_id` of shop `shop_id` with the default public client
    /// (as the app's PKCE code exchange would) and returns its tokens.
    pub fn seed_customer(&self, shop_id: u64, customer_id: u64) -> TokenSet {
        let now = self.now_ms();
        self.with_model(|m| m.seed_customer(now, shop_id, customer_id, None))
            .expect("the server always has a default public client")
    }

    /// [`Model::customer_alive`] at the simulator's now: false means the customer must log in again.
    pub fn customer_alive(&self, shop_id: u64, customer_id: u64) -> bool {
        let now = self.now_ms();
        self.with_model(|m| m.customer_alive(shop_id, customer_id, now))
    }

    /// The simulator's clock.
    pub fn clock(&self) -> &SimClock {
        &self.shared.clock
    }

    /// The simulator's current time, unix ms.
    pub fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// Moves the simulator's clock forward by `ms`.
    pub fn advance_clock(&self, ms: u64) {
        self.shared.clock.advance(ms.min(i64::MAX as u64) as i64);
    }

    /// Runs `f` with the model locked. Do not block inside.
    pub fn with_model<R>(&self, f: impl FnOnce(&mut Model) -> R) -> R {
        f(&mut self.shared.model())
    }

    /// Seeds a grant of the default app on `shop` (as by token exchange) and returns its tokens.
    pub fn seed_shop(&self, shop: &str) -> TokenSet {
        let now = self.now_ms();
        let shop = shop.to_ascii_lowercase();
        self.with_model(|m| m.seed_grant(now, &shop, None)).expect("the server always has a default app")
    }

    /// Seeds a grant of the default app on `shop` whose current pair is `access` / `refresh` (given
    /// strings, not minted ones; see [`Model::seed_grant_with_tokens`]) and returns its tokens. For
    /// tests whose client already holds tokens, e.g. a fixture store. Panics if either string is
    /// already in use.
    pub fn seed_shop_with_tokens(&self, shop: &str, access: &str, refresh: &str) -> TokenSet {
        let now = self.now_ms();
        let shop = shop.to_ascii_lowercase();
        self.with_model(|m| m.seed_grant_with_tokens(now, &shop, None, access, refresh))
            .expect("the server always has a default app, and the tokens are new")
    }

    /// A session token for `shop` signed by the default app, valid for a minute from the
    /// simulator's now.
    pub fn session_token(&self, shop: &str) -> String {
        let now = self.now_ms();
        let shop = shop.to_ascii_lowercase();
        self.with_model(|m| m.session_token(now, &shop, None, 60_000)).expect("the server always has a default app")
    }

    /// Queues scripted faults for `shop`.
    pub fn push_faults(&self, shop: &str, faults: impl IntoIterator<Item = Fault>) -> Result<(), FaultConfigError> {
        let shop = shop.to_ascii_lowercase();
        self.with_model(|m| m.push_faults(&shop, faults))
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> CounterSet {
        self.with_model(|m| m.counters().clone())
    }

    /// Everything known about `shop` now.
    pub fn shop_state(&self, shop: &str) -> ShopState {
        let now = self.now_ms();
        let shop = shop.to_ascii_lowercase();
        self.with_model(|m| m.shop_state(&shop, now))
    }

    /// [`Model::grant_alive`] at the simulator's now.
    pub fn grant_alive(&self, shop: &str) -> bool {
        let now = self.now_ms();
        let shop = shop.to_ascii_lowercase();
        self.with_model(|m| m.grant_alive(&shop, now))
    }

    /// Holds `shop`'s next token request: the model processes it when it arrives (a rotation
    /// is committed), and its answer waits for [`release`](Self::release) or
    /// [`cancel`](Self::cancel). Idempotent while unused; one hold holds one request.
    pub fn hold(&self, shop: &str) -> HoldStatus {
        self.shared.holds.arm(&shop.to_ascii_lowercase())
    }

    /// Waits until a token request to `shop` is held, at most `timeout`; returns whether one
    /// is. A `true` means the request was received and processed, and its answer is unsent.
    pub async fn wait_held(&self, shop: &str, timeout: Duration) -> bool {
        self.shared.holds.wait_held(&shop.to_ascii_lowercase(), timeout).await
    }

    /// Sends the oldest held answer to `shop` as the model (and any scripted fault) decided.
    /// Returns whether one was held.
    pub fn release(&self, shop: &str) -> bool {
        self.shared.holds.release(&shop.to_ascii_lowercase())
    }

    /// Disarms `shop`'s unused hold and resets the connection of every held request to it
    /// (the answer is lost; what the model committed stays). Returns whether anything was
    /// armed or held.
    pub fn cancel(&self, shop: &str) -> bool {
        self.shared.holds.cancel(&shop.to_ascii_lowercase())
    }

    /// Whether `shop` has a hold armed, and how many of its requests are held.
    pub fn hold_status(&self, shop: &str) -> HoldStatus {
        self.shared.holds.status(&shop.to_ascii_lowercase())
    }

    /// Stops accepting, lets open connections finish (hung ones are reset), and waits for
    /// the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    conns.spawn(serve_connection(stream, router.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = wait_shutdown(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        conns.abort_all();
    }
}

async fn serve_connection(stream: TcpStream, router: Router, mut shutdown: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    // A duplicate of the socket, kept to set SO_LINGER=0 when a handler asks for a reset.
    let (stream, linger_handle) = match split_for_reset(stream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "could not prepare connection");
            return;
        }
    };
    let ctl = ConnControl::default();
    let svc = {
        let ctl = ctl.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ctl.clone());
            TowerToHyperService::new(router.clone()).call(req)
        })
    };
    // Boxed so that it can be dropped explicitly, before the duplicate socket.
    let mut conn = Box::pin(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc));
    let reset = tokio::select! {
        _ = conn.as_mut() => false,
        _ = ctl.reset_requested() => true,
        _ = wait_shutdown(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => false,
                _ = ctl.reset_requested() => true,
            }
        }
    };
    if reset {
        if let Err(e) = socket2::SockRef::from(&linger_handle).set_linger(Some(Duration::ZERO)) {
            tracing::warn!(error = %e, "could not arm connection reset");
        }
    }
    // Dropping the connection and then the duplicate closes the socket: an RST when armed.
    drop(conn);
    drop(linger_handle);
}

fn split_for_reset(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let dup = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, dup))
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/admin/oauth/access_token", post(token_by_host))
        .route("/shops/{shop}/admin/oauth/access_token", post(token_by_path))
        .route("/admin/api/{version}/shop.json", get(shop_json_by_host))
        .route("/shops/{shop}/admin/api/{version}/shop.json", get(shop_json_by_path))
        .route("/admin/api/{version}/graphql.json", post(graphql_by_host))
        .route("/authentication/{shop_id}/oauth/token", post(customer_token))
        .route("/{shop_id}/account/customer/api/{version}/graphql", post(customer_api))
        .route("/shops/{shop}/admin/api/{version}/graphql.json", post(graphql_by_path))
        .nest("/_sim", crate::control::router())
        .fallback(not_found)
        .with_state(shared)
}

/// The shop named by the `Host` header, without its port.
pub(crate) fn host_shop(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(HOST)?.to_str().ok()?.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next()?
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

fn missing_host(shared: &Shared) -> Response {
    let id = shared.model().next_request_id();
    let reply =
        HttpReply::json(400, &serde_json::json!({"error":"invalid_request","error_description":"Missing Host header"}));
    to_response(reply, &id)
}

async fn token_by_host(
    State(s): State<Arc<Shared>>,
    ctl: Option<Extension<ConnControl>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match host_shop(&headers) {
        Some(shop) => token(s, ctl.map(|e| e.0), shop, &headers, body).await,
        None => missing_host(&s),
    }
}

async fn token_by_path(
    State(s): State<Arc<Shared>>,
    Path(shop): Path<String>,
    ctl: Option<Extension<ConnControl>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    token(s, ctl.map(|e| e.0), shop.to_ascii_lowercase(), &headers, body).await
}

/// One token request to a grant being handled: counted in by [`Model::begin_token_request`] under
/// the lock that handles it, counted out when dropped — with the answer, or with the handler when a
/// hang, a reset or a client that gave up drops it.
struct InFlight {
    shared: Arc<Shared>,
    grant: String,
}

impl InFlight {
    fn begin(shared: &Arc<Shared>, model: &mut Model, grant: &str) -> InFlight {
        model.begin_token_request(grant);
        InFlight { shared: shared.clone(), grant: grant.to_owned() }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.model().end_token_request(&self.grant);
    }
}

async fn token(s: Arc<Shared>, ctl: Option<ConnControl>, shop: String, headers: &HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let now = s.clock.now_ms();
    let (reply, in_flight) = {
        let mut m = s.model();
        let reply = m.handle_token_request(now, &shop, content_type, &body);
        let in_flight = InFlight::begin(&s, &mut m, &reply.grant);
        (reply, in_flight)
    };
    answer_token(s, ctl, reply, in_flight).await
}

async fn customer_token(
    State(s): State<Arc<Shared>>,
    Path(shop_id): Path<String>,
    ctl: Option<Extension<ConnControl>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let authorization = headers.get(AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let now = s.clock.now_ms();
    let (reply, in_flight) = {
        let mut m = s.model();
        let reply = m.handle_customer_token_request(now, &shop_id, content_type, &body, authorization);
        let in_flight = InFlight::begin(&s, &mut m, &reply.grant);
        (reply, in_flight)
    };
    answer_token(s, ctl.map(|e| e.0), reply, in_flight).await
}

async fn customer_api(
    State(s): State<Arc<Shared>>,
    Path((shop_id, _version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let token = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = s.clock.now_ms();
    let reply = s.model().handle_customer_api(now, &shop_id, token);
    to_response(reply.reply, &reply.request_id)
}

/// Delivers a token answer (after its hold, if the grant has one armed), then counts the request
/// out.
async fn answer_token(s: Arc<Shared>, ctl: Option<ConnControl>, reply: TokenReply, in_flight: InFlight) -> Response {
    let shop = reply.grant.clone();
    tracing::debug!(
        grant = %shop,
        request_id = %reply.request_id,
        fault = ?reply.fault.map(|f| f.kind()),
        "token request"
    );
    let delivery = match s.holds.take(&shop) {
        Some(verdict) => {
            tracing::debug!(grant = %shop, request_id = %reply.request_id, "token answer held");
            let mut shutdown = s.shutdown.clone();
            tokio::select! {
                // A dropped sender (never expected) answers, as a release would.
                v = verdict => if v == Ok(Verdict::Cancel) { Delivery::Reset } else { reply.delivery },
                _ = wait_shutdown(&mut shutdown) => Delivery::Reset,
            }
        }
        None => reply.delivery,
    };
    let response = deliver(&s, ctl, &reply.request_id, delivery).await;
    drop(in_flight);
    response
}

async fn shop_json_by_host(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match host_shop(&headers) {
        Some(shop) => admin(&s, &shop, &headers, AdminApi::RestShop),
        None => missing_host(&s),
    }
}

async fn shop_json_by_path(
    State(s): State<Arc<Shared>>,
    Path((shop, _version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    admin(&s, &shop.to_ascii_lowercase(), &headers, AdminApi::RestShop)
}

async fn graphql_by_host(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match host_shop(&headers) {
        Some(shop) => admin(&s, &shop, &headers, AdminApi::GraphQl),
        None => missing_host(&s),
    }
}

async fn graphql_by_path(
    State(s): State<Arc<Shared>>,
    Path((shop, _version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    admin(&s, &shop.to_ascii_lowercase(), &headers, AdminApi::GraphQl)
}

fn admin(s: &Shared, shop: &str, headers: &HeaderMap, api: AdminApi) -> Response {
    let token = headers.get("x-shopify-access-token").and_then(|v| v.to_str().ok());
    let now = s.clock.now_ms();
    let reply = s.model().handle_admin(now, shop, token, api);
    to_response(reply.reply, &reply.request_id)
}

async fn not_found(State(s): State<Arc<Shared>>) -> Response {
    let id = s.model().next_request_id();
    to_response(HttpReply::json(404, &serde_json::json!({"errors": "Not Found"})), &id)
}

async fn deliver(s: &Shared, ctl: Option<ConnControl>, request_id: &str, delivery: Delivery) -> Response {
    match delivery {
        Delivery::Respond { reply, delay_ms } => {
            if delay_ms > 0 {
                let mut shutdown = s.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
                    _ = wait_shutdown(&mut shutdown) => {}
                }
            }
            to_response(reply, request_id)
        }
        Delivery::Hang => {
            // Held until the client disconnects (hyper then drops this future), the cap
            // passes, or the server shuts down; then the connection is reset.
            let mut shutdown = s.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(s.hang_cap) => {}
                _ = wait_shutdown(&mut shutdown) => {}
            }
            reset(ctl).await
        }
        Delivery::Reset => reset(ctl).await,
    }
}

async fn reset(ctl: Option<ConnControl>) -> Response {
    match ctl {
        Some(ctl) => {
            ctl.request_reset();
            // The connection task drops this future together with the connection.
            std::future::pending().await
        }
        // Only reachable if the router is served by something other than `accept_loop`.
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

pub(crate) fn to_response(reply: HttpReply, request_id: &str) -> Response {
    let mut resp = Response::new(Body::from(reply.body));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID_HEADER, v);
    }
    for (name, value) in reply.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
            h.insert(n, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_str(host).unwrap());
        h
    }

    #[test]
    fn host_header_shop_resolution() {
        assert_eq!(host_shop(&headers("Demo.myshopify.com:8443")).as_deref(), Some("demo.myshopify.com"));
        assert_eq!(host_shop(&headers("demo.myshopify.com")).as_deref(), Some("demo.myshopify.com"));
        assert_eq!(host_shop(&headers("[::1]:80")).as_deref(), Some("::1"));
        assert_eq!(host_shop(&HeaderMap::new()), None);
    }

    #[test]
    fn clock_offsets() {
        let c = SimClock::default();
        let before = c.now_ms();
        c.advance(31 * 86_400_000);
        assert!(c.now_ms() >= before + 31 * 86_400_000);
        assert_eq!(c.offset_ms(), 31 * 86_400_000);
    }
}
