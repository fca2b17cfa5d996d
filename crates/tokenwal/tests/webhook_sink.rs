//! The webhook sink over real sockets: a receiver that fails its first deliveries and is down
//! during an engine restart still ends up with every event (at least once, signatures valid); an
//! event the receiver keeps refusing becomes a durable dead letter after its bounded attempts,
//! later events keep flowing in order, and replay delivers it once the receiver accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenwal::core::UnixMillis;
use tokenwal::core::{ClientSecret, GrantKey, Record, RefusalReason, TokenSet};
use tokenwal::webhook_sink::{self as webhook, WebhookConfig};
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_sim::SimHandle;
use tokenwal_testkit::{now, seed, shop, sim, CLIENT_ID, SECRET};

const HOOK_SECRET: &str = "hook-signing-secret";

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
    /// Answer 500 to every (validly signed) event of this shop.
    refuse_shop: Mutex<Option<String>>,
    /// Deliveries refused because of `refuse_shop`.
    refused: AtomicUsize,
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
    if inbox.refuse_shop.lock().unwrap().as_deref() == v["shop"].as_str() {
        inbox.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
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
    let sim = sim().await;
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

    // Engine 1: two shops die; the receiver fails the first three deliveries. This test is about
    // at-least-once delivery to a receiver that comes back: no event may run out of attempts.
    let never_give_up = |mut c: Config| {
        c.webhook.as_mut().unwrap().max_attempts = 1000;
        c
    };
    let engine = open(never_give_up(config(&sim, dir.path(), SECRET, &hook))).await;
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
    let engine = open(never_give_up(config(&sim, dir.path(), "wrong-secret", &hook))).await;
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

/// A receiver on a free loopback port, and its URL.
async fn receiver() -> (Arc<Inbox>, String, tokio::sync::oneshot::Sender<()>) {
    let inbox = Arc::new(Inbox::default());
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let stop = start_receiver(Arc::clone(&inbox), addr).await;
    (inbox, format!("http://{addr}/hook"), stop)
}

/// Kills `names` at the simulator and makes the engine find out, one after the other: one
/// `needs_reauth` event each, in this order.
async fn kill(sim: &SimHandle, engine: &Engine, names: &[&str]) {
    for s in names {
        sim.with_model(|m| m.uninstall(&shop(s).to_string()));
        let err = engine.access_token(&shop(s)).await.unwrap_err();
        assert!(matches!(err, Error::NeedsReauth { .. }), "{err}");
    }
}

fn accepted_shops(inbox: &Inbox) -> Vec<String> {
    inbox.accepted.lock().unwrap().iter().map(|(_, v)| v["shop"].as_str().unwrap().to_owned()).collect()
}

/// Issue 18.5: one event the receiver keeps refusing used to be retried forever, and every later
/// event waited behind it. Now it becomes a dead letter after `max_attempts`, later events are
/// delivered in journal order, the letter survives reopening the store, a restart that finds the
/// letter with the cursor still on its event (a crash between the two writes) neither resends it
/// nor writes it twice, and replay delivers it once the receiver accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_becomes_a_dead_letter_and_later_events_keep_flowing() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let (inbox, hook, _stop) = receiver().await;
    let names = ["refused", "later1", "later2", "later3"];
    let tokens: Vec<TokenSet> = names.iter().map(|s| seed(&sim, s)).collect();
    *inbox.refuse_shop.lock().unwrap() = Some(shop("refused").to_string());

    let mut c = config(&sim, dir.path(), SECRET, &hook);
    c.webhook.as_mut().unwrap().max_attempts = 3;
    let engine = open(c.clone()).await;
    for (s, t) in names.iter().zip(&tokens) {
        engine.install(&shop(s), t.clone()).await.unwrap();
    }
    kill(&sim, &engine, &names[..3]).await;

    // Bounded: on the old code the refused event holds the others back for ever.
    let later = [shop("later1").to_string(), shop("later2").to_string()];
    let flowed = tokio::time::timeout(Duration::from_secs(15), async {
        while accepted_shops(&inbox) != later {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(flowed.is_ok(), "later events stuck behind a refused one: got {:?}", accepted_shops(&inbox));
    assert_eq!(inbox.refused.load(Ordering::SeqCst), 3, "exactly max_attempts attempts");

    let letters: Vec<webhook::DeadLetter> =
        webhook::dead_letters(engine.store(), "webhook").unwrap().into_iter().map(Result::unwrap).collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = letters[0].clone();
    let refused_lsn = expected_events(engine.store(), &["refused"]).into_keys().next().unwrap();
    assert_eq!((letter.lsn, letter.attempts), (refused_lsn, 3));
    assert_eq!((letter.kind.as_str(), letter.shop.as_str()), ("needs_reauth", "refused.myshopify.com"));
    assert_eq!(letter.last_error, "status 500");
    assert!(letter.id.ends_with(&format!("-{refused_lsn}")), "{}", letter.id);
    let body = String::from_utf8(letter.body().to_vec()).unwrap();
    for secret in [HOOK_SECRET, SECRET, tokens[0].refresh_token.expose_secret(), tokens[0].access_token.expose_secret()]
    {
        assert!(!body.contains(secret) && !format!("{letter:?}").contains(secret), "no secret in a dead letter");
    }
    engine.shutdown().await;
    drop(engine);

    // A crash between the letter and the cursor: the cursor is back on the refused event.
    let keys = tokenwal::KeyRing::insecure_test_ring();
    let store = loop {
        match tokenwal::store::Store::open(dir.path().join("db"), &keys, Default::default()) {
            Ok((s, _)) => break s,
            Err(tokenwal::store::StoreError::Locked { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(webhook::dead_letters(&store, "webhook").unwrap().len(), 1, "durable across a reopen");
    store.set_cursor("webhook", refused_lsn).unwrap();
    drop(store);

    // Restart: the sink meets an event that is already a dead letter and moves on.
    let engine = open(c.clone()).await;
    kill(&sim, &engine, &names[3..]).await;
    // (later1 and later2, past the cursor, may be delivered again: at least once.)
    let later3 = shop("later3").to_string();
    wait_for("the event after the restart", || accepted_shops(&inbox).last() == Some(&later3)).await;
    let seen = accepted_shops(&inbox);
    assert!(seen.iter().all(|s| s.starts_with("later")), "{seen:?}");
    assert_eq!(inbox.refused.load(Ordering::SeqCst), 3, "a dead letter is not resent by the sink");
    let again: Vec<_> =
        webhook::dead_letters(engine.store(), "webhook").unwrap().into_iter().map(Result::unwrap).collect();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0], letter, "not written twice");

    // Replay while the receiver still refuses: kept, one more attempt counted.
    let w = c.webhook.clone().unwrap();
    let report = webhook::replay(engine.store(), &w, webhook::Replay::One(letter.id.clone())).await.unwrap();
    assert_eq!((report.delivered.len(), report.failed.len()), (0, 1), "{report:?}");
    let kept = webhook::dead_letters(engine.store(), "webhook").unwrap().remove(0).unwrap();
    assert_eq!((kept.attempts, kept.body()), (4, letter.body()));

    // The receiver is fixed: replay delivers the very same event, once, and removes the letter.
    *inbox.refuse_shop.lock().unwrap() = None;
    let report = webhook::replay(engine.store(), &w, webhook::Replay::All).await.unwrap();
    assert_eq!(report.delivered, std::slice::from_ref(&letter.id), "{report:?}");
    assert!(webhook::dead_letters(engine.store(), "webhook").unwrap().is_empty());
    let got = inbox.accepted.lock().unwrap().clone();
    assert_eq!(got.len(), seen.len() + 1);
    let last = got.last().unwrap();
    assert_eq!((last.0.as_str(), last.1["lsn"].as_u64()), (letter.id.as_str(), Some(refused_lsn)));
    let missing = webhook::replay(engine.store(), &w, webhook::Replay::One(letter.id.clone())).await;
    assert!(matches!(missing, Err(webhook::DeadLetterError::NotFound { .. })), "{missing:?}");
    assert_eq!(inbox.bad.load(Ordering::SeqCst), 0, "every delivery and replay was signed");
    engine.shutdown().await;
}

/// A dead letter that fails its checks is named, and neither listing nor `replay --all` stops at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_dead_letter_is_named_and_the_others_still_listed_and_replayed() {
    let (inbox, hook, _stop) = receiver().await;
    let store = tokenwal::store::Store::in_memory();
    let letter = |lsn: u64| tokenwal::store::DeadLetter {
        lsn,
        attempts: 10,
        first_failed_at: UnixMillis(1_800_000_000_000),
        last_attempt_at: UnixMillis(1_800_000_000_000),
        last_error: "timeout".into(),
        payload: format!(r#"{{"id":"ab-{lsn}","kind":"needs_reauth","shop":"s{lsn}.myshopify.com","lsn":{lsn}}}"#)
            .into_bytes(),
    };
    for lsn in [3, 4, 5] {
        store.put_dead_letter("webhook", &letter(lsn)).unwrap();
    }
    let mut torn = letter(4).encode().unwrap();
    torn.truncate(torn.len() - 2);
    let key = tokenwal::store::dead_letter::dead_letter_key("webhook", 4).unwrap();
    assert!(store.put_raw_for_test("meta", &key, &torn));

    let listed = webhook::dead_letters(&store, "webhook").unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!((listed[0].as_ref().unwrap().lsn, listed[2].as_ref().unwrap().lsn), (3, 5));
    let err = listed[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("corrupt meta/dead_letter/webhook/4") && err.contains("length"), "{err}");

    let w = WebhookConfig::new(url::Url::parse(&hook).unwrap(), ClientSecret::new(HOOK_SECRET));
    let one = webhook::replay(&store, &w, webhook::Replay::One("ab-4".into())).await.unwrap_err();
    assert!(one.to_string().contains("meta/dead_letter/webhook/4"), "{one}");
    let report = webhook::replay(&store, &w, webhook::Replay::All).await.unwrap();
    assert_eq!(report.delivered, ["ab-3", "ab-5"]);
    assert_eq!(report.corrupt.len(), 1, "{report:?}");
    assert_eq!(inbox.accepted.lock().unwrap().len(), 2);
    let left = webhook::dead_letters(&store, "webhook").unwrap();
    assert!(left.len() == 1 && left[0].is_err(), "only the corrupt one is left, for an operator");
}

#[test]
fn max_attempts_is_validated() {
    let mut w = WebhookConfig::new(url::Url::parse("https://example.com/h").unwrap(), ClientSecret::new("s"));
    assert_eq!(w.max_attempts, webhook::DEFAULT_MAX_ATTEMPTS);
    assert!(w.validate().is_ok());
    w.max_attempts = 0;
    assert!(w.validate().unwrap_err().contains("max_attempts"));
    w.max_attempts = webhook::MAX_ATTEMPTS_LIMIT + 1;
    assert!(w.validate().is_err());
}
