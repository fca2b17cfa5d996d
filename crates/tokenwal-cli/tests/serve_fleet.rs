//! Several `tokenwal serve` brokers on one PostgreSQL store (issue 14, item 7): each its own Unix
//! socket and bearer token, the simulator as Shopify. The brokers give the guarantees of one:
//!
//! * 50 concurrent token calls for one due shop, spread over three brokers: exactly one refresh at
//!   the simulator, every caller gets the same fresh token;
//! * a shop installed through one broker is served by the others; a 401 reported at another broker
//!   after the first rotated is answered with the newer token, not another refresh;
//! * a broker killed with kill -9 with a refresh on the wire: the other keeps serving; its callers
//!   for that shop wait (503 with `Retry-After`, never another refresh) and are served once the dead
//!   member's lease ran out and the orphan sweep retried the old refresh token; the killed broker,
//!   restarted, serves the same token. No lockout, no two requests for one shop at once.
//!
//! Each test uses a fresh schema ([`tokenwal_store::PgScratch`]); without a reachable PostgreSQL the
//! tests skip loudly, and fail under `TOKENWAL_REQUIRE_PG=1` (CI).

use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tokenwal::core::AccessToken;
use tokenwal_store::PgScratch;
use tokenwal_testkit::broker::{grant_body, try_call, write_private, Answer, Broker, BrokerSetup};
use tokenwal_testkit::{accepted, requests, BlockingSim};

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");

fn shop(name: &str) -> String {
    format!("{name}.myshopify.com")
}

/// `n` brokers on the store `db`, broker `i` on `dir/broker-i.sock` with a bearer token of its own.
/// Requests time out after 2 s (under half of a short lease).
fn setups(dir: &Path, db: &str, sim: &BlockingSim, n: usize) -> Vec<BrokerSetup> {
    let config = dir.join("config.json");
    write_private(&config, r#"{"request_timeout": "2s"}"#, 0o600);
    (0..n)
        .map(|i| BrokerSetup {
            bin: BIN.to_owned(),
            db: db.into(),
            sim_base: sim.h().base_url(),
            config: config.clone(),
            bearer: format!("fleet-broker-{i}-bearer-{:08x}", rand::random::<u32>()),
        })
        .collect()
}

fn start(setup: &BrokerSetup, dir: &Path, i: usize) -> Broker {
    let b = Broker::start(setup, &dir.join(format!("broker-{i}.sock")), None);
    b.wait_ready();
    b
}

fn token_of(a: &Answer) -> String {
    assert_eq!(a.status, 200, "{:?}", a.json());
    a.json()["access_token"].as_str().unwrap().to_owned()
}

#[test]
fn brokers_on_one_database_share_one_refresh_and_one_state() {
    let Some(pg) = PgScratch::new("several brokers on one PostgreSQL store") else { return };
    let sim = BlockingSim::start_with(tokenwal_sim::SimConfig::default(), 2);
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let brokers: Vec<Broker> =
        setups(dir.path(), &url, &sim, 3).iter().enumerate().map(|(i, s)| start(s, dir.path(), i)).collect();

    // 50 concurrent token calls for one due shop, spread over the three brokers.
    let crowd = sim.h().seed_shop(&shop("crowd"));
    let a = brokers[0].call(
        "PUT",
        &format!("/v1/shops/{}/grant", shop("crowd")),
        Some(&grant_body(&crowd, json!({"expires_at": 1_700_000_000}))),
    );
    assert_eq!(a.status, 200, "{:?}", a.json());
    let brokers = Arc::new(brokers);
    let barrier = Arc::new(Barrier::new(50));
    let tokens: Vec<String> = (0..50)
        .map(|i| {
            let (brokers, barrier) = (Arc::clone(&brokers), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                token_of(&brokers[i % 3].call("GET", &format!("/v1/shops/{}/token", shop("crowd")), None))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let distinct: BTreeSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), 1, "one token for all 50 callers of three brokers");
    assert_ne!(tokens[0], crowd.access_token.as_str(), "a fresh token");
    assert!(accepted(sim.h(), "crowd", &AccessToken::new(tokens[0].as_str())));
    assert_eq!(requests(sim.h(), "crowd"), 1, "exactly one refresh across the brokers");

    // Installed through broker 0, served by broker 1 from the store (no refresh).
    let alpha = sim.h().seed_shop(&shop("alpha"));
    let (grant, token, unauth) = (
        format!("/v1/shops/{}/grant", shop("alpha")),
        format!("/v1/shops/{}/token", shop("alpha")),
        format!("/v1/shops/{}/unauthorized", shop("alpha")),
    );
    assert_eq!(brokers[0].call("PUT", &grant, Some(&grant_body(&alpha, json!({"expires_in": 3600})))).status, 200);
    assert_eq!(token_of(&brokers[1].call("GET", &token, None)), alpha.access_token.as_str());
    assert_eq!(requests(sim.h(), "alpha"), 0);
    // A 401 reported at broker 0: one refresh. The same stale token reported at broker 1 afterwards
    // gets the newer token, with no second refresh; broker 2 serves it too.
    let stale = json!({"access_token": alpha.access_token.as_str()}).to_string();
    let newer = token_of(&brokers[0].call("POST", &unauth, Some(stale.as_bytes())));
    assert_ne!(newer, alpha.access_token.as_str());
    assert_eq!(requests(sim.h(), "alpha"), 1);
    assert_eq!(token_of(&brokers[1].call("POST", &unauth, Some(stale.as_bytes()))), newer);
    assert_eq!(token_of(&brokers[2].call("GET", &token, None)), newer);
    assert_eq!(requests(sim.h(), "alpha"), 1, "no second refresh for a 401 another broker already answered");
    assert!(accepted(sim.h(), "alpha", &AccessToken::new(newer.as_str())));

    let c = sim.h().counters();
    assert_eq!((c.total.overlapping_token_requests, c.total.total_rejections()), (0, 0));
    // The brokers stop (Drop: kill) before the scratch schema is dropped.
    drop(brokers);
}

#[test]
fn a_broker_killed_mid_refresh_is_recovered_by_the_other() {
    let Some(pg) = PgScratch::new("a broker of two on one PostgreSQL store killed mid-refresh") else { return };
    let sim = BlockingSim::start_with(tokenwal_sim::SimConfig::default(), 2);
    let dir = tempfile::tempdir().unwrap();
    // A 6 s membership lease: the orphan sweep runs every 1.5 s.
    let url = format!("{}&lease=6", pg.url());
    let setups = setups(dir.path(), &url, &sim, 2);
    let mut first = start(&setups[0], dir.path(), 0);
    let second = start(&setups[1], dir.path(), 1);
    let steady = sim.h().seed_shop(&shop("steady"));
    let path = format!("/v1/shops/{}/grant", shop("steady"));
    assert_eq!(second.call("PUT", &path, Some(&grant_body(&steady, json!({"expires_in": 3600})))).status, 200);

    // The first broker refreshes a due shop; the server rotates, its answer is held on the wire.
    let held = sim.h().seed_shop(&shop("held"));
    sim.h().hold(&shop("held"));
    let grant = format!("/v1/shops/{}/grant", shop("held"));
    let token = format!("/v1/shops/{}/token", shop("held"));
    assert_eq!(first.call("PUT", &grant, Some(&grant_body(&held, json!({"expires_at": 1_700_000_000})))).status, 200);
    let (sock, bearer, path) = (first.sock.clone(), first.bearer.clone(), token.clone());
    let caller = std::thread::spawn(move || try_call(&sock, "GET", &path, Some(&bearer), None));
    assert!(sim.runtime().block_on(sim.h().wait_held(&shop("held"), Duration::from_secs(20))), "refresh on the wire");

    // A caller of the second broker for that shop waits: the attempt belongs to a live member.
    let (sock, bearer, path) = (second.sock.clone(), second.bearer.clone(), token.clone());
    let waiter = std::thread::spawn(move || {
        let mut unavailable = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let a = try_call(&sock, "GET", &path, Some(&bearer), None).expect("the second broker answers");
            match a.status {
                200 => return (a, unavailable, Instant::now()),
                503 => {
                    assert!(a.header("retry-after").is_some(), "{:?}", a.json());
                    unavailable += 1;
                }
                _ => panic!("the second broker answered {} {:?}", a.status, a.json()),
            }
            assert!(Instant::now() < deadline, "never served");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    first.kill9();
    let killed_at = Instant::now();
    sim.h().cancel(&shop("held"));
    assert!(caller.join().unwrap().is_none(), "the killed broker answered nothing");

    // The second broker keeps serving its other shops meanwhile.
    let steady_token = format!("/v1/shops/{}/token", shop("steady"));
    assert_eq!(token_of(&second.call("GET", &steady_token, None)), steady.access_token.as_str());

    let (a, unavailable, served_at) = waiter.join().unwrap();
    let fresh = token_of(&a);
    let after = served_at - killed_at;
    eprintln!("served {after:?} after the kill, {unavailable} answers 503 before");
    // The dead member's attempt was taken over only once its lease ran out (renewed every second).
    assert!(after >= Duration::from_secs(4), "taken over {after:?} after the kill: inside the lease");
    assert!(accepted(sim.h(), "held", &AccessToken::new(fresh.as_str())), "the token served is accepted");
    let c = sim.h().counters().shop(&shop("held"));
    assert_eq!((c.token_requests, c.replays), (2, 1), "the lost answer recovered by one retry of the old token");

    // The killed broker restarted: no lockout, the same token, no further refresh.
    let log = Arc::clone(&first.log);
    let first = Broker::start(&setups[0], &first.sock.clone(), Some(log));
    first.wait_ready();
    assert_eq!(token_of(&first.call("GET", &token, None)), fresh);
    assert_eq!(requests(sim.h(), "held"), 2);
    assert!(sim.h().grant_alive(&shop("held")), "the grant is alive at the server");
    let c = sim.h().counters();
    assert_eq!(c.total.overlapping_token_requests, 0, "two requests for one shop at once");
    assert_eq!(c.total.total_rejections(), 0, "{:?}", c.total.rejections);
    let logs = format!("{}\n{}", first.log_text(), second.log_text());
    for secret in [held.access_token.as_str(), held.refresh_token.as_str(), fresh.as_str(), &setups[0].bearer] {
        assert!(!logs.contains(secret), "a secret ({} chars) in a broker's log", secret.len());
    }
    drop((first, second));
}
