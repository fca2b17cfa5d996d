//! `fleet`: several engine processes on one PostgreSQL store (issue 13), against one simulator.
//!
//! * **Refreshes.** `--processes P` children (default 4) open engines on one fresh schema. Each
//!   round, every child seeds and installs its share of `--concurrency N` shops (default 256 in
//!   all, disjoint between children), reports ready, and on the parent's `go` refreshes them all at
//!   once. Per round the fleet's throughput is the refreshes over the slowest child's wall time;
//!   latencies are every refresh's; database commits per refresh come from the children's store
//!   counters (each `COMMIT` of a group is one sync). CPU per refresh, over the measured rounds
//!   (from the parent's `go` to the last child's `done`; 10 ms ticks of `/proc`): the engine
//!   children's own (each reports its process's CPU over its refreshes), the PostgreSQL server's
//!   (every `postgres` process of this host), the bench parent's (the simulator answering the
//!   token requests), and the whole machine's busy time (`/proc/stat`: all of the above, the
//!   kernel's work for them, and anything else running).
//! * **Orphaned intents.** The parent writes 10 000 (quick: 500) grants with an attempt in flight
//!   through a store of its own, leaves (its membership ends, so every attempt is an orphan), and
//!   `P` children open engines on the schema at once: their recoveries take the orphans over between
//!   them. Reported: the slowest child's recovery time, and that every orphan was resolved exactly
//!   once. The intents are dated a minute back (a crash found later), so no probe waits for the
//!   dead request's timeout. Also reported: the schema's size in the database per grant afterwards
//!   (`pg_total_relation_size` of its tables, indexes included; each grant then holds its install,
//!   its intent and recovery's records).
//!
//! Children are this binary (`tokenwal-bench child fleet-…`); they talk `key=value` lines.

use crate::util::{now, percentile, shop, Table};
use crate::Opts;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokenwal::core::{InstallSource, Machine, TokenSet, UnixMillis};
use tokenwal::store::{PgLocation, Store, StoreConfig};
use tokenwal::{Config, Engine, StoreLocation};
use tokenwal_sim::{serve, SimConfig};

const COLUMNS: [&str; 12] = [
    "processes",
    "concurrent refreshes",
    "rounds",
    "refreshes/s",
    "p50",
    "p99",
    "commits/refresh",
    "errors",
    "CPU/refresh: engines",
    "database",
    "bench parent (simulator)",
    "whole machine",
];

/// CPU time of every PostgreSQL server process of this host (`postgres` and its backends, by
/// command name), from `/proc` (10 ms ticks). Backends that exited meanwhile are not counted: the
/// fleet's connections live through the rounds.
fn database_cpu() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Duration::ZERO };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == "postgres").then_some(pid)
        })
        .filter_map(crate::util::process_cpu_time)
        .sum()
}

/// Busy CPU time of the whole machine (every CPU, everything but idle and iowait), from the first
/// line of `/proc/stat` (10 ms ticks).
fn machine_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return Duration::ZERO };
    let ticks: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy: u64 = ticks.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    Duration::from_millis(busy * 10)
}

/// CPU spent while the refreshes ran, by party.
#[derive(Default)]
struct Cpu {
    engines: Duration,
    database: Duration,
    parent: Duration,
    machine: Duration,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(args: &[String]) -> Worker {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .arg("child")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a fleet child");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Worker { child, stdin, lines }
    }

    /// The next line that starts with `prefix`.
    fn expect(&self, prefix: &str) -> String {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(600)).expect("a fleet child stopped answering");
            if l.starts_with(prefix) {
                return l;
            }
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to a fleet child");
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ').find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('='))).unwrap_or("")
}

fn url_with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}schema={schema}")
}

pub async fn run(opts: &Opts) {
    let Some(url) = opts.pg.clone() else {
        eprintln!("fleet needs --pg postgres://… (a database where it may create schemas)");
        std::process::exit(2);
    };
    let processes = opts.processes.unwrap_or(4).max(1);
    let sim_config = SimConfig { access_ttl: "86400s".parse().expect("duration"), ..SimConfig::default() };
    let sim = serve(sim_config, "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
    let base = sim.base_url();

    let table =
        Table::new("Fleet: engine processes on one PostgreSQL store, refreshes against the simulator", &COLUMNS);
    let concurrencies = opts.concurrency.clone().unwrap_or_else(|| vec![256]);
    for n in concurrencies {
        let schema = format!("tokenwal_bench_fleet_{}_{n}", std::process::id());
        eprintln!("fleet: schema {schema} (drop it with: DROP SCHEMA {schema} CASCADE)");
        let db = url_with_schema(&url, &schema);
        let per = n.div_ceil(processes);
        let rounds = if opts.quick { 2 } else { 6 };
        let mut fleet: Vec<Worker> = (0..processes)
            .map(|i| {
                Worker::spawn(&[
                    "fleet-refresh".into(),
                    db.clone(),
                    base.clone(),
                    format!("p{i}n{n}"),
                    per.to_string(),
                    (rounds + 1).to_string(),
                ])
            })
            .collect();
        let (mut lat, mut refreshes, mut errors, mut walls) = (Vec::new(), 0u64, 0u64, Duration::ZERO);
        // Database commits made while the refreshes ran (each group's COMMIT is one sync), the
        // installs between rounds excluded.
        let mut commits = 0u64;
        let mut cpu = Cpu::default();
        for round in 0..=rounds {
            for w in &fleet {
                w.expect("ready");
            }
            let (db0, machine0, parent0) = (database_cpu(), machine_cpu(), crate::util::cpu_time());
            for w in &mut fleet {
                w.say("go");
            }
            let mut wall = Duration::ZERO;
            for w in &fleet {
                let l = w.expect("done");
                if round == 0 {
                    continue; // warm-up: connections, prepared statements, allocator
                }
                wall = wall.max(Duration::from_micros(field(&l, "wall_us").parse().expect("wall_us")));
                errors += field(&l, "errors").parse::<u64>().expect("errors");
                let us = field(&l, "lat_us");
                lat.extend(
                    us.split(',').filter(|s| !s.is_empty()).map(|s| Duration::from_micros(s.parse().expect("us"))),
                );
                refreshes += field(&l, "n").parse::<u64>().expect("n");
                commits += field(&l, "syncs").parse::<u64>().expect("syncs");
                cpu.engines += Duration::from_micros(field(&l, "cpu_us").parse().expect("cpu_us"));
            }
            if round > 0 {
                cpu.parent += crate::util::cpu_time().saturating_sub(parent0);
                cpu.machine += machine_cpu().saturating_sub(machine0);
                cpu.database += database_cpu().saturating_sub(db0);
            }
            walls += wall;
        }
        for mut w in fleet {
            w.child.wait().expect("fleet child");
        }
        lat.sort();
        table.row(&[
            processes.to_string(),
            (per * processes).to_string(),
            rounds.to_string(),
            format!("{:.0}", refreshes as f64 / walls.as_secs_f64()),
            format!("{:.2} ms", percentile(&lat, 0.50).as_secs_f64() * 1e3),
            format!("{:.2} ms", percentile(&lat, 0.99).as_secs_f64() * 1e3),
            format!("{:.3}", commits as f64 / refreshes.max(1) as f64),
            errors.to_string(),
            per_refresh(cpu.engines, refreshes),
            per_refresh(cpu.database, refreshes),
            per_refresh(cpu.parent, refreshes),
            per_refresh(cpu.machine, refreshes),
        ]);
    }

    orphans(opts, &url, processes, &sim).await;
    sim.shutdown().await;
}

fn per_refresh(cpu: Duration, refreshes: u64) -> String {
    format!("{:.0} µs", cpu.as_secs_f64() * 1e6 / refreshes.max(1) as f64)
}

/// Writes `count` grants with an attempt in flight, leaves, and lets `processes` engines recover them.
async fn orphans(opts: &Opts, url: &str, processes: usize, sim: &tokenwal_sim::SimHandle) {
    let count = if opts.quick { 500 } else { 10_000 };
    let schema = format!("tokenwal_bench_orphans_{}", std::process::id());
    eprintln!("fleet: schema {schema} (drop it with: DROP SCHEMA {schema} CASCADE)");
    let db = url_with_schema(url, &schema);
    let location = PgLocation::parse(&db).expect("--pg: a postgres:// URL");
    let keys = tokenwal::KeyRing::insecure_test_ring();
    let store = {
        let (l, k) = (location.clone(), keys.clone());
        tokio::task::spawn_blocking(move || Store::open_postgres(&l, &k, StoreConfig::default()))
            .await
            .expect("open task")
            .expect("open the orphans' store")
            .0
    };
    let machine = Machine::shopify(store.fingerprint_key());
    let back = UnixMillis(now().0 - 60_000);
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..count {
        let s = shop(&format!("orphan{i}"));
        let t = sim.seed_shop(s.as_str());
        let tokens = TokenSet {
            access_token: tokenwal::core::AccessToken::new(t.access_token.as_str()),
            access_expires_at: back,
            refresh_token: tokenwal::core::RefreshToken::new(t.refresh_token.as_str()),
            refresh_expires_at: None,
            scope: Some(t.scope.clone()),
        };
        let grant = tokenwal::core::GrantKey::shopify(&s);
        let install =
            machine.install(None, grant, tokens, InstallSource::Import, back).transition().write_batch().unwrap();
        let state = tokenwal::core::codec::decode_state(&install.state).expect("state");
        let attempt = machine.plan_attempt(&state, back).expect("attempt").transition().write_batch().unwrap();
        let store = store.clone();
        writes.spawn(async move {
            store.apply(install).await.expect("install");
            store.apply(attempt).await.expect("intent");
        });
        while writes.len() >= 512 {
            writes.join_next().await;
        }
    }
    while writes.join_next().await.is_some() {}
    drop(store);
    let started = Instant::now();
    let fleet: Vec<Worker> =
        (0..processes).map(|_| Worker::spawn(&["fleet-recover".into(), db.clone(), sim.base_url()])).collect();
    let (mut resolved, mut slowest) = (0u64, Duration::ZERO);
    let mut opens = Vec::new();
    for mut w in fleet {
        let l = w.expect("recovered");
        resolved += field(&l, "resolved").parse::<u64>().expect("resolved");
        let took = Duration::from_micros(field(&l, "elapsed_us").parse().expect("elapsed_us"));
        slowest = slowest.max(took);
        opens.push(format!("{:.2} s", took.as_secs_f64()));
        w.say("stop");
        w.child.wait().expect("fleet child");
    }
    let wall = started.elapsed();
    // What the server saw: every orphan probed exactly once, never two requests for one at once.
    let counters = sim.counters();
    let per_shop: Vec<u64> =
        (0..count).map(|i| counters.shop(shop(&format!("orphan{i}")).as_str()).token_requests).collect();
    let probes: u64 = per_shop.iter().sum();

    let (healthy, bytes) = {
        let (l, k) = (location.clone(), keys.clone());
        tokio::task::spawn_blocking(move || {
            let store = Store::open_postgres(&l, &k, StoreConfig::default()).expect("reopen").0;
            let healthy = (0..count)
                .filter(|i| {
                    let g = tokenwal::core::GrantKey::shopify(&shop(&format!("orphan{i}")));
                    store.get(&g).ok().flatten().is_some_and(|s| s.phase == tokenwal::core::Phase::Healthy)
                })
                .count();
            (healthy, store.database_bytes().expect("schema size").unwrap_or(0))
        })
        .await
        .expect("check task")
    };
    let table = Table::new(
        "Fleet: orphaned intents (their process gone) recovered by engine processes opening at once",
        &[
            "orphans",
            "processes",
            "each process's recovery",
            "slowest",
            "wall incl. process start",
            "probes sent",
            "most probes for one grant",
            "overlapping",
            "healthy after",
            "database bytes/grant",
        ],
    );
    table.row(&[
        count.to_string(),
        processes.to_string(),
        opens.join(", "),
        format!("{:.2} s", slowest.as_secs_f64()),
        format!("{:.2} s", wall.as_secs_f64()),
        probes.to_string(),
        per_shop.iter().max().copied().unwrap_or(0).to_string(),
        counters.total.overlapping_token_requests.to_string(),
        healthy.to_string(),
        (bytes / count as u64).to_string(),
    ]);
    eprintln!("fleet: the children's recovery reports counted {resolved} resolved (a grant another process resolved first counts for both)");
    assert_eq!((probes, healthy), (count as u64, count), "every orphan probed once and healthy");
}

fn engine_config(db: &str, base: &str) -> Config {
    let location = PgLocation::parse(db).expect("postgres URL");
    crate::journal::engine_config(base, StoreLocation::Postgres(Box::new(location)))
}

/// `child fleet-refresh DB SIM TAG PER ROUNDS`.
pub fn refresh_child(args: &[String]) {
    let (db, base, tag) = (&args[0], &args[1], &args[2]);
    let per: usize = args[3].parse().expect("per");
    let rounds: usize = args[4].parse().expect("rounds");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let (engine, _) = Engine::open(engine_config(db, base)).await.expect("engine");
        let http = reqwest::Client::new();
        let stdin = std::io::stdin();
        for round in 0..rounds {
            let mut shops = Vec::with_capacity(per);
            for i in 0..per {
                let s = shop(&format!("{tag}r{round}i{i}"));
                let t: serde_json::Value = http
                    .post(format!("{base}/_sim/shops"))
                    .json(&serde_json::json!({ "shop": s.as_str() }))
                    .send()
                    .await
                    .expect("seed")
                    .json()
                    .await
                    .expect("seed answer");
                let tokens = TokenSet {
                    access_token: tokenwal::core::AccessToken::new(t["access_token"].as_str().expect("access_token")),
                    access_expires_at: now(),
                    refresh_token: tokenwal::core::RefreshToken::new(t["refresh_token"].as_str().expect("refresh")),
                    refresh_expires_at: None,
                    scope: t["scope"].as_str().map(String::from),
                };
                engine.install(&s, tokens).await.expect("install");
                shops.push(s);
            }
            println!("ready");
            let mut line = String::new();
            stdin.lock().read_line(&mut line).expect("go");
            let syncs_before = engine.store().stats().syncs;
            let cpu_before = crate::util::cpu_time();
            let started = Instant::now();
            let (lat, errors) = crate::journal::tokens_at_once(&engine, shops).await;
            let wall = started.elapsed();
            let cpu = crate::util::cpu_time().saturating_sub(cpu_before);
            let lat: Vec<String> = lat.iter().map(|d| d.as_micros().to_string()).collect();
            let syncs = engine.store().stats().syncs - syncs_before;
            println!(
                "done n={per} wall_us={} errors={errors} syncs={syncs} cpu_us={} lat_us={}",
                wall.as_micros(),
                cpu.as_micros(),
                lat.join(",")
            );
        }
        engine.shutdown().await;
    });
}

/// `child fleet-recover DB SIM`: opens an engine (its recovery takes orphans over) and reports.
pub fn recover_child(args: &[String]) {
    let (db, base) = (&args[0], &args[1]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut config = engine_config(db, base);
        config.recovery_budget = Duration::from_secs(600);
        // Four processes at 4 096 probes each would open 16k connections to the one simulator at
        // once (its accept backlog, not recovery, would be measured): 256 each.
        config.max_concurrent_refreshes = 256;
        let started = Instant::now();
        let (engine, report) = Engine::open(config).await.expect("engine");
        println!(
            "recovered elapsed_us={} open={} resolved={} pending={}",
            started.elapsed().as_micros(),
            report.open,
            report.resolved,
            report.pending
        );
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        engine.shutdown().await;
    });
}
