//! PostgreSQL restarted under load (issue 13, item 6c; docs/journal.md, "Crash points added by this
//! backend"): two `tokenwal run` processes and a `tokenwal serve` broker on one PostgreSQL store,
//! tokens living seconds, clients asking the broker for tokens, one refresh held on the wire; then
//! `pg_ctlcluster … restart`. The test is the supervisor: it restarts what exits 74 (a fail-stop:
//! the lost connection may have cut a write or a `COMMIT`), and fails on any other exit. Checked:
//!
//! * every token the broker handed out before the restart came from a durable state: no answer
//!   given after the restart is older (in the simulator's issue order) than one given before it,
//!   and no client ever sees a shop's token go back;
//! * work resumes by itself: every shop is refreshed again after the restart, ends healthy, with a
//!   grant alive at the server and a token it accepts;
//! * the refresh whose answer was lost across the restart is resolved by retrying the old refresh
//!   token; the simulator rejected no refresh and never saw two requests for one shop at once;
//! * every process stops cleanly on SIGTERM at the end, and no log holds a token.
//!
//! Its own test binary: restarting the shared server breaks any PostgreSQL test running beside it
//! in the same binary (cargo runs test binaries one after another). The server is started again
//! when the test ends, passed or not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenwal_sim::{Fault, SimConfig};
use tokenwal_store::PgScratch;
use tokenwal_testkit::broker::{try_call, write_private, Broker, BrokerSetup};
use tokenwal_testkit::cli::{env_refs, exits_within, import_seeded, shops_json, sigterm, sim_env, spawn};
use tokenwal_testkit::{BlockingSim, CLIENT_ID};

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const BEARER: &str = "pg-restart-bearer-5b0e8d1c44";
const SHOPS: usize = 12;
/// Client threads asking the broker for tokens.
const CLIENTS: usize = 3;

fn shop(i: usize) -> String {
    format!("restart-{i}.myshopify.com")
}

/// `pg_ctlcluster --skip-systemctl-redirect VERSION main ACTION`; whether it succeeded.
fn pg_ctl(action: &str) -> bool {
    let version = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("a PostgreSQL cluster under /etc/postgresql");
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the server again when the test ends if it is not running (a failure midway must not
/// leave it down for the suites that follow).
struct ServerUp;

impl Drop for ServerUp {
    fn drop(&mut self) {
        if !pg_ctl("status") && !pg_ctl("start") {
            eprintln!("could not start PostgreSQL again: run pg_ctlcluster … main start");
        }
    }
}

/// One process of the fleet, killed if the test ends with it still running.
enum Member {
    Run { child: Child, rx: Receiver<String>, log: Vec<String> },
    Serve(Broker),
}

impl Member {
    fn child(&mut self) -> &mut Child {
        match self {
            Member::Run { child, .. } => child,
            Member::Serve(b) => &mut b.child,
        }
    }

    fn log(&mut self) -> String {
        match self {
            Member::Run { rx, log, .. } => {
                log.extend(rx.try_iter());
                log.join("\n")
            }
            Member::Serve(b) => b.log_text(),
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child().kill();
        let _ = self.child().wait();
    }
}

/// A token the broker answered.
struct Ack {
    shop: usize,
    token: String,
    client: usize,
    sent: Instant,
    answered: Instant,
}

/// What the clients saw: the tokens served, the 503s by reason, and anything else (errors).
#[derive(Default)]
struct Seen {
    acks: Vec<Ack>,
    unavailable: BTreeMap<String, usize>,
    errors: Vec<String>,
}

/// A client of the broker: asks for each shop's token in turn until `stop`, retrying a 503 or a
/// broker that is not there (restarting); every 200 is recorded. Anything else is an error.
fn client(id: usize, sock: PathBuf, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut i = id;
    while !stop.load(Ordering::Relaxed) {
        let path = format!("/v1/shops/{}/token", shop(i % SHOPS));
        let sent = Instant::now();
        match try_call(&sock, "GET", &path, Some(BEARER), None) {
            Some(a) if a.status == 200 => {
                let token = a.json()["access_token"].as_str().unwrap().to_owned();
                seen.lock().unwrap().acks.push(Ack {
                    shop: i % SHOPS,
                    token,
                    client: id,
                    sent,
                    answered: Instant::now(),
                });
                i += 1;
                // Load, not a benchmark: leave the two cores to the fleet.
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(a) if a.status == 503 => {
                let reason = a.json()["reason"].as_str().unwrap_or("none").to_owned();
                *seen.lock().unwrap().unavailable.entry(reason).or_default() += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(a) => {
                seen.lock().unwrap().errors.push(format!("{path}: {} {}", a.status, String::from_utf8_lossy(&a.body)))
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn postgresql_restarted_under_load_loses_nothing_acknowledged() {
    let Some(pg) = PgScratch::new("PostgreSQL restarted under load") else { return };
    let _server = ServerUp;
    // Tokens live 5 s and are refreshed 2 s before expiry: every shop is refreshed every few seconds.
    let cfg = SimConfig { access_ttl: "5s".parse().unwrap(), ..SimConfig::default() };
    let sim = BlockingSim::start_with(cfg, 2);
    let url = pg.url();
    let db = Path::new(&url);
    let names: Vec<String> = (0..SHOPS).map(shop).collect();
    import_seeded(BIN, db, sim.h(), &names);
    for name in &names {
        // Slow answers keep attempts in flight, so the restart meets some on the wire.
        sim.h().push_faults(name, std::iter::repeat_n(Fault::Slow { delay_ms: 200 }, 20)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    write_private(&config, r#"{"request_timeout": "3s", "refresh_margin": "2s"}"#, 0o600);
    let mut env = sim_env(sim.h());
    env.push(("TOKENWAL_CONFIG", config.display().to_string()));
    let env = env_refs(&env);
    let sock = dir.path().join("broker.sock");
    let setup = BrokerSetup {
        bin: BIN.to_owned(),
        db: db.to_owned(),
        sim_base: sim.h().base_url(),
        config: config.clone(),
        bearer: BEARER.to_owned(),
    };
    let spawn_run = || {
        let (child, rx) = spawn(BIN, db, &["run"], &env);
        Member::Run { child, rx, log: Vec::new() }
    };
    let mut fleet = [spawn_run(), spawn_run(), Member::Serve(Broker::start(&setup, &sock, None))];
    if let Member::Serve(b) = &fleet[2] {
        b.wait_ready();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (sock, stop, seen) = (sock.clone(), Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || client(id, sock, stop, seen))
        })
        .collect();

    // Under load for a while; then one shop's refresh is held on the wire (processed by the server,
    // a rotation made, its answer unsent) while the database restarts, and its answer is lost.
    std::thread::sleep(Duration::from_secs(4));
    let held = shop(0);
    sim.h().hold(&held);
    assert!(sim.runtime().block_on(sim.h().wait_held(&held, Duration::from_secs(20))), "a refresh on the wire");
    let requests_before: Vec<u64> = names.iter().map(|n| sim.h().counters().shop(n).token_requests).collect();
    let restart_at = Instant::now();
    assert!(pg_ctl("restart"), "pg_ctlcluster restart failed");
    let restarted_at = Instant::now();
    sim.h().cancel(&held);
    eprintln!("PostgreSQL restarted in {:?}", restarted_at - restart_at);

    // The supervisor: what exits 74 is restarted; any other exit fails the test. Until every shop
    // was refreshed again after the restart and is healthy (at least 8 s, at most 60 s).
    let mut fail_stops = BTreeMap::<&str, usize>::new();
    let deadline = restarted_at + Duration::from_secs(60);
    let mut settled = false;
    let mut last_check = Instant::now();
    while !settled {
        for m in fleet.iter_mut() {
            let Some(status) = m.child().try_wait().unwrap() else { continue };
            assert_eq!(status.code(), Some(74), "a fleet member exited otherwise than by a fail-stop:\n{}", m.log());
            assert!(m.log().contains("store fail-stopped"), "says why:\n{}", m.log());
            *m = match m {
                Member::Run { .. } => {
                    *fail_stops.entry("run").or_default() += 1;
                    spawn_run()
                }
                Member::Serve(b) => {
                    *fail_stops.entry("serve").or_default() += 1;
                    let log = Arc::clone(&b.log);
                    Member::Serve(Broker::start(&setup, &sock, Some(log)))
                }
            };
        }
        if last_check.elapsed() >= Duration::from_secs(1) && restarted_at.elapsed() >= Duration::from_secs(8) {
            last_check = Instant::now();
            let refreshed_again = names
                .iter()
                .zip(&requests_before)
                .all(|(n, before)| sim.h().counters().shop(n).token_requests > *before);
            settled = refreshed_again && shops_json(BIN, db).iter().all(|s| s["state"] == "healthy");
        }
        assert!(Instant::now() < deadline, "the fleet did not settle after the restart: {:?}", shops_json(BIN, db));
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.errors.is_empty(), "the broker answered otherwise than 200 or 503: {:?}", seen.errors);

    // Every shop is served a token the server accepts; its grant is alive.
    let Member::Serve(broker) = &fleet[2] else { unreachable!() };
    broker.wait_ready();
    for name in &names {
        let a = broker.call("GET", &format!("/v1/shops/{name}/token"), None);
        assert_eq!(a.status, 200, "{name}: {:?}", a.json());
        let token = a.json()["access_token"].as_str().unwrap().to_owned();
        let valid = sim.h().with_model(|m| m.access_token_valid(name, &token, sim.h().now_ms()));
        assert!(valid, "{name}: the token served is not accepted by the server");
        assert!(sim.h().grant_alive(name), "{name}: the grant is dead at the server (a lockout)");
    }

    // Nothing acknowledged before the restart was lost: each token's place in the server's issue
    // order never goes back, per client, and across the restart.
    let acks = seen.acks;
    let order: Vec<BTreeMap<String, usize>> = names
        .iter()
        .map(|n| {
            let state = sim.h().shop_state(n);
            let grant = state.grant(CLIENT_ID).expect("the app's grant");
            grant.access_tokens.iter().enumerate().map(|(i, t)| (t.token.as_str().to_owned(), i)).collect()
        })
        .collect();
    let place = |a: &Ack| *order[a.shop].get(&a.token).expect("a token the server issued");
    let mut last: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for a in &acks {
        let p = place(a);
        let prev = last.insert((a.client, a.shop), p).unwrap_or(0);
        assert!(p >= prev, "{}: client {} was served an older token after a newer one", shop(a.shop), a.client);
    }
    let (mut before, mut after) = (0, 0);
    for s in 0..SHOPS {
        let newest_before = acks.iter().filter(|a| a.shop == s && a.answered < restart_at).map(place).max();
        let oldest_after = acks.iter().filter(|a| a.shop == s && a.sent > restarted_at).map(place).min();
        if let (Some(b), Some(a)) = (newest_before, oldest_after) {
            assert!(a >= b, "{}: served a token older than one acknowledged before the restart", shop(s));
        }
        before += usize::from(newest_before.is_some());
        after += usize::from(oldest_after.is_some());
    }
    assert!(before >= SHOPS / 2 && after >= SHOPS / 2, "too few shops served around the restart ({before}, {after})");

    // Stop the fleet: each member exits 0 on SIGTERM.
    let mut logs = String::new();
    for m in fleet.iter_mut() {
        sigterm(m.child().id());
        let code = exits_within(m.child(), Duration::from_secs(30));
        let log = m.log();
        assert_eq!(code, Some(0), "{log}");
        logs.push_str(&log);
    }
    assert!(!logs.contains("shpat_") && !logs.contains("shprt_") && !logs.contains("sim-client-secret"));
    let counters = sim.h().counters();
    let held_counters = counters.shop(&held);
    eprintln!(
        "{} tokens served ({} before the restart), 503s {:?}, fail-stops restarted {fail_stops:?}, {} token requests, \
         {} replays",
        acks.len(),
        acks.iter().filter(|a| a.answered < restart_at).count(),
        seen.unavailable,
        counters.total.token_requests,
        counters.total.replays
    );
    assert!(!fail_stops.is_empty(), "the restart made no process fail-stop: was the database restarted?");
    assert!(held_counters.replays >= 1, "the refresh whose answer was lost was resolved by retrying the old token");
    assert_eq!(counters.total.total_rejections(), 0, "the server rejected a refresh: {:?}", counters.total.rejections);
    assert_eq!(counters.total.overlapping_token_requests, 0, "two requests for one shop at once");
}
