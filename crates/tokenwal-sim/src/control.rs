//! The control API under `/_sim/`: JSON in, JSON out. For tests and operators; an engine
//! never calls it.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /_sim/health` | | `{"ok":true}` |
//! | `POST /_sim/apps` | `{"client_id","client_secret"}` | `{"client_id"}` |
//! | `POST /_sim/shops` | `{"shop","client_id"?}` | a token set, as by token exchange |
//! | `GET /_sim/shops/{shop}` | | [`ShopState`](crate::ShopState) |
//! | `POST /_sim/shops/{shop}/uninstall` | | `{"revoked":bool}` |
//! | `POST /_sim/shops/{shop}/faults` | a fault, a list, or `{"faults":[…]}` | `{"pending":[…]}` |
//! | `DELETE /_sim/shops/{shop}/faults` | | `{"pending":[]}` |
//! | `GET /_sim/shops/{shop}/hold` | | `{"armed":bool,"held":N}` |
//! | `POST /_sim/shops/{shop}/hold` | | arms a hold of the shop's next token request; `{"armed":true,"held":N}` |
//! | `POST /_sim/shops/{shop}/hold/wait` | `{"timeout_ms"?}` (default 10000) | `{"armed","held"}` once a request is held; 408 if none was in time |
//! | `POST /_sim/shops/{shop}/hold/release` | | sends the oldest held answer; `{"released":bool}` |
//! | `POST /_sim/shops/{shop}/hold/cancel` | | disarms, resets every held connection; `{"cancelled":bool}` |
//! | `POST /_sim/public_clients` | `{"client_id"}` | `{"client_id"}` (a Customer Account API public client) |
//! | `POST /_sim/customers` | `{"shop_id","customer_id","client_id"?}` | a token set, as by the app's code exchange; the grant is then `/_sim/shops/{shop_id}:{customer_id}` |
//! | `POST /_sim/legacy_tokens` | `{"shop","client_id"?,"token"?}` | `{"access_token"}` |
//! | `POST /_sim/session_tokens` | `{"shop","client_id"?,"lifetime_ms"?}` | `{"session_token"}` |
//! | `GET /_sim/config` | | [`ModelConfig`](crate::ModelConfig) |
//! | `PATCH` or `POST /_sim/config` | JSON merge patch of the config | the new config |
//! | `GET` / `PUT` / `DELETE /_sim/faults/random` | [`RandomFaults`](crate::faults::RandomFaults) | the setting or `null` |
//! | `GET /_sim/counters` | | [`CounterSet`](crate::CounterSet): per grant (a shop, or a customer's `{shop_id}:{customer_id}`) and in total, including `overlapping_token_requests` and `max_concurrent_token_requests` |
//! | `POST /_sim/counters/reset` | | `{}` |
//! | `GET /_sim/clock` | | `{"now_ms","offset_ms"}` |
//! | `POST /_sim/clock/advance` | `{"ms":N}` (may be negative) | `{"now_ms","offset_ms"}` |
//!
//! Every `/_sim/shops/{shop}/…` route takes a customer's grant name `{shop_id}:{customer_id}` as
//! its `{shop}` too (state, faults, holds, uninstall).
//!
//! Errors are `{"error":"…"}` with status 400 (bad input), 404 (unknown app) or 408 (no
//! request held in time).
//!
//! A held token request was processed by the model when it arrived (a rotation is committed);
//! only its answer waits. See [`SimHandle::hold`](crate::SimHandle::hold).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::faults::{Fault, RandomFaults};
use crate::model::{ModelConfig, ModelError};
use crate::shared::Shared;

/// An error answer of the control API.
struct ControlError(StatusCode, String);

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<ModelError> for ControlError {
    fn from(e: ModelError) -> Self {
        let status = match e {
            ModelError::UnknownApp(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        ControlError(status, e.to_string())
    }
}

fn bad(msg: impl ToString) -> ControlError {
    ControlError(StatusCode::BAD_REQUEST, msg.to_string())
}

/// Parses a JSON body; an empty body reads as `{}`.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ControlError> {
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    serde_json::from_slice(text).map_err(|e| bad(format!("bad request body: {e}")))
}

type Ctl = State<Arc<Shared>>;
type Answer = Result<Json<Value>, ControlError>;

pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/apps", post(register_app))
        .route("/shops", post(seed_shop))
        .route("/shops/{shop}", get(shop_state))
        .route("/shops/{shop}/uninstall", post(uninstall))
        .route("/shops/{shop}/faults", get(pending_faults).post(push_faults).delete(clear_faults))
        .route("/shops/{shop}/hold", get(hold_status).post(hold))
        .route("/shops/{shop}/hold/wait", post(wait_held))
        .route("/shops/{shop}/hold/release", post(release))
        .route("/shops/{shop}/hold/cancel", post(cancel))
        .route("/public_clients", post(register_public_client))
        .route("/customers", post(seed_customer))
        .route("/legacy_tokens", post(seed_legacy))
        .route("/session_tokens", post(session_token))
        .route("/config", get(get_config).patch(patch_config).post(patch_config))
        .route("/faults/random", get(get_random).put(set_random).post(set_random).delete(clear_random))
        .route("/counters", get(counters))
        .route("/counters/reset", post(reset_counters))
        .route("/clock", get(clock))
        .route("/clock/advance", post(advance_clock))
}

fn to_json(v: impl serde::Serialize) -> Answer {
    serde_json::to_value(v).map(Json).map_err(|e| ControlError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[derive(Deserialize)]
struct AppBody {
    client_id: String,
    client_secret: String,
}

async fn register_app(State(s): Ctl, body: Bytes) -> Answer {
    let b: AppBody = parse(&body)?;
    s.model().register_app(&b.client_id, &b.client_secret);
    Ok(Json(json!({"client_id": b.client_id})))
}

#[derive(Deserialize)]
struct ShopBody {
    shop: String,
    client_id: Option<String>,
}

async fn seed_shop(State(s): Ctl, body: Bytes) -> Answer {
    let b: ShopBody = parse(&body)?;
    let now = s.clock.now_ms();
    let tokens = s.model().seed_grant(now, &b.shop.to_ascii_lowercase(), b.client_id.as_deref())?;
    to_json(tokens)
}

#[derive(Deserialize)]
struct PublicClientBody {
    client_id: String,
}

async fn register_public_client(State(s): Ctl, body: Bytes) -> Answer {
    let b: PublicClientBody = parse(&body)?;
    s.model().register_public_client(&b.client_id);
    Ok(Json(json!({"client_id": b.client_id})))
}

#[derive(Deserialize)]
struct CustomerBody {
    shop_id: u64,
    customer_id: u64,
    client_id: Option<String>,
}

async fn seed_customer(State(s): Ctl, body: Bytes) -> Answer {
    let b: CustomerBody = parse(&body)?;
    let now = s.clock.now_ms();
    let tokens = s.model().seed_customer(now, b.shop_id, b.customer_id, b.client_id.as_deref())?;
    to_json(tokens)
}

async fn shop_state(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    let now = s.clock.now_ms();
    let state = s.model().shop_state(&shop.to_ascii_lowercase(), now);
    to_json(state)
}

async fn uninstall(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    let revoked = s.model().uninstall(&shop.to_ascii_lowercase());
    Ok(Json(json!({"revoked": revoked})))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FaultsBody {
    One(Fault),
    Many(Vec<Fault>),
    Wrapped { faults: Vec<Fault> },
}

async fn pending_faults(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    let pending = s.model().pending_faults(&shop.to_ascii_lowercase());
    to_json(json!({"pending": pending}))
}

async fn push_faults(State(s): Ctl, Path(shop): Path<String>, body: Bytes) -> Answer {
    let faults = match parse::<FaultsBody>(&body)? {
        FaultsBody::One(f) => vec![f],
        FaultsBody::Many(v) | FaultsBody::Wrapped { faults: v } => v,
    };
    let shop = shop.to_ascii_lowercase();
    let mut m = s.model();
    m.push_faults(&shop, faults).map_err(bad)?;
    to_json(json!({"pending": m.pending_faults(&shop)}))
}

async fn clear_faults(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    s.model().clear_faults(&shop.to_ascii_lowercase());
    Ok(Json(json!({"pending": []})))
}

async fn hold_status(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    to_json(s.holds.status(&shop.to_ascii_lowercase()))
}

async fn hold(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    to_json(s.holds.arm(&shop.to_ascii_lowercase()))
}

#[derive(Deserialize)]
struct WaitBody {
    timeout_ms: Option<u64>,
}

async fn wait_held(State(s): Ctl, Path(shop): Path<String>, body: Bytes) -> Answer {
    let b: WaitBody = parse(&body)?;
    let shop = shop.to_ascii_lowercase();
    let timeout = Duration::from_millis(b.timeout_ms.unwrap_or(10_000));
    if s.holds.wait_held(&shop, timeout).await {
        to_json(s.holds.status(&shop))
    } else {
        Err(ControlError(StatusCode::REQUEST_TIMEOUT, format!("no token request to {shop} held within {timeout:?}")))
    }
}

async fn release(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    Ok(Json(json!({"released": s.holds.release(&shop.to_ascii_lowercase())})))
}

async fn cancel(State(s): Ctl, Path(shop): Path<String>) -> Answer {
    Ok(Json(json!({"cancelled": s.holds.cancel(&shop.to_ascii_lowercase())})))
}

#[derive(Deserialize)]
struct LegacyBody {
    shop: String,
    client_id: Option<String>,
    token: Option<String>,
}

async fn seed_legacy(State(s): Ctl, body: Bytes) -> Answer {
    let b: LegacyBody = parse(&body)?;
    let token =
        s.model().seed_legacy_token(&b.shop.to_ascii_lowercase(), b.client_id.as_deref(), b.token.as_deref())?;
    to_json(json!({"access_token": token}))
}

#[derive(Deserialize)]
struct SessionBody {
    shop: String,
    client_id: Option<String>,
    lifetime_ms: Option<u64>,
}

async fn session_token(State(s): Ctl, body: Bytes) -> Answer {
    let b: SessionBody = parse(&body)?;
    let now = s.clock.now_ms();
    let token = s.model().session_token(
        now,
        &b.shop.to_ascii_lowercase(),
        b.client_id.as_deref(),
        b.lifetime_ms.unwrap_or(60_000),
    )?;
    Ok(Json(json!({"session_token": token})))
}

async fn get_config(State(s): Ctl) -> Answer {
    let config = s.model().config().clone();
    to_json(config)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge_patch(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

async fn patch_config(State(s): Ctl, body: Bytes) -> Answer {
    let patch: Value = parse(&body)?;
    let mut m = s.model();
    let mut current = serde_json::to_value(m.config()).map_err(bad)?;
    // A policy patch that changes the kind replaces the policy rather than merging fields
    // of different variants.
    if let (Some(new_kind), Some(old_kind)) =
        (patch.pointer("/policy/kind").cloned(), current.pointer("/policy/kind").cloned())
    {
        if new_kind != old_kind {
            current["policy"] = json!({"kind": new_kind});
        }
    }
    merge_patch(&mut current, patch);
    let config: ModelConfig = serde_json::from_value(current).map_err(|e| bad(format!("bad config: {e}")))?;
    m.set_config(config.clone());
    to_json(config)
}

async fn get_random(State(s): Ctl) -> Answer {
    let r = s.model().random_faults();
    to_json(r)
}

async fn set_random(State(s): Ctl, body: Bytes) -> Answer {
    let r: RandomFaults = parse(&body)?;
    let mut m = s.model();
    m.set_random_faults(Some(r)).map_err(bad)?;
    to_json(m.random_faults())
}

async fn clear_random(State(s): Ctl) -> Answer {
    s.model().set_random_faults(None).map_err(bad)?;
    Ok(Json(Value::Null))
}

async fn counters(State(s): Ctl) -> Answer {
    let c = s.model().counters().clone();
    to_json(c)
}

async fn reset_counters(State(s): Ctl) -> Answer {
    s.model().reset_counters();
    Ok(Json(json!({})))
}

fn clock_json(s: &Shared) -> Json<Value> {
    Json(json!({"now_ms": s.clock.now_ms(), "offset_ms": s.clock.offset_ms()}))
}

async fn clock(State(s): Ctl) -> Json<Value> {
    clock_json(&s)
}

#[derive(Deserialize)]
struct AdvanceBody {
    ms: i64,
}

async fn advance_clock(State(s): Ctl, body: Bytes) -> Answer {
    let b: AdvanceBody = parse(&body)?;
    s.clock.advance(b.ms);
    Ok(clock_json(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut t, json!({"b": {"c": null, "e": 4}, "f": 5}));
        assert_eq!(t, json!({"a": 1, "b": {"d": 3, "e": 4}, "f": 5}));
    }
}
