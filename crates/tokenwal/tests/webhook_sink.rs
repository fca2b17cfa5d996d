//! The webhook sink over real sockets: a receiver that fails its first deliveries and is down
//! during an engine restart still ends up with every event (at least once, signatures valid).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenwal::core::UnixMillis;
use tokenwal::core::{AccessToken, ClientSecret, GrantKey, Record, RefreshToken, RefusalReason, ShopDomain, TokenSet};
use tokenwal::webhook_sink::{self as webhook, WebhookConfig};
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_sim::{serve, SimConfig, SimHandle};

const CLIENT_ID: &str = "sim-client-id";
const SECRET: &str = "sim-client-secret";
const HOOK_SECRET: &str = "hook-signing-secret";

fn shop(name: &str) -> ShopDomain {
    ShopDomain::parse(&format!("{name}.myshopify.com")).unwrap()
}

fn now() -> UnixMillis {
    UnixMillis::from_system_time(std::time::SystemTime::now())
}

fn seed(sim: &SimHandle, name: &str) -> TokenSet {
    let t = sim.seed_shop(&shop(name).to_string());
    TokenSet {
        access_token: AccessToken::new(t.access_token.as_str()),
        access_expires_at: now(),
        refresh_token: RefreshToken::new(t.refresh_token.as_str()),
        refresh_expires_at: Some(now().saturating_add(Duration::from_secs(t.refresh_token_expires_in))),
        scope: Some(t.scope.clone()),
    }
}

/// What the receiver saw.
#[derive(Default)]
struct Inbox {
    /// Answer 500 to this many more (validly signed) deliveries.
    fail_next: AtomicUsize,
    /// While set, every request gets 503 (on top of the listener being closed).
    down: AtomicBool,
    /// Requests with a bad or missing signature or a stale timestamp.
    bad: AtomicUsize,
    /// Every accepted delivery: (id, body).
    accepted: Mutex<Vec<(String, serde_json::Value)>>,
}

async fn receive(
    axum::extract::State(inbox): axum::extract::State<Arc<Inbox>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    if inbox.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let ts = h(webhook::TIMESTAMP_HEADER);
    let fresh = ts.parse::<u64>().is_ok_and(|t| (now().0 / 1000).abs_diff(t) <= 300);
    if !fresh || !webhook::verify(HOOK_SECRET.as_bytes(), &ts, &body, &h(webhook::SIGNATURE_HEADER)) {
        inbox.bad.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    if inbox.fail_next.load(Ordering::SeqCst) > 0 {
        inbox.fail_next.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["id"].as_str().unwrap(), h(webhook::EVENT_ID_HEADER));
    inbox.accepted.lock().unwrap().push((h(webhook::EVENT_ID_HEADER), v));
    StatusCode::OK
}

/// Serves the receiver on `addr` until the returned sender fires.
async fn start_receiver(inbox: Arc<Inbox>, addr: std::net::SocketAddr) -> tokio::sync::oneshot::Sender<()> {
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(inbox);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap()
    });
    tx
}

fn config(sim: &SimHandle, dir: &std::path::Path, secret: &str, hook: &str) -> Config {
    let mut c = Config::shopify(StoreLocation::Path(dir.join("db")), CLIENT_ID, ClientSecret::new(secret))
        .with_insecure_test_endpoint(url::Url::parse(&sim.base_url()).unwrap())
        .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
    c.proactive = false;
    c.timeouts.connect = Duration::from_secs(2);
    c.timeouts.total = Duration::from_secs(3);
    c.policy.backoff.base = Duration::from_millis(40);
    c.policy.backoff.cap = Duration::from_millis(400);
    let mut w = WebhookConfig::new(url::Url::parse(hook).unwrap(), ClientSecret::new(HOOK_SECRET));
    w.app_handle = Some("my-app".into());
    w.min_backoff = Duration::from_millis(30);
    w.max_backoff = Duration::from_millis(150);
    w.poll_interval = Duration::from_millis(30);
    w.timeouts.total = Duration::from_secs(2);
    c.webhook = Some(w);
    c
}

/// Opens the engine, waiting for the previous one's background tasks to release the store lock.
async fn open(c: Config) -> Engine {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Engine::open(c.clone()).await {
            Ok((e, _)) => return e,
            Err(e) if Instant::now() < deadline && e.to_string().contains("locked") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("open: {e}"),
        }
    }
}

/// The (lsn → kind) of every event the journal implies, recomputed from the store independently
/// of the sink.
fn expected_events(store: &tokenwal::store::Store, shops: &[&str]) -> BTreeMap<u64, &'static str> {
    let mut out = BTreeMap::new();
    for name in shops {
        let mut dead = false;
        for (lsn, r) in store.history(&GrantKey::shopify(&shop(name))).unwrap() {
            match r {
                Record::NeedsReauth { .. } => {
                    dead = true;
                    out.insert(lsn, "needs_reauth");
                }
                Record::Installed { .. } | Record::Committed { .. } => {
                    if dead {
                        out.insert(lsn, "recovered");
                    }
                    dead = false;
                }
                Record::Refused { why: RefusalReason::AppCredentials { .. }, .. } => {
                    out.insert(lsn, "app_credentials_rejected");
                }
                _ => {}
            }
        }
    }
    out
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_delivered_at_least_once_across_a_restart() {
    let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inbox = Arc::new(Inbox::default());
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let hook = format!("http://{addr}/hook");
    let stop = start_receiver(Arc::clone(&inbox), addr).await;
    inbox.fail_next.store(3, Ordering::SeqCst);

    let shops = ["dead1", "dead2", "dead3", "healthy"];
    let tokens: Vec<TokenSet> = shops.iter().map(|s| seed(&sim, s)).collect();
    for s in &shops[..3] {
        sim.with_model(|m| m.uninstall(&shop(s).to_string()));
    }

    // Engine 1: two shops die; the receiver fails the first three deliveries.
    let engine = open(config(&sim, dir.path(), SECRET, &hook)).await;
    for (s, t) in shops.iter().zip(&tokens) {
        engine.install(&shop(s), t.clone()).await.unwrap();
    }
    for s in &shops[..2] {
        let err = engine.access_token(&shop(s)).await.unwrap_err();
        assert!(matches!(err, Error::NeedsReauth { .. }), "{err}");
    }
    let accepted = |n: usize| inbox.accepted.lock().unwrap().len() >= n;
    wait_for("the first two events", || accepted(2)).await;
    assert_eq!(inbox.fail_next.load(Ordering::SeqCst), 0, "the failed deliveries were retried");

    // The receiver goes down; a third shop dies and the first recovers; the engine stops.
    inbox.down.store(true, Ordering::SeqCst);
    let _ = stop.send(());
    let err = engine.access_token(&shop("dead3")).await.unwrap_err();
    assert!(matches!(err, Error::NeedsReauth { .. }), "{err}");
    let fresh = seed(&sim, "dead1");
    engine.install(&shop("dead1"), fresh).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // a few failed attempts
    engine.shutdown().await;
    drop(engine);
    assert_eq!(inbox.accepted.lock().unwrap().len(), 2, "nothing delivered while down");

    // Engine 2 with a wrong client secret (an invalid_client event); the receiver comes back.
    let engine = open(config(&sim, dir.path(), "wrong-secret", &hook)).await;
    let err = engine.access_token(&shop("healthy")).await.unwrap_err();
    assert!(matches!(err, Error::AppCredentialsRejected { .. }), "{err}");
    inbox.down.store(false, Ordering::SeqCst);
    let _stop = start_receiver(Arc::clone(&inbox), addr).await;

    let expected = expected_events(engine.store(), &shops);
    assert_eq!(
        expected.values().copied().collect::<Vec<_>>().len(),
        5,
        "3 needs-reauth, 1 recovered, 1 app-credentials-rejected: {expected:?}"
    );
    let received_lsns = || -> BTreeSet<u64> {
        inbox.accepted.lock().unwrap().iter().map(|(_, v)| v["lsn"].as_u64().unwrap()).collect()
    };
    wait_for("every event", || expected.keys().all(|l| received_lsns().contains(l))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let got = inbox.accepted.lock().unwrap().clone();
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for (id, v) in &got {
        *per_id.entry(id.clone()).or_default() += 1;
        let lsn = v["lsn"].as_u64().unwrap();
        assert_eq!(expected.get(&lsn).copied(), v["kind"].as_str(), "no event without its record: {v}");
        assert!(id.ends_with(&format!("-{lsn}")), "{id}");
        let name = v["shop"].as_str().unwrap().trim_end_matches(".myshopify.com").to_owned();
        assert_eq!(v["deep_link"], format!("https://admin.shopify.com/store/{name}/apps/my-app"));
        assert!(v["since_ms"].as_u64().unwrap() > 0 && !v["reason"].as_str().unwrap().is_empty());
    }
    let duplicates: usize = per_id.values().map(|n| n - 1).sum();
    println!("delivered {} events, {} distinct, {duplicates} duplicates", got.len(), per_id.len());
    assert_eq!(per_id.len(), expected.len(), "every event, and no other");
    assert_eq!(inbox.bad.load(Ordering::SeqCst), 0, "every delivery was signed");
    let body = serde_json::to_string(&got).unwrap();
    assert!(!body.contains(HOOK_SECRET) && !body.contains(SECRET), "no secret in a payload");
    engine.shutdown().await;
}
