//! tokenwal's generic OAuth 2.0 profile against a real server no one here wrote: panva's
//! `oidc-provider` (npm), configured to rotate refresh tokens on every use, with a confidential client
//! (HTTP Basic) and a custom grant that mints the first refresh token without a browser
//! (`tests/oidc/server.js`). A fault-injecting proxy sits between the engine and the server.
//!
//! It shows classification against a strict real server: a response dropped after the server rotated
//! ends in needs-reauth (the retry presents the rotated-out token, and the server revokes the whole
//! grant on reuse — tokenwal says so instead of looping or reporting healthy), while a 5xx before the
//! server processed anything ends healthy.
//!
//! The same server's public client (no secret, authorization code + PKCE, rotation with reuse
//! detection) is driven through a TOML provider profile by the `tokenwal` binary in
//! `crates/tokenwal-cli/tests/oidc_provider.rs`.
//!
//! Needs node and `npm ci` in `tests/oidc` (`.ci/run` does it). Without node the suite is skipped with
//! a message, unless `TOKENWAL_REQUIRE_NODE=1` (CI sets it), in which case it fails
//! (`tokenwal_testkit::oidc::start`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenwal::core::{
    AccessToken, ClientSecret, GrantKey, InstallSource, Phase, ReauthReason, RefreshToken, RetryPolicy, TokenSet,
    UnixMillis,
};
use tokenwal::{ClientAuth, Config, Endpoint, Engine, Error, StoreLocation};
use tokenwal_testkit::oidc::{start as start_server, OidcServer as Server};

const CLIENT: &str = "tokenwal";
const SECRET: &str = "tokenwal-test-secret";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Forward, then answer 520 with a plain-text body: the server rotated, the answer is lost.
    DropAfterForward,
    /// Answer 503 without forwarding: the server saw nothing.
    FailBefore,
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    faults: Arc<Mutex<VecDeque<Mode>>>,
    /// Upstream answers the client never saw.
    lost: Arc<Mutex<Vec<serde_json::Value>>>,
    client: reqwest::Client,
}

async fn proxy_token(
    axum::extract::State(p): axum::extract::State<Proxy>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mode = p.faults.lock().unwrap().pop_front();
    if mode == Some(Mode::FailBefore) {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable").into_response();
    }
    let mut req = p.client.post(&p.upstream).body(body);
    for name in ["authorization", "content-type", "accept"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.clone());
        }
    }
    let resp = req.send().await.expect("upstream answers");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("upstream body");
    if mode == Some(Mode::DropAfterForward) {
        p.lost.lock().unwrap().push(serde_json::from_slice(&bytes).unwrap_or_default());
        return (
            axum::http::StatusCode::from_u16(520).unwrap(),
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            "error code: 520",
        )
            .into_response();
    }
    (axum::http::StatusCode::from_u16(status).unwrap(), [(axum::http::header::CONTENT_TYPE, "application/json")], bytes)
        .into_response()
}

async fn start_proxy(upstream: &str) -> (String, Proxy) {
    let p = Proxy {
        upstream: upstream.to_owned(),
        faults: Arc::default(),
        lost: Arc::default(),
        client: reqwest::Client::new(),
    };
    let app = axum::Router::new().route("/token", axum::routing::post(proxy_token)).with_state(p.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, p)
}

/// Mints a first pair through the custom grant (no browser).
async fn mint(server: &Server, account: &str) -> (String, String) {
    let v: serde_json::Value = reqwest::Client::new()
        .post(server.token_url())
        .basic_auth(CLIENT, Some(SECRET))
        .form(&[("grant_type", "urn:tokenwal:test:mint"), ("account", account)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (v["access_token"].as_str().unwrap().to_owned(), v["refresh_token"].as_str().unwrap().to_owned())
}

/// Presents `rt` directly to the server (bypassing the proxy); returns the HTTP status.
async fn direct_refresh(server: &Server, rt: &str) -> u16 {
    reqwest::Client::new()
        .post(server.token_url())
        .basic_auth(CLIENT, Some(SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn engine(proxy_url: &str) -> Engine {
    let mut c = Config::shopify(StoreLocation::InMemory, CLIENT, ClientSecret::new(SECRET));
    c.endpoint = Endpoint::OAuth2 {
        provider: "oidc".into(),
        token_url: url::Url::parse(proxy_url).unwrap(),
        client_auth: ClientAuth::Basic,
    };
    c.policy = RetryPolicy::single_use();
    c.policy.backoff.base = Duration::from_millis(30);
    c.policy.backoff.cap = Duration::from_millis(200);
    c.proactive = false;
    c.timeouts.total = Duration::from_secs(5);
    Engine::open(c).await.unwrap().0
}

fn expired(access: String, refresh: String) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(access),
        access_expires_at: UnixMillis::from_system_time(std::time::SystemTime::now()),
        refresh_token: RefreshToken::new(refresh),
        refresh_expires_at: None,
        scope: None,
    }
}

#[tokio::test]
async fn a_response_lost_after_rotation_ends_in_needs_reauth() {
    let Some(server) = start_server() else { return };
    let (proxy_url, proxy) = start_proxy(&server.token_url()).await;
    let engine = engine(&proxy_url).await;
    let grant = GrantKey::new("oidc", "alice").unwrap();
    let (a0, r0) = mint(&server, "alice").await;
    engine.install_grant(grant.clone(), expired(a0, r0.clone()), InstallSource::Application).await.unwrap();

    proxy.faults.lock().unwrap().push_back(Mode::DropAfterForward);
    let err = engine.access_token_for(&grant).await.unwrap_err();
    assert!(matches!(err, Error::NeedsReauth { .. }), "{err}");
    let state = engine.state(&grant).unwrap().unwrap();
    match &state.phase {
        Phase::NeedsReauth { reason: ReauthReason::CredentialRejected { status, error, after_ambiguity }, .. } => {
            assert_eq!((*status, error.as_str(), *after_ambiguity), (400, "invalid_grant", true));
        }
        other => panic!("expected needs-reauth after an ambiguity, got {other:?}"),
    }
    // The server really revoked the family: the replacement it issued in the lost answer is dead too.
    let lost = proxy.lost.lock().unwrap().clone();
    assert_eq!(lost.len(), 1, "exactly one answer was lost");
    let r1 = lost[0]["refresh_token"].as_str().expect("the lost answer carried a new refresh token").to_owned();
    assert_eq!(direct_refresh(&server, &r1).await, 400, "reuse of the old token revoked the replacement");
    assert_eq!(direct_refresh(&server, &r0).await, 400);
    // Not looped on: asking again does not send anything and says the same.
    assert!(matches!(engine.access_token_for(&grant).await.unwrap_err(), Error::NeedsReauth { .. }));
}

#[tokio::test]
async fn a_failure_before_processing_ends_healthy() {
    let Some(server) = start_server() else { return };
    let (proxy_url, proxy) = start_proxy(&server.token_url()).await;
    let engine = engine(&proxy_url).await;
    let grant = GrantKey::new("oidc", "bob").unwrap();
    let (a0, r0) = mint(&server, "bob").await;
    engine.install_grant(grant.clone(), expired(a0.clone(), r0.clone()), InstallSource::Application).await.unwrap();

    proxy.faults.lock().unwrap().extend([Mode::FailBefore, Mode::FailBefore]);
    let token = engine.access_token_for(&grant).await.unwrap();
    assert_ne!(token.expose_secret(), a0);
    let state = engine.state(&grant).unwrap().unwrap();
    assert_eq!(state.phase, Phase::Healthy);
    let stored = state.tokens.unwrap().refresh_token;
    assert_ne!(stored.expose_secret(), r0, "the server rotated and tokenwal stored the replacement");
    // The stored replacement works at the server (a direct refresh rotates it; it is the live token).
    assert_eq!(direct_refresh(&server, stored.expose_secret()).await, 200);
}
