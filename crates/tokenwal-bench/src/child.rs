//! Measurements that need a fresh process (memory after open, startup time without warm in-process
//! state): the bench binary re-runs itself as `tokenwal-bench child <what> ...` and reads
//! `key=value` lines from its stdout.

use crate::util::{
    cpu_time, fake_tokens, kind, now, parse_kv, percentile, proc_status_kb, scale_key, scale_tokens, Kind, KIND_ENV,
};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::ClientSecret;
use tokenwal::core::{AccessToken, InstallSource, Machine, Outcome, RefreshToken, TokenSet, UnixMillis};
use tokenwal::store::{Store, StoreConfig};
use tokenwal::{Config, Engine, StoreLocation};

/// sled 0.34.7 releases its file lock from background threads after a `Db` is dropped: give it time
/// before another process opens the same store, so that no lock wait is measured as open time.
/// (`quick`: numbers do not matter, a lock wait is harmless: `Store::open` waits for it.)
pub fn settle(quick: bool) {
    std::thread::sleep(if quick { Duration::from_millis(100) } else { Duration::from_secs(2) });
}

/// Runs `tokenwal-bench child <args>` and returns its answer.
pub fn run(args: &[String]) -> HashMap<String, String> {
    let exe = std::env::current_exe().expect("own executable");
    let out = Command::new(exe).env(KIND_ENV, kind().name()).arg("child").args(args).output().expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!("child {args:?} failed ({}): {}\n{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    parse_kv(&stdout)
}

/// Runs a child that is meant to end by aborting (a crash): its answer, whatever its exit status.
pub fn run_crashing(args: &[String]) -> HashMap<String, String> {
    let exe = std::env::current_exe().expect("own executable");
    let out = Command::new(exe).env(KIND_ENV, kind().name()).arg("child").args(args).output().expect("spawn child");
    parse_kv(&String::from_utf8_lossy(&out.stdout))
}

fn emit(k: &str, v: impl std::fmt::Display) {
    println!("{k}={v}");
}

fn emit_mem(stage: &str) {
    emit(&format!("{stage}_rss_kb"), proc_status_kb("VmRSS"));
    emit(&format!("{stage}_hwm_kb"), proc_status_kb("VmHWM"));
}

/// The child's entry point.
pub fn main(args: &[String]) {
    let what = args.first().map(String::as_str).unwrap_or("");
    emit_mem("start");
    match what {
        "store-open" => store_open(Path::new(&args[1])),
        "fleet-refresh" => crate::fleet::refresh_child(&args[1..]),
        "fleet-recover" => crate::fleet::recover_child(&args[1..]),
        "engine-open" => engine_open(Path::new(&args[1]), &args[2], &args[3..]),
        "crash-intents" => crash_intents(Path::new(&args[1]), Path::new(&args[2]), args.get(3).is_some()),
        "crash-refresh" => crash_refresh(Path::new(&args[1]), args[2].parse().expect("count")),
        "token-latency" => token_latency(Path::new(&args[1]), args[2].parse().expect("grants")),
        "soak-sim" => crate::soak::sim_child(&args[1]),
        other => panic!("unknown child command {other:?}"),
    }
}

/// Re-installs the grants listed in `tokens` (`i, access, refresh, refresh expires in (s), scope`,
/// tab-separated) with those tokens, makes an intent durable for each without sending anything, and
/// aborts the process: a crash right after the intents. With `install_only`, no intents: a crash of
/// a process that had been writing, with nothing in flight.
fn crash_intents(path: &Path, tokens: &Path, install_only: bool) {
    let text = std::fs::read_to_string(tokens).expect("tokens file");
    let grants: Vec<(usize, TokenSet)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let t = now();
            let tokens = TokenSet {
                access_token: AccessToken::new(f[1]),
                access_expires_at: t,
                refresh_token: RefreshToken::new(f[2]),
                refresh_expires_at: Some(t.saturating_add(Duration::from_secs(f[3].parse().expect("seconds")))),
                scope: Some(f[4].to_owned()),
            };
            (f[0].parse().expect("index"), tokens)
        })
        .collect();
    let grants = Arc::new(grants);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let (store, _) =
            Store::open(path, &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default()).expect("open");
        let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
        let writers = 256.min(grants.len().max(1));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let (store, machine, grants) = (store.clone(), Arc::clone(&machine), Arc::clone(&grants));
            tasks.spawn(async move {
                for (i, tokens) in grants.iter().skip(w).step_by(writers) {
                    let key = scale_key(*i);
                    let cur = store.get(&key).expect("read").expect("grant exists");
                    let installed = machine
                        .install(Some(&cur), key, tokens.clone(), InstallSource::Application, now())
                        .make_durable(&store)
                        .await
                        .expect("install");
                    if install_only {
                        continue;
                    }
                    let plan = machine.plan_attempt(installed.state(), now()).expect("plan");
                    // The intent is durable; the request is never sent: the process dies here.
                    let _permit = plan.make_durable(&store).await.expect("intent");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        emit("written", grants.len());
        emit("open_attempts", store.open_grants().expect("open grants").len());
    });
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::abort();
}

/// Refreshes grants `g0..g{count}` of a scale store once each (intent durable, then a success's commit
/// durable, 256 writers), then aborts with nothing in flight: a crash after a long write session.
fn crash_refresh(path: &Path, count: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let (store, _) =
            Store::open(path, &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default()).expect("open");
        let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
        let started = Instant::now();
        let writers = 256.min(count.max(1));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let (store, machine) = (store.clone(), Arc::clone(&machine));
            tasks.spawn(async move {
                for i in (w..count).step_by(writers) {
                    let s = store.get(&scale_key(i)).expect("read").expect("grant exists");
                    let t = now();
                    let permit = machine.plan_attempt(&s, t).expect("plan").make_durable(&store).await.expect("intent");
                    let old = s.tokens.as_ref().expect("tokens");
                    let tokens =
                        fake_tokens(i as u64 + (1 << 40), old.access_expires_at, UnixMillis(t.0 + 90 * 86_400_000));
                    let outcome = Outcome::Success { tokens, request_id: None };
                    machine
                        .on_outcome(permit.state(), &permit, outcome, t, 0)
                        .make_durable(&store)
                        .await
                        .expect("commit");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        emit("refreshed", count);
        emit("refresh_ns", started.elapsed().as_nanos());
        emit("syncs", store.stats().syncs);
    });
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::abort();
}

/// `Store::open`, then a full scan.
fn store_open(path: &Path) {
    let t = Instant::now();
    let (store, report) =
        Store::open(path, &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default()).expect("open");
    emit("open_ns", t.elapsed().as_nanos());
    emit("report_open_ns", report.elapsed.as_nanos());
    emit("grants", report.grants);
    emit("open_attempts", report.open_attempts);
    emit("corrupt", report.corrupt.len());
    emit_mem("opened");
    let t = Instant::now();
    let open = store.open_grants().expect("open grants");
    emit("open_grants", open.len());
    emit("open_grants_ns", t.elapsed().as_nanos());
    drop(open);
    let t = Instant::now();
    let mut seen = 0usize;
    store.for_each_grant(|_| seen += 1).expect("scan");
    emit("scan_ns", t.elapsed().as_nanos());
    emit("scanned", seen);
    emit_mem("scanned");
}

/// `Engine::open` (recovery included) against `base` (a simulator, or an unused loopback address
/// when nothing will be sent). Flags: `proactive` starts the scheduler and measures its initial load
/// and its idle CPU; `idle=SECS` sets the idle window; `touch=N` calls `access_token` for grants
/// `g0..gN` (served from the store, then cached).
fn engine_open(path: &Path, base: &str, flags: &[String]) {
    let flag = |name: &str| flags.iter().find_map(|f| f.strip_prefix(name)?.strip_prefix('=')).map(str::to_owned);
    let proactive = flags.iter().any(|f| f == "proactive");
    let idle: u64 = flag("idle").and_then(|v| v.parse().ok()).unwrap_or(10);
    let touch: usize = flag("touch").and_then(|v| v.parse().ok()).unwrap_or(0);
    // `Engine::open` is measured with its whole recovery unless `budget-ms` says otherwise.
    let budget_ms: u64 = flag("budget-ms").and_then(|v| v.parse().ok()).unwrap_or(600_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut config = engine_config(path, base);
        config.proactive = proactive;
        config.max_concurrent_refreshes = 256;
        config.recovery_budget = Duration::from_millis(budget_ms);
        let cpu0 = cpu_time();
        let t = Instant::now();
        let (engine, report) = Engine::open(config).await.expect("engine open");
        emit("open_ns", t.elapsed().as_nanos());
        emit("open_cpu_ms", (cpu_time() - cpu0).as_millis());
        emit("report_ns", report.elapsed.as_nanos());
        emit("grants", report.grants);
        emit("open", report.open);
        emit("interrupted", report.interrupted);
        emit("resolved", report.resolved);
        emit("still_ambiguous", report.still_ambiguous);
        emit("needs_reauth", report.needs_reauth);
        emit("pending", report.pending);
        let stats = engine.store().stats();
        emit("syncs", stats.syncs);
        emit("batches", stats.batches_applied);
        emit_mem("opened");
        if proactive {
            // The scheduler loads every grant's due time in the background. It has finished when
            // the process has been quiet (< 20 ms of CPU) for a whole second.
            let started = Instant::now();
            let cpu_start = cpu_time();
            let mut samples: Vec<(Instant, Duration)> = vec![(Instant::now(), cpu_time())];
            let loaded_at = loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                samples.push((Instant::now(), cpu_time()));
                if let Some(i) = samples.len().checked_sub(11) {
                    let (t0, c0) = samples[i];
                    let (_, c1) = *samples.last().expect("sample");
                    if c1 - c0 < Duration::from_millis(20) {
                        break Some((t0, c0));
                    }
                }
                if started.elapsed() > Duration::from_secs(300) {
                    break None;
                }
            };
            let (t_loaded, c_loaded) = loaded_at.expect("the scheduler's load ends within 5 minutes");
            emit("sched_load_ns", (t_loaded - started).as_nanos());
            emit("sched_load_cpu_ms", (c_loaded - cpu_start).as_millis());
            emit_mem("loaded");
            let c0 = cpu_time();
            let t0 = Instant::now();
            tokio::time::sleep(Duration::from_secs(idle)).await;
            emit("idle_ns", t0.elapsed().as_nanos());
            emit("idle_cpu_ms", (cpu_time() - c0).as_millis());
            emit("idle_syncs", engine.store().stats().syncs - stats.syncs);
            emit_mem("idle");
        }
        if touch > 0 {
            let t = Instant::now();
            let errors = touch_all(&engine, touch, |_| false).await;
            emit("touch_ns", t.elapsed().as_nanos());
            emit("touch_errors", errors);
            emit("touch_syncs", engine.store().stats().syncs - stats.syncs);
            emit_mem("touched");
        }
        engine.shutdown().await;
    });
}

/// Calls `access_token_for` for every grant `i < n` that `skip` leaves out, from 64 tasks: the number
/// of errors.
async fn touch_all(engine: &Engine, n: usize, skip: impl Fn(usize) -> bool + Copy + Send + Sync + 'static) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    let workers = 64;
    for w in 0..workers {
        let engine = engine.clone();
        tasks.spawn(async move {
            let mut errors = 0usize;
            for i in (w..n).step_by(workers).filter(|&i| !skip(i)) {
                if engine.access_token_for(&scale_key(i)).await.is_err() {
                    errors += 1;
                }
            }
            errors
        });
    }
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        errors += r.expect("touch task");
    }
    errors
}

/// The engine's config for a scale store of this run's kind, its token endpoint at `base`: the
/// Admin API's test endpoint, or the built-in Customer Account API profile (a public client) with
/// its token URL moved to `{base}/authentication/{shop_id}/oauth/token`.
fn engine_config(path: &Path, base: &str) -> Config {
    let config = Config::shopify(
        StoreLocation::Path(path.to_path_buf()),
        "sim-client-id",
        ClientSecret::new("sim-client-secret"),
    )
    .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
    match kind() {
        Kind::Admin => config.with_insecure_test_endpoint(url::Url::parse(base).expect("base url")),
        Kind::Customer => {
            let mut profile = tokenwal::core::ProviderProfile::shopify_customer_account();
            if let tokenwal::core::protocol::ProviderSpec::OAuth2 { token_url, .. } = &mut profile.spec {
                *token_url = format!("{}/authentication/{{shop_id}}/oauth/token", base.trim_end_matches('/'));
            }
            config.with_profile(profile)
        }
    }
}

/// A token endpoint that answers every POST at once with a fresh pair (any path, either body
/// format, no checks): the refresh latency measured is tokenwal's (two durable writes and the
/// HTTP exchange over loopback), not a server's. Runs on its own thread and runtime; returns its
/// base URL and the number of requests it answered.
fn trivial_endpoint() -> (String, Arc<std::sync::atomic::AtomicU64>) {
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicU64, Ordering};
    let served = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let counter = Arc::clone(&served);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("endpoint runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(format!("http://{}", listener.local_addr().expect("addr"))).expect("send the address");
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let counter = Arc::clone(&counter);
                        async move {
                            let _ = req.into_body().collect().await;
                            let n = counter.fetch_add(1, Ordering::Relaxed);
                            let t = fake_tokens(n + (1 << 50), UnixMillis(0), UnixMillis(0));
                            let body = serde_json::json!({
                                "access_token": t.access_token.expose_secret(),
                                "expires_in": 86_400,
                                "refresh_token": t.refresh_token.expose_secret(),
                                "refresh_token_expires_in": 7_776_000,
                                "scope": t.scope,
                            });
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(hyper::body::Bytes::from(body.to_string())))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
    });
    (rx.recv().expect("the endpoint's address"), served)
}

/// Token latency over a scale store of `n` grants, one call at a time (fresh process):
///
/// - `first`: the first call for a grant (its state read from the store), 10 000 grants spread over
///   the store (at least 1 in 10);
/// - then every other grant is touched (64 tasks) so that all are cached;
/// - `cached`: a cached, valid token, up to 100 000 grants;
/// - `refresh`: a grant whose access token has expired — intent durable, a refresh at a trivial
///   loopback endpoint, commit durable — 1 000 grants spread over the store (at least 1 in 100),
///   made due by re-installing them with an expired access token before the engine opens.
fn token_latency(path: &Path, n: usize) {
    let first_step = (n / 10_000).max(10);
    let stale_step = (n / 1_000).max(100);
    // Disjoint samples: `first` takes i ≡ 0, `refresh` i ≡ 1 (mod their steps; first_step divides stale_step).
    let is_stale = move |i: usize| i % stale_step == 1;
    let stale: Vec<usize> = (1..n).step_by(stale_step).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        {
            let (store, _) =
                Store::open(path, &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default()).expect("open");
            let machine = Machine::shopify(store.fingerprint_key());
            for &i in &stale {
                let key = scale_key(i);
                let cur = store.get(&key).expect("read").expect("grant exists");
                let t = now();
                let tokens =
                    scale_tokens(i as u64 + (1 << 41), UnixMillis(t.0 - 1_000), UnixMillis(t.0 + 90 * 86_400_000));
                machine
                    .install(Some(&cur), key, tokens, InstallSource::Application, t)
                    .make_durable(&store)
                    .await
                    .expect("install");
            }
        }
        let (base, served) = trivial_endpoint();
        let mut config = engine_config(path, &base);
        config.proactive = false;
        let (engine, _) = Engine::open(config).await.expect("engine open");
        emit_mem("opened");

        let time_each = |indices: Vec<usize>, label: &'static str| {
            let engine = engine.clone();
            async move {
                let mut samples = Vec::with_capacity(indices.len());
                for i in indices {
                    let key = scale_key(i);
                    let t = Instant::now();
                    let token = engine.access_token_for(&key).await;
                    samples.push(t.elapsed());
                    token.unwrap_or_else(|e| panic!("{label}: grant {i}: {e}"));
                }
                samples.sort_unstable();
                emit(&format!("{label}_n"), samples.len());
                for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
                    emit(&format!("{label}_{name}_ns"), percentile(&samples, p).as_nanos());
                }
            }
        };
        time_each((0..n).step_by(first_step).collect(), "first").await;

        let t = Instant::now();
        let errors = touch_all(&engine, n, move |i| i % first_step == 0 || is_stale(i)).await;
        assert_eq!(errors, 0, "every token is served");
        emit("touch_ns", t.elapsed().as_nanos());
        emit_mem("touched");

        let cached_step = (n / 100_000).max(1);
        time_each((0..n).step_by(cached_step).filter(|&i| !is_stale(i)).collect(), "cached").await;
        let before = served.load(std::sync::atomic::Ordering::Relaxed);
        time_each(stale.clone(), "refresh").await;
        emit("refresh_requests", served.load(std::sync::atomic::Ordering::Relaxed) - before);
        emit("syncs", engine.store().stats().syncs);
        engine.shutdown().await;
    });
}
