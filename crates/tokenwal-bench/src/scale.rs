//! Scenarios 4 (recovery), 5 (footprint) and 6 (the scheduler at scale), on stores of 100k and 1M
//! grants built through the store API (see [`crate::populate`]), measured in fresh child processes.

use crate::child::{self, settle};
use crate::populate::{install_many, scale_store};
use crate::util::{
    copy_dir, disk_usage, fake_tokens, fmt_bytes, fmt_dur, kind, now, scale_key, scale_shop, scale_tokens, Kind, Table,
};
use crate::Opts;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{FingerprintKey, GrantKey, InstallSource, Machine, Outcome, UnixMillis, WriteBatch};
use tokenwal::store::{Store, StoreConfig};
use tokenwal_sim::{serve, SimConfig, SimHandle};

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
    settle(opts.quick);

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
            if open.contains_key("open_ns") { fmt_dur(ns(open, "open_ns")) } else { "—".into() },
            fmt_dur(e),
            if open.contains_key("opened_rss_kb") { mib(num(open, "opened_rss_kb")) } else { "—".into() },
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

    // 1% in flight, after a crash: a child process re-installs every 100th grant with tokens the
    // simulator knows, makes each one's intent durable without sending it, and aborts (no clean
    // shutdown: sled's log is left as a kill leaves it). The crash image is copied twice, so that
    // `Store::open` and `Engine::open` are each measured on a first open after the crash. Recovery
    // turns every intent into an ambiguity and retries it against the simulator.
    let inflight = opts.dir.join(format!("grants-{large}-inflight"));
    let inflight_b = opts.dir.join(format!("grants-{large}-inflight-b"));
    for d in [&inflight, &inflight_b] {
        let _ = std::fs::remove_dir_all(d);
    }
    copy_dir(&large_store.path, &inflight).expect("copy the store");
    let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
    let k = large / 100;
    let tokens_file = opts.dir.join("inflight-tokens.tsv");
    write_tokens_file(&sim, &tokens_file, (0..k).map(|j| j * 100));
    // A crash after a long write session: sled 0.34.7 writes its snapshot only when it opens, so the
    // first open after a process that wrote a lot replays everything that process wrote.
    let refreshes = if opts.quick { 200 } else { large / 5 };
    let churned = opts.dir.join(format!("grants-{large}-refreshed"));
    let _ = std::fs::remove_dir_all(&churned);
    copy_dir(&large_store.path, &churned).expect("copy the store");
    let crash = child::run_crashing(&["crash-refresh".into(), path_str(&churned), format!("{refreshes}")]);
    eprintln!(
        "  {} refreshes in {} ({} syncs), then the writer aborted",
        num(&crash, "refreshed"),
        fmt_dur(ns(&crash, "refresh_ns")),
        num(&crash, "syncs")
    );
    let engine = child::run(&["engine-open".into(), path_str(&churned), NOWHERE.into()]);
    let open = HashMap::from([("open_attempts".to_owned(), "0".to_owned())]);
    row(
        format!("{large} grants, first open after a crash that followed {refreshes} refreshes (2 durable writes each)"),
        &open,
        &engine,
        "< 2 s (0 open intents)",
    );
    settle(opts.quick);
    let engine = child::run(&["engine-open".into(), path_str(&churned), NOWHERE.into()]);
    row(format!("{large} grants, the same store, next open"), &open, &engine, "");
    let _ = std::fs::remove_dir_all(&churned);

    // The same writes as the 1% case below without intents: a crash with nothing in flight.
    let crashed = opts.dir.join(format!("grants-{large}-crashed"));
    let _ = std::fs::remove_dir_all(&crashed);
    copy_dir(&large_store.path, &crashed).expect("copy the store");
    let args = ["crash-intents".into(), path_str(&crashed), path_str(&tokens_file), "install-only".into()];
    let crash = child::run_crashing(&args);
    eprintln!("  {} grants re-installed, then the writer aborted", num(&crash, "written"));
    let engine = child::run(&["engine-open".into(), path_str(&crashed), NOWHERE.into()]);
    let open = HashMap::from([("open_attempts".to_owned(), "0".to_owned())]);
    row(
        format!("{large} grants, first open after a crash ({k} installs written by the crashed process)"),
        &open,
        &engine,
        "< 2 s (0 open intents)",
    );
    let _ = std::fs::remove_dir_all(&crashed);

    let crash = child::run_crashing(&["crash-intents".into(), path_str(&inflight), path_str(&tokens_file)]);
    eprintln!("  {} intents left open, then the writer aborted", num(&crash, "written"));
    copy_dir(&inflight, &inflight_b).expect("copy the crash image");
    let (path, path_b) = (path_str(&inflight), path_str(&inflight_b));
    let base = sim.base_url();
    let open = tokio::task::spawn_blocking(move || child::run(&["store-open".into(), path])).await.expect("child");
    let before = sim.counters();
    let engine = tokio::task::spawn_blocking({
        let (path, base) = (path_b.clone(), base.clone());
        move || child::run(&["engine-open".into(), path, base])
    })
    .await
    .expect("child");
    let after = sim.counters();
    row(format!("{large} grants, 1% in flight, first open after a crash"), &open, &engine, "");
    eprintln!(
        "  simulator: {} token requests during recovery",
        after.total.token_requests.saturating_sub(before.total.token_requests)
    );
    settle(opts.quick);
    let open2 = tokio::task::spawn_blocking({
        let path = path_b.clone();
        move || child::run(&["store-open".into(), path])
    })
    .await
    .expect("child");
    let engine2 =
        tokio::task::spawn_blocking(move || child::run(&["engine-open".into(), path_b, base])).await.expect("child");
    row(format!("{large} grants, same store after that recovery"), &open2, &engine2, "");
    sim.shutdown().await;

    // History does not matter: the churned store (scenario 5) holds hundreds of thousands of journal
    // records for 10k grants.
    let churn = opts.dir.join("churn");
    if churn.is_dir() {
        let p = path_str(&churn);
        let open = child::run(&["store-open".into(), p.clone()]);
        let engine = child::run(&["engine-open".into(), p, NOWHERE.into()]);
        let live = std::fs::read_to_string(opts.dir.join("churn.live")).unwrap_or_default();
        row(
            format!("churned store: {} grants, {} live journal records", num(&open, "grants"), live.trim()),
            &open,
            &engine,
            "",
        );
    }

    settle(opts.quick);
    transitions_one_by_one_vs_together(&inflight).await;
    for d in [&inflight, &inflight_b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Scenario 4b (issue 15, items 3 and 4): a store in which **every** grant was left with an open
/// intent by a crash (10k and 100k grants; tiny with `--quick`), opened by a fresh process against a
/// fast simulator (no latency, every retry answered). Then the same crash image against a simulator
/// that holds every answer: `Engine::open` returns at its recovery budget with the grants still
/// recovering in the background.
pub async fn recovery_intents(opts: &Opts) {
    let sizes: [usize; 2] = if opts.quick { [200, 1_000] } else { [10_000, 100_000] };
    let t = Table::new(
        "Recovery of open intents: every grant in flight at the crash (fresh process; page cache warm)",
        &[
            "store",
            "endpoint",
            "Engine::open",
            "per open intent",
            "recovery outcome",
            "syncs",
            "token requests",
            "target",
            "verdict",
        ],
    );
    for n in sizes {
        let base_store = scale_store(&opts.dir, n).await;
        let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
        let tokens_file = opts.dir.join(format!("all-inflight-{n}-tokens.tsv"));
        write_tokens_file(&sim, &tokens_file, 0..n);
        let image = opts.dir.join(format!("grants-{n}-all-inflight"));
        let _ = std::fs::remove_dir_all(&image);
        copy_dir(&base_store.path, &image).expect("copy the store");
        let crash = child::run_crashing(&["crash-intents".into(), path_str(&image), path_str(&tokens_file)]);
        eprintln!("  {n} grants: {} intents left open, then the writer aborted", num(&crash, "open_attempts"));
        let held = opts.dir.join(format!("grants-{n}-all-inflight-held"));
        let _ = std::fs::remove_dir_all(&held);
        copy_dir(&image, &held).expect("copy the crash image");
        settle(opts.quick);

        let before = sim.counters().total.token_requests;
        let engine = tokio::task::spawn_blocking({
            let (path, base) = (path_str(&image), sim.base_url());
            move || child::run(&["engine-open".into(), path, base])
        })
        .await
        .expect("child");
        let requests = sim.counters().total.token_requests - before;
        let open = ns(&engine, "open_ns");
        // The targets are for 10k and 100k open intents (none at `--quick` sizes).
        let target = (!opts.quick).then(|| if n >= 100_000 { Duration::from_secs(10) } else { Duration::from_secs(1) });
        t.row(&[
            format!("{n} grants, all in flight"),
            "fast simulator".into(),
            fmt_dur(open),
            fmt_dur(open / n.max(1) as u32),
            outcome(&engine),
            format!("{}", num(&engine, "syncs")),
            format!("{requests}"),
            target.map_or("—".into(), |t| format!("< {}", fmt_dur(t))),
            match target {
                None => "—".into(),
                Some(t) if open < t => "met".into(),
                Some(_) => "missed".into(),
            },
        ]);

        // The same crash image against an endpoint that holds every answer (a hang): open returns
        // at its budget; the grants keep recovering in the background.
        for i in 0..n {
            sim.hold(scale_shop(i).as_str());
        }
        let budget_ms = 2_000u64;
        let engine = tokio::task::spawn_blocking({
            let (path, base) = (path_str(&held), sim.base_url());
            move || child::run(&["engine-open".into(), path, base, format!("budget-ms={budget_ms}")])
        })
        .await
        .expect("child");
        let open = ns(&engine, "open_ns");
        t.row(&[
            format!("{n} grants, all in flight"),
            "every answer held (hangs)".into(),
            fmt_dur(open),
            "—".into(),
            outcome(&engine),
            format!("{}", num(&engine, "syncs")),
            "—".into(),
            format!("returns at the {budget_ms} ms budget"),
            if open < Duration::from_millis(budget_ms) + Duration::from_secs(1) {
                "met".into()
            } else {
                "missed".into()
            },
        ]);
        sim.shutdown().await;
        for d in [&image, &held] {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&tokens_file);
    }
}

fn outcome(engine: &HashMap<String, String>) -> String {
    format!(
        "{} interrupted, {} resolved, {} still ambiguous, {} needs-reauth, {} still recovering at return",
        num(engine, "interrupted"),
        num(engine, "resolved"),
        num(engine, "still_ambiguous"),
        num(engine, "needs_reauth"),
        num(engine, "pending"),
    )
}

/// Recovery's first step writes one transition per interrupted intent (`Refreshing` → `Ambiguous`).
/// On the untouched crash image: half of them one after another (each waits for its own sync, as
/// `Engine::open` did before issue 15), the other half all at once (group commit, as it does now).
/// Store-level only: no engine, no network.
async fn transitions_one_by_one_vs_together(path: &Path) {
    let (store, _) = Store::open(path, &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default())
        .expect("open the crash image");
    let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
    let mut seq = store.open_grants().expect("open grants");
    let conc = seq.split_off(seq.len() / 2);
    let t = Table::new(
        "Recovery's Refreshing → Ambiguous transitions on the 1% crash image: one by one vs together (store only)",
        &["mode", "transitions", "wall", "per transition", "syncs"],
    );
    let s0 = store.stats();
    let started = Instant::now();
    for s in &seq {
        let tr = machine.recover_interrupted(s, now(), 0).expect("an interrupted intent");
        tokenwal::core::Pending::from_transition(tr).make_durable(&store).await.expect("transition");
    }
    let wall = started.elapsed();
    let s1 = store.stats();
    t.row(&[
        "one by one (as `Engine::open` did before issue 15)".into(),
        format!("{}", seq.len()),
        fmt_dur(wall),
        fmt_dur(wall / seq.len().max(1) as u32),
        format!("{}", s1.syncs - s0.syncs),
    ]);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let n_conc = conc.len();
    for s in conc {
        let (store, machine) = (store.clone(), Arc::clone(&machine));
        tasks.spawn(async move {
            let tr = machine.recover_interrupted(&s, now(), 0).expect("an interrupted intent");
            tokenwal::core::Pending::from_transition(tr).make_durable(&store).await.expect("transition");
        });
    }
    while tasks.join_next().await.is_some() {}
    let wall = started.elapsed();
    let s2 = store.stats();
    t.row(&[
        "all at once (group commit, as `Engine::open` does now)".into(),
        format!("{n_conc}"),
        fmt_dur(wall),
        fmt_dur(wall / n_conc.max(1) as u32),
        format!("{}", s2.syncs - s1.syncs),
    ]);
}

/// Seeds the grants `indices` in `sim` and writes their tokens to `path` in the format the
/// `crash-intents` child reads (`i, access, refresh, refresh expires in (s), scope`, tab-separated).
fn write_tokens_file(sim: &SimHandle, path: &Path, indices: impl Iterator<Item = usize>) {
    let lines: Vec<String> = indices
        .map(|i| {
            let t = sim.seed_shop(scale_shop(i).as_str());
            format!(
                "{i}\t{}\t{}\t{}\t{}",
                t.access_token.as_str(),
                t.refresh_token.as_str(),
                t.refresh_token_expires_in,
                t.scope
            )
        })
        .collect();
    std::fs::write(path, lines.join("\n")).expect("tokens file");
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// The bytes the store asks sled to keep for one batch, keys and values of every tree it writes:
/// (the state and its open-index entry, the records with their history and expiry entries).
fn batch_bytes(b: &WriteBatch) -> (u64, u64) {
    let g = b.grant.len() as u64;
    let state = g + b.state.len() as u64 + if b.open { g } else { 0 };
    // journal: lsn → frame; history: grant ‖ 0 ‖ lsn → ∅; expiry: at ‖ lsn → grant.
    let records = b.records.iter().map(|(_, f)| 8 + f.len() as u64 + (g + 9) + (16 + g)).sum();
    (state, records)
}

/// Logical bytes of a scale-store grant right after its install (state + one `Installed` record).
fn install_bytes() -> u64 {
    let (state, records) = install_parts();
    state + records
}

/// [`install_bytes`] split: the grant's state (key, state frame, open-index entry) and its
/// `Installed` record (with its index entries).
fn install_parts() -> (u64, u64) {
    let machine = Machine::shopify(FingerprintKey::from_bytes([7; 32]));
    let t = now();
    let tokens = scale_tokens(123_456, t, UnixMillis(t.0 + 90 * 86_400_000));
    let b = machine.install(None, scale_key(123_456), tokens, InstallSource::Import, t).transition().write_batch();
    batch_bytes(&b.expect("encode"))
}

/// Logical bytes of one churned grant's state, and of its intent and commit records (with index
/// entries), measured on one refresh through an in-memory store.
async fn refresh_bytes() -> (u64, u64, u64) {
    let store = Store::in_memory();
    let machine = Machine::shopify(store.fingerprint_key());
    let t = now();
    let key = GrantKey::shopify(&crate::util::shop("c1234"));
    let tokens = fake_tokens(1, UnixMillis(t.0 + 3_600_000), UnixMillis(t.0 + 90 * 86_400_000));
    let s = machine.install(None, key, tokens, InstallSource::Import, t).make_durable(&store).await.expect("install");
    let plan = machine.plan_attempt(s.state(), t).expect("plan");
    let (_, intent) = batch_bytes(&plan.transition().write_batch().expect("encode"));
    let permit = plan.make_durable(&store).await.expect("intent");
    let tokens = fake_tokens(2, UnixMillis(t.0 + 3_600_000), UnixMillis(t.0 + 90 * 86_400_000));
    let pending = machine.on_outcome(permit.state(), &permit, Outcome::Success { tokens, request_id: None }, t, 0);
    let (state, commit) = batch_bytes(&pending.transition().write_batch().expect("encode"));
    (state, intent, commit)
}

/// Scenario 5: bytes and memory per grant; disk under continuous refreshes with retention.
pub async fn footprint(opts: &Opts) {
    let [small, large] = sizes(opts);
    let stores = [scale_store(&opts.dir, small).await, scale_store(&opts.dir, large).await];
    settle(opts.quick);
    let logical = install_bytes();
    let t = Table::new(
        "Footprint per grant (each grant installed once: its state and one journal record)",
        &[
            "grants",
            "disk (apparent)",
            "disk (allocated)",
            "allocated / grant",
            "target",
            "verdict",
            "logical bytes / grant (keys + values handed to sled)",
            "RSS: Store::open",
            "RSS: + full scan",
            "RSS: Engine, every token cached",
            "cache's own RSS / grant (engine with every token cached − store after full scan)",
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
        let base = num(&open, "scanned_rss_kb");
        t.row(&[
            format!("{n}"),
            fmt_bytes(apparent as f64),
            fmt_bytes(allocated as f64),
            fmt_bytes(per),
            "< 1 KiB".into(),
            if per < 1024.0 { "met" } else { "missed" }.into(),
            format!("{logical} B (disk is {:.1}×)", per / logical as f64),
            mib(num(&open, "opened_rss_kb")),
            mib(num(&open, "scanned_rss_kb")),
            format!("{} (touching all took {})", mib(rss), fmt_dur(ns(&engine, "touch_ns"))),
            fmt_bytes(rss.saturating_sub(base) as f64 * 1024.0 / n as f64),
        ]);
    }
    if kind() == Kind::Admin {
        churn(opts).await;
    } else {
        eprintln!("(the churn is run with Admin API grants only)");
    }
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
    let (store, _) = Store::open(&dir, &tokenwal::KeyRing::insecure_test_ring(), config).expect("store");
    let cap = opts.history_per_grant;
    let capped = cap.map_or(String::new(), |n| format!(", each grant trimmed to its newest {n} records"));
    let t = Table::new(
        &format!(
            "Disk under continuous refreshes: {grants} grants, one refresh per grant per simulated hour, \
             retention {retention_h} h{capped}, compaction after every round"
        ),
        &[
            "refreshes",
            "simulated time",
            "live journal records",
            "logical bytes (keys + values)",
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
    let (state_bytes, intent_bytes, commit_bytes) = refresh_bytes().await;
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
        // As the engine's compactor: a grant is trimmed when its version reaches a multiple of half
        // the cap (`crates/tokenwal/src/compactor.rs`), then retention runs.
        let due: Vec<GrantKey> = match cap {
            Some(n) => {
                let every = (n / 2).max(1) as u64;
                states
                    .iter()
                    .filter(|s| s.version % every == 0 || s.version % every == 1)
                    .map(|s| s.grant.clone())
                    .collect()
            }
            None => Vec::new(),
        };
        let keep = cap.unwrap_or(usize::MAX);
        tokio::task::spawn_blocking(move || {
            for g in &due {
                while s2.trim_history(g, keep).expect("trim") >= s2.config().compact_chunk {}
            }
            while s2.compact(at).expect("compact").more {}
        })
        .await
        .expect("compaction");
        if round % (rounds / samples).max(1) == 0 || round == rounds {
            let (apparent, allocated) = disk_usage(&dir);
            let st = store.stats();
            let live = st.records_appended - st.compacted;
            // The install records are `grants` of the live ones at first; the rest alternate intent/commit.
            let logical = grants as u64 * state_bytes + live * (intent_bytes + commit_bytes) / 2;
            let (t_last, n_last) = last;
            t.row(&[
                format!("{done}"),
                format!("{:.1} d", (round * hour) as f64 / day as f64),
                format!("{live}"),
                format!("{} (disk is {:.1}×)", fmt_bytes(logical as f64), allocated as f64 / logical as f64),
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
    let live = store.stats().records_appended - store.stats().compacted;
    drop(store);
    settle(opts.quick);
    // The store stays for the recovery scenario's "long history" row.
    std::fs::write(opts.dir.join("churn.live"), format!("{live}")).expect("live count");
    let t = Table::new(
        "Opening the churned store (fresh process): the first open replays sled's log written since its last snapshot",
        &["open", "Store::open", "RSS after open"],
    );
    for which in ["first open after the write session", "next open"] {
        let open = child::run(&["store-open".into(), path_str(&dir)]);
        t.row(&[which.into(), fmt_dur(ns(&open, "open_ns")), mib(num(&open, "opened_rss_kb"))]);
    }
}

/// Scenario 6: the proactive scheduler over the large store when nothing is due.
pub async fn scheduler(opts: &Opts) {
    let [_, large] = sizes(opts);
    let s = scale_store(&opts.dir, large).await;
    settle(opts.quick);
    let idle = if opts.quick { 1 } else { 10 };
    let path = s.path.display().to_string();
    let scan = child::run(&["store-open".into(), path.clone()]);
    settle(opts.quick);
    let off = child::run(&["engine-open".into(), path.clone(), NOWHERE.into()]);
    settle(opts.quick);
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
            "scheduler's own RSS / grant (vs. a store after a full scan)",
        ],
    );
    t.row(&[
        "(reference) Store::open + one full scan, no engine".into(),
        fmt_dur(ns(&scan, "open_ns")),
        format!("scan: {}", fmt_dur(ns(&scan, "scan_ns"))),
        "—".into(),
        format!("{} after the scan", mib(num(&scan, "scanned_rss_kb"))),
        "—".into(),
        "—".into(),
        "—".into(),
    ]);
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
        fmt_bytes(loaded.saturating_sub(num(&scan, "scanned_rss_kb")) as f64 * 1024.0 / large as f64),
    ]);
}

/// Scenario 14 (issue 17, item 5): the per-grant costs of one store of this run's kind
/// (`--grants admin|customer-account`) at 100k and 1M grants — bytes, open time, memory, and
/// token latency (first call, cached, refresh) — each measured in fresh child processes.
pub async fn per_grant(opts: &Opts) {
    let sizes = sizes(opts);
    let mut stores = Vec::new();
    for n in sizes {
        stores.push(scale_store(&opts.dir, n).await);
    }
    settle(opts.quick);
    let (state, record) = install_parts();
    let key = scale_key(123_456);
    let name = kind().name();
    let t = Table::new(
        &format!("Per-grant costs, {name} grants (sled, default settings; each grant installed once)"),
        &[
            "grants",
            "grant key (bytes)",
            "state bytes / grant (logical: key, state frame, index entry)",
            "+ its install record",
            "disk (allocated) / grant",
            "Store::open",
            "Engine::open",
            "RSS after Engine::open (/ grant)",
            "RSS, every token cached (/ grant)",
        ],
    );
    let mut latencies = Vec::new();
    for (n, s) in sizes.into_iter().zip(&stores) {
        let (_, allocated) = disk_usage(&s.path);
        let path = path_str(&s.path);
        let open = child::run(&["store-open".into(), path.clone()]);
        settle(opts.quick);
        let engine = child::run(&["engine-open".into(), path.clone(), NOWHERE.into()]);
        settle(opts.quick);
        let lat = child::run(&["token-latency".into(), path, format!("{n}")]);
        let per = |kb: u64| format!("{} ({})", mib(kb), fmt_bytes(kb as f64 * 1024.0 / n as f64));
        t.row(&[
            format!("{n}"),
            format!("{key} ({} B)", key.to_string().len()),
            format!("{state} B"),
            format!("{} B", state + record),
            fmt_bytes(allocated as f64 / n as f64),
            fmt_dur(ns(&open, "open_ns")),
            fmt_dur(ns(&engine, "open_ns")),
            per(num(&engine, "opened_rss_kb")),
            per(num(&lat, "touched_rss_kb")),
        ]);
        latencies.push((n, lat));
        settle(opts.quick);
    }
    let t = Table::new(
        &format!("Token latency, {name} grants (one call at a time; fresh process; p50 / p99 / max)"),
        &[
            "grants",
            "first call (state read from the store)",
            "cached, valid token",
            "refresh (intent, loopback HTTP, commit)",
            "requests sent for the refreshes",
        ],
    );
    for (n, lat) in latencies {
        let cell = |label: &str| {
            format!(
                "{} / {} / {} (n = {})",
                fmt_dur(ns(&lat, &format!("{label}_p50_ns"))),
                fmt_dur(ns(&lat, &format!("{label}_p99_ns"))),
                fmt_dur(ns(&lat, &format!("{label}_max_ns"))),
                num(&lat, &format!("{label}_n")),
            )
        };
        t.row(&[
            format!("{n}"),
            cell("first"),
            cell("cached"),
            cell("refresh"),
            format!("{}", num(&lat, "refresh_requests")),
        ]);
    }
}
