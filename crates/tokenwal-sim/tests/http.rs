//! The HTTP front end over real loopback sockets, observed from a reqwest client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokenwal_sim::{serve, Fault, SimConfig, SimHandle, TokenSet};

const SHOP: &str = "demo.myshopify.com";
const DAY_MS: u64 = 86_400_000;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start() -> SimHandle {
    start_with(SimConfig { seed: Some(1), ..SimConfig::default() }).await
}

async fn start_with(config: SimConfig) -> SimHandle {
    serve(config, loopback()).await.expect("bind loopback")
}

fn client() -> Client {
    Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

/// A client that resolves `shop` to the simulator, for Host-header shop resolution.
fn host_client(sim: &SimHandle, shop: &str) -> Client {
    Client::builder().no_proxy().timeout(Duration::from_secs(10)).resolve(shop, sim.addr()).build().unwrap()
}

fn refresh_body(refresh_token: &str) -> Value {
    json!({
        "client_id": "sim-client-id",
        "client_secret": "sim-client-secret",
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
    })
}

async fn refresh(c: &Client, sim: &SimHandle, refresh_token: &str) -> reqwest::Result<reqwest::Response> {
    c.post(sim.token_url(SHOP)).json(&refresh_body(refresh_token)).send().await
}

async fn refresh_ok(c: &Client, sim: &SimHandle, refresh_token: &str) -> TokenSet {
    let resp = refresh(c, sim, refresh_token).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

fn request_id(resp: &reqwest::Response) -> String {
    resp.headers().get("x-request-id").expect("x-request-id on every answer").to_str().unwrap().to_owned()
}

#[tokio::test]
async fn refresh_round_trip_with_path_and_host_resolution() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    let c = client();

    // Path-based shop, JSON body.
    let resp = refresh(&c, &sim, t0.refresh_token.as_str()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let id1 = request_id(&resp);
    let t1: TokenSet = resp.json().await.unwrap();
    assert_ne!(t1.refresh_token, t0.refresh_token);
    assert_eq!((t1.expires_in, t1.refresh_token_expires_in), (3600, 7_776_000));

    // Host-header shop, form body.
    let hc = host_client(&sim, SHOP);
    let port = sim.addr().port();
    let resp = hc
        .post(format!("http://{SHOP}:{port}/admin/oauth/access_token"))
        .form(&[
            ("client_id", "sim-client-id"),
            ("client_secret", "sim-client-secret"),
            ("grant_type", "refresh_token"),
            ("refresh_token", t1.refresh_token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_ne!(request_id(&resp), id1);
    let t2: TokenSet = resp.json().await.unwrap();

    // The same token sent to another shop (via Host) is unknown there.
    let other = "other.myshopify.com";
    let resp = host_client(&sim, other)
        .post(format!("http://{other}:{port}/admin/oauth/access_token"))
        .json(&refresh_body(t2.refresh_token.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error":"invalid_request","error_description":"This request requires an active refresh_token"})
    );

    // Admin API, both resolutions.
    let resp = hc
        .get(format!("http://{SHOP}:{port}/admin/api/2025-10/shop.json"))
        .header("X-Shopify-Access-Token", t2.access_token.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!request_id(&resp).is_empty());
    assert_eq!(resp.json::<Value>().await.unwrap()["shop"]["myshopify_domain"], SHOP);
    let resp = c
        .get(format!("{}/admin/api/2025-10/shop.json", sim.shop_base_url(SHOP)))
        .header("X-Shopify-Access-Token", "shpat_bogus")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    request_id(&resp);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"errors":"[API] Invalid API key or access token (unrecognized login or wrong password)"})
    );
    let resp = c
        .post(format!("{}/admin/api/2025-10/graphql.json", sim.shop_base_url(SHOP)))
        .header("X-Shopify-Access-Token", t2.access_token.as_str())
        .json(&json!({"query":"{ shop { myshopifyDomain } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let counters = sim.counters().shop(SHOP);
    assert_eq!((counters.rotations, counters.admin_ok, counters.admin_unauthorized), (2, 2, 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn rotate_then_drop_is_a_plain_520_and_the_retry_recovers() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    sim.push_faults(SHOP, [Fault::RotateThenDrop]).unwrap();
    let c = client();
    let resp = refresh(&c, &sim, t0.refresh_token.as_str()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 520);
    request_id(&resp);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert_eq!(resp.text().await.unwrap(), "error code: 520");
    // Committed server-side: the retry is a replay of the lost pair.
    let t1 = refresh_ok(&c, &sim, t0.refresh_token.as_str()).await;
    let state = sim.shop_state(SHOP);
    let r0 = state.refresh_token(t0.refresh_token.as_str()).unwrap();
    assert_eq!(r0.replacement.as_ref(), Some(&t1.refresh_token));
    assert_eq!(sim.counters().shop(SHOP).replays, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn rotate_then_hang_times_the_client_out() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    sim.push_faults(SHOP, [Fault::RotateThenHang]).unwrap();
    let c = Client::builder().no_proxy().timeout(Duration::from_millis(300)).build().unwrap();
    let started = Instant::now();
    let err = refresh(&c, &sim, t0.refresh_token.as_str()).await.expect_err("a hung answer never arrives");
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(sim.counters().shop(SHOP).rotations, 1, "rotation committed");
    let t1 = refresh_ok(&client(), &sim, t0.refresh_token.as_str()).await;
    assert_eq!(t1.expires_in, 3600);
    sim.shutdown().await;
}

#[tokio::test]
async fn rotate_then_reset_is_a_connection_error_not_a_status() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    sim.push_faults(SHOP, [Fault::RotateThenReset]).unwrap();
    let c = client();
    let started = Instant::now();
    let err = refresh(&c, &sim, t0.refresh_token.as_str()).await.expect_err("no HTTP response");
    assert!(!err.is_timeout(), "{err:?}");
    assert!(err.status().is_none(), "{err:?}");
    assert!(err.is_request() || err.is_connect(), "{err:?}");
    let chain = format!("{err:?}");
    assert!(
        chain.contains("ConnectionReset") || chain.contains("IncompleteMessage"),
        "expected a reset or an unanswered close: {chain}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(sim.counters().shop(SHOP).rotations, 1);
    // The same client recovers on a fresh connection.
    refresh_ok(&c, &sim, t0.refresh_token.as_str()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn throttle_fail_truncate_malformed_missing_and_slow() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    let c = client();
    let rt = t0.refresh_token.as_str();
    sim.push_faults(
        SHOP,
        [
            Fault::Throttle { retry_after_secs: 2 },
            Fault::FailBeforeProcessing { status: 503, json: false },
            Fault::FailBeforeProcessing { status: 502, json: true },
            Fault::Truncated,
            Fault::Malformed,
            Fault::MissingExpiresIn,
            Fault::Slow { delay_ms: 300 },
            Fault::InvalidClient,
        ],
    )
    .unwrap();

    let resp = refresh(&c, &sim, rt).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "2");
    request_id(&resp);

    let resp = refresh(&c, &sim, rt).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    request_id(&resp);
    assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());

    let resp = refresh(&c, &sim, rt).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"errors":"Bad Gateway"}));
    assert_eq!(sim.counters().shop(SHOP).rotations, 0, "nothing processed yet");

    let resp = refresh(&c, &sim, rt).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("{\"access_token\""), "{text}");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "truncated: {text}");

    let resp = refresh(&c, &sim, rt).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.json::<Value>().await.is_err());

    let resp = refresh(&c, &sim, rt).await.unwrap();
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("expires_in").is_none() && body.get("access_token").is_some());

    let started = Instant::now();
    let resp = refresh(&c, &sim, rt).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let resp = refresh(&c, &sim, rt).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_client");

    let counters = sim.counters().shop(SHOP);
    assert_eq!(counters.total_faults(), 8);
    assert_eq!((counters.rotations, counters.replays), (1, 3));
    sim.shutdown().await;
}

async fn ctl(c: &Client, sim: &SimHandle, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = c.request(method, format!("{}/_sim{path}", sim.base_url()));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap()
}

#[tokio::test]
async fn control_api_drives_a_31_day_scenario() {
    use reqwest::Method;
    let sim = start().await;
    let c = client();
    assert_eq!(ctl(&c, &sim, Method::GET, "/health", None).await, json!({"ok": true}));

    ctl(&c, &sim, Method::POST, "/apps", Some(json!({"client_id":"cid2","client_secret":"sec2"}))).await;
    let t0: TokenSet =
        serde_json::from_value(ctl(&c, &sim, Method::POST, "/shops", Some(json!({"shop": SHOP}))).await).unwrap();
    let t1 = refresh_ok(&c, &sim, t0.refresh_token.as_str()).await;

    // 31 days later R0 is out of retention; R1 is unused and alive.
    let clock = ctl(&c, &sim, Method::POST, "/clock/advance", Some(json!({"ms": 31 * DAY_MS}))).await;
    assert_eq!(clock["offset_ms"], 31 * DAY_MS);
    let resp = refresh(&c, &sim, t0.refresh_token.as_str()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let state = ctl(&c, &sim, Method::GET, &format!("/shops/{SHOP}"), None).await;
    assert_eq!(state["alive"], true);
    assert!(sim.grant_alive(SHOP));
    let r1 = state["grants"][0]["refresh_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["token"] == t1.refresh_token.as_str())
        .unwrap();
    assert_eq!(r1["accepted_now"], true);

    // Scripted faults via the API.
    let pending = ctl(
        &c,
        &sim,
        Method::POST,
        &format!("/shops/{SHOP}/faults"),
        Some(json!([{"kind":"rotate_then_drop"},{"kind":"throttle","retry_after_secs":1}])),
    )
    .await;
    assert_eq!(pending["pending"].as_array().unwrap().len(), 2);
    let resp = refresh(&c, &sim, t1.refresh_token.as_str()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 520);
    ctl(&c, &sim, Method::DELETE, &format!("/shops/{SHOP}/faults"), None).await;

    // Switch the policy to strict: the retry of R1 is now refused.
    let config = ctl(
        &c,
        &sim,
        Method::PATCH,
        "/config",
        Some(json!({"policy":{"kind":"strict"},"rejection_style":"invalid_grant"})),
    )
    .await;
    assert_eq!(config["policy"], json!({"kind":"strict"}));
    assert_eq!(config["access_ttl_ms"], 3_600_000);
    let resp = refresh(&c, &sim, t1.refresh_token.as_str()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_grant");

    // Counters, then reset.
    let counters = ctl(&c, &sim, Method::GET, "/counters", None).await;
    assert_eq!(counters["shops"][SHOP]["rotations"], 2);
    assert_eq!(counters["total"]["faults"]["rotate_then_drop"], 1);
    assert_eq!(counters["total"]["rejections"]["invalid_grant"], 1);
    ctl(&c, &sim, Method::POST, "/counters/reset", None).await;
    assert_eq!(sim.counters().total.token_requests, 0);

    // Session token minted on the simulator's clock, then a token exchange.
    let st = ctl(&c, &sim, Method::POST, "/session_tokens", Some(json!({"shop": SHOP}))).await;
    let resp = c
        .post(sim.token_url(SHOP))
        .form(&[
            ("client_id", "sim-client-id"),
            ("client_secret", "sim-client-secret"),
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token", st["session_token"].as_str().unwrap()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:id_token"),
            ("requested_token_type", "urn:shopify:params:oauth:token-type:offline-access-token"),
            ("expiring", "1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let acquired: TokenSet = resp.json().await.unwrap();
    assert_eq!(acquired.refresh_token_expires_in, 7_776_000);
    assert_eq!(sim.counters().shop(SHOP).acquisitions, 1);

    // A legacy token migrated through the endpoint with an integer `expiring`.
    let legacy = ctl(&c, &sim, Method::POST, "/legacy_tokens", Some(json!({"shop": SHOP}))).await;
    let migrate = json!({
        "client_id": "sim-client-id",
        "client_secret": "sim-client-secret",
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": legacy["access_token"],
        "subject_token_type": "urn:shopify:params:oauth:token-type:offline-access-token",
        "requested_token_type": "urn:shopify:params:oauth:token-type:offline-access-token",
        "expiring": 1,
    });
    let first: TokenSet = c.post(sim.token_url(SHOP)).json(&migrate).send().await.unwrap().json().await.unwrap();
    let again: TokenSet = c.post(sim.token_url(SHOP)).json(&migrate).send().await.unwrap().json().await.unwrap();
    assert_eq!(first.refresh_token, again.refresh_token);

    // Random faults on, then off.
    let set =
        ctl(&c, &sim, Method::PUT, "/faults/random", Some(json!({"seed": 5, "probabilities": {"malformed": 1.0}})))
            .await;
    assert_eq!(set["probabilities"]["malformed"], 1.0);
    let resp = refresh(&c, &sim, first.refresh_token.as_str()).await.unwrap();
    assert!(resp.json::<Value>().await.is_err());
    ctl(&c, &sim, Method::DELETE, "/faults/random", None).await;

    // Bad control input is a 400 with a JSON error.
    let resp =
        c.post(format!("{}/_sim/clock/advance", sim.base_url())).json(&json!({"ms": "soon"})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.json::<Value>().await.unwrap()["error"].is_string());
    let resp = c
        .post(format!("{}/_sim/shops", sim.base_url()))
        .json(&json!({"shop": SHOP, "client_id": "nobody"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_missing_fields_still_carry_request_ids() {
    let sim = start().await;
    let c = client();
    let resp = c.get(format!("{}/nope", sim.base_url())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    request_id(&resp);
    let resp = c.post(sim.token_url(SHOP)).json(&json!({"client_id":"sim-client-id"})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    request_id(&resp);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_request");
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_resets_hung_connections_and_drop_stops_the_server() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    sim.push_faults(SHOP, [Fault::RotateThenHang]).unwrap();
    let url = sim.token_url(SHOP);
    let body = refresh_body(t0.refresh_token.as_str());
    let hung = tokio::spawn(async move { client().post(url).json(&body).send().await });
    // Wait until the request has been processed (and is being held).
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.counters().total.token_requests == 0 {
        assert!(Instant::now() < deadline, "request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let addr = sim.addr();
    sim.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let outcome = hung.await.unwrap();
    assert!(outcome.is_err(), "a hung request gets no answer: {outcome:?}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let sim = start().await;
    let addr = sim.addr();
    drop(sim);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn hang_cap_resets_the_connection() {
    let sim = start_with(SimConfig { hang_cap: "200ms".parse().unwrap(), ..SimConfig::default() }).await;
    let t0 = sim.seed_shop(SHOP);
    sim.push_faults(SHOP, [Fault::RotateThenHang]).unwrap();
    let started = Instant::now();
    let err = refresh(&client(), &sim, t0.refresh_token.as_str()).await.expect_err("reset after the cap");
    assert!(!err.is_timeout(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_held_answer_waits_for_release_and_the_rotation_is_already_committed() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    sim.hold(SHOP);
    assert_eq!(sim.hold_status(SHOP), tokenwal_sim::HoldStatus { armed: true, held: 0 });
    let c = client();
    let pending = {
        let (c, url, body) = (c.clone(), sim.token_url(SHOP), refresh_body(t0.refresh_token.as_str()));
        tokio::spawn(async move { c.post(url).json(&body).send().await })
    };
    assert!(sim.wait_held(SHOP, Duration::from_secs(10)).await, "the request reaches the hold");
    assert_eq!(sim.hold_status(SHOP), tokenwal_sim::HoldStatus { armed: false, held: 1 });
    // Processed, not answered: the old refresh token already has its replacement.
    let replacement = sim.shop_state(SHOP).refresh_token(t0.refresh_token.as_str()).unwrap().replacement.clone();
    assert!(replacement.is_some());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "no answer before the release");
    assert!(sim.release(SHOP));
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t1: TokenSet = resp.json().await.unwrap();
    assert_eq!(Some(t1.refresh_token.clone()), replacement);
    // The hold was used up: the next request is answered at once.
    assert!(!sim.release(SHOP));
    refresh_ok(&c, &sim, t1.refresh_token.as_str()).await;
    assert_eq!(sim.hold_status(SHOP), tokenwal_sim::HoldStatus::default());
}

#[tokio::test]
async fn a_cancelled_hold_resets_the_connection() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    sim.hold(SHOP);
    let c = client();
    let pending = {
        let (c, url, body) = (c.clone(), sim.token_url(SHOP), refresh_body(t0.refresh_token.as_str()));
        tokio::spawn(async move { c.post(url).json(&body).send().await })
    };
    assert!(sim.wait_held(SHOP, Duration::from_secs(10)).await);
    assert!(sim.cancel(SHOP));
    assert!(pending.await.unwrap().is_err(), "the answer is lost");
    // The rotation stays committed: a retry with the old token gets the same pair.
    assert_eq!(sim.counters().shop(SHOP).rotations, 1);
    assert!(!sim.cancel(SHOP), "nothing armed or held any more");
    // An armed, unused hold is disarmed by cancel.
    sim.hold(SHOP);
    assert!(sim.cancel(SHOP));
    let _ = refresh_ok(&c, &sim, t0.refresh_token.as_str()).await;
}

#[tokio::test]
async fn holds_over_the_control_api() {
    let sim = start().await;
    let t0 = sim.seed_shop(SHOP);
    let c = client();
    let ctl = |path: &str| format!("{}/_sim/shops/{SHOP}/hold{path}", sim.base_url());
    let r: Value = c.post(ctl("/wait")).json(&json!({"timeout_ms": 20})).send().await.unwrap().json().await.unwrap();
    assert!(r["error"].as_str().unwrap().contains("no token request"), "{r}");
    let status = c.post(ctl("/wait")).json(&json!({"timeout_ms": 20})).send().await.unwrap().status();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    let r: Value = c.post(ctl("")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"armed": true, "held": 0}));
    let pending = {
        let (c, url, body) = (c.clone(), sim.token_url(SHOP), refresh_body(t0.refresh_token.as_str()));
        tokio::spawn(async move { c.post(url).json(&body).send().await })
    };
    let r: Value = c.post(ctl("/wait")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"armed": false, "held": 1}));
    let r: Value = c.get(ctl("")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"armed": false, "held": 1}));
    assert!(!pending.is_finished());
    let r: Value = c.post(ctl("/release")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"released": true}));
    assert_eq!(pending.await.unwrap().unwrap().status(), StatusCode::OK);
    let r: Value = c.post(ctl("/cancel")).send().await.unwrap().json().await.unwrap();
    assert_eq!(r, json!({"cancelled": false}));
}

/// Two token requests for one shop at the same time are counted as overlapping; for two shops,
/// or one after the other, they are not. Reported by `SimHandle::counters` and `GET /_sim/counters`.
#[tokio::test]
async fn overlapping_token_requests_are_counted_per_grant() {
    let sim = std::sync::Arc::new(start().await);
    let other = "other.myshopify.com";
    let t0 = sim.seed_shop(SHOP);
    let o0 = sim.seed_shop(other);
    let c = client();

    // Shop A's first request is held (received, processed, unanswered) ...
    sim.hold(SHOP);
    let first = {
        let (c, sim, rt) = (c.clone(), sim.clone(), t0.refresh_token.as_str().to_owned());
        tokio::spawn(async move { refresh(&c, &sim, &rt).await.unwrap().status() })
    };
    assert!(sim.wait_held(SHOP, Duration::from_secs(10)).await);
    // ... while shop B is refreshed: different grants never overlap.
    let resp = c.post(sim.token_url(other)).json(&refresh_body(o0.refresh_token.as_str())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(sim.counters().total.overlapping_token_requests, 0);
    // A second request for shop A while the first is still being handled: one overlap.
    assert_eq!(refresh(&c, &sim, t0.refresh_token.as_str()).await.unwrap().status(), StatusCode::OK);
    assert!(sim.release(SHOP));
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    // Shop A again, alone.
    assert_eq!(refresh(&c, &sim, t0.refresh_token.as_str()).await.unwrap().status(), StatusCode::OK);

    let counters = sim.counters();
    let a = counters.shop(SHOP);
    assert_eq!((a.token_requests, a.overlapping_token_requests, a.max_concurrent_token_requests), (3, 1, 2));
    let b = counters.shop(other);
    assert_eq!((b.overlapping_token_requests, b.max_concurrent_token_requests), (0, 1));
    assert_eq!((counters.total.overlapping_token_requests, counters.total.max_concurrent_token_requests), (1, 2));
    let json = ctl(&c, &sim, reqwest::Method::GET, "/counters", None).await;
    assert_eq!(json["total"]["overlapping_token_requests"], 1);
    assert_eq!(json["shops"][SHOP]["max_concurrent_token_requests"], 2);
    assert_eq!(json["shops"][other]["overlapping_token_requests"], 0);
    sim.with_model(|m| assert_eq!(m.token_requests_in_flight(SHOP), 0));
}

/// A hung or reset answer is counted out when its connection goes, not left in flight.
#[tokio::test]
async fn dropped_answers_leave_nothing_in_flight() {
    let sim = start_with(SimConfig {
        seed: Some(1),
        hang_cap: tokenwal_sim::SimDuration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let t0 = sim.seed_shop(SHOP);
    sim.push_faults(SHOP, [Fault::RotateThenHang, Fault::RotateThenReset]).unwrap();
    let c = client();
    assert!(refresh(&c, &sim, t0.refresh_token.as_str()).await.is_err());
    assert!(refresh(&c, &sim, t0.refresh_token.as_str()).await.is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.with_model(|m| m.token_requests_in_flight(SHOP)) > 0 {
        assert!(Instant::now() < deadline, "still in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.counters().shop(SHOP).overlapping_token_requests, 0);
}

/// The Customer Account API mode over HTTP: a public client's form refresh at
/// `/authentication/{shop_id}/oauth/token`, its refusals, the control API, the token check.
#[tokio::test]
async fn customer_account_mode_over_http() {
    let sim = start().await;
    let c = client();
    let seeded =
        ctl(&c, &sim, reqwest::Method::POST, "/customers", Some(json!({"shop_id": 42, "customer_id": 7}))).await;
    let rt0 = seeded["refresh_token"].as_str().unwrap().to_owned();
    let url = sim.customer_token_url_template().replace("{shop_id}", "42");
    let form = |rt: &str| {
        vec![
            ("grant_type", "refresh_token".to_owned()),
            ("client_id", "sim-public-client-id".to_owned()),
            ("refresh_token", rt.to_owned()),
        ]
    };

    let resp = c.post(&url).form(&form(&rt0)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t1: TokenSet = resp.json().await.unwrap();
    // Strict single use: the spent token is refused with a JSON 400.
    let resp = c.post(&url).form(&form(&rt0)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_grant");
    // A secret, in the body or as HTTP Basic, or a wrong client id: 401 invalid_client.
    let mut with_secret = form(t1.refresh_token.as_str());
    with_secret.push(("client_secret", "x".to_owned()));
    let mut wrong_client = form(t1.refresh_token.as_str());
    wrong_client[1].1 = "sim-client-id".to_owned();
    for resp in [
        c.post(&url).form(&with_secret).send().await.unwrap(),
        c.post(&url)
            .basic_auth("sim-public-client-id", Some("x"))
            .form(&form(t1.refresh_token.as_str()))
            .send()
            .await
            .unwrap(),
        c.post(&url).form(&wrong_client).send().await.unwrap(),
    ] {
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_client");
    }
    // The customer's grant is `42:7` in the per-shop control routes; still alive.
    let state = ctl(&c, &sim, reqwest::Method::GET, "/shops/42:7", None).await;
    assert_eq!(state["alive"], true);
    assert!(sim.customer_alive(42, 7));
    let counters = sim.counters().shop("42:7");
    assert_eq!((counters.token_requests, counters.rotations, counters.invalid_client), (5, 1, 3));
    // The Customer Account API takes the new access token, not the spent one's shop neighbour.
    let ok = c.post(sim.customer_api_url(42)).header("authorization", t1.access_token.as_str()).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let no = c.post(sim.customer_api_url(43)).header("authorization", t1.access_token.as_str()).send().await.unwrap();
    assert_eq!(no.status(), StatusCode::UNAUTHORIZED);
    // Scripted faults by grant name over the control API.
    ctl(&c, &sim, reqwest::Method::POST, "/shops/42:7/faults", Some(json!({"kind": "rotate_then_drop"}))).await;
    let resp = c.post(&url).form(&form(t1.refresh_token.as_str())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 520);
    // Under strict single use the lost answer spent the token.
    let resp = c.post(&url).form(&form(t1.refresh_token.as_str())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    sim.shutdown().await;
}
