//! Scenarios 4 (recovery), 5 (footprint) and 6 (the scheduler at scale), on stores of 100k and 1M
//! grants built through the store API (see [`crate::populate`]), measured in fresh child processes.

use crate::child::{self, settle};
use crate::populate::{install_many, scale_store};
use crate::util::{copy_dir, disk_usage, fake_tokens, fmt_bytes, fmt_dur, now, scale_key, scale_shop, Table};
use crate::Opts;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{AccessToken, GrantKey, InstallSource, Machine, Outcome, RefreshToken, TokenSet, UnixMillis};
use tokenwal::store::{Store, StoreConfig};
use tokenwal_sim::{serve, SimConfig};

/// An address nothing listens on: engines that will send nothing still need an endpoint.
const NOWHERE: &str = "http://127.0.0.1:9/";

/// The two store sizes (the 100k and 1M; tiny with `--quick`).
pub fn sizes(opts: &Opts) -> [usize; 2] {
    if opts.quick {
        [1_000, 2_000]
    } else {
        [100_000, 1_000_000]
    }
}

fn ns(kv: &HashMap<String, String>, k: &str) -> Duration {
    Duration::from_nanos(kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0))
}

fn num(kv: &HashMap<String, String>, k: &str) -> u64 {
    kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn mib(kb: u64) -> String {
    fmt_bytes(kb as f64 * 1024.0)
}

/// Scenario 4: open and recover.
pub async fn recovery(opts: &Opts) {
    let [small, large] = sizes(opts);
    let small_store = scale_store(&opts.dir, small).await;
    let large_store = scale_store(&opts.dir, large).await;
    settle();

    let t = Table::new(
        "Open and recover (fresh process each; page cache warm)",
        &[
            "store",
            "open intents",
            "Store::open",
            "Engine::open (recovery included)",
            "RSS after Store::open",
            "RSS after Engine::open",
            "recovery outcome",
            "target",
            "verdict",
        ],
    );
    let row = |label: String, open: &HashMap<String, String>, engine: &HashMap<String, String>, target: &str| {
        let e = ns(engine, "open_ns");
        let verdict = if target.is_empty() {
            "—".to_owned()
        } else if e < Duration::from_secs(2) {
            "met".to_owned()
        } else {
            "missed".to_owned()
        };
        t.row(&[
            label,
            format!("{}", num(open, "open_attempts")),
            fmt_dur(ns(open, "open_ns")),
            fmt_dur(e),
            mib(num(open, "opened_rss_kb")),
            mib(num(engine, "opened_rss_kb")),
            format!(
                "{} interrupted, {} resolved, {} still ambiguous, {} needs-reauth; {} syncs",
                num(engine, "interrupted"),
                num(engine, "resolved"),
                num(engine, "still_ambiguous"),
                num(engine, "needs_reauth"),
                num(engine, "syncs"),
            ),
            target.to_owned(),
            verdict,
        ]);
    };
    for (n, s) in [(small, &small_store), (large, &large_store)] {
        let path = s.path.display().to_string();
        let open = child::run(&["store-open".into(), path.clone()]);
        let engine = child::run(&["engine-open".into(), path, NOWHERE.into()]);
        let target = if n == large { "< 2 s (0 open intents)" } else { "" };
        row(format!("{n} grants"), &open, &engine, target);
    }

    // 1% in flight: a copy of the large store where every 100th grant was re-installed with tokens
    // the simulator knows and then had its intent made durable without a send (a crash after the
    // intent). Recovery turns each into an ambiguity and retries it against the simulator.
    let inflight = opts.dir.join(format!("grants-{large}-inflight"));
    let _ = std::fs::remove_dir_all(&inflight);
    copy_dir(&large_store.path, &inflight).expect("copy the store");
    let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
    let k = large / 100;
    {
        let (store, _) = Store::open(&inflight, StoreConfig::default()).expect("open copy");
        let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let writers = 256.min(k.max(1));
        let seeded: Vec<(usize, TokenSet)> = (0..k)
            .map(|j| {
                let i = j * 100;
                let t = sim.seed_shop(scale_shop(i).as_str());
                let tokens = TokenSet {
                    access_token: AccessToken::new(t.access_token.as_str()),
                    access_expires_at: now(),
                    refresh_token: RefreshToken::new(t.refresh_token.as_str()),
                    refresh_expires_at: Some(now().saturating_add(Duration::from_secs(t.refresh_token_expires_in))),
                    scope: Some(t.scope.clone()),
                };
                (i, tokens)
            })
            .collect();
        let seeded = Arc::new(seeded);
        for w in 0..writers {
            let (store, machine, seeded) = (store.clone(), Arc::clone(&machine), Arc::clone(&seeded));
            tasks.spawn(async move {
                for j in (w..seeded.len()).step_by(writers) {
                    let (i, tokens) = &seeded[j];
                    let key = scale_key(*i);
                    let cur = store.get(&key).expect("read").expect("grant exists");
                    let installed = machine
                        .install(Some(&cur), key, tokens.clone(), InstallSource::Application, now())
                        .make_durable(&store)
                        .await
                        .expect("install");
                    let plan = machine.plan_attempt(installed.state(), now()).expect("plan");
                    // The intent is durable; the request is never sent (the process "died" here).
                    let _permit = plan.make_durable(&store).await.expect("intent");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        eprintln!("  {k} intents left open in {:.1?}", started.elapsed());
    }
    settle();
    let path = inflight.display().to_string();
    let base = sim.base_url();
    let open = tokio::task::spawn_blocking({
        let path = path.clone();
        move || child::run(&["store-open".into(), path])
    })
    .await
    .expect("child");
    let before = sim.counters();
    let engine = tokio::task::spawn_blocking({
        let (path, base) = (path.clone(), base.clone());
        move || child::run(&["engine-open".into(), path, base])
    })
    .await
    .expect("child");
    let after = sim.counters();
    row(format!("{large} grants, 1% in flight"), &open, &engine, "");
    eprintln!(
        "  simulator: {} token requests during recovery",
        after.total.token_requests.saturating_sub(before.total.token_requests)
    );
    settle();
    let open2 = tokio::task::spawn_blocking({
        let path = path.clone();
        move || child::run(&["store-open".into(), path])
    })
    .await
    .expect("child");
    let engine2 =
        tokio::task::spawn_blocking(move || child::run(&["engine-open".into(), path, base])).await.expect("child");
    row(format!("{large} grants, same store after that recovery"), &open2, &engine2, "");
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&inflight);

    // History does not matter: the churned store (scenario 5) holds millions of journal records.
    let churn = opts.dir.join("churn");
    if churn.is_dir() {
        let p = churn.display().to_string();
        let open = child::run(&["store-open".into(), p.clone()]);
        let engine = child::run(&["engine-open".into(), p, NOWHERE.into()]);
        row("churned store (see footprint: long history, few grants)".into(), &open, &engine, "");
    }
}

/// Scenario 5: bytes and memory per grant; disk under continuous refreshes with retention.
pub async fn footprint(opts: &Opts) {
    let [small, large] = sizes(opts);
    let stores = [scale_store(&opts.dir, small).await, scale_store(&opts.dir, large).await];
    settle();
    let t = Table::new(
        "Footprint per grant (each grant installed once: its state and one journal record)",
        &[
            "grants",
            "disk (apparent)",
            "disk (allocated)",
            "allocated / grant",
            "target",
            "verdict",
            "RSS: Store::open",
            "RSS: + full scan",
            "RSS: Engine, every token cached",
            "cached engine RSS / grant",
        ],
    );
    for (n, s) in [small, large].into_iter().zip(&stores) {
        let (apparent, allocated) = disk_usage(&s.path);
        let per = allocated as f64 / n as f64;
        let path = s.path.display().to_string();
        let open = child::run(&["store-open".into(), path.clone()]);
        let engine = child::run(&["engine-open".into(), path, NOWHERE.into(), format!("touch={n}")]);
        assert_eq!(num(&engine, "touch_errors"), 0, "every token is served");
        let rss = num(&engine, "touched_rss_kb");
        let base = num(&engine, "start_rss_kb");
        t.row(&[
            format!("{n}"),
            fmt_bytes(apparent as f64),
            fmt_bytes(allocated as f64),
            fmt_bytes(per),
            "< 1 KiB".into(),
            if per < 1024.0 { "met" } else { "missed" }.into(),
            mib(num(&open, "opened_rss_kb")),
            mib(num(&open, "scanned_rss_kb")),
            format!("{} (touching all took {})", mib(rss), fmt_dur(ns(&engine, "touch_ns"))),
            fmt_bytes(rss.saturating_sub(base) as f64 * 1024.0 / n as f64),
        ]);
    }
    churn(opts).await;
}

/// Continuous refreshes over a fixed fleet with a simulated clock: each round every grant refreshes
/// once (intent + commit, through the store API), the clock moves one hour, and compaction runs to
/// completion. Disk size is sampled as it goes.
pub async fn churn(opts: &Opts) {
    let grants = opts.churn_grants.unwrap_or(if opts.quick { 100 } else { 10_000 });
    let refreshes = opts.refreshes.unwrap_or(if opts.quick { 3_000 } else { 10_000_000 });
    let retention_h = opts.retention_hours.unwrap_or(if opts.quick { 10 } else { 30 * 24 });
    let rounds = (refreshes / grants as u64).max(1);
    let samples = 20u64;
    let dir = opts.dir.join("churn");
    let _ = std::fs::remove_dir_all(&dir);
    let config = StoreConfig::default().with_retention(Duration::from_secs(retention_h * 3600));
    let (store, _) = Store::open(&dir, config).expect("store");
    let t = Table::new(
        &format!(
            "Disk under continuous refreshes: {grants} grants, one refresh per grant per simulated hour, \
             retention {retention_h} h, compaction after every round"
        ),
        &[
            "refreshes",
            "simulated time",
            "live journal records",
            "disk (apparent)",
            "disk (allocated)",
            "allocated / grant",
            "wall so far",
            "refreshes/s (this stretch)",
        ],
    );
    let t0 = now();
    let hour = 3_600_000u64;
    let day = 24 * hour;
    let make = Arc::new(move |i: usize| {
        (
            GrantKey::shopify(&crate::util::shop(&format!("c{i}"))),
            fake_tokens(i as u64, UnixMillis(t0.0 + hour), UnixMillis(t0.0 + 90 * day)),
        )
    });
    let mut states = install_many(&store, grants, true, make).await;
    let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
    let started = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut done = 0u64;
    let writers = 256.min(grants);
    for round in 1..=rounds {
        let at = UnixMillis(t0.0 + round * hour);
        let chunks: Vec<Vec<_>> = {
            let mut c: Vec<Vec<_>> = (0..writers).map(|_| Vec::new()).collect();
            for (i, s) in states.drain(..).enumerate() {
                c[i % writers].push((i, s));
            }
            c
        };
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in chunks {
            let (store, machine) = (store.clone(), Arc::clone(&machine));
            tasks.spawn(async move {
                let mut out = Vec::with_capacity(chunk.len());
                for (i, s) in chunk {
                    let permit =
                        machine.plan_attempt(&s, at).expect("plan").make_durable(&store).await.expect("intent");
                    let seed = (round << 32) | i as u64;
                    let tokens = fake_tokens(seed, UnixMillis(at.0 + hour), UnixMillis(at.0 + 90 * day));
                    let outcome = Outcome::Success { tokens, request_id: None };
                    let d = machine.on_outcome(permit.state(), &permit, outcome, at, 0).make_durable(&store).await;
                    out.push((i, d.expect("commit").state().clone()));
                }
                out
            });
        }
        let mut next = Vec::with_capacity(grants);
        while let Some(r) = tasks.join_next().await {
            next.extend(r.expect("round task"));
        }
        next.sort_by_key(|(i, _)| *i);
        states = next.into_iter().map(|(_, s)| s).collect();
        done += grants as u64;
        let s2 = store.clone();
        tokio::task::spawn_blocking(move || while s2.compact(at).expect("compact").more {}).await.expect("compaction");
        if round % (rounds / samples).max(1) == 0 || round == rounds {
            let (apparent, allocated) = disk_usage(&dir);
            let st = store.stats();
            let (t_last, n_last) = last;
            t.row(&[
                format!("{done}"),
                format!("{:.1} d", (round * hour) as f64 / day as f64),
                format!("{}", st.records_appended - st.compacted),
                fmt_bytes(apparent as f64),
                fmt_bytes(allocated as f64),
                fmt_bytes(allocated as f64 / grants as f64),
                fmt_dur(started.elapsed()),
                format!("{:.0}", (done - n_last) as f64 / t_last.elapsed().as_secs_f64()),
            ]);
            last = (Instant::now(), done);
        }
        if opts.max_wall.is_some_and(|m| started.elapsed() > m) {
            println!();
            println!(
                "(stopped after {} by --max-minutes: {done} of {refreshes} refreshes)",
                fmt_dur(started.elapsed())
            );
            break;
        }
    }
    drop(store);
    settle();
    // The store stays for the recovery scenario's "long history" row.
    let _ = Path::new(&dir);
}

/// Scenario 6: the proactive scheduler over the large store when nothing is due.
pub async fn scheduler(opts: &Opts) {
    let [_, large] = sizes(opts);
    let s = scale_store(&opts.dir, large).await;
    settle();
    let idle = if opts.quick { 1 } else { 10 };
    let path = s.path.display().to_string();
    let off = child::run(&["engine-open".into(), path.clone(), NOWHERE.into()]);
    settle();
    let on = child::run(&["engine-open".into(), path, NOWHERE.into(), "proactive".into(), format!("idle={idle}")]);
    let t = Table::new(
        &format!("Proactive scheduler over {large} grants, nothing due (due times staggered over a day, ≥ 6 h away)"),
        &[
            "engine",
            "Engine::open",
            "scheduler initial load (wall)",
            "CPU during load",
            "RSS after load",
            "CPU while idle",
            "syncs while idle",
            "RSS / grant (vs. engine without scheduler)",
        ],
    );
    t.row(&[
        "proactive = false".into(),
        fmt_dur(ns(&off, "open_ns")),
        "—".into(),
        "—".into(),
        mib(num(&off, "opened_rss_kb")),
        "—".into(),
        "—".into(),
        "—".into(),
    ]);
    let idle_wall = ns(&on, "idle_ns").as_secs_f64();
    let idle_cpu = num(&on, "idle_cpu_ms") as f64 / 1000.0;
    let loaded = num(&on, "loaded_rss_kb");
    t.row(&[
        "proactive = true".into(),
        fmt_dur(ns(&on, "open_ns")),
        fmt_dur(ns(&on, "sched_load_ns")),
        format!("{} ms", num(&on, "sched_load_cpu_ms")),
        mib(loaded),
        format!(
            "{:.2}% of one core ({} ms over {:.1} s)",
            100.0 * idle_cpu / idle_wall,
            num(&on, "idle_cpu_ms"),
            idle_wall
        ),
        format!("{}", num(&on, "idle_syncs")),
        fmt_bytes(loaded.saturating_sub(num(&off, "opened_rss_kb")) as f64 * 1024.0 / large as f64),
    ]);
}
