//! The built-in `shopify-customer-account` profile against a hand-written token endpoint over
//! loopback (`/authentication/{shop_id}/oauth/token`, the profile's `token_url` pointed at it):
//! a public client refreshing per customer, each customer at its own shop's URL, expiry from
//! `expires_in` at receipt, and 400/401 → needs re-login while a 5xx or a timeout never is.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenwal::core::protocol::ProviderSpec;
use tokenwal::core::{
    AccessToken, ClientSecret, CustomerAccount, GrantKey, InstallSource, ProviderProfile, RefreshToken, TokenSet,
};
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_testkit::now;

/// One scripted answer.
#[derive(Clone, Copy)]
enum Reply {
    /// 200 with new tokens (`at-{n}`, `rt-{n}`, `expires_in` 600).
    Rotate,
    /// This status with this body.
    Status(u16, &'static str),
    /// No answer within the client's timeout.
    Hang,
}

#[derive(Clone, Debug)]
struct Seen {
    shop_id: String,
    origin: Option<String>,
    authorization: Option<String>,
    form: HashMap<String, String>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A token endpoint answering from `script` (then `Rotate`), recording every request.
async fn server(script: Vec<Reply>) -> (String, Log) {
    let seen: Log = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let s2 = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/authentication/{shop_id}/oauth/token",
        axum::routing::post(
            move |axum::extract::Path(shop_id): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  axum::extract::Form(form): axum::extract::Form<HashMap<String, String>>| {
                let seen = Arc::clone(&s2);
                let script = Arc::clone(&script);
                async move {
                    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let n = {
                        let mut g = seen.lock().unwrap();
                        g.push(Seen {
                            shop_id,
                            origin: header("origin"),
                            authorization: header("authorization"),
                            form,
                        });
                        g.len()
                    };
                    let reply = script.lock().unwrap().pop_front().unwrap_or(Reply::Rotate);
                    match reply {
                        Reply::Rotate => (
                            axum::http::StatusCode::OK,
                            serde_json::json!({"access_token": format!("at-{n}"), "expires_in": 600, "refresh_token": format!("rt-{n}")})
                                .to_string(),
                        ),
                        Reply::Status(status, body) => {
                            (axum::http::StatusCode::from_u16(status).unwrap(), body.to_owned())
                        }
                        Reply::Hang => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            (axum::http::StatusCode::OK, "{}".to_owned())
                        }
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, seen)
}

/// The built-in profile, its token URL and `Origin` set (both settings), a configured secret that a
/// public client must never send.
fn config(base: &str) -> Config {
    let mut profile = ProviderProfile::shopify_customer_account();
    let ProviderSpec::OAuth2 { token_url, origin, .. } = &mut profile.spec else { unreachable!() };
    *token_url = format!("{base}/authentication/{{shop_id}}/oauth/token");
    *origin = Some("https://store.example".into());
    let mut c = Config::shopify(StoreLocation::InMemory, "public-client-id", ClientSecret::new("never-sent"))
        .with_profile(profile);
    c.proactive = false;
    c.timeouts.total = Duration::from_millis(500);
    c.policy.backoff.base = Duration::from_millis(20);
    c.policy.backoff.cap = Duration::from_millis(50);
    c
}

fn customer(shop_id: u64, customer_id: u64) -> GrantKey {
    GrantKey::customer_account(&CustomerAccount::new(shop_id, customer_id).unwrap())
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
async fn a_public_client_refreshes_each_customer_at_its_own_shop() {
    let (base, seen) = server(vec![]).await;
    let (engine, _) = Engine::open(config(&base)).await.unwrap();
    let alice = customer(111, 7);
    let bob = customer(222, 7);
    engine.install_grant(alice.clone(), expired("rt-alice"), InstallSource::Application).await.unwrap();
    engine.install_grant(bob.clone(), expired("rt-bob"), InstallSource::Application).await.unwrap();

    let before = now();
    assert_eq!(engine.access_token_for(&alice).await.unwrap().expose_secret(), "at-1");
    assert_eq!(engine.access_token_for(&bob).await.unwrap().expose_secret(), "at-2");
    let after = now();
    // A valid token is served from the cache: no further request.
    assert_eq!(engine.access_token_for(&alice).await.unwrap().expose_secret(), "at-1");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (s, shop_id, rt) in [(&seen[0], "111", "rt-alice"), (&seen[1], "222", "rt-bob")] {
        assert_eq!(s.shop_id, shop_id, "each customer's token goes to its own shop's URL");
        assert_eq!(s.origin.as_deref(), Some("https://store.example"));
        assert_eq!(s.authorization, None, "a public client sends no Authorization header");
        let mut keys: Vec<&str> = s.form.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["client_id", "grant_type", "refresh_token"], "and no client_secret");
        assert_eq!(s.form["grant_type"], "refresh_token");
        assert_eq!(s.form["client_id"], "public-client-id");
        assert_eq!(s.form["refresh_token"], rt);
    }
    // Expiry is `expires_in` counted from receipt; the rotated refresh token is kept per customer.
    let a = engine.state(&alice).unwrap().unwrap().tokens.unwrap();
    assert!(a.access_expires_at >= before.saturating_add(Duration::from_secs(600)));
    assert!(a.access_expires_at <= after.saturating_add(Duration::from_secs(600)));
    assert_eq!(a.refresh_token.expose_secret(), "rt-1");
    assert_eq!(engine.state(&bob).unwrap().unwrap().tokens.unwrap().refresh_token.expose_secret(), "rt-2");
    // A grant of the Admin API is not this engine's.
    let shop = GrantKey::shopify(&tokenwal::core::ShopDomain::parse("x.myshopify.com").unwrap());
    assert!(matches!(engine.access_token_for(&shop).await, Err(Error::Config(_))));
}

#[tokio::test]
async fn a_401_on_refresh_means_log_in_again() {
    for (status, body) in [(401, r#"{"error":"invalid_token"}"#), (400, ""), (400, r#"{"error":"invalid_grant"}"#)] {
        let (base, seen) = server(vec![Reply::Status(status, body)]).await;
        let (engine, _) = Engine::open(config(&base)).await.unwrap();
        let c = customer(111, 9);
        engine.install_grant(c.clone(), expired("rt-0"), InstallSource::Application).await.unwrap();
        let err = engine.access_token_for(&c).await.unwrap_err();
        assert!(matches!(err, Error::NeedsReauth { .. }), "{status} {body}: {err}");
        assert_eq!(engine.state(&c).unwrap().unwrap().phase.name(), "needs-reauth");
        assert_eq!(seen.lock().unwrap().len(), 1, "one definitive answer, no retry");
        // Another customer of the same shop is untouched.
        let other = customer(111, 10);
        engine.install_grant(other.clone(), expired("rt-x"), InstallSource::Application).await.unwrap();
        assert_eq!(engine.access_token_for(&other).await.unwrap().expose_secret(), "at-2");
    }
}

/// A 5xx or a timeout may have rotated: the old token is retried, never the grant declared dead.
/// A 400 that follows the ambiguity resolves it: the customer must log in again.
#[tokio::test]
async fn a_5xx_or_a_timeout_is_never_a_re_login() {
    let (base, seen) = server(vec![Reply::Status(500, "oops"), Reply::Hang, Reply::Status(502, "")]).await;
    let (engine, _) = Engine::open(config(&base)).await.unwrap();
    let c = customer(333, 1);
    engine.install_grant(c.clone(), expired("rt-0"), InstallSource::Application).await.unwrap();
    let token = loop {
        match engine.access_token_for(&c).await {
            Ok(t) => break t,
            Err(Error::Ambiguous { .. } | Error::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("a 5xx or a timeout became {e}"),
        }
    };
    assert_eq!(token.expose_secret(), "at-4");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|s| s.form["refresh_token"] == "rt-0"), "the same token is retried until an answer");
    assert_eq!(engine.state(&c).unwrap().unwrap().phase.name(), "healthy");

    let (base, seen) = server(vec![Reply::Status(503, ""), Reply::Status(400, r#"{"error":"invalid_grant"}"#)]).await;
    let (engine, _) = Engine::open(config(&base)).await.unwrap();
    engine.install_grant(c.clone(), expired("rt-0"), InstallSource::Application).await.unwrap();
    let err = loop {
        match engine.access_token_for(&c).await {
            Err(Error::Ambiguous { .. } | Error::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other.unwrap_err(),
        }
    };
    let Error::NeedsReauth { reason, .. } = &err else { panic!("{err}") };
    assert!(
        matches!(reason, tokenwal::core::ReauthReason::CredentialRejected { after_ambiguity: true, status: 400, .. }),
        "{reason:?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_profile_url_off_loopback_must_be_https() {
    let mut c = config("http://192.0.2.1");
    c.proactive = false;
    assert!(matches!(Engine::open(c).await, Err(Error::Config(_))));
}
