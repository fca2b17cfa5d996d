//! The broker's HTTP API (v1; docs/broker-openapi.json): routes, bodies, and the deliberate
//! mapping of every engine error to a status.

use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{AccessToken, GrantKey, Phase, SessionToken, ShopDomain, UnixMillis};
use tokenwal::store::StoreError;
use tokenwal::{AcquireError, Engine, Error, Health};

use super::Broker;
use crate::timefmt::{self, now};

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// The routes, their templates (the `route` label and log field).
pub const TOKEN: &str = "/v1/shops/{shop}/token";
const UNAUTHORIZED: &str = "/v1/shops/{shop}/unauthorized";
const GRANT: &str = "/v1/shops/{shop}/grant";
const EXCHANGE: &str = "/v1/shops/{shop}/token-exchange";
const UNINSTALL: &str = "/v1/shops/{shop}/uninstall";
const GRANTS: &str = "/v1/grants";
const HEALTHZ: &str = "/healthz";
const READYZ: &str = "/readyz";
const METRICS: &str = "/metrics";
const ROUTES: [&str; 9] = [TOKEN, UNAUTHORIZED, GRANT, EXCHANGE, UNINSTALL, GRANTS, HEALTHZ, READYZ, METRICS];

/// The router: every route behind the bearer check, observed (log line and metrics) once answered.
/// One middleware does both for the routes (one layer less per call than a check and an observer
/// apart); the two fallbacks (no such route, no such method) check and observe themselves, as
/// route `unmatched`.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route(TOKEN, get(token))
        .route(UNAUTHORIZED, post(unauthorized))
        .route(GRANT, put(grant))
        .route(EXCHANGE, post(exchange))
        .route(UNINSTALL, post(uninstall))
        .route(GRANTS, get(grants))
        .route(HEALTHZ, get(healthz))
        .route(READYZ, get(readyz))
        .route(METRICS, get(metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&broker), guard))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(broker)
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error answer: `{"error": code, "message": ..., ...extra}`, with `Retry-After` when set.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Map<String, Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), extra: Map::new(), retry_after: None }
    }

    fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 503 `unavailable` with a reason and `Retry-After` (whole seconds, at least 1).
    fn unavailable(reason: &'static str, message: impl Into<String>, retry_after: Duration) -> ApiError {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            .with("reason", reason)
            .with("retry_after", secs);
        e.retry_after = Some(secs);
        e
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        body.extend(self.extra);
        let mut r = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// How long until `at` (zero if past).
fn until(at: UnixMillis) -> Duration {
    at.since(now())
}

impl Broker {
    /// The engine, or 503 `recovering` while it is still opening.
    fn engine(&self) -> Result<&Engine, ApiError> {
        match self.engine.get() {
            Some(e) => Ok(e),
            None => Err(ApiError::unavailable(
                "recovering",
                "the broker is running recovery over the store; try again shortly",
                Duration::from_secs(1),
            )),
        }
    }

    /// The re-auth link of `shop` (`None` without an app handle).
    fn reauth_url(&self, grant: &GrantKey) -> Option<String> {
        self.app_handle.as_deref().and_then(|h| tokenwal::webhook_sink::deep_link(grant, h))
    }

    /// The 409 of a dead grant: its state, why, since when, and the re-auth link.
    fn dead(&self, grant: &GrantKey, state: &'static str, reason: String) -> ApiError {
        let since = self
            .engine
            .get()
            .and_then(|e| e.state(grant).ok().flatten())
            .and_then(|s| match s.phase {
                Phase::NeedsReauth { since, .. } | Phase::Uninstalled { since } | Phase::NotInstalled { since } => {
                    Some(since)
                }
                _ => None,
            })
            .map(|t| t.to_string());
        let message = match state {
            "uninstalled" => {
                format!("{}: the app is uninstalled from this shop; it must be installed again", grant.account())
            }
            _ => format!("{}: the grant is dead ({reason}); the merchant must open the app", grant.account()),
        };
        ApiError::new(StatusCode::CONFLICT, "needs_reauth", message)
            .with("state", state)
            .with("reason", reason)
            .with("since", since.map_or(Value::Null, Value::from))
            .with("reauth_url", self.reauth_url(grant).map_or(Value::Null, Value::from))
    }

    /// Every engine error, deliberately.
    pub(super) fn engine_error(&self, e: Error) -> ApiError {
        match e {
            Error::NotInstalled { grant } => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_installed",
                format!("{}: no tokens were ever installed for this shop", grant.account()),
            ),
            Error::NeedsReauth { grant, reason } => self.dead(&grant, "needs-reauth", reason.to_string()),
            Error::Uninstalled { grant } => {
                self.dead(&grant, "uninstalled", "the app was uninstalled from this shop".into())
            }
            e @ (Error::Ambiguous { retry_at, .. } | Error::Unavailable { retry_at, .. }) => {
                ApiError::unavailable("upstream", e.to_string(), until(retry_at))
            }
            // One grant still being recovered in the background after the open's budget ran out.
            ref e @ Error::Recovering { retry_after, .. } => {
                ApiError::unavailable("recovering", e.to_string(), retry_after)
            }
            e @ Error::InFlight { .. } => ApiError::unavailable("upstream", e.to_string(), Duration::from_secs(1)),
            e @ Error::AppCredentialsRejected { until: at } => {
                ApiError::unavailable("app_credentials_rejected", e.to_string(), until(at))
            }
            e @ Error::OlderPair { held, .. } => {
                ApiError::new(StatusCode::CONFLICT, "older_pair", e.to_string()).with("held_generation", held.0)
            }
            Error::Store(s) => store_error(s),
            Error::InvalidShop(s) => ApiError::bad_request("invalid_shop", format!("invalid shop domain: {s}")),
            e @ Error::ShuttingDown => ApiError::unavailable("shutting_down", e.to_string(), Duration::from_secs(1)),
            e @ (Error::Config(_) | Error::Internal(_)) => ApiError::internal(e.to_string()),
            // `Error` is non-exhaustive: a variant added later is an internal error until mapped here.
            e => ApiError::internal(e.to_string()),
        }
    }

    /// A token exchange's error.
    fn exchange_error(&self, shop: &ShopDomain, e: AcquireError) -> ApiError {
        match e {
            e @ AcquireError::InvalidSessionToken { .. } => {
                ApiError::bad_request("invalid_session_token", e.to_string())
            }
            e @ AcquireError::Rejected { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "session_token_rejected", e.to_string())
            }
            ref e @ AcquireError::Throttled { retry_after, .. } => {
                ApiError::unavailable("upstream", e.to_string(), retry_after.unwrap_or(Duration::from_secs(1)))
            }
            e @ (AcquireError::Ambiguous { .. } | AcquireError::NotSent { .. } | AcquireError::Busy { .. }) => {
                let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                ApiError::unavailable("upstream", e.to_string(), wait)
            }
            e @ AcquireError::AppCredentials { until: at } => {
                ApiError::unavailable("app_credentials_rejected", e.to_string(), until(at))
            }
            AcquireError::Uninstalled { .. } => {
                self.dead(&GrantKey::shopify(shop), "uninstalled", "the app was uninstalled from this shop".into())
            }
            AcquireError::Engine(e) => self.engine_error(e),
            e => ApiError::internal(e.to_string()),
        }
    }
}

fn store_error(s: StoreError) -> ApiError {
    match s {
        e @ (StoreError::Poisoned
        | StoreError::Io { .. }
        | StoreError::LeaseLost { .. }
        | StoreError::LeaseExpiring { .. }) => ApiError::unavailable(
            "store_poisoned",
            format!("store fail-stopped ({e}): the broker exits for its supervisor to restart it"),
            Duration::from_secs(5),
        ),
        // PostgreSQL unreachable or restarting: a read is retried on a new connection by the next
        // call; a write that failed has fail-stopped the store (the broker exits 74).
        e @ StoreError::Database { .. } => {
            ApiError::unavailable("store_unavailable", e.to_string(), Duration::from_secs(1))
        }
        e @ StoreError::Closed => ApiError::unavailable("shutting_down", e.to_string(), Duration::from_secs(1)),
        e => ApiError::internal(format!("store: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Extractors

/// A shop from the path, or 400 naming the rule it breaks.
struct Shop(ShopDomain);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Shop {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Shop, ApiError> {
        // Every route with a shop is `/v1/shops/{shop}/…`: without a percent escape the segment is the
        // parameter as `Path` would decode it, so it is read in place (no deserializer, no copy).
        let raw = match shop_segment(parts.uri.path()).filter(|s| !s.contains('%')) {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => {
                let Path(raw) = Path::<String>::from_request_parts(parts, state)
                    .await
                    .map_err(|_| ApiError::bad_request("invalid_shop", "the shop in the path is not valid UTF-8"))?;
                std::borrow::Cow::Owned(raw)
            }
        };
        ShopDomain::parse(&raw)
            .map(Shop)
            .map_err(|e| ApiError::bad_request("invalid_shop", format!("invalid shop domain: {e}")))
    }
}

/// The `{shop}` segment of a `/v1/shops/{shop}/…` path, as sent (not percent-decoded).
fn shop_segment(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/shops/").and_then(|rest| rest.split('/').next())
}

/// A JSON body: at most [`MAX_BODY`] bytes (413), unknown fields refused (400). An empty body reads
/// as `{}`. Error messages never quote a value from the body.
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body<T>, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is larger than {MAX_BODY} bytes"),
                )
            } else {
                ApiError::bad_request("invalid_body", "the body could not be read")
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        serde_json::from_slice(bytes).map(Body).map_err(|e| ApiError::bad_request("invalid_body", json_problem(&e)))
    }
}

/// A serde_json error as a message that names a field or a position, never a value.
fn json_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let head = text.split(" at line ").next().unwrap_or("");
    if head.starts_with("unknown field") || head.starts_with("missing field") || head.starts_with("duplicate field") {
        // "unknown field `x`, expected one of ...": the field's name and what is allowed.
        return format!("invalid body: {head}");
    }
    let what = match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "not valid JSON",
        serde_json::error::Category::Data => "a field has the wrong type or value",
        serde_json::error::Category::Io => "the body could not be read",
    };
    format!("invalid body: {what} (line {} column {})", e.line(), e.column())
}

// ---------------------------------------------------------------------------------------------
// Middleware

/// 401 unless the request carries the broker's bearer token; then [`observe`]s the answer under the
/// route template the request matched.
async fn guard(State(b): State<Arc<Broker>>, matched: MatchedPath, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = ROUTES.iter().copied().find(|r| *r == matched.as_str()).unwrap_or("unmatched");
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let r = if b.bearer.accepts(req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
        next.run(req).await
    } else {
        unauthorized_answer()
    };
    observe(&b, route, &method, &uri, &r, started);
    r
}

fn unauthorized_answer() -> Response {
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer token (Authorization: Bearer <broker token>)",
    )
    .into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// One log line and the metrics per request: method, route template, shop (when valid), status,
/// latency. Never the Authorization header, a body or a token. The shop is read from the path (kept
/// by reference count, not copied) only when the line is written: at the default level a successful
/// call writes none.
fn observe(b: &Broker, route: &'static str, method: &Method, uri: &Uri, r: &Response, started: Instant) {
    let took = started.elapsed();
    let status = r.status().as_u16();
    b.metrics.observe(route, status, took);
    let micros = took.as_micros() as u64;
    let shop = || shop_segment(uri.path()).and_then(|s| ShopDomain::parse(s).ok());
    if r.status().is_server_error() {
        let shop = shop();
        let shop = shop.as_ref().map_or("-", ShopDomain::as_str);
        tracing::warn!(%method, route, shop, status, latency_us = micros, "request");
    } else if tracing::enabled!(tracing::Level::DEBUG) {
        let shop = shop();
        let shop = shop.as_ref().map_or("-", ShopDomain::as_str);
        tracing::debug!(%method, route, shop, status, latency_us = micros, "request");
    }
}

/// A fallback's answer (behind the bearer check), observed as route `unmatched`.
fn unmatched(b: &Broker, req: &Request, answer: impl FnOnce() -> Response) -> Response {
    let started = Instant::now();
    let r = if b.bearer.accepts(req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
        answer()
    } else {
        unauthorized_answer()
    };
    observe(b, "unmatched", req.method(), req.uri(), &r, started);
    r
}

async fn not_found(State(b): State<Arc<Broker>>, req: Request) -> Response {
    unmatched(&b, &req, || {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route (see docs/broker-openapi.json)")
            .into_response()
    })
}

async fn method_not_allowed(State(b): State<Arc<Broker>>, req: Request) -> Response {
    unmatched(&b, &req, || {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method")
            .into_response()
    })
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// The token object of a 200 (the reference for [`token_body_parts`], which renders it in two parts
/// around `expires_in`; a unit test checks that they agree byte for byte).
#[cfg(test)]
#[derive(Serialize)]
struct TokenAnswer<'a> {
    shop: &'a str,
    access_token: &'a str,
    expires_at: String,
    expires_in: u64,
    scope: Option<&'a str>,
}

/// The token answer's JSON before and after the value of `expires_in` (the key order of the object
/// above: shop, access_token, expires_at, expires_in, scope).
pub(super) fn token_body_parts(
    shop: &ShopDomain,
    token: &AccessToken,
    expires_at: UnixMillis,
    scope: Option<&str>,
) -> (Box<[u8]>, Box<[u8]>) {
    fn json<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
        // Serialising a string or an optional string into a Vec cannot fail.
        let _ = serde_json::to_writer(out, v);
    }
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(br#"{"shop":"#);
    json(&mut head, shop.as_str());
    head.extend_from_slice(br#","access_token":"#);
    json(&mut head, token.expose_secret());
    head.extend_from_slice(br#","expires_at":"#);
    json(&mut head, &expires_at.to_string());
    head.extend_from_slice(br#","expires_in":"#);
    let mut tail = Vec::with_capacity(64);
    tail.extend_from_slice(br#","scope":"#);
    json(&mut tail, &scope);
    tail.push(b'}');
    (head.into_boxed_slice(), tail.into_boxed_slice())
}

impl Broker {
    /// The 200 for `token`, with its expiry and scope; 503 `upstream` if it has no more than the
    /// refresh margin of life left (a refresh failed transiently and the engine fell back to it).
    fn token_answer(&self, engine: &Engine, shop: &ShopDomain, token: AccessToken) -> Result<Response, ApiError> {
        let info = match self.details(shop, &token) {
            Some(i) => i,
            None => self.load_details(engine, shop, &token)?,
        };
        self.answer(engine, shop, &info)
    }

    /// The 200 (or the 503 inside the margin) for the token of `info`.
    fn answer(&self, engine: &Engine, shop: &ShopDomain, info: &super::Details) -> Result<Response, ApiError> {
        let now = now();
        let left = info.expires_at.since(now);
        if left <= self.margin {
            let retry = engine
                .state(&GrantKey::shopify(shop))
                .ok()
                .flatten()
                .and_then(|s| s.not_before)
                .map_or(Duration::from_secs(1), until);
            return Err(ApiError::unavailable(
                "upstream",
                format!(
                    "{shop}: a refresh failed and the current token has only {}s left (the broker hands out tokens with \
                     more than {}s): retrying",
                    left.as_secs(),
                    self.margin.as_secs()
                ),
                retry,
            ));
        }
        let mut r = Response::new(axum::body::Body::from(info.body(left.as_secs())));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(r)
    }
}

/// How long a token call waits for a refresh someone else has in flight.
const WAIT_FOR_REFRESH: Duration = Duration::from_secs(10);
/// How often it looks whether that refresh has committed.
const WAIT_STEP: Duration = Duration::from_millis(20);

impl Broker {
    /// While another caller (a concurrent request, the scheduler) refreshes the grant, the engine
    /// serves a still-valid token inside the refresh margin at once. The broker promises more than
    /// the margin, so it waits (bounded) for that refresh to commit instead of answering 503 —
    /// unless the grant is backing off after a failed refresh, which [`Broker::token_answer`]
    /// reports at once. Returns the details of the token to answer with.
    async fn beyond_margin(
        &self,
        engine: &Engine,
        shop: &ShopDomain,
        mut token: AccessToken,
    ) -> Result<Arc<super::Details>, ApiError> {
        // Set when the token is first seen inside the margin (a cached call never needs it).
        let mut wait_until = None;
        loop {
            let info = match self.details(shop, &token) {
                Some(i) => i,
                None => self.load_details(engine, shop, &token)?,
            };
            if info.expires_at.since(now()) > self.margin {
                return Ok(info);
            }
            if Instant::now() >= *wait_until.get_or_insert_with(|| Instant::now() + WAIT_FOR_REFRESH) {
                return Ok(info);
            }
            let backing_off = engine
                .state(&GrantKey::shopify(shop))
                .ok()
                .flatten()
                .and_then(|s| s.not_before)
                .is_some_and(|nb| !until(nb).is_zero());
            if backing_off {
                return Ok(info);
            }
            tokio::time::sleep(WAIT_STEP).await;
            token = engine.access_token(shop).await.map_err(|e| self.engine_error(e))?;
        }
    }
}

async fn token(State(b): State<Arc<Broker>>, Shop(shop): Shop) -> Result<Response, ApiError> {
    let engine = b.engine()?;
    let token = engine.access_token(&shop).await.map_err(|e| b.engine_error(e))?;
    let info = b.beyond_margin(engine, &shop, token).await?;
    b.answer(engine, &shop, &info)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnauthorizedBody {
    access_token: String,
}

async fn unauthorized(
    State(b): State<Arc<Broker>>,
    Shop(shop): Shop,
    Body(body): Body<UnauthorizedBody>,
) -> Result<Response, ApiError> {
    if body.access_token.trim().is_empty() {
        return Err(ApiError::bad_request("invalid_body", "invalid body: `access_token` is empty"));
    }
    let engine = b.engine()?;
    let rejected = AccessToken::new(body.access_token);
    let token = engine.on_unauthorized(&shop, &rejected).await.map_err(|e| b.engine_error(e))?;
    b.token_answer(engine, &shop, token)
}

/// The keys of `PUT .../grant` (the import line's, without `shop`).
const GRANT_KEYS: [&str; 7] = [
    "access_token",
    "refresh_token",
    "expires_at",
    "expires_in",
    "refresh_token_expires_at",
    "refresh_token_expires_in",
    "scope",
];

async fn grant(
    State(b): State<Arc<Broker>>,
    Shop(shop): Shop,
    Body(body): Body<Map<String, Value>>,
) -> Result<Response, ApiError> {
    if let Some(k) = body.keys().find(|k| !GRANT_KEYS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("invalid body: unknown field `{}`, expected one of {}", k.escape_debug(), GRANT_KEYS.join(", ")),
        ));
    }
    // The same validation as `tokenwal import` (its messages never quote a value).
    let mut line = body;
    line.insert("shop".into(), Value::String(shop.as_str().to_owned()));
    let (_, tokens) = crate::import::parse_line(&Value::Object(line).to_string(), now())
        .map_err(|m| ApiError::bad_request("invalid_body", format!("invalid body: {m}")))?;
    let engine = b.engine()?;
    engine.install(&shop, tokens).await.map_err(|e| b.engine_error(e))?;
    Ok(axum::Json(json!({"installed": true})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    session_token: String,
}

async fn exchange(
    State(b): State<Arc<Broker>>,
    Shop(shop): Shop,
    Body(body): Body<ExchangeBody>,
) -> Result<Response, ApiError> {
    if body.session_token.trim().is_empty() {
        return Err(ApiError::bad_request("invalid_body", "invalid body: `session_token` is empty"));
    }
    let engine = b.engine()?;
    engine
        .exchange_session_token(&shop, SessionToken::new(body.session_token))
        .await
        .map_err(|e| b.exchange_error(&shop, e))?;
    let token = engine.access_token(&shop).await.map_err(|e| b.engine_error(e))?;
    b.token_answer(engine, &shop, token)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UninstallBody {
    triggered_at: Option<String>,
}

async fn uninstall(
    State(b): State<Arc<Broker>>,
    Shop(shop): Shop,
    Body(body): Body<UninstallBody>,
) -> Result<Response, ApiError> {
    let at = match body.triggered_at.as_deref() {
        Some(s) => timefmt::parse_rfc3339(s)
            .map_err(|e| ApiError::bad_request("invalid_body", format!("invalid body: `triggered_at`: {e}")))?,
        None => now(),
    };
    let engine = b.engine()?;
    let done = engine.uninstalled_as_of(&shop, at).await.map_err(|e| b.engine_error(e))?;
    Ok(axum::Json(json!({"uninstalled": done})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsQuery {
    state: Option<String>,
}

const STATES: [&str; 6] = ["healthy", "refreshing", "ambiguous", "needs-reauth", "uninstalled", "not-installed"];

#[derive(Serialize)]
struct GrantEntry {
    shop: String,
    state: &'static str,
    reason: Option<String>,
    since: Option<String>,
    reauth_url: Option<String>,
}

async fn grants(
    State(b): State<Arc<Broker>>,
    query: Result<Query<GrantsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|_| {
        ApiError::bad_request(
            "invalid_query",
            format!("the only query parameter is state, one of {}", STATES.join(", ")),
        )
    })?;
    if let Some(s) = q.state.as_deref() {
        if !STATES.contains(&s) {
            return Err(ApiError::bad_request("invalid_query", format!("state must be one of {}", STATES.join(", "))));
        }
    }
    let engine = b.engine()?.clone();
    let broker = Arc::clone(&b);
    let list = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let scan = engine.store().for_each_grant(|s| {
            let name = s.phase.name();
            if q.state.as_deref().is_some_and(|want| want != name) {
                return;
            }
            let (reason, since) = match &s.phase {
                Phase::NeedsReauth { reason, since } => (Some(reason.to_string()), Some(since.to_string())),
                Phase::Ambiguous(a) => (Some(a.last_reason.to_string()), Some(a.since.to_string())),
                Phase::Uninstalled { since } | Phase::NotInstalled { since } => (None, Some(since.to_string())),
                Phase::Refreshing { started_at, .. } => (None, Some(started_at.to_string())),
                Phase::Healthy => (None, None),
            };
            let reauth_url =
                if matches!(s.phase, Phase::NeedsReauth { .. }) { broker.reauth_url(&s.grant) } else { None };
            out.push(GrantEntry { shop: s.grant.account().to_owned(), state: name, reason, since, reauth_url });
        });
        scan.map(|_| out)
    })
    .await
    .map_err(|e| ApiError::internal(format!("grant scan failed: {e}")))?
    .map_err(store_error)?;
    let mut list = list;
    list.sort_by(|a, c| a.shop.cmp(&c.shop));
    Ok(axum::Json(json!({ "grants": list })).into_response())
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "alive"})).into_response()
}

async fn readyz(State(b): State<Arc<Broker>>) -> Response {
    let not_ready = |reason: &str, retry: u64| {
        let mut r =
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"ready": false, "reason": reason}))).into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry));
        r
    };
    let Some(engine) = b.engine.get() else {
        return not_ready("recovering", 1);
    };
    if b.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return not_ready("shutting_down", 1);
    }
    match engine.health() {
        Health::Healthy => axum::Json(json!({"ready": true})).into_response(),
        _ => not_ready("store_poisoned", 5),
    }
}

async fn metrics(State(b): State<Arc<Broker>>) -> Response {
    let mut r = b.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::Details;

    #[test]
    fn the_pre_rendered_token_body_is_serde_json_s() {
        let shop = ShopDomain::parse("body-check.myshopify.com").unwrap();
        let scopes = [Some("read_orders,write_products"), Some(r#"odd "scope" \ é"#), Some(""), None];
        for (i, scope) in scopes.into_iter().enumerate() {
            let token = format!("shpat_{i}\"\\\u{1}/é");
            let expires_at = UnixMillis(1_765_000_000_123 + i as u64);
            let d = Details::new(&shop, AccessToken::new(token.clone()), expires_at, scope);
            for expires_in in [0, 7, 10, 59, 3599, 86_400, u64::MAX] {
                let want = serde_json::to_vec(&TokenAnswer {
                    shop: shop.as_str(),
                    access_token: &token,
                    expires_at: expires_at.to_string(),
                    expires_in,
                    scope,
                })
                .unwrap();
                let got = d.body(expires_in);
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
                assert_eq!(got.capacity(), got.len(), "one allocation of the exact size");
            }
        }
    }

    #[test]
    fn the_shop_segment_is_the_path_parameter() {
        assert_eq!(shop_segment("/v1/shops/a.myshopify.com/token"), Some("a.myshopify.com"));
        assert_eq!(shop_segment("/v1/shops/a.myshopify.com/token-exchange"), Some("a.myshopify.com"));
        assert_eq!(shop_segment("/v1/grants"), None);
    }
}
