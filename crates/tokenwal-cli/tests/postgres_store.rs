//! `tokenwal` on a PostgreSQL store (`--db postgres://…`), as real processes against the simulator
//! over loopback (issue 13: a fleet of writers on one store):
//!
//! * `run` killed with SIGKILL at random moments and restarted, over and over, with faults on (lost
//!   answers, resets, 5xx): recovery resolves what the kill left ambiguous (the killed process was
//!   of this host, so its membership ends at once), and in the end every shop is healthy with a
//!   grant alive at the server — no lockout.
//! * Four `run` processes on one store, one of them killed with SIGKILL and restarted every round,
//!   with faults on and tokens living seconds: no lockout, every ambiguity resolved.
//! * While `run` processes are live, the other commands (`shops`, `status`, `token`) work beside
//!   them; a `run` or a `serve` whose database is unreachable keeps retrying with backoff instead
//!   of exiting.
//!
//! Each test uses a fresh schema ([`tokenwal_store::PgScratch`]); without a reachable PostgreSQL the
//! tests skip loudly, and fail under `TOKENWAL_REQUIRE_PG=1` (CI).

use rand::Rng;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokenwal_sim::{Fault, SimConfig};
use tokenwal_store::PgScratch;
use tokenwal_testkit::cli::{exits_within, run, sim_env, sim_env_with_config, spawn, wait_for_line, Resume};
use tokenwal_testkit::BlockingSim;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const SHOPS: usize = 12;
/// Slow answers per shop in the fleet test.
const SLOW_PER_SHOP: usize = 8;

fn shop(i: usize) -> String {
    format!("fleet-{i}.myshopify.com")
}

fn import_all(sim: &BlockingSim, db: &Path) {
    tokenwal_testkit::cli::import_seeded(BIN, db, sim.h(), &(0..SHOPS).map(shop).collect::<Vec<_>>());
}

fn shops(db: &Path) -> Vec<serde_json::Value> {
    tokenwal_testkit::cli::shops_json(BIN, db)
}

/// Every shop's first refreshes meet faults (the rotation's answer lost, the connection reset, a
/// 5xx); then the server behaves.
fn scripted_faults(i: usize) -> Vec<Fault> {
    match i % 3 {
        0 => vec![Fault::RotateThenDrop, Fault::FailBeforeProcessing { status: 503, json: false }],
        1 => vec![Fault::RotateThenReset, Fault::RotateThenDrop],
        _ => vec![Fault::FailBeforeProcessing { status: 502, json: false }, Fault::RotateThenReset],
    }
}

#[test]
fn run_killed_again_and_again_loses_no_shop() {
    let Some(pg) = PgScratch::new("tokenwal run on PostgreSQL, kill -9 loop") else { return };
    let cfg = SimConfig { access_ttl: "3s".parse().unwrap(), ..SimConfig::default() };
    let sim = BlockingSim::start_with(cfg, 2);
    let url = pg.url();
    let db = Path::new(&url);
    import_all(&sim, db);
    // The faults are spread over the kill rounds; the last run can finish them.
    for i in 0..SHOPS {
        sim.h().push_faults(&shop(i), scripted_faults(i)).unwrap();
    }
    let env = sim_env(sim.h());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut rng = rand::thread_rng();
    for round in 0..6 {
        let (mut child, rx) = spawn(BIN, db, &["run"], &env);
        std::thread::sleep(Duration::from_millis(rng.gen_range(800..2500)));
        if let Some(status) = child.try_wait().unwrap() {
            let log: Vec<String> = rx.try_iter().collect();
            panic!("round {round}: run exited early with {status:?}:\n{}", log.join("\n"));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // A last run, stopped cleanly after every shop had time to recover and refresh.
    let (mut child, rx) = spawn(BIN, db, &["run"], &env);
    std::thread::sleep(Duration::from_secs(6));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(exits_within(&mut child, Duration::from_secs(30)), Some(0));
    let log = rx.iter().collect::<Vec<_>>().join("\n");
    assert!(!log.contains("shpat_") && !log.contains("shprt_") && !log.contains("sim-client-secret"), "{log}");

    let states = shops(db);
    assert_eq!(states.len(), SHOPS, "{states:?}");
    for s in &states {
        assert_eq!(s["state"], "healthy", "{s}");
        let name = s["shop"].as_str().unwrap();
        assert!(sim.h().grant_alive(name), "{name}: the grant is dead at the server (a lockout)");
    }
    let refreshes: u64 = (0..SHOPS).map(|i| sim.h().counters().shop(&shop(i)).token_requests).sum();
    assert!(refreshes >= SHOPS as u64 * 3, "every shop's faults were met and passed ({refreshes} token requests)");
    let faults = sim.h().counters().total.total_faults();
    assert_eq!(faults, SHOPS as u64 * 2, "every scripted fault was met");
}

#[test]
fn other_commands_work_beside_live_runs() {
    let Some(pg) = PgScratch::new("tokenwal run on PostgreSQL, commands beside it") else { return };
    let sim = BlockingSim::start();
    let url = pg.url();
    let db = Path::new(&url);
    import_all(&sim, db);
    let env = sim_env(sim.h());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut child, rx) = spawn(BIN, db, &["run"], &env);
    wait_for_line(&rx, "store opened", Duration::from_secs(30));
    assert_eq!(shops(db).len(), SHOPS, "shops reads the store while run holds it");
    let out = run(BIN, db, &["status", "--json"], &[], None, true);
    assert_eq!(out.code, 0, "{out:?}");
    let status: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(status["store"]["size_bytes"].as_u64().unwrap() > 0, "the schema's size: {status}");
    assert!(status["store"]["bytes_per_grant"].as_u64().unwrap() > 0, "{status}");
    // The store's URL is shown without its password (trust auth accepts any).
    let with_password = url.replacen("postgres@", "postgres:hunter2-db-secret@", 1);
    assert_ne!(with_password, url);
    for args in [&["status"][..], &["status", "--json"][..]] {
        let out = run(BIN, Path::new(&with_password), args, &[], None, true);
        assert_eq!(out.code, 0, "{out:?}");
        assert!(!format!("{}{}", out.stdout, out.stderr).contains("hunter2"), "{args:?} shows the password: {out:?}");
    }
    let out = run(BIN, db, &["token", &shop(0)], &env, None, true);
    assert_eq!(out.code, 0, "token beside a live run: {out:?}");
    assert!(out.stdout.trim().starts_with("shpat_"), "{out:?}");
    assert!(child.try_wait().unwrap().is_none(), "run still going");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(exits_within(&mut child, Duration::from_secs(30)), Some(0));
    assert!(shops(db).iter().all(|s| s["state"] == "healthy"), "{:?}", shops(db));
}

#[test]
fn a_fleet_of_four_runs_killed_one_at_a_time_loses_no_shop() {
    let Some(pg) = PgScratch::new("four tokenwal runs on one PostgreSQL store, kill -9 loop") else { return };
    let cfg = SimConfig { access_ttl: "3s".parse().unwrap(), ..SimConfig::default() };
    let sim = BlockingSim::start_with(cfg, 2);
    let url = pg.url();
    let db = Path::new(&url);
    import_all(&sim, db);
    for i in 0..SHOPS {
        // The scripted faults, then slow answers: attempts stay in flight long enough for kills and
        // restarts (and the recovery each restart runs) to meet the other processes' attempts.
        let slow = std::iter::repeat_n(Fault::Slow { delay_ms: 300 }, SLOW_PER_SHOP);
        sim.h().push_faults(&shop(i), scripted_faults(i).into_iter().chain(slow)).unwrap();
    }
    // Requests time out after 3 s, so a killed process's attempt is probed 3 s after it started.
    let dir = tempfile::tempdir().unwrap();
    let env = sim_env_with_config(sim.h(), dir.path(), r#"{"request_timeout": "3s"}"#);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut fleet: Vec<_> = (0..4).map(|_| spawn(BIN, db, &["run"], &env)).collect();
    let mut rng = rand::thread_rng();
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(700..1800)));
        for (i, (child, rx)) in fleet.iter_mut().enumerate() {
            if let Some(status) = child.try_wait().unwrap() {
                let log: Vec<String> = rx.try_iter().collect();
                panic!("round {round}: run {i} exited early with {status:?}:\n{}", log.join("\n"));
            }
        }
        let victim = rng.gen_range(0..fleet.len());
        fleet[victim].0.kill().unwrap();
        fleet[victim].0.wait().unwrap();
        fleet[victim] = spawn(BIN, db, &["run"], &env);
    }
    // Let the fleet settle (every ambiguity recovered, every shop refreshed again), then stop it.
    std::thread::sleep(Duration::from_secs(8));
    let mut logs = String::new();
    for (mut child, rx) in fleet {
        assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
        assert_eq!(exits_within(&mut child, Duration::from_secs(30)), Some(0));
        logs.push_str(&rx.iter().collect::<Vec<_>>().join("\n"));
    }
    assert!(!logs.contains("shpat_") && !logs.contains("shprt_") && !logs.contains("sim-client-secret"));
    assert!(!logs.contains("store poisoned"), "no process fail-stopped:\n{logs}");
    let states = shops(db);
    assert_eq!(states.len(), SHOPS, "{states:?}");
    for s in &states {
        assert_eq!(s["state"], "healthy", "{s}");
        let name = s["shop"].as_str().unwrap();
        assert!(sim.h().grant_alive(name), "{name}: the grant is dead at the server (a lockout)");
    }
    let counters = sim.h().counters();
    let faults = counters.total.total_faults();
    eprintln!(
        "fleet: {faults} faults met, {} token requests",
        (0..SHOPS).map(|i| counters.shop(&shop(i)).token_requests).sum::<u64>()
    );
    assert!(faults >= SHOPS as u64 * (2 + SLOW_PER_SHOP as u64 / 2), "the faults were met ({faults})");
    // The fleet refreshed each shop many times over (tokens live 3 s), and never two of its
    // processes at once: the simulator saw no token request for a shop while another was open.
    let requests: u64 = (0..SHOPS).map(|i| counters.shop(&shop(i)).token_requests).sum();
    assert!(requests >= SHOPS as u64 * 4, "{requests} token requests");
    assert_eq!(
        (counters.total.overlapping_token_requests, counters.total.max_concurrent_token_requests),
        (0, 1),
        "concurrent token requests for one shop"
    );
}

#[test]
fn a_run_whose_database_is_down_keeps_retrying() {
    // Nothing listens on port 1: every connection is refused at once.
    let db = Path::new("postgres://tokenwal:never-shown-pw@127.0.0.1:1/none?connect_timeout=2");
    let sim = BlockingSim::start();
    let env = sim_env(sim.h());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut child, rx) = spawn(BIN, db, &["run"], &env);
    let log = wait_for_line(&rx, "retrying", Duration::from_secs(30));
    let log2 = wait_for_line(&rx, "retrying", Duration::from_secs(30));
    assert!(child.try_wait().unwrap().is_none(), "run exited instead of retrying");
    let text = [log, log2].concat().join("\n");
    assert!(text.contains("database error during connect"), "{text}");
    assert!(!text.contains("never-shown-pw"), "the URL's password in a log line: {text}");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(exits_within(&mut child, Duration::from_secs(10)), Some(0));
}

/// `serve` too: while its database is down the broker keeps retrying the open, answering 503
/// `recovering`, instead of exiting (a supervisor restarting the fleet with its database would
/// otherwise see it fail until the database is back).
#[test]
fn a_broker_whose_database_is_down_keeps_retrying() {
    let sim = BlockingSim::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    tokenwal_testkit::broker::write_private(&config, "{}", 0o600);
    let setup = tokenwal_testkit::broker::BrokerSetup {
        bin: BIN.to_owned(),
        db: "postgres://tokenwal:never-shown-pw@127.0.0.1:1/none?connect_timeout=2".into(),
        sim_base: sim.h().base_url(),
        config,
        bearer: "pg-down-broker-bearer-0c9f1e".to_owned(),
    };
    let mut b = tokenwal_testkit::broker::Broker::start(&setup, &dir.path().join("b.sock"), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.log_text().matches("retrying").count() < 2 {
        assert!(b.child.try_wait().unwrap().is_none(), "serve exited instead of retrying:\n{}", b.log_text());
        assert!(Instant::now() < deadline, "no retries:\n{}", b.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = b.call("GET", "/readyz", None);
    assert_eq!((a.status, a.json()["reason"].as_str()), (503, Some("recovering")), "{:?}", a.json());
    assert!(!b.log_text().contains("never-shown-pw"), "the URL's password in a log line");
    tokenwal_testkit::cli::sigterm(b.child.id());
    assert_eq!(exits_within(&mut b.child, Duration::from_secs(10)), Some(0), "{}", b.log_text());
}

#[test]
fn a_run_frozen_past_its_lease_is_taken_over_and_never_writes_again() {
    let Some(pg) = PgScratch::new("tokenwal run on PostgreSQL, SIGSTOP past the lease") else { return };
    let sim = BlockingSim::start();
    // A 6 s membership lease; requests time out after 2 s (less than half the lease).
    let url = format!("{}&lease=6", pg.url());
    let db = Path::new(&url);
    import_all(&sim, db);
    let frozen_shop = shop(0);
    // Its refresh is answered 1.5 s late, so the first process is frozen with it in flight.
    sim.h().push_faults(&frozen_shop, [Fault::Slow { delay_ms: 1500 }]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = sim_env_with_config(sim.h(), dir.path(), r#"{"request_timeout": "2s"}"#);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let requests = |s: &str| sim.h().counters().shop(s).token_requests;

    let (mut first, first_rx) = spawn(BIN, db, &["run"], &env);
    let _resume = Resume(first.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while requests(&frozen_shop) == 0 {
        assert!(Instant::now() < deadline, "the first run never sent its refresh");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(Command::new("kill").args(["-STOP", &first.id().to_string()]).status().unwrap().success());
    let frozen_at = Instant::now();

    // A second process joins, and takes the frozen process's attempt over only once its lease has
    // run out: until then the shop stays with its attempt in flight.
    let (mut second, _second_rx) = spawn(BIN, db, &["run"], &env);
    let _stop_second = Resume(second.id());
    let deadline = Instant::now() + Duration::from_secs(40);
    while requests(&frozen_shop) < 2 {
        assert!(Instant::now() < deadline, "the second run never recovered the frozen attempt");
        std::thread::sleep(Duration::from_millis(20));
    }
    let taken_after = frozen_at.elapsed();
    assert!(taken_after >= Duration::from_secs(4), "taken over {taken_after:?} after the freeze: inside the lease");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = shops(db).into_iter().find(|s| s["shop"] == frozen_shop.as_str()).unwrap();
        if s["state"] == "healthy" {
            break;
        }
        assert!(Instant::now() < deadline, "not healthy after the takeover: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The frozen process resumes: its lease is gone, so it fail-stops without writing.
    assert!(Command::new("kill").args(["-CONT", &first.id().to_string()]).status().unwrap().success());
    let code = exits_within(&mut first, Duration::from_secs(30));
    assert_eq!(code, Some(74), "the resumed process must fail-stop (exit 74)");
    let log = first_rx.iter().collect::<Vec<_>>().join("\n");
    assert!(log.contains("lease"), "says why:\n{log}");
    assert!(!log.contains("shpat_") && !log.contains("shprt_"), "{log}");

    assert!(second.try_wait().unwrap().is_none(), "the second process is unaffected");
    let s = shops(db).into_iter().find(|s| s["shop"] == frozen_shop.as_str()).unwrap();
    assert_eq!(s["state"], "healthy", "{s}");
    assert!(sim.h().grant_alive(&frozen_shop), "the grant is alive at the server");
    let c = sim.h().counters();
    assert_eq!(c.total.overlapping_token_requests, 0, "two requests for one shop at once");
    assert!(Command::new("kill").args(["-TERM", &second.id().to_string()]).status().unwrap().success());
    assert_eq!(exits_within(&mut second, Duration::from_secs(30)), Some(0));
}
