//! Scenario 9, soak (issue 16.6): the real engine — on-disk store, proactive scheduler, background
//! compaction — against the simulator over loopback, **in its own process** (`tokenwal-bench child
//! soak-sim`: the simulator remembers every token it ever minted, to recognise replays, so
//! in-process its memory would be counted as the engine's), for a long run with random faults on
//! (lost answers, hangs, resets, 5xx, throttles, slow and garbled answers). Access tokens live
//! `--soak-ttl` (default 60 s), so every grant is refreshed every half-life: 10 000 grants make about
//! 330 refreshes a second, and a ten-minute run puts each grant through about 20 rotations — the
//! wear of days of hourly refreshes, compressed by the short lifetime (the engine's clock is the
//! wall clock). The engine's compaction (`Config::compaction`) runs as in production, with
//! `--history-per-grant` and `--compact-interval` to make a short run reach the per-grant history
//! cap and trim it several times (e.g. 2 000 grants, `--soak-ttl 10s`, `--compact-interval 30s`:
//! each grant passes the default 64-record cap after ~32 rotations, under three minutes).
//!
//! Every interval it samples the process: resident memory, open file descriptors, live tokio tasks,
//! the journal's live records (appended − compacted since open) and the store's bytes on disk, and
//! the grants by phase. They must stay flat after warm-up: a leak of any of them shows as a trend
//! across the rows. The last two rows compare the last sample with the first after warm-up, and
//! with the first of the run's second half (the plateau, once every grant is past the cap).

use crate::util::{disk_usage, fmt_bytes, open_fds, proc_status_kb, shop, Table};
use crate::Opts;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenwal::core::{AccessToken, ClientSecret, RefreshToken, TokenSet, UnixMillis};
use tokenwal::store::{Store, StoreConfig};
use tokenwal::{Compaction, Config, Engine, StoreLocation};
use tokenwal_sim::{serve, SimConfig, SimDuration};

struct Sample {
    at: Duration,
    rss_kb: u64,
    fds: usize,
    tasks: usize,
    rotations: u64,
    live_records: u64,
    disk: u64,
}

fn config(base: &str, store: StoreLocation, compaction: Compaction) -> Config {
    let mut c = Config::shopify(store, "sim-client-id", ClientSecret::new("sim-client-secret"))
        .with_insecure_test_endpoint(url::Url::parse(base).expect("sim url"))
        .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
    c.max_concurrent_refreshes = 256;
    c.timeouts.total = Duration::from_secs(5);
    c.policy.backoff.base = Duration::from_millis(200);
    c.policy.backoff.cap = Duration::from_secs(5);
    c.compaction = Some(compaction);
    c
}

fn sim_config(ttl: &str) -> SimConfig {
    let mut s = SimConfig { access_ttl: ttl.parse().expect("ttl"), fault_seed: 16, ..SimConfig::default() };
    s.p_rotate_then_drop = 0.004;
    s.p_rotate_then_hang = 0.001;
    s.p_rotate_then_reset = 0.002;
    s.p_fail_before_processing = 0.01;
    s.p_throttle = 0.005;
    s.p_slow = 0.005;
    s.p_truncated = 0.002;
    s.p_malformed = 0.002;
    s
}

fn phases(store: &Store) -> String {
    let mut counts = BTreeMap::<&str, usize>::new();
    let _ = store.for_each_grant(|s| *counts.entry(s.phase.name()).or_default() += 1);
    counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// The simulator's process (`child soak-sim TTL`): prints `base=URL`, serves until its stdin closes
/// (the bench ended or died).
pub fn sim_child(ttl: &str) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let sim = serve(sim_config(ttl), "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
        println!("base={}", sim.base_url());
        let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await;
        sim.shutdown().await;
    });
}

/// The simulator in its own process, and a client of its control API.
struct RemoteSim {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl RemoteSim {
    fn start(ttl: &str) -> RemoteSim {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .args(["child", "soak-sim", ttl])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the simulator");
        // The child prints `key=value` lines (its memory at start first); the address is `base=`.
        let base = BufReader::new(child.stdout.take().expect("stdout"))
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("base=").map(str::to_owned))
            .expect("the simulator's address (base=URL)");
        RemoteSim { child, base, http: reqwest::Client::new() }
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: serde_json::Value) -> serde_json::Value {
        let r =
            self.http.request(method, format!("{}/_sim{path}", self.base)).json(&body).send().await.expect("control");
        assert!(r.status().is_success(), "simulator control {path}: {}", r.status());
        r.json().await.expect("control JSON")
    }

    async fn seed_shop(&self, shop: &str) -> serde_json::Value {
        self.control(reqwest::Method::POST, "/shops", serde_json::json!({ "shop": shop })).await
    }

    async fn rotations(&self) -> u64 {
        let c = self.control(reqwest::Method::GET, "/counters", serde_json::Value::Null).await;
        c["total"]["rotations"].as_u64().expect("total.rotations")
    }

    /// The simulator's resident memory (for the table: it is not the engine's).
    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RemoteSim {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Runs the soak.
pub async fn run(opts: &Opts) {
    let grants = if opts.quick { 200 } else { opts.churn_grants.unwrap_or(10_000) };
    let wall = opts.max_wall.unwrap_or(if opts.quick { Duration::from_secs(20) } else { Duration::from_secs(600) });
    let every = if opts.quick { Duration::from_secs(2) } else { Duration::from_secs(30) };
    let ttl = opts.soak_ttl.as_deref().unwrap_or(if opts.quick { "10s" } else { "60s" });
    let _: SimDuration = ttl.parse().unwrap_or_else(|e| panic!("--soak-ttl {ttl}: {e}"));
    let warm_up = every * 2;
    let sim = RemoteSim::start(ttl);
    let dir = opts.dir.join("soak");
    let _ = std::fs::remove_dir_all(&dir);
    let mut store_config = StoreConfig::default();
    if let Some(mib) = opts.cache_mib {
        store_config = store_config.with_cache_capacity(mib * 1024 * 1024);
    }
    if let Some(r) = opts.soak_retention {
        store_config = store_config.with_retention(r);
    }
    let cache = fmt_bytes(store_config.cache_capacity as f64);
    let keys = tokenwal::KeyRing::insecure_test_ring();
    let (store, _) = Store::open(&dir, &keys, store_config).expect("store open");
    let defaults = Compaction::default();
    let compaction = Compaction {
        history_per_grant: opts.history_per_grant.unwrap_or(defaults.history_per_grant),
        interval: opts.compact_interval.unwrap_or(defaults.interval),
        // A store passed in keeps its own retention (`--soak-retention-secs`).
        retention: defaults.retention,
    };
    let (engine, _) =
        Engine::open(config(&sim.base, StoreLocation::Open(store), compaction)).await.expect("engine open");
    let t0 = UnixMillis::from_system_time(std::time::SystemTime::now());
    let ttl_ms = sim_config(ttl).access_ttl.as_millis();
    for i in 0..grants {
        let name = format!("soak-{i}");
        let t = sim.seed_shop(&shop(&name).to_string()).await;
        // Spread the first refreshes over one lifetime.
        let expires = UnixMillis(t0.0 + (i as u64 * ttl_ms) / grants as u64);
        let tokens = TokenSet {
            access_token: AccessToken::new(t["access_token"].as_str().expect("access_token")),
            access_expires_at: expires,
            refresh_token: RefreshToken::new(t["refresh_token"].as_str().expect("refresh_token")),
            refresh_expires_at: None,
            scope: None,
        };
        engine.install(&shop(&name), tokens).await.expect("install");
    }
    let table = Table::new(
        &format!(
            "9. Soak: {grants} grants, access TTL {ttl}, random faults on, {} s, sled cache {cache}, \
             compaction every {} s (history cap {}){}",
            wall.as_secs(),
            compaction.interval.as_secs_f64(),
            compaction.history_per_grant,
            match opts.soak_retention {
                Some(r) => format!(", and at every sample with a {} s retention", r.as_secs()),
                None => String::new(),
            }
        ),
        &[
            "elapsed",
            "rotations (total)",
            "RSS",
            "open fds",
            "live tasks",
            "journal records (live)",
            "records compacted",
            "store on disk",
            "grants by phase",
            "simulator RSS (other process)",
        ],
    );
    let started = Instant::now();
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut samples = Vec::new();
    while started.elapsed() < wall {
        tokio::time::sleep(every).await;
        if opts.soak_retention.is_some() {
            let store = engine.store().clone();
            let now = UnixMillis::from_system_time(std::time::SystemTime::now());
            let _ = tokio::task::spawn_blocking(move || store.compact(now)).await;
        }
        let stats = engine.store().stats();
        let s = Sample {
            at: started.elapsed(),
            rss_kb: proc_status_kb("VmRSS"),
            fds: open_fds(),
            tasks: metrics.num_alive_tasks(),
            rotations: sim.rotations().await,
            live_records: stats.records_appended.saturating_sub(stats.compacted),
            disk: disk_usage(&dir).1,
        };
        table.row(&[
            format!("{} s", s.at.as_secs()),
            s.rotations.to_string(),
            fmt_bytes(s.rss_kb as f64 * 1024.0),
            s.fds.to_string(),
            s.tasks.to_string(),
            s.live_records.to_string(),
            stats.compacted.to_string(),
            fmt_bytes(s.disk as f64),
            phases(engine.store()),
            fmt_bytes(sim.rss_kb() as f64 * 1024.0),
        ]);
        samples.push(s);
    }
    // First vs last sample after warm-up, and over the second half of the run: with compaction on,
    // the journal grows until each grant reaches the history cap, so the second half is the plateau.
    for (from, what) in [(warm_up, "after warm-up"), (wall / 2, "second half")] {
        let (Some(first), Some(last)) = (samples.iter().find(|s| s.at >= from), samples.last()) else { continue };
        let pct = |a: u64, b: u64| (b as f64 - a as f64) / a.max(1) as f64 * 100.0;
        table.row(&[
            format!("{} s → {} s", first.at.as_secs(), last.at.as_secs()),
            format!("+{}", last.rotations - first.rotations),
            format!("{:+.1} %", pct(first.rss_kb, last.rss_kb)),
            format!("{:+}", last.fds as i64 - first.fds as i64),
            format!("{:+}", last.tasks as i64 - first.tasks as i64),
            format!("{:+}", last.live_records as i64 - first.live_records as i64),
            String::new(),
            format!("{:+.1} %", pct(first.disk, last.disk)),
            format!("({what}: first vs last)"),
            String::new(),
        ]);
    }
    engine.shutdown().await;
    drop(sim);
    let _ = std::fs::remove_dir_all(&dir);
}
