//! The generic OAuth 2.0 profile (RFC 6749 §6) against a hand-written form-encoded token endpoint over
//! loopback: client authentication in the body or by HTTP Basic, and a server that does not rotate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenwal::core::{
    AccessToken, ClientSecret, GrantKey, InstallSource, Machine, RefreshToken, RetryPolicy, TokenSet,
};
use tokenwal::{ClientAuth, Config, Endpoint, Engine, StoreLocation};
use tokenwal_testkit::now;

type Seen = Arc<Mutex<Vec<(Option<String>, HashMap<String, String>)>>>;

/// A token endpoint that records what it received; it rotates only when `rotate` is set.
async fn server(rotate: bool) -> (String, Seen) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/oauth/token",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::extract::Form(form): axum::extract::Form<HashMap<String, String>>| {
                let seen = Arc::clone(&s2);
                async move {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let n = {
                        let mut g = seen.lock().unwrap();
                        g.push((auth, form));
                        g.len()
                    };
                    let mut body = serde_json::json!({"access_token": format!("at-{n}"), "token_type": "Bearer", "expires_in": 600});
                    if rotate {
                        body["refresh_token"] = serde_json::json!(format!("rt-{n}"));
                    }
                    axum::Json(body)
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn config(url: &str, auth: ClientAuth) -> Config {
    let mut c = Config::shopify(StoreLocation::InMemory, "client-1", ClientSecret::new("s3cret"));
    c.endpoint =
        Endpoint::OAuth2 { provider: "idp".into(), token_url: url::Url::parse(url).unwrap(), client_auth: auth };
    c.policy = RetryPolicy::single_use();
    c.proactive = false;
    c.timeouts.total = Duration::from_secs(3);
    c
}

fn expired(rt: &str) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new("at-0"),
        access_expires_at: now(),
        refresh_token: RefreshToken::new(rt),
        refresh_expires_at: None,
        scope: None,
    }
}

#[tokio::test]
async fn basic_auth_and_rotation() {
    let (url, seen) = server(true).await;
    let (engine, _) = Engine::open(config(&url, ClientAuth::Basic)).await.unwrap();
    let grant = GrantKey::new("idp", "user-42").unwrap();
    engine.install_grant(grant.clone(), expired("rt-0"), InstallSource::Application).await.unwrap();
    assert_eq!(engine.access_token_for(&grant).await.unwrap().expose_secret(), "at-1");
    let (auth, form) = seen.lock().unwrap()[0].clone();
    // base64("client-1:s3cret")
    assert_eq!(auth.as_deref(), Some("Basic Y2xpZW50LTE6czNjcmV0"));
    assert_eq!(form.get("grant_type").map(String::as_str), Some("refresh_token"));
    assert_eq!(form.get("refresh_token").map(String::as_str), Some("rt-0"));
    assert!(!form.contains_key("client_secret"), "the secret goes in one place only");
    let s = engine.state(&grant).unwrap().unwrap();
    assert_eq!(s.tokens.unwrap().refresh_token.expose_secret(), "rt-1");
    // A Shopify call on this engine is refused: grants belong to one provider. The Shopify grant
    // is in the store with a valid token (written there directly: the engine would refuse to
    // install it), so only the provider check stands between the call and that token.
    let shop = tokenwal::core::ShopDomain::parse("x.myshopify.com").unwrap();
    let foreign = GrantKey::shopify(&shop);
    let mut valid = expired("rt-shopify");
    valid.access_expires_at = now().saturating_add(Duration::from_secs(600));
    let machine = Machine::shopify(engine.store().fingerprint_key());
    machine
        .install(None, foreign.clone(), valid, InstallSource::Application, now())
        .make_durable(engine.store())
        .await
        .unwrap();
    assert!(engine.state(&foreign).unwrap().is_some(), "installed: the call cannot stop at NotInstalled");
    let err = engine.access_token_for(&foreign).await.unwrap_err();
    assert!(matches!(err, tokenwal::Error::Config(_)), "refused by the provider check: {err}");
    let err = engine.install_grant(foreign, expired("rt-2"), InstallSource::Application).await.unwrap_err();
    assert!(matches!(err, tokenwal::Error::Config(_)), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing was sent for the foreign grant");
}

#[tokio::test]
async fn body_auth_and_a_server_that_does_not_rotate() {
    let (url, seen) = server(false).await;
    let (engine, _) = Engine::open(config(&url, ClientAuth::Body)).await.unwrap();
    let grant = GrantKey::new("idp", "user-7").unwrap();
    engine.install_grant(grant.clone(), expired("rt-keep"), InstallSource::Application).await.unwrap();
    assert_eq!(engine.access_token_for(&grant).await.unwrap().expose_secret(), "at-1");
    let (auth, form) = seen.lock().unwrap()[0].clone();
    assert_eq!(auth, None);
    assert_eq!(form.get("client_id").map(String::as_str), Some("client-1"));
    assert_eq!(form.get("client_secret").map(String::as_str), Some("s3cret"));
    // RFC 6749 §6: no new refresh token means the old one stays.
    let s = engine.state(&grant).unwrap().unwrap();
    assert_eq!(s.tokens.unwrap().refresh_token.expose_secret(), "rt-keep");
}

#[tokio::test]
async fn plain_http_is_refused_off_loopback() {
    let c = config("http://192.0.2.1/oauth/token", ClientAuth::Body);
    assert!(Engine::open(c).await.is_err());
    let c = config("ftp://127.0.0.1/oauth/token", ClientAuth::Body);
    assert!(Engine::open(c).await.is_err());
}
