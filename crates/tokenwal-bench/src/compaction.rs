//! Scenario 16 (issue 15, item 1): refresh latency while a compaction pass runs.
//!
//! **Backlog**: a fresh sled store gets `--churn-grants` grants (default 1 000) with
//! `--refreshes / grants` refreshes each (default 100 per grant: 201 journal records), written
//! through the store API as the churn scenario writes them (intent + commit per refresh, one round
//! of all grants per simulated hour, round after round, so a grant's records are spread over the
//! journal as hourly refreshes leave them). The rounds end half an hour before the build, so with
//! the history cap `--history-per-grant` (default 64) and the retention `--retention-hours`
//! (default a quarter of the cap: 16 h) a pass has two kinds of work: each grant loses its records
//! beyond the newest cap ([`Store::trim_history`]: 1 + 2 × rounds − cap per grant), then the kept
//! records older than the retention go ([`Store::compact`]: cap − 2 × retention per grant).
//!
//! **Load**: the engine opens that store (`StoreLocation::Open`, its own background compactor
//! off) and serves `n` load grants of the in-process simulator (loopback HTTP): `n` tasks, one per
//! grant, each calling `on_unauthorized` with the grant's current access token in a closed loop, so
//! every call is exactly one refresh (intent durable → HTTP → commit durable). The load runs
//! without a break through three phases, and each refresh counts in the phase it started in:
//! (a) a fixed window with no compaction, (b) while one compaction pass runs over the backlog,
//! (c) a fixed window after it finished.
//!
//! **The pass** is the engine's background pass (`crates/tokenwal/src/compactor.rs`, `pass`) step for
//! step, through the same public store calls on the engine's store: the queued grants (every
//! backlog grant and every load grant, as the engine's trim queue would hold them) 64 to a blocking
//! task, each grant's `trim_history` called again while it returns a full `compact_chunk`; then
//! `compact(now)` on a blocking task per chunk while it reports more; after each blocking task a
//! rest as long as the task took, at most 1 s, as the engine does since 2026-12-07 (`--no-pace`: a
//! `yield_now` instead, the engine's behaviour before). The
//! engine's own compactor is not used because its trim queue only holds grants
//! that engine wrote, and its first pass starts up to a minute after open.

use crate::journal::engine_config;
use crate::util::{fake_tokens, fmt_dur, now, percentile, shop, try_cpu_time, Table};
use crate::Opts;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{AccessToken, GrantKey, GrantState, InstallSource, Machine, Outcome, RefreshToken};
use tokenwal::core::{TokenSet, UnixMillis};
use tokenwal::store::{Store, StoreConfig, StoreStats};
use tokenwal::{Engine, StoreLocation};
use tokenwal_sim::{serve, SimConfig, SimHandle};

const HOUR: u64 = 3_600_000;
/// Grants per blocking task of the trim step (as the engine's compactor).
const TRIM_GRANTS_PER_TASK: usize = 64;

/// The scenario's sizes.
struct Sizes {
    grants: usize,
    rounds: u64,
    cap: usize,
    retention_h: u64,
    warmup: Duration,
    window: Duration,
}

impl Sizes {
    fn of(opts: &Opts) -> Sizes {
        let grants = opts.churn_grants.unwrap_or(if opts.quick { 50 } else { 1_000 }).max(1);
        let refreshes = opts.refreshes.unwrap_or(if opts.quick { 1_000 } else { 100_000 });
        let cap = opts.history_per_grant.unwrap_or(if opts.quick { 8 } else { 64 });
        Sizes {
            grants,
            rounds: (refreshes / grants as u64).max(1),
            cap,
            retention_h: opts.retention_hours.unwrap_or((cap as u64 / 4).max(1)),
            warmup: Duration::from_millis(if opts.quick { 300 } else { 2_000 }),
            window: Duration::from_secs(if opts.quick { 1 } else { 10 }),
        }
    }

    /// Records each backlog grant holds: its install and two per refresh.
    fn records_per_grant(&self) -> u64 {
        1 + 2 * self.rounds
    }
}

/// What one compaction pass did.
#[derive(Default)]
struct PassReport {
    elapsed: Duration,
    /// When the trim step ended and the retention step began, with the store's counters then.
    trim_end: Option<(Instant, StoreStats, Option<Duration>)>,
    trimmed: usize,
    expired: usize,
    trim_tasks: Vec<Duration>,
    retention_tasks: Vec<Duration>,
    /// CPU time of the blocking threads over the tasks (`None` if `/proc` could not be read).
    task_cpu: Option<Duration>,
}

/// CPU time of the calling thread so far.
fn this_thread_cpu() -> Option<Duration> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    let tid = link.file_name()?.to_str()?.parse().ok()?;
    crate::util::thread_cpu(tid)
}

/// Runs `f` and returns its value with the CPU time this thread spent in it.
fn with_cpu<T>(f: impl FnOnce() -> T) -> (T, Option<Duration>) {
    let before = this_thread_cpu();
    let v = f();
    (v, before.zip(this_thread_cpu()).map(|(b, a)| a.saturating_sub(b)))
}

fn add_cpu(total: &mut Option<Duration>, d: Option<Duration>) {
    *total = total.zip(d).map(|(t, d)| t + d);
}

/// One compaction pass over `grants`, as `compactor::pass` runs it (see the module doc).
async fn pass(store: &Store, grants: &[GrantKey], keep: usize, pace: bool) -> PassReport {
    let started = Instant::now();
    let chunk = store.config().compact_chunk.max(1);
    let mut r = PassReport { task_cpu: Some(Duration::ZERO), ..PassReport::default() };
    for group in grants.chunks(TRIM_GRANTS_PER_TASK) {
        let (store, group) = (store.clone(), group.to_vec());
        let t = Instant::now();
        let (n, cpu) = tokio::task::spawn_blocking(move || {
            with_cpu(|| {
                let mut n = 0;
                for g in &group {
                    loop {
                        let k = store.trim_history(g, keep).expect("trim_history");
                        n += k;
                        if k < chunk {
                            break;
                        }
                    }
                }
                n
            })
        })
        .await
        .expect("trim task");
        add_cpu(&mut r.task_cpu, cpu);
        r.trim_tasks.push(t.elapsed());
        after_task(t.elapsed(), pace).await;
        r.trimmed += n;
    }
    r.trim_end = Some((Instant::now(), store.stats(), try_cpu_time()));
    loop {
        let store = store.clone();
        let t = Instant::now();
        let (c, cpu) = tokio::task::spawn_blocking(move || with_cpu(|| store.compact(now()).expect("compact")))
            .await
            .expect("compact task");
        add_cpu(&mut r.task_cpu, cpu);
        r.retention_tasks.push(t.elapsed());
        after_task(t.elapsed(), pace).await;
        r.expired += c.removed;
        if !c.more {
            break;
        }
    }
    r.elapsed = started.elapsed();
    r
}

/// Between two blocking tasks: the engine rests as long as the task took (at most 1 s); `--no-pace`
/// only yields, as the engine did before.
async fn after_task(took: Duration, pace: bool) {
    if pace {
        tokio::time::sleep(took.min(Duration::from_secs(1))).await;
    } else {
        tokio::task::yield_now().await;
    }
}

/// Writes the backlog: `s.grants` grants installed at `t0`, then `s.rounds` rounds of one refresh per
/// grant, an hour apart, with 256 writers. Returns the grants.
async fn build_backlog(store: &Store, s: &Sizes, t0: UnixMillis) -> Vec<GrantKey> {
    let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
    let day = 24 * HOUR;
    let writers = 256.min(s.grants);
    let keys: Vec<GrantKey> = (0..s.grants).map(|i| GrantKey::shopify(&shop(&format!("b{i}")))).collect();
    // Round 0 installs; rounds 1.. refresh. Each writer keeps the states of its share of the grants.
    let mut shares: Vec<Vec<(usize, Option<GrantState>)>> = (0..writers).map(|_| Vec::new()).collect();
    for i in 0..s.grants {
        shares[i % writers].push((i, None));
    }
    for round in 0..=s.rounds {
        let at = UnixMillis(t0.0 + round * HOUR);
        let mut tasks = tokio::task::JoinSet::new();
        for share in shares.drain(..) {
            let (store, machine, keys) = (store.clone(), Arc::clone(&machine), keys.clone());
            tasks.spawn(async move {
                let mut out = Vec::with_capacity(share.len());
                for (i, state) in share {
                    let seed = (round << 32) | i as u64;
                    let tokens = fake_tokens(seed, UnixMillis(at.0 + HOUR), UnixMillis(at.0 + 90 * day));
                    let next = match state {
                        None => machine
                            .install(None, keys[i].clone(), tokens, InstallSource::Import, at)
                            .make_durable(&store)
                            .await
                            .expect("install")
                            .state()
                            .clone(),
                        Some(state) => {
                            let permit = machine
                                .plan_attempt(&state, at)
                                .expect("plan")
                                .make_durable(&store)
                                .await
                                .expect("intent");
                            let outcome = Outcome::Success { tokens, request_id: None };
                            let d =
                                machine.on_outcome(permit.state(), &permit, outcome, at, 0).make_durable(&store).await;
                            d.expect("commit").state().clone()
                        }
                    };
                    out.push((i, Some(next)));
                }
                out
            });
        }
        while let Some(r) = tasks.join_next().await {
            shares.push(r.expect("backlog task"));
        }
    }
    keys
}

/// A load grant's worker: refreshes in a closed loop until `stop`; (start, latency, ok) per call.
async fn worker(
    engine: Engine,
    shop: tokenwal::core::ShopDomain,
    mut token: AccessToken,
    stop: Arc<AtomicBool>,
) -> Vec<(Instant, Duration, bool)> {
    let mut out = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = engine.on_unauthorized(&shop, &token).await;
        let ok = r.is_ok();
        out.push((t, t.elapsed(), ok));
        match r {
            Ok(next) => token = next,
            // Keep the load going at the same rate; the error is counted.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    out
}

const PHASES: [&str; 5] = [
    "(a) no compaction",
    "(b) during the pass",
    "(b1) … its trim step",
    "(b2) … its retention step",
    "(c) after the pass",
];

/// Scenario 16: refresh latency before, during and after a compaction pass over a backlog.
pub async fn run(opts: &Opts) {
    let s = Sizes::of(opts);
    let concurrencies = opts.concurrency.clone().unwrap_or(if opts.quick { vec![8] } else { vec![64, 256] });
    let sim_config = SimConfig { access_ttl: "86400s".parse().expect("duration"), ..SimConfig::default() };
    let sim = serve(sim_config, "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
    let base = sim.base_url();
    let mut store_config = StoreConfig::default().with_retention(Duration::from_secs(s.retention_h * 3600));
    if let Some(c) = opts.compact_chunk {
        store_config = store_config.with_compact_chunk(c);
    }
    let per = s.records_per_grant();
    let trim_each = per.saturating_sub(s.cap as u64);
    let expire_each = (per.min(s.cap as u64)).saturating_sub(2 * s.retention_h);
    println!();
    println!(
        "backlog: {} grants × {} records ({} refreshes each, an hour apart, the newest half an hour old); \
         history cap {}, retention {} h, compact_chunk {}: a pass trims {} and expires {} records per backlog grant \
         ({} in all), and trims the load grants to the cap{}; phases (a) and (c) {} each after {} of warm-up",
        s.grants,
        per,
        s.rounds,
        s.cap,
        s.retention_h,
        store_config.compact_chunk,
        trim_each,
        expire_each,
        (trim_each + expire_each) * s.grants as u64,
        if opts.pace {
            " (paced as the engine: a rest as long as each blocking task)"
        } else {
            " (--no-pace: yield only)"
        },
        fmt_dur(s.window),
        fmt_dur(s.warmup),
    );
    let backlog_table = Table::new(
        "Compaction backlog (written through the store API before each run)",
        &["concurrent grants", "backlog grants", "journal records", "build time", "disk (apparent)"],
    );
    let mut runs = Vec::new();
    for &n in &concurrencies {
        runs.push((n, one(opts, &s, &store_config, &sim, &base, n, &backlog_table).await));
    }
    let t = Table::new(
        "Refresh latency while compaction runs (engine → simulator over loopback, closed loop, sled store)",
        &[
            "concurrent grants",
            "phase",
            "duration",
            "refreshes",
            "refreshes/s",
            "p50",
            "p99",
            "p99.9",
            "max",
            "syncs/refresh",
            "committer write time / sync",
            "flush + fsync time / sync",
            "process CPU / s",
            "errors",
        ],
    );
    for (n, run) in &runs {
        for (phase, p) in PHASES.iter().zip(&run.phases) {
            let mut lat = p.latencies.clone();
            lat.sort();
            let refreshes = lat.len() as u64;
            t.row(&[
                format!("{n}"),
                (*phase).to_owned(),
                fmt_dur(p.duration),
                format!("{refreshes}"),
                format!("{:.0}", refreshes as f64 / p.duration.as_secs_f64()),
                fmt_dur(percentile(&lat, 50.0)),
                fmt_dur(percentile(&lat, 99.0)),
                fmt_dur(percentile(&lat, 99.9)),
                fmt_dur(lat.last().copied().unwrap_or_default()),
                format!("{:.3}", p.syncs as f64 / refreshes.max(1) as f64),
                fmt_dur(p.write_time / p.syncs.max(1) as u32),
                fmt_dur(p.sync_time / p.syncs.max(1) as u32),
                p.cpu.map_or("n/a".into(), |c| format!("{:.2} s", c.as_secs_f64() / p.duration.as_secs_f64())),
                format!("{}", p.errors),
            ]);
        }
    }
    let t = Table::new(
        "The compaction pass (as the engine's background compactor runs it)",
        &[
            "concurrent grants",
            "pass time",
            "records trimmed",
            "records expired",
            "deleted (store counter)",
            "deleted/s",
            "syncs during the pass",
            "trim tasks: n, p50, max",
            "retention tasks: n, p50, max",
            "compaction threads' CPU / task time",
            "refreshes (bench) / rotations (simulator)",
        ],
    );
    for (n, run) in &mut runs {
        let r = &mut run.pass;
        let tasks = |v: &mut Vec<Duration>| {
            v.sort();
            format!("{}, {}, {}", v.len(), fmt_dur(percentile(v, 50.0)), fmt_dur(v.last().copied().unwrap_or_default()))
        };
        t.row(&[
            format!("{n}"),
            fmt_dur(r.elapsed),
            format!("{}", r.trimmed),
            format!("{}", r.expired),
            format!("{}", run.compacted),
            format!("{:.0}", (r.trimmed + r.expired) as f64 / r.elapsed.as_secs_f64()),
            format!("{}", run.pass_syncs),
            tasks(&mut r.trim_tasks),
            tasks(&mut r.retention_tasks),
            r.task_cpu.map_or("n/a".into(), |c| {
                let wall: Duration = r.trim_tasks.iter().chain(&r.retention_tasks).sum();
                format!("{:.0}%", 100.0 * c.as_secs_f64() / wall.as_secs_f64().max(1e-9))
            }),
            format!("{} / {}", run.refreshes, run.rotations),
        ]);
    }
    sim.shutdown().await;
}

/// One phase's samples.
#[derive(Default)]
struct Phase {
    duration: Duration,
    latencies: Vec<Duration>,
    errors: u64,
    syncs: u64,
    write_time: Duration,
    sync_time: Duration,
    /// Process CPU time over the phase (every thread: engine, simulator, committer, compaction).
    cpu: Option<Duration>,
}

/// One concurrency's results.
struct Run {
    phases: Vec<Phase>,
    pass: PassReport,
    /// The store's `compacted` counter over the pass.
    compacted: u64,
    pass_syncs: u64,
    /// Successful refreshes of the whole run (warm-up included), and the simulator's rotations of the
    /// load grants: equal when every call was exactly one refresh.
    refreshes: u64,
    rotations: u64,
}

async fn one(
    opts: &Opts,
    s: &Sizes,
    store_config: &StoreConfig,
    sim: &SimHandle,
    base: &str,
    n: usize,
    backlog_table: &Table,
) -> Run {
    let dir = opts.dir.join(format!("compaction-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (store, _) = Store::open(&dir, &tokenwal::KeyRing::insecure_test_ring(), store_config.clone()).expect("store");
    // The newest backlog round half an hour before now.
    let t0 = UnixMillis(now().0 - s.rounds * HOUR - HOUR / 2);
    let built = Instant::now();
    eprintln!("compaction {n}: building the backlog ({} grants × {} refreshes)", s.grants, s.rounds);
    let mut queued = build_backlog(&store, s, t0).await;
    let build_time = built.elapsed();
    let st = store.stats();
    backlog_table.row(&[
        format!("{n}"),
        format!("{}", s.grants),
        format!("{}", st.records_appended - st.compacted),
        fmt_dur(build_time),
        crate::util::fmt_bytes(crate::util::disk_usage(&dir).0 as f64),
    ]);

    let mut config = engine_config(base, StoreLocation::Open(store.clone()));
    // The bench runs the pass itself (see the module doc).
    config.compaction = None;
    let (engine, _) = Engine::open(config).await.expect("engine");
    let mut shops = Vec::with_capacity(n);
    let mut installs = tokio::task::JoinSet::new();
    for i in 0..n {
        let sh = shop(&format!("l{n}x{i}"));
        let t = sim.seed_shop(sh.as_str());
        let tokens = TokenSet {
            access_token: AccessToken::new(t.access_token.as_str()),
            access_expires_at: UnixMillis(now().0 + 86_400_000),
            refresh_token: RefreshToken::new(t.refresh_token.as_str()),
            refresh_expires_at: Some(now().saturating_add(Duration::from_secs(t.refresh_token_expires_in))),
            scope: Some(t.scope.clone()),
        };
        let (engine, sh2, access) = (engine.clone(), sh.clone(), tokens.access_token.clone());
        installs.spawn(async move { engine.install(&sh2, tokens).await.expect("install") });
        queued.push(GrantKey::shopify(&sh));
        shops.push((sh, access));
    }
    while installs.join_next().await.is_some() {}

    eprintln!("compaction {n}: load on");
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for (sh, access) in shops.iter().cloned() {
        workers.spawn(worker(engine.clone(), sh, access, Arc::clone(&stop)));
    }
    tokio::time::sleep(s.warmup).await;
    let mark = |st: &Store| (Instant::now(), st.stats(), try_cpu_time());
    let a0 = mark(&store);
    tokio::time::sleep(s.window).await;
    let b0 = mark(&store);
    eprintln!("compaction {n}: pass starts");
    let report = pass(&store, &queued, s.cap, opts.pace).await;
    let b1 = mark(&store);
    eprintln!("compaction {n}: pass done in {}", fmt_dur(report.elapsed));
    tokio::time::sleep(s.window).await;
    let c1 = mark(&store);
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    while let Some(r) = workers.join_next().await {
        samples.extend(r.expect("worker"));
    }
    let trim_end = report.trim_end.expect("the pass marks its trim step's end");
    let bounds = [(&a0, &b0), (&b0, &b1), (&b0, &trim_end), (&trim_end, &b1), (&b1, &c1)];
    let mut phases: Vec<Phase> = bounds
        .iter()
        .map(|((from, sf, cf), (to, st, ct))| Phase {
            duration: *to - *from,
            syncs: st.syncs - sf.syncs,
            write_time: st.write_time.saturating_sub(sf.write_time),
            sync_time: st.sync_time.saturating_sub(sf.sync_time),
            cpu: cf.zip(*ct).map(|(f, t)| t.saturating_sub(f)),
            ..Phase::default()
        })
        .collect();
    for &(start, lat, ok) in &samples {
        // (b1) and (b2) split (b): a sample counts in every phase it started in.
        for (i, ((from, ..), (to, ..))) in bounds.iter().enumerate() {
            if start >= *from && start < *to {
                if ok {
                    phases[i].latencies.push(lat);
                } else {
                    phases[i].errors += 1;
                }
            }
        }
    }
    let refreshes = samples.iter().filter(|(_, _, ok)| *ok).count() as u64;
    let counters = sim.counters();
    let rotations = shops.iter().map(|(sh, _)| counters.shop(sh.as_str()).rotations).sum();
    engine.shutdown().await;
    drop(engine);
    drop(store);
    Run {
        phases,
        pass: report,
        compacted: b1.1.compacted - b0.1.compacted,
        pass_syncs: b1.1.syncs - b0.1.syncs,
        refreshes,
        rotations,
    }
}
