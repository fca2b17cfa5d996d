//! Scenario 2 (the cost of the journal) and 3 (the sync floor).
//!
//! **Engine**: the real engine against the in-process simulator over loopback. Each round installs
//! `n` fresh shops whose access tokens are already expired, then calls `access_token` for all of them
//! at once: each call makes exactly one refresh (intent durable → HTTP → commit durable). The same
//! rounds run on a sled store and on the in-memory store, interleaved, in one process.
//!
//! **Store only**: the same two durable writes per refresh (intent, then the success's commit),
//! driven by the core `Machine` straight into the store with no HTTP, so the journal's own cost is
//! visible apart from the simulator's.
//!
//! **Sync floor**: 128-byte appends + `sync_data` (and `sync_all`) on a file in the same directory
//! as the stores.

use crate::util::{
    committer_since, fake_tokens, fmt_dur, new_committer, now, open_fds, percentile, shop, thread_cpu, threads_named,
    try_cpu_time, Table,
};
use crate::Opts;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{ClientSecret, GrantKey, InstallSource, Machine, Outcome, ShopDomain, TokenSet, UnixMillis};
use tokenwal::store::{Store, StoreConfig, StoreStats};
use tokenwal::{Config, Engine, StoreLocation};
use tokenwal_sim::{serve, SimConfig, SimHandle};

/// One side's totals over its rounds at one concurrency.
struct Side {
    refreshes: u64,
    wall: Duration,
    latencies: Vec<Duration>,
    errors: u64,
    syncs: u64,
    batches: u64,
    write_time: Duration,
    sync_time: Duration,
    /// `None` once any reading of `/proc` failed.
    cpu: Option<Duration>,
    committer_cpu: Option<Duration>,
    max_fds: usize,
}

impl Default for Side {
    fn default() -> Side {
        Side {
            refreshes: 0,
            wall: Duration::ZERO,
            latencies: Vec::new(),
            errors: 0,
            syncs: 0,
            batches: 0,
            write_time: Duration::ZERO,
            sync_time: Duration::ZERO,
            cpu: Some(Duration::ZERO),
            committer_cpu: Some(Duration::ZERO),
            max_fds: 0,
        }
    }
}

/// What a round measures besides its own timings: process CPU, the committer thread's CPU, open
/// file descriptors.
struct Probe {
    cpu: Option<Duration>,
    committer: Option<Duration>,
    stats: StoreStats,
    fds: usize,
}

impl Probe {
    fn take(store: &Store, tid: Option<u32>) -> Probe {
        Probe { cpu: try_cpu_time(), committer: tid.and_then(thread_cpu), stats: store.stats(), fds: open_fds() }
    }
}

fn add_delta(total: &mut Option<Duration>, before: Option<Duration>, after: Option<Duration>) {
    *total = match (*total, before, after) {
        (Some(t), Some(b), Some(a)) => Some(t + a.saturating_sub(b)),
        _ => None,
    };
}

impl Side {
    fn add(&mut self, n: usize, wall: Duration, lat: Vec<Duration>, errors: u64, before: Probe, after: Probe) {
        add_delta(&mut self.cpu, before.cpu, after.cpu);
        add_delta(&mut self.committer_cpu, before.committer, after.committer);
        self.max_fds = self.max_fds.max(before.fds).max(after.fds);
        let (before, after) = (before.stats, after.stats);
        self.refreshes += n as u64;
        self.wall += wall;
        self.latencies.extend(lat);
        self.errors += errors;
        self.syncs += after.syncs - before.syncs;
        self.batches += after.batches_applied - before.batches_applied;
        self.write_time += after.write_time - before.write_time;
        self.sync_time += after.sync_time - before.sync_time;
    }

    fn throughput(&self) -> f64 {
        self.refreshes as f64 / self.wall.as_secs_f64()
    }

    fn row(&mut self, t: &Table, n: usize, backend: &str) {
        self.latencies.sort();
        let per = |d: Duration| fmt_dur(d / self.refreshes.max(1) as u32);
        t.row(&[
            format!("{n}"),
            backend.to_owned(),
            format!("{}", self.refreshes),
            format!("{:.0}", self.throughput()),
            fmt_dur(percentile(&self.latencies, 50.0)),
            fmt_dur(percentile(&self.latencies, 99.0)),
            format!("{:.3}", self.syncs as f64 / self.refreshes.max(1) as f64),
            format!("{:.2}", self.batches as f64 / self.refreshes.max(1) as f64),
            per(self.write_time),
            per(self.sync_time),
            self.committer_cpu.map_or("n/a".into(), per),
            self.cpu.map_or("n/a".into(), per),
            format!("{}", self.max_fds),
            format!("{}", self.errors),
        ]);
    }
}

const COLUMNS: [&str; 14] = [
    "concurrent shops",
    "store",
    "refreshes",
    "refreshes/s",
    "p50 latency",
    "p99 latency",
    "syncs/refresh",
    "durable writes/refresh",
    "committer write time/refresh",
    "committer sync time/refresh",
    "committer CPU/refresh",
    "process CPU/refresh",
    "open fds (max)",
    "errors",
];

fn concurrencies(opts: &Opts) -> Vec<usize> {
    if let Some(c) = &opts.concurrency {
        c.clone()
    } else if opts.quick {
        vec![1, 16, 64]
    } else {
        vec![1, 16, 256, 4096]
    }
}

/// Rounds at concurrency `n`: enough for `target` refreshes (`--refreshes`, default 4 096), at least 3.
fn rounds(opts: &Opts, n: usize) -> usize {
    let target: usize = if opts.quick { 32 } else { opts.refreshes.map_or(4096, |r| r as usize) };
    target.div_ceil(n).max(3)
}

pub(crate) fn engine_config(base: &str, store: StoreLocation) -> Config {
    let mut c = Config::shopify(store, "sim-client-id", ClientSecret::new("sim-client-secret"))
        .with_insecure_test_endpoint(url::Url::parse(base).expect("sim url"))
        .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
    c.proactive = false;
    c.max_concurrent_refreshes = 4096;
    c
}

/// Seeds and installs `n` shops (access tokens expired), then refreshes them all at once.
async fn engine_round(engine: &Engine, tid: Option<u32>, sim: &SimHandle, tag: &str, n: usize, side: &mut Side) {
    let shops: Vec<_> = (0..n).map(|i| shop(&format!("{tag}i{i}"))).collect();
    let mut installs = tokio::task::JoinSet::new();
    for s in &shops {
        let t = sim.seed_shop(s.as_str());
        let tokens = TokenSet {
            access_token: tokenwal::core::AccessToken::new(t.access_token.as_str()),
            access_expires_at: now(),
            refresh_token: tokenwal::core::RefreshToken::new(t.refresh_token.as_str()),
            refresh_expires_at: Some(now().saturating_add(Duration::from_secs(t.refresh_token_expires_in))),
            scope: Some(t.scope.clone()),
        };
        let (engine, s) = (engine.clone(), s.clone());
        installs.spawn(async move { engine.install(&s, tokens).await.expect("install") });
    }
    while installs.join_next().await.is_some() {}
    let before = Probe::take(engine.store(), tid);
    let started = Instant::now();
    let (lat, errors) = tokens_at_once(engine, shops).await;
    let wall = started.elapsed();
    side.add(n, wall, lat, errors, before, Probe::take(engine.store(), tid));
}

/// Asks `engine` for every shop's token at once: each call's latency, and how many failed.
pub(crate) async fn tokens_at_once(engine: &Engine, shops: Vec<ShopDomain>) -> (Vec<Duration>, u64) {
    let mut calls = tokio::task::JoinSet::new();
    for s in shops {
        let engine = engine.clone();
        calls.spawn(async move {
            let t = Instant::now();
            let ok = engine.access_token(&s).await.is_ok();
            (t.elapsed(), ok)
        });
    }
    let (mut lat, mut errors) = (Vec::with_capacity(calls.len()), 0);
    while let Some(r) = calls.join_next().await {
        let (d, ok) = r.expect("call task");
        lat.push(d);
        errors += u64::from(!ok);
    }
    (lat, errors)
}

/// Installs `n` grants, then runs one refresh each (intent durable, then commit durable), all at once.
async fn store_round(store: &Store, tid: Option<u32>, tag: &str, n: usize, side: &mut Side) {
    let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
    let t0 = now();
    let mut installs = tokio::task::JoinSet::new();
    for i in 0..n {
        let (store, machine) = (store.clone(), Arc::clone(&machine));
        let key = GrantKey::shopify(&shop(&format!("{tag}i{i}")));
        let tokens = fake_tokens(i as u64, t0, UnixMillis(t0.0 + 90 * 86_400_000));
        installs.spawn(async move {
            let d = machine.install(None, key, tokens, InstallSource::Import, t0).make_durable(&store).await;
            d.expect("install").state().clone()
        });
    }
    let mut states = Vec::with_capacity(n);
    while let Some(r) = installs.join_next().await {
        states.push(r.expect("install task"));
    }
    let before = Probe::take(store, tid);
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for (i, s) in states.into_iter().enumerate() {
        let (store, machine) = (store.clone(), Arc::clone(&machine));
        calls.spawn(async move {
            let t = Instant::now();
            let permit = machine.plan_attempt(&s, now()).expect("plan").make_durable(&store).await.expect("intent");
            let at = now();
            let tokens =
                fake_tokens(i as u64 + 1_000_000, UnixMillis(at.0 + 3_600_000), UnixMillis(at.0 + 90 * 86_400_000));
            let outcome = Outcome::Success { tokens, request_id: None };
            let done = machine.on_outcome(permit.state(), &permit, outcome, at, 0).make_durable(&store).await;
            let ok = done.map(|d| d.value().is_some()).unwrap_or(false);
            (t.elapsed(), ok)
        });
    }
    let mut lat = Vec::with_capacity(n);
    let mut errors = 0;
    while let Some(r) = calls.join_next().await {
        let (d, ok) = r.expect("refresh task");
        lat.push(d);
        errors += u64::from(!ok);
    }
    let wall = started.elapsed();
    side.add(n, wall, lat, errors, before, Probe::take(store, tid));
}

fn ratio_row(t: &Table, n: usize, what: &str, sled: &Side, mem: &Side, target: &str) {
    let r = sled.throughput() / mem.throughput();
    let verdict = match (n, what) {
        (256, "engine") => {
            if r >= 0.8 {
                "met"
            } else {
                "missed"
            }
        }
        _ => "—",
    };
    t.row(&[
        format!("{n}"),
        what.to_owned(),
        format!("{:.0}", sled.throughput()),
        format!("{:.0}", mem.throughput()),
        format!("{:.1}%", 100.0 * r),
        target.to_owned(),
        verdict.to_owned(),
    ]);
}

/// Scenario 2: engine and store-only, sled vs memory, at each concurrency.
pub async fn run(opts: &Opts) {
    let dir = opts.dir.join("journal");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    let mut summary = Vec::new();
    if opts.path.as_deref().is_none_or(|p| p == "engine") {
        engine_path(opts, &dir, &mut summary).await;
    }
    if opts.path.as_deref().is_none_or(|p| p == "store") {
        store_path(opts, &dir, &mut summary).await;
    }
    let table = Table::new(
        "Journaled (sled) vs in-memory throughput",
        &["concurrent shops", "path", "sled refreshes/s", "memory refreshes/s", "sled / memory", "target", "verdict"],
    );
    for (n, what, sled, mem) in &summary {
        let target = if *n == 256 && *what == "engine" { "≥ 80%" } else { "" };
        ratio_row(&table, *n, what, sled, mem, target);
    }
    let table =
        Table::new("Syncs per refresh (sled)", &["concurrent shops", "path", "syncs/refresh", "target", "verdict"]);
    for (n, what, sled, _) in &summary {
        let spr = sled.syncs as f64 / sled.refreshes.max(1) as f64;
        let (target, verdict) =
            if *n == 256 { ("< 0.25", if spr < 0.25 { "met" } else { "missed" }) } else { ("", "—") };
        table.row(&[format!("{n}"), (*what).to_owned(), format!("{spr:.3}"), target.into(), verdict.into()]);
    }
}

type Summary = Vec<(usize, &'static str, Side, Side)>;

async fn engine_path(opts: &Opts, dir: &std::path::Path, summary: &mut Summary) {
    let sim_config = SimConfig { access_ttl: "86400s".parse().expect("duration"), ..SimConfig::default() };
    let sim = serve(sim_config, "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
    let base = sim.base_url();
    let table = Table::new("Engine refreshes against the simulator (loopback HTTP), sled vs in-memory store", &COLUMNS);
    for n in concurrencies(opts) {
        // Fresh engines for each concurrency: the HTTP connections pooled at one level (thousands at
        // 4096) do not pile up into the next.
        let before = threads_named("tokenwal-commit");
        let path = StoreLocation::Path(dir.join(format!("engine-{n}")));
        let (sled_engine, _) = Engine::open(engine_config(&base, path)).await.expect("engine (sled)");
        let sled_tid = committer_since(&before);
        let before = threads_named("tokenwal-commit");
        let (mem_engine, _) =
            Engine::open(engine_config(&base, StoreLocation::InMemory)).await.expect("engine (memory)");
        let mem_tid = committer_since(&before);
        // A PostgreSQL store in a schema of its own, when --pg names a database.
        let before = threads_named("tokenwal-commit");
        let pg_engine = match &opts.pg {
            Some(url) => {
                let schema = format!("tokenwal_bench_{}_{n}", std::process::id());
                let location = tokenwal::store::PgLocation::parse(url)
                    .and_then(|l| l.with_schema(&schema))
                    .expect("--pg: a postgres:// URL");
                eprintln!("postgres store: schema {schema} (drop it with: DROP SCHEMA {schema} CASCADE)");
                let (e, _) = Engine::open(engine_config(&base, StoreLocation::Postgres(Box::new(location))))
                    .await
                    .expect("engine (postgres)");
                Some(e)
            }
            None => None,
        };
        let pg_tid = committer_since(&before);
        // Warm-up: connections, allocator, page cache.
        let mut warm = Side::default();
        let w = n.min(64);
        engine_round(&sled_engine, sled_tid, &sim, &format!("ws{n}"), w, &mut warm).await;
        engine_round(&mem_engine, mem_tid, &sim, &format!("wm{n}"), w, &mut warm).await;
        if let Some(e) = &pg_engine {
            engine_round(e, pg_tid, &sim, &format!("wp{n}"), w, &mut warm).await;
        }
        let mut pg = Side::default();
        let (mut sled, mut mem) = (Side::default(), Side::default());
        for r in 0..rounds(opts, n) {
            // Alternate which side goes first, so drift in the machine's load hits both alike.
            let (s, m) = (format!("es{n}r{r}"), format!("em{n}r{r}"));
            if r % 2 == 0 {
                engine_round(&sled_engine, sled_tid, &sim, &s, n, &mut sled).await;
                engine_round(&mem_engine, mem_tid, &sim, &m, n, &mut mem).await;
            } else {
                engine_round(&mem_engine, mem_tid, &sim, &m, n, &mut mem).await;
                engine_round(&sled_engine, sled_tid, &sim, &s, n, &mut sled).await;
            }
            if let Some(e) = &pg_engine {
                engine_round(e, pg_tid, &sim, &format!("ep{n}r{r}"), n, &mut pg).await;
            }
        }
        sled.row(&table, n, "sled");
        mem.row(&table, n, "memory");
        if let Some(e) = pg_engine {
            // syncs/refresh is database COMMITs per refresh.
            pg.row(&table, n, "postgres");
            e.shutdown().await;
        }
        summary.push((n, "engine", sled, mem));
        sled_engine.shutdown().await;
        mem_engine.shutdown().await;
        drop((sled_engine, mem_engine));
        // Let the dropped engines' connections close before the next level.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sim.shutdown().await;
}

async fn store_path(opts: &Opts, dir: &std::path::Path, summary: &mut Summary) {
    let (store, sled_tid) = new_committer(|| {
        Store::open(dir.join("store"), &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default())
            .expect("store")
            .0
    });
    let (mem_store, mem_tid) = new_committer(Store::in_memory);
    let table = Table::new("Store only: intent + commit per refresh, no HTTP, sled vs in-memory store", &COLUMNS);
    for n in concurrencies(opts) {
        let (mut sled, mut mem) = (Side::default(), Side::default());
        for r in 0..rounds(opts, n) {
            let (s, m) = (format!("ss{n}r{r}"), format!("sm{n}r{r}"));
            if r % 2 == 0 {
                store_round(&store, sled_tid, &s, n, &mut sled).await;
                store_round(&mem_store, mem_tid, &m, n, &mut mem).await;
            } else {
                store_round(&mem_store, mem_tid, &m, n, &mut mem).await;
                store_round(&store, sled_tid, &s, n, &mut sled).await;
            }
        }
        sled.row(&table, n, "sled");
        mem.row(&table, n, "memory");
        summary.push((n, "store only", sled, mem));
    }
}

/// Scenario 3: the sync floor of this disk, and a single writer's durable write for comparison.
pub async fn sync_floor(opts: &Opts) {
    let dir = opts.dir.join("sync");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    let samples = if opts.quick { 50 } else { 2000 };
    let table = Table::new(
        "Sync floor: one small append + sync on the stores' disk, and one durable store write",
        &["operation", "samples", "p50", "p99", "mean", "p50 / fdatasync p50"],
    );
    let sync_dir = dir.clone();
    let measure = move |name: &str, all: bool| -> Vec<Duration> {
        let path = sync_dir.join(name);
        let mut f = OpenOptions::new().create(true).append(true).open(&path).expect("sync file");
        let buf = [0x5au8; 128];
        let mut v = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            f.write_all(&buf).expect("append");
            if all {
                f.sync_all().expect("sync_all");
            } else {
                f.sync_data().expect("sync_data");
            }
            v.push(t.elapsed());
        }
        v.sort();
        v
    };
    let floor = tokio::task::spawn_blocking(move || (measure("fdatasync.bin", false), measure("fsync.bin", true)))
        .await
        .expect("sync task");
    let base = percentile(&floor.0, 50.0);
    let row = |name: &str, v: &[Duration]| {
        let mean = v.iter().sum::<Duration>() / v.len().max(1) as u32;
        table.row(&[
            name.to_owned(),
            format!("{}", v.len()),
            fmt_dur(percentile(v, 50.0)),
            fmt_dur(percentile(v, 99.0)),
            fmt_dur(mean),
            format!("{:.2}×", percentile(v, 50.0).as_secs_f64() / base.as_secs_f64()),
        ]);
    };
    row("append 128 B + fdatasync (`sync_data`)", &floor.0);
    row("append 128 B + fsync (`sync_all`)", &floor.1);

    // One writer, one grant: every durable write is a group of one (sled flush + fsync of its file).
    let (store, tid) = new_committer(|| {
        Store::open(dir.join("store"), &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default())
            .expect("store")
            .0
    });
    let mut side = Side::default();
    let writes = if opts.quick { 20 } else { 500 };
    for r in 0..writes {
        store_round(&store, tid, &format!("f{r}"), 1, &mut side).await;
    }
    side.latencies.sort();
    let per_write: Vec<Duration> = side.latencies.iter().map(|d| *d / 2).collect();
    row("store: one refresh alone (intent + commit, 2 durable writes)", &side.latencies);
    row("store: one durable write alone (half of the above)", &per_write);
    let stats = store.stats();
    let t2 = Table::new(
        "Committer time per sync at concurrency 1 (all of it: setup installs included)",
        &["syncs", "write time / sync", "flush + fsync time / sync"],
    );
    t2.row(&[
        format!("{}", stats.syncs),
        fmt_dur(stats.write_time / stats.syncs.max(1) as u32),
        fmt_dur(stats.sync_time / stats.syncs.max(1) as u32),
    ]);
}
