//! Crash tests with real processes: the engine runs in a child process (this test binary,
//! re-executed with `TOKENWAL_CRASH_CHILD=1`) against the simulator served by the parent over
//! loopback, on a store the parent owns: a sled directory, or (every test's `_pg` variant, generated
//! by `on_both_backends!`) a PostgreSQL scratch schema. The child gets either as one address in
//! `TOKENWAL_CRASH_STORE`; the parent opens the same store between runs to inspect it.
//!
//! The child opens the engine (running recovery), installs the shops the parent listed if they are
//! not installed yet, then asks `access_token` for every shop for a few rounds, printing one line per
//! answer. Every round refreshes (the child's refresh margin is longer than the access lifetime).
//!
//! The parent kills the child at every crash point of `docs/journal.md` (the engine's named
//! failpoints abort the process there; hung requests are cut by SIGKILL at random moments), inspects
//! the store the dead child left (what is open, and whether the simulator processed the credential
//! it holds), restarts the child without the failpoint on the same store and checks, through the
//! simulator:
//!
//! * every shop is served in every round after the restart, and its last token works at the
//!   fake Admin API (`access_token_valid`); its grant is alive (`grant_alive`);
//! * no refresh request was ever rejected (under the default retain-until-replacement-used policy a
//!   rejection would mean tokenwal presented a dead or superseded token);
//! * a replay (a retry of an already-used refresh token) happened exactly where the crash point
//!   left an ambiguity the server had already acted on;
//! * after every crash, every stored refresh token is still accepted by the server: the durable
//!   state is always recoverable;
//! * under a strict single-use server, a crash after the response loses the grant, and the restart
//!   says so (needs-reauth) once, without looping.
//!
//! **PostgreSQL.** Every case runs on both backends; none is sled-only. A killed child leaves its
//! membership lease behind: the next process to join on this host (the parent inspecting, or the
//! restarted child) finds its pid dead and ends that lease at once, so its attempts are recovered
//! without waiting for the lease. The restart's recovery probe of such an attempt waits out the
//! dead request's timeout (the restarted child's own: 2 s on PostgreSQL instead of 5 s;
//! `docs/journal.md`, PostgreSQL), which is most of the `_pg` variants' extra time. Store faults (`crash_on_failed_*`) are injected in the
//! committer, above the backend: on PostgreSQL a failed write or sync rolls the group's
//! transaction back, so the failed batch is never durable there (sled may keep it; the checks
//! accept either). Compaction runs on PostgreSQL too, each chunk a transaction of its own
//! (committed at once, where sled's waits for the next sync).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokenwal::core::{
    AccessToken, ClientSecret, GrantKey, GrantState, Phase, RefreshToken, RetryPolicy, ShopDomain, TokenSet,
};
use tokenwal::store::{FaultPoint, StoreConfig};
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_sim::config::PolicyKind;
use tokenwal_sim::{serve, Fault, SimConfig, SimHandle};
use tokenwal_testkit::backend::{location_of, open_at};
use tokenwal_testkit::{now as wall_now, on_both_backends, Backend, TestStore, CLIENT_ID, SECRET};

const CHILD: &str = "TOKENWAL_CRASH_CHILD";
/// The store: a sled directory or a PostgreSQL URL ([`TestStore::address`]).
const ENV_STORE: &str = "TOKENWAL_CRASH_STORE";
const ENV_SIM: &str = "TOKENWAL_CRASH_SIM";
const ENV_SHOPS: &str = "TOKENWAL_CRASH_SHOPS";
const ENV_ROUNDS: &str = "TOKENWAL_CRASH_ROUNDS";
const ENV_CONCURRENT: &str = "TOKENWAL_CRASH_CONCURRENT";
const ENV_STRICT: &str = "TOKENWAL_CRASH_STRICT";
const ENV_TIMEOUT_MS: &str = "TOKENWAL_CRASH_TIMEOUT_MS";
/// Recovery's budget at open (ms); with it, callers wait for a grant still recovering.
const ENV_BUDGET_MS: &str = "TOKENWAL_CRASH_BUDGET_MS";
/// `CAP:INTERVAL_MS`: the child compacts in the background, each grant keeping CAP records.
const ENV_COMPACT: &str = "TOKENWAL_CRASH_COMPACT";
/// `before-write:N`, `after-write:N` or `sync:N`: the store fails there (N-th visit after installs).
const ENV_STORE_FAULT: &str = "TOKENWAL_CRASH_STORE_FAULT";
const FAILPOINT: &str = "TOKENWAL_FAILPOINT";

/// Every line the child reports starts with this marker (the test harness may print on the same
/// line before it).
const MARK: &str = "TWCRASH|";
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

fn shop(name: &str) -> ShopDomain {
    ShopDomain::parse(name).unwrap()
}

fn grant(name: &str) -> GrantKey {
    GrantKey::shopify(&shop(name))
}

// ---------------------------------------------------------------------------------------------
// The child.

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"))
}

fn report(line: impl std::fmt::Display) {
    // One `println!` is one locked write: lines never interleave.
    println!("{MARK}{line}");
}

fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::NeedsReauth { .. } => "needs-reauth",
        Error::Ambiguous { .. } => "ambiguous",
        Error::Unavailable { .. } => "unavailable",
        Error::AppCredentialsRejected { .. } => "app-credentials",
        Error::InFlight { .. } => "in-flight",
        Error::Recovering { .. } => "recovering",
        Error::NotInstalled { .. } => "not-installed",
        Error::Uninstalled { .. } => "uninstalled",
        Error::Store(_) => "store",
        _ => "other",
    }
}

/// The shops the parent listed: `[{shop, access_token, refresh_token, refresh_token_expires_in}]`.
fn read_shops(path: &Path) -> Vec<(String, TokenSet)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let now = wall_now();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let tokens = TokenSet {
                access_token: AccessToken::new(s["access_token"].as_str().unwrap()),
                // Expired: the first round refreshes.
                access_expires_at: now,
                refresh_token: RefreshToken::new(s["refresh_token"].as_str().unwrap()),
                refresh_expires_at: Some(
                    now.saturating_add(Duration::from_secs(s["refresh_token_expires_in"].as_u64().unwrap())),
                ),
                scope: None,
            };
            (s["shop"].as_str().unwrap().to_owned(), tokens)
        })
        .collect()
}

async fn child_main() {
    let strict = std::env::var_os(ENV_STRICT).is_some();
    let concurrent = std::env::var_os(ENV_CONCURRENT).is_some();
    let rounds: usize = env(ENV_ROUNDS).parse().unwrap();
    let timeout_ms: u64 = env(ENV_TIMEOUT_MS).parse().unwrap();
    let base = url::Url::parse(&env(ENV_SIM)).unwrap();
    let store_fault = std::env::var(ENV_STORE_FAULT).ok().map(|v| {
        let (point, nth) = v.split_once(':').unwrap();
        let point = match point {
            "before-write" => FaultPoint::BeforeWrite,
            "after-write" => FaultPoint::AfterWrite,
            "sync" => FaultPoint::Sync,
            other => panic!("unknown store fault {other}"),
        };
        (point, nth.parse::<u64>().unwrap())
    });
    let address = env(ENV_STORE);
    // With a store fault to inject, the child opens the store itself to keep a handle on it.
    let opened = store_fault.map(|_| open_at(&address, StoreConfig::default()));
    let store = match &opened {
        Some(s) => StoreLocation::Open(s.clone()),
        None => location_of(&address),
    };
    let mut c = Config::shopify(store, CLIENT_ID, ClientSecret::new(SECRET))
        .with_insecure_test_endpoint(base)
        .with_store_keys(tokenwal::KeySource::Ring(tokenwal_store::KeyRing::insecure_test_ring()));
    if strict {
        c.policy = RetryPolicy::single_use();
    }
    c.proactive = false;
    c.max_wait = Duration::from_secs(5);
    c.timeouts.connect = Duration::from_secs(2);
    c.timeouts.total = Duration::from_millis(timeout_ms);
    c.policy.backoff.base = Duration::from_millis(20);
    c.policy.backoff.cap = Duration::from_millis(200);
    if let Ok(v) = std::env::var(ENV_COMPACT) {
        let (cap, ms) = v.split_once(':').unwrap();
        c.compaction = Some(tokenwal::Compaction {
            history_per_grant: cap.parse().unwrap(),
            interval: Duration::from_millis(ms.parse().unwrap()),
            ..Default::default()
        });
    }
    if let Ok(ms) = std::env::var(ENV_BUDGET_MS) {
        c.recovery_budget = Duration::from_millis(ms.parse().unwrap());
        c.wait_for_recovery = true;
    }
    let (engine, r) = Engine::open(c).await.expect("engine opens");
    report(format_args!(
        "report open={} interrupted={} resolved={} still_ambiguous={} needs_reauth={} pending={}",
        r.open, r.interrupted, r.resolved, r.still_ambiguous, r.needs_reauth, r.pending
    ));
    let shops = read_shops(Path::new(&env(ENV_SHOPS)));
    for (name, tokens) in &shops {
        if engine.state(&grant(name)).unwrap().is_none() {
            engine.install(&shop(name), tokens.clone()).await.unwrap();
            report(format_args!("installed {name}"));
        }
    }
    if let (Some(store), Some((point, nth))) = (&opened, store_fault) {
        store.inject_fault(point, nth);
    }
    let ask = |engine: Engine, round: usize, name: String| async move {
        // Every round forces a refresh through the app's 401 path: the current token is reported as
        // rejected, so tokenwal refreshes once (or returns a newer token someone else got).
        let current = engine.state(&grant(&name)).ok().flatten().and_then(|s| s.tokens).map(|t| t.access_token);
        let answer = match current {
            Some(c) => engine.on_unauthorized(&shop(&name), &c).await,
            None => engine.access_token(&shop(&name)).await,
        };
        match answer {
            Ok(t) => report(format_args!("ok {round} {name} {}", t.expose_secret())),
            Err(e) => report(format_args!("err {round} {name} {}", error_kind(&e))),
        }
    };
    for round in 0..rounds {
        if concurrent {
            let mut tasks = tokio::task::JoinSet::new();
            for (name, _) in &shops {
                tasks.spawn(ask(engine.clone(), round, name.clone()));
            }
            while tasks.join_next().await.is_some() {}
        } else {
            for (name, _) in &shops {
                ask(engine.clone(), round, name.clone()).await;
            }
        }
    }
    for (name, _) in &shops {
        match engine.state(&grant(name)) {
            Ok(s) => report(format_args!("state {name} {}", s.unwrap().phase.name())),
            Err(_) => report(format_args!("state {name} unreadable")),
        }
    }
    engine.shutdown().await;
    report("done");
}

/// The child's body; a no-op in a normal test run.
#[test]
fn crash_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(child_main());
}

// ---------------------------------------------------------------------------------------------
// The parent.

/// What one child run printed.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    lines: Vec<String>,
    stderr: String,
}

impl Run {
    fn words(&self, kind: &str) -> Vec<Vec<&str>> {
        self.lines.iter().map(|l| l.split(' ').collect::<Vec<_>>()).filter(|w| w[0] == kind).collect()
    }

    fn finished(&self) -> bool {
        self.status.success() && self.lines.iter().any(|l| l == "done")
    }

    fn aborted(&self) -> bool {
        self.status.signal() == Some(SIGABRT)
    }

    /// The recovery report's counters (`open`, `interrupted`, …).
    fn report(&self) -> BTreeMap<String, usize> {
        let w = self.words("report");
        let w = w.first().unwrap_or_else(|| panic!("no report: {self:?}"));
        w[1..]
            .iter()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect()
    }

    /// `(round, shop) -> access token` of every success.
    fn served(&self) -> BTreeMap<(usize, String), String> {
        self.words("ok").iter().map(|w| ((w[1].parse().unwrap(), w[2].to_owned()), w[3].to_owned())).collect()
    }

    /// `(round, shop) -> error kind` of every failure.
    fn errors(&self) -> BTreeMap<(usize, String), String> {
        self.words("err").iter().map(|w| ((w[1].parse().unwrap(), w[2].to_owned()), w[3].to_owned())).collect()
    }

    /// Final phase of every shop.
    fn phases(&self) -> BTreeMap<String, String> {
        self.words("state").iter().map(|w| (w[1].to_owned(), w[2].to_owned())).collect()
    }
}

/// Held while this process spawns a child and while it has a store open: a child forked by another
/// test while a store's lock file is open would hold that lock (flock) until its exec closes the
/// descriptor, and the next open of that store would find it `Locked`.
fn spawn_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn parse_line(line: &str) -> Option<String> {
    line.find(MARK).map(|i| line[i + MARK.len()..].to_owned())
}

/// Whether a test runs in this process: not in a child, and its backend is reachable (without a
/// PostgreSQL server the `_pg` variants skip loudly, or fail under `TOKENWAL_REQUIRE_PG=1`).
fn runs_here(backend: Backend) -> bool {
    std::env::var_os(CHILD).is_none() && (backend == Backend::Sled || TestStore::new(backend, "crash suite").is_some())
}

/// The child's request timeout unless a test sets another: 5 s, or 2 s on PostgreSQL, where a
/// restart's recovery probe of a dead child's attempt waits that long after the attempt's start
/// (the loopback simulator answers in milliseconds either way).
fn default_timeout_ms(backend: Backend) -> u64 {
    match backend {
        Backend::Postgres => 2_000,
        _ => 5_000,
    }
}

struct Harness {
    // Dropped in this order: the simulator's server task before its runtime.
    sim: SimHandle,
    _rt: tokio::runtime::Runtime,
    /// `shops.json`.
    dir: tempfile::TempDir,
    store: TestStore,
    shops: Vec<String>,
    rounds: usize,
    strict: bool,
    concurrent: bool,
    timeout_ms: u64,
    store_fault: Option<String>,
    budget_ms: Option<u64>,
    compact: Option<String>,
}

impl Harness {
    fn new(backend: Backend, tag: &str, shops: usize, policy: PolicyKind) -> Harness {
        Harness::with_config(backend, tag, shops, SimConfig { policy, ..SimConfig::default() })
    }

    fn with_config(backend: Backend, tag: &str, shops: usize, config: SimConfig) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let policy = config.policy;
        let config = SimConfig { hang_cap: "5s".parse().unwrap(), ..config };
        let sim = rt.block_on(serve(config, "127.0.0.1:0".parse().unwrap())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let shops: Vec<String> = (0..shops).map(|i| format!("{tag}-{i}.myshopify.com")).collect();
        let list: Vec<serde_json::Value> = shops
            .iter()
            .map(|s| {
                let t = sim.seed_shop(s);
                serde_json::json!({
                    "shop": s,
                    "access_token": t.access_token.as_str(),
                    "refresh_token": t.refresh_token.as_str(),
                    "refresh_token_expires_in": t.refresh_token_expires_in,
                })
            })
            .collect();
        std::fs::write(dir.path().join("shops.json"), serde_json::to_vec(&list).unwrap()).unwrap();
        Harness {
            sim,
            _rt: rt,
            dir,
            store: TestStore::new(backend, "crash suite").expect("checked by runs_here"),
            shops,
            rounds: 3,
            strict: policy == PolicyKind::Strict,
            concurrent: false,
            timeout_ms: default_timeout_ms(backend),
            store_fault: None,
            budget_ms: None,
            compact: None,
        }
    }

    fn command(&self, failpoint: Option<&str>) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env(ENV_STORE, self.store.address())
            .env(ENV_SIM, self.sim.base_url())
            .env(ENV_SHOPS, self.dir.path().join("shops.json"))
            .env(ENV_ROUNDS, self.rounds.to_string())
            .env(ENV_TIMEOUT_MS, self.timeout_ms.to_string())
            .env_remove(FAILPOINT)
            .env_remove(ENV_STRICT)
            .env_remove(ENV_CONCURRENT)
            .env_remove(ENV_STORE_FAULT)
            .env_remove(ENV_BUDGET_MS)
            .env_remove(ENV_COMPACT)
            .env("RUST_BACKTRACE", "0");
        if let Some(ms) = self.budget_ms {
            cmd.env(ENV_BUDGET_MS, ms.to_string());
        }
        if let Some(c) = &self.compact {
            cmd.env(ENV_COMPACT, c);
        }
        if let Some(fp) = failpoint {
            cmd.env(FAILPOINT, fp);
        }
        if self.strict {
            cmd.env(ENV_STRICT, "1");
        }
        if self.concurrent {
            cmd.env(ENV_CONCURRENT, "1");
        }
        if let Some(f) = &self.store_fault {
            cmd.env(ENV_STORE_FAULT, f);
        }
        cmd
    }

    /// Runs the child to its end (normal exit or abort at `failpoint`).
    fn run(&self, failpoint: Option<&str>) -> Run {
        let child = {
            let _g = spawn_lock();
            self.command(failpoint).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        };
        let out = child.wait_with_output().unwrap();
        let lines = String::from_utf8_lossy(&out.stdout).lines().filter_map(parse_line).collect();
        Run { status: out.status, lines, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
    }

    /// Runs the child without failpoint and checks it finished.
    fn run_clean(&self) -> Run {
        let r = self.run(None);
        assert!(r.finished(), "the clean run did not finish: {r:#?}");
        r
    }

    /// Runs the child until `kill_when` says so (polled every 5 ms), then SIGKILLs it. Returns
    /// whether it was killed (it may have finished first) and what it printed.
    fn run_until_killed(&self, mut kill_when: impl FnMut(&Harness, Duration) -> bool) -> (bool, Run) {
        let mut child = {
            let _g = spawn_lock();
            self.command(None).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap()
        };
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(l) = parse_line(&line) {
                    let _ = tx.send(l);
                }
            }
        });
        let started = Instant::now();
        let mut killed = false;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if kill_when(self, started.elapsed()) {
                child.kill().unwrap();
                killed = true;
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the child never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = child.wait().unwrap();
        reader.join().unwrap();
        let lines: Vec<String> = rx.try_iter().collect();
        if killed {
            assert_eq!(status.signal(), Some(SIGKILL), "{lines:?}");
        }
        (killed, Run { status, lines, stderr: String::new() })
    }

    /// The durable state of every shop, as the stopped child left it.
    fn inspect(&self) -> BTreeMap<String, GrantState> {
        let _g = spawn_lock();
        let store = self.store.open();
        let states =
            self.shops.iter().filter_map(|s| store.get(&grant(s)).unwrap().map(|st| (s.clone(), st))).collect();
        drop(store);
        states
    }

    fn stored_refresh_token(state: &GrantState) -> String {
        state.tokens.as_ref().unwrap().refresh_token.expose_secret().to_owned()
    }

    /// Whether the simulator has already processed (used) `refresh_token` of `shop`.
    fn processed(&self, shop: &str, refresh_token: &str) -> bool {
        let view = self.sim.shop_state(shop);
        let r = view.refresh_token(refresh_token).unwrap_or_else(|| panic!("{shop}: the sim never issued it"));
        r.first_used_at_ms.is_some()
    }

    fn accepted(&self, shop: &str, refresh_token: &str) -> bool {
        let now = self.sim.now_ms();
        self.sim.with_model(|m| m.refresh_token_accepted(CLIENT_ID, shop, refresh_token, now))
    }

    /// After any stop: every stored refresh token is still accepted by the server (under retention),
    /// and an open grant is exactly a grant whose outcome the stopped process never recorded.
    /// Returns the open grants and, for each, whether the server had processed its credential.
    fn check_recoverable(&self) -> BTreeMap<String, bool> {
        let mut open = BTreeMap::new();
        for (s, st) in self.inspect() {
            let rt = Harness::stored_refresh_token(&st);
            if !self.strict {
                assert!(self.accepted(&s, &rt), "{s}: the durable refresh token is dead at the server ({st:?})");
            }
            if st.phase.is_open() {
                let processed = self.processed(&s, &rt);
                open.insert(s, processed);
            }
        }
        open
    }

    /// The invariants after a clean run: every shop was served in every round, its last token
    /// works, its grant is alive, the server rejected nothing, and every grant ends healthy.
    fn check_served(&self, run: &Run) {
        let served = run.served();
        let now = self.sim.now_ms();
        for s in &self.shops {
            for round in 0..self.rounds {
                assert!(served.contains_key(&(round, s.clone())), "{s} not served in round {round}: {run:#?}");
            }
            let last = &served[&(self.rounds - 1, s.clone())];
            assert!(
                self.sim.with_model(|m| m.access_token_valid(s, last, now)),
                "{s}: the last served token is refused by the Admin API"
            );
            assert!(self.sim.grant_alive(s), "{s}: grant dead at the server");
            assert_eq!(run.phases().get(s).map(String::as_str), Some("healthy"), "{run:#?}");
        }
        let c = self.sim.counters();
        assert_eq!(c.total.total_rejections(), 0, "the server rejected a refresh: {:?}", c.total);
    }

    /// Commit before use, across a stop: every access token the stopped child handed out is the
    /// durable one or older (by the server's issue time; a replay returns the same token).
    fn check_served_was_durable(&self, run: &Run) {
        let states = self.inspect();
        let mut last: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for ((round, s), t) in run.served() {
            if last.get(&s).is_none_or(|(r, _)| round >= *r) {
                last.insert(s, (round, t));
            }
        }
        for (s, (_, served)) in last {
            let stored = states[&s].tokens.as_ref().unwrap().access_token.expose_secret().to_owned();
            let view = self.sim.shop_state(&s);
            let issued = |t: &str| view.access_token(t).unwrap_or_else(|| panic!("{s}: unknown token")).issued_at_ms;
            assert!(
                issued(&served) <= issued(&stored),
                "{s}: the child handed out a token newer than the durable one (used before its commit was durable)"
            );
        }
    }

    fn replays(&self) -> u64 {
        self.sim.counters().total.replays
    }

    fn requests(&self, shop: &str) -> u64 {
        self.sim.counters().shop(shop).token_requests
    }
}

// ---------------------------------------------------------------------------------------------
// Named failpoints: abort at the N-th hit, restart, check.

/// Aborts the child at the `nth` hit of `name` (one hit per attempt; shops are served in order, so
/// the `nth` attempt is shop `(nth-1) % shops` in round `(nth-1) / shops`), checks what the dead
/// process left, restarts it and checks recovery. Returns the harness for further checks.
fn crash_at(backend: Backend, name: &str, nth: usize) -> Harness {
    let h = Harness::new(backend, &format!("{name}-{nth}"), 3, PolicyKind::RetainUntilReplacementUsed);
    let n = h.shops.len();
    let (round, victim) = ((nth - 1) / n, h.shops[(nth - 1) % n].clone());
    let crashed = h.run(Some(&format!("{name}:{nth}")));
    assert!(crashed.aborted(), "{name}:{nth} did not abort: {crashed:#?}");
    assert!(crashed.stderr.contains(&format!("tokenwal failpoint {name}: aborting")), "{}", crashed.stderr);
    // Everything before the victim's attempt was served.
    assert_eq!(crashed.served().len(), nth - 1, "{crashed:#?}");

    h.check_served_was_durable(&crashed);
    let states = h.inspect();
    let victim_state = &states[&victim];
    let rt = Harness::stored_refresh_token(victim_state);
    let open = h.check_recoverable();
    // The victim's attempt number `round` (0-based) is the one cut short.
    let sent_before = round as u64;
    match name {
        "before-intent" => {
            assert_eq!(victim_state.phase, Phase::Healthy);
            assert_eq!(victim_state.generation.0, 1 + round as u64, "no new generation");
            assert!(open.is_empty(), "{open:?}");
            assert_eq!(h.requests(&victim), sent_before, "nothing was sent");
        }
        "after-intent" => {
            assert!(matches!(victim_state.phase, Phase::Refreshing { .. }), "{victim_state:?}");
            assert_eq!(open.len(), 1);
            assert_eq!(open.get(&victim), Some(&false), "the server never saw it");
            assert_eq!(h.requests(&victim), sent_before, "nothing was sent");
        }
        "after-response" | "before-commit" => {
            assert!(matches!(victim_state.phase, Phase::Refreshing { .. }), "{victim_state:?}");
            assert_eq!(open.len(), 1);
            assert_eq!(open.get(&victim), Some(&true), "the server rotated");
            assert_eq!(h.requests(&victim), sent_before + 1);
        }
        "after-commit" => {
            assert_eq!(victim_state.phase, Phase::Healthy);
            assert_eq!(victim_state.generation.0, 2 + round as u64, "the commit is durable");
            assert!(open.is_empty(), "{open:?}");
            assert!(!h.processed(&victim, &rt), "the durable token is the new, unused one");
        }
        other => panic!("no expectations for {other}"),
    }

    let replays_before = h.replays();
    let restarted = h.run_clean();
    let report = restarted.report();
    let ambiguous = open.len();
    assert_eq!(report["open"], ambiguous, "{report:?}");
    assert_eq!(report["interrupted"], ambiguous, "{report:?}");
    assert_eq!(report["resolved"], ambiguous, "{report:?}");
    assert_eq!(report["needs_reauth"], 0, "{report:?}");
    h.check_served(&restarted);
    // A replay exactly where the server had acted on a request whose answer was lost.
    let expected = open.values().filter(|p| **p).count() as u64;
    assert_eq!(h.replays() - replays_before, expected, "replays after restart");
    assert!(h.check_recoverable().is_empty());
    h
}

/// The failpoint names covered by a named test below; `every_failpoint_has_a_crash_test` keeps
/// this list in step with the engine's.
const COVERED: [&str; 7] = [
    "before-intent",
    "after-intent",
    "after-response",
    "before-commit",
    "after-commit",
    "during-recovery",
    "during-compaction",
];

#[test]
fn every_failpoint_has_a_crash_test() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    for name in tokenwal::failpoint::NAMES {
        assert!(COVERED.contains(&name), "failpoint {name} has no crash test");
    }
}

/// The first, a middle and the last attempt of a 3-shop, 3-round run.
const VARIANTS: [usize; 3] = [1, 5, 9];

fn crash_case(backend: Backend, name: &str) {
    if !runs_here(backend) {
        return;
    }
    for nth in VARIANTS {
        crash_at(backend, name, nth);
    }
}

on_both_backends! {
    #[test]
    fn crash_before_intent, crash_before_intent_pg(backend) {
        crash_case(backend, "before-intent");
    }
}

on_both_backends! {
    #[test]
    fn crash_after_intent, crash_after_intent_pg(backend) {
        crash_case(backend, "after-intent");
    }
}

on_both_backends! {
    #[test]
    fn crash_after_response, crash_after_response_pg(backend) {
        crash_case(backend, "after-response");
    }
}

on_both_backends! {
    #[test]
    fn crash_before_commit, crash_before_commit_pg(backend) {
        crash_case(backend, "before-commit");
    }
}

on_both_backends! {
    #[test]
    fn crash_after_commit, crash_after_commit_pg(backend) {
        crash_case(backend, "after-commit");
    }
}

on_both_backends! {
    /// Every attempt-level failpoint with all shops refreshing at once: the process dies with other
    /// shops' attempts at any stage. Whatever it left, the restart serves everyone, loses nothing, and
    /// replays exactly the open attempts the server had acted on.
    #[test]
    fn crash_at_every_failpoint_while_all_shops_refresh_concurrently, crash_at_every_failpoint_while_all_shops_refresh_concurrently_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        for name in ["before-intent", "after-intent", "after-response", "before-commit", "after-commit"] {
            let mut h = Harness::new(backend, &format!("conc-{name}"), 4, PolicyKind::RetainUntilReplacementUsed);
            h.concurrent = true;
            let crashed = h.run(Some(&format!("{name}:6")));
            assert!(crashed.aborted(), "{name}: {crashed:#?}");
            h.check_served_was_durable(&crashed);
            let open = h.check_recoverable();
            let replays = h.replays();
            let restarted = h.run_clean();
            assert_eq!(restarted.report()["open"], open.len(), "{name}");
            assert_eq!(restarted.report()["resolved"], open.len(), "{name}");
            h.check_served(&restarted);
            assert_eq!(h.replays() - replays, open.values().filter(|p| **p).count() as u64, "{name}: {open:?}");
        }
    }
}

on_both_backends! {
    /// A crash after the response, then another in recovery's probe (its response lost too), then a
    /// clean restart: the same old token is retried a second time and still returns the pair.
    #[test]
    fn crash_after_response_then_again_in_the_recovery_probe, crash_after_response_then_again_in_the_recovery_probe_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        let h = Harness::new(backend, "probe-crash", 3, PolicyKind::RetainUntilReplacementUsed);
        let victim = h.shops[1].clone();
        assert!(h.run(Some("after-response:2")).aborted());
        let open = h.check_recoverable();
        assert_eq!(open.get(&victim), Some(&true));
        let replays = h.replays();
        // The recovery probe is the first attempt of the next process.
        let again = h.run(Some("after-response:1"));
        assert!(again.aborted(), "{again:#?}");
        assert_eq!(h.replays(), replays + 1, "the probe replayed the old token");
        let states = h.inspect();
        let st = &states[&victim];
        assert!(matches!(st.phase, Phase::Refreshing { .. }), "{st:?}");
        assert_eq!(h.check_recoverable().get(&victim), Some(&true));
        let restarted = h.run_clean();
        assert_eq!(restarted.report()["resolved"], 1);
        h.check_served(&restarted);
        assert_eq!(h.replays(), replays + 2, "two replays of the same old token");
    }
}

/// Every shop stopped after send, before the response (SIGKILL while the server holds every answer).
/// Returns the harness, the shops' count and the server's token requests so far.
fn all_in_flight_then_killed(backend: Backend, tag: &str) -> (Harness, usize, u64) {
    let mut h = Harness::new(backend, tag, 4, PolicyKind::RetainUntilReplacementUsed);
    let n = h.shops.len();
    h.concurrent = true;
    h.rounds = 1;
    h.timeout_ms = 30_000;
    for s in &h.shops {
        h.sim.push_faults(s, [Fault::RotateThenHang]).unwrap();
    }
    let (killed, _) = h.run_until_killed(|h, _| h.sim.counters().total.token_requests >= n as u64);
    assert!(killed);
    let open = h.check_recoverable();
    assert_eq!(open.len(), n, "every shop was in flight: {open:?}");
    assert!(open.values().all(|p| *p), "the server rotated every one");
    let requests = h.sim.counters().total.token_requests;
    // The hung requests died with the child; the next ones are answered at once. (A recovery probe
    // on a shared store waits out the dead request's timeout, the restarted process's own.)
    h.timeout_ms = default_timeout_ms(h.store.backend());
    (h, n, requests)
}

/// (`Refreshing`, `Ambiguous`) grants in the store.
fn open_phases(h: &Harness) -> (usize, usize) {
    let states = h.inspect();
    let refreshing = states.values().filter(|s| matches!(s.phase, Phase::Refreshing { .. })).count();
    let ambiguous = states.values().filter(|s| matches!(s.phase, Phase::Ambiguous(_))).count();
    (refreshing, ambiguous)
}

/// The attempt each open grant is `Refreshing` (`None`: another phase).
fn refreshing_attempts(h: &Harness) -> BTreeMap<String, Option<u64>> {
    h.inspect()
        .into_iter()
        .map(|(s, st)| {
            let a = match st.phase {
                Phase::Refreshing { attempt, .. } => Some(attempt.0),
                _ => None,
            };
            (s, a)
        })
        .collect()
}

on_both_backends! {
    /// Every shop in flight at a kill, then crashes in the middle of recovery's first writes. An
    /// interrupted attempt that can be probed at once gets one write: its probe's intent, carrying
    /// the interruption's records (the process dies when the first is durable, before its probe is
    /// sent: `after-intent`); the others get the interruption alone, group-committed. Either way a
    /// crash leaves each grant before or after its write (atomic), never a request sent, and
    /// planning again completes the rest.
    #[test]
    fn crash_during_recovery, crash_during_recovery_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        let (mut h, n, requests) = all_in_flight_then_killed(backend, "recovery");
        for _ in 0..2 {
            let before = refreshing_attempts(&h);
            let r = h.run(Some("after-intent:1"));
            assert!(r.aborted(), "{r:#?}");
            let (refreshing, ambiguous) = open_phases(&h);
            assert_eq!(refreshing + ambiguous, n, "every grant is still open");
            let after = refreshing_attempts(&h);
            let moved = before.iter().filter(|(s, a)| after.get(*s) != Some(*a)).count();
            assert!(moved >= 1, "at least the write that preceded the failpoint is durable: {before:?} {after:?}");
        }
        assert_eq!(h.sim.counters().total.token_requests, requests, "recovery crashed before probing anything");
        h.check_recoverable();

        let replays = h.replays();
        let (refreshing, _) = open_phases(&h);
        h.rounds = 2;
        let restarted = h.run_clean();
        let report = restarted.report();
        assert_eq!((report["open"], report["interrupted"], report["resolved"]), (n, refreshing, n), "{report:?}");
        h.check_served(&restarted);
        assert_eq!(h.replays() - replays, n as u64, "every hung rotation was recovered by a replay");
    }
}

on_both_backends! {
    /// Recovery outlives a zero budget: open returns at once, recovery goes on in the background while
    /// callers wait for it, and the process dies there (at a recovery probe's response, then in its
    /// transitions). Nothing is lost: the next start recovers every grant and serves it.
    #[test]
    fn crash_during_background_recovery, crash_during_background_recovery_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        let (mut h, n, requests) = all_in_flight_then_killed(backend, "background");
        h.budget_ms = Some(0);
        let r = h.run(Some("after-response:1"));
        assert!(r.aborted(), "{r:#?}");
        let report = r.report();
        assert_eq!((report["open"], report["pending"]), (n, n), "open returned before recovery ended: {report:?}");
        assert!(h.sim.counters().total.token_requests > requests, "a background probe was sent");
        let (refreshing, ambiguous) = open_phases(&h);
        assert_eq!(refreshing + ambiguous, n, "every grant is still open: {r:#?}");
        h.check_recoverable();

        let r = h.run(Some("during-recovery:1"));
        assert!(r.aborted(), "{r:#?}");
        let (refreshing, ambiguous) = open_phases(&h);
        assert_eq!(refreshing + ambiguous, n);
        h.check_recoverable();

        h.rounds = 2;
        let restarted = h.run_clean();
        assert_eq!(restarted.report()["open"], n);
        h.check_served(&restarted);
    }
}

on_both_backends! {
    /// Compaction cut short: the child compacts every 5 ms with a cap of 2 records per grant while every
    /// round refreshes every shop, and aborts after the N-th chunk that deleted something (on sled
    /// before any sync made it durable; on PostgreSQL it is committed). Nothing is lost: every grant's state and refresh token stay valid, the
    /// histories stay readable, and the restart serves every shop.
    #[test]
    fn crash_during_compaction, crash_during_compaction_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        for nth in [1, 3, 6] {
            let mut h = Harness::new(backend, &format!("compact-{nth}"), 3, PolicyKind::RetainUntilReplacementUsed);
            h.rounds = 30;
            h.compact = Some("2:5".into());
            let crashed = h.run(Some(&format!("during-compaction:{nth}")));
            assert!(crashed.aborted(), "compaction never deleted {nth} chunks: {crashed:#?}");
            h.check_served_was_durable(&crashed);
            // Refreshes run beside the compaction: the abort may catch one mid-attempt (recoverable).
            let open = h.check_recoverable();
            {
                let _g = spawn_lock();
                let store = h.store.open();
                for s in &h.shops {
                    let g = GrantKey::shopify(&ShopDomain::parse(s).unwrap());
                    let history = store.history(&g).expect("a history stays readable");
                    assert!(!history.is_empty(), "{s}: the newest records stay");
                    assert!(store.get(&g).unwrap().is_some(), "{s}: the state stays");
                }
            }
            h.rounds = 2;
            h.compact = None;
            let restarted = h.run_clean();
            let report = restarted.report();
            assert_eq!(
                (report["open"], report["resolved"], report["needs_reauth"]),
                (open.len(), open.len(), 0),
                "{report:?}"
            );
            h.check_served(&restarted);
        }
    }
}

on_both_backends! {
    /// "After send, before response", at random moments: requests hang at the server after it rotated,
    /// the engine's total timeout is short, and the child is SIGKILLed at random while it retries.
    #[test]
    fn crash_after_send_before_response_random_kills, crash_after_send_before_response_random_kills_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        let mut h = Harness::new(backend, "kill", 3, PolicyKind::RetainUntilReplacementUsed);
        h.concurrent = true;
        h.rounds = 6;
        h.timeout_ms = 150;
        let seed: u64 = rand::random();
        eprintln!("random kills: seed {seed}");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let mut kills = 0;
        for iteration in 0..8 {
            for s in &h.shops {
                h.sim.with_model(|m| m.clear_faults(s));
                // Mostly rotations whose answer never comes (hang until the engine's timeout), some
                // reset or 520, and slow but normal answers in between.
                let faults: Vec<Fault> = (0..rng.gen_range(6..12))
                    .map(|_| match rng.gen_range(0..8) {
                        0 => Fault::RotateThenReset,
                        1 => Fault::RotateThenDrop,
                        2..=4 => Fault::RotateThenHang,
                        _ => Fault::Slow { delay_ms: rng.gen_range(5..60) },
                    })
                    .collect();
                h.sim.push_faults(s, faults).unwrap();
            }
            let after = Duration::from_millis(rng.gen_range(20..900));
            let (killed, run) = h.run_until_killed(|_, elapsed| elapsed >= after);
            kills += usize::from(killed);
            if !killed {
                assert!(run.finished(), "iteration {iteration} (seed {seed}): {run:#?}");
            }
            // Every stored refresh token, open or not, is still accepted by the server.
            h.check_recoverable();
            h.check_served_was_durable(&run);
        }
        eprintln!("random kills: {kills} kills, {} replays so far", h.replays());
        assert!(kills >= 4, "too few kills to mean anything ({kills}, seed {seed})");
        for s in &h.shops {
            h.sim.with_model(|m| m.clear_faults(s));
        }
        h.timeout_ms = default_timeout_ms(h.store.backend());
        let restarted = h.run_clean();
        h.check_served(&restarted);
        assert!(h.replays() > 0, "the lost answers were recovered by replays (seed {seed})");
    }
}

/// The last row of the crash-point table: a write or sync fails (full disk, I/O error). The store is
/// fail-stop: the child gets `Io`, then `Poisoned` for everything, and exits; the failed batch may or
/// may not be durable. The restart's recovery handles either: every shop is served, nothing the
/// server holds is lost, and a replay happens exactly if the lost batch left a processed attempt open.
fn crash_on_store_failure(backend: Backend, fault: &str) {
    if !runs_here(backend) {
        return;
    }
    let mut h =
        Harness::new(backend, &format!("io-{}", fault.replace(':', "-")), 3, PolicyKind::RetainUntilReplacementUsed);
    h.store_fault = Some(fault.to_owned());
    let failed = h.run(None);
    assert!(failed.finished(), "{failed:#?}");
    let errors = failed.errors();
    assert_eq!(errors.get(&(0, h.shops[0].clone())).map(String::as_str), Some("store"), "{failed:#?}");
    assert!(errors.values().all(|e| e == "store"), "fail-stop: {errors:?}");
    assert!(failed.served().is_empty(), "nothing served after the failure: {failed:#?}");
    let open = h.check_recoverable();
    let states = h.inspect();
    let first = &states[&h.shops[0]];
    eprintln!("{fault}: the failed batch left {} generation {} ({open:?})", first.phase.name(), first.generation.0);
    h.store_fault = None;
    let replays = h.replays();
    let restarted = h.run_clean();
    assert_eq!(restarted.report()["open"], open.len());
    h.check_served(&restarted);
    assert_eq!(h.replays() - replays, open.values().filter(|p| **p).count() as u64);
}

on_both_backends! {
    /// The first attempt's intent is written but its sync fails: nothing was sent.
    #[test]
    fn crash_on_failed_sync_of_an_intent, crash_on_failed_sync_of_an_intent_pg(backend) {
        crash_on_store_failure(backend, "sync:1");
    }
}

on_both_backends! {
    /// The first attempt's commit is written but its sync fails: the server had rotated.
    #[test]
    fn crash_on_failed_sync_of_a_commit, crash_on_failed_sync_of_a_commit_pg(backend) {
        crash_on_store_failure(backend, "sync:2");
    }
}

on_both_backends! {
    /// The first attempt's commit fails right after its transaction (written, reported failed).
    #[test]
    fn crash_on_failed_write_of_a_commit, crash_on_failed_write_of_a_commit_pg(backend) {
        crash_on_store_failure(backend, "after-write:2");
    }
}

on_both_backends! {
    /// The first attempt's intent fails before its transaction: nothing written, nothing sent.
    #[test]
    fn crash_on_failed_write_of_an_intent, crash_on_failed_write_of_an_intent_pg(backend) {
        crash_on_store_failure(backend, "before-write:1");
    }
}

/// A strict single-use server and a crash after its response: the rotation the server committed is
/// lost with the process, so the grant is really dead for tokenwal (the only refresh token the
/// server would still take is the one lost with the answer). The restart probes it once, is
/// rejected, and marks it needs-reauth: not healthy, and not looped on.
fn strict_crash_after_response(backend: Backend, tag: &str, revoke_family_on_reuse: bool) -> Harness {
    let config = SimConfig { policy: PolicyKind::Strict, revoke_family_on_reuse, ..SimConfig::default() };
    let h = Harness::with_config(backend, tag, 2, config);
    let (victim, other) = (h.shops[0].clone(), h.shops[1].clone());
    assert!(h.run(Some("after-response:1")).aborted());
    assert_eq!(h.check_recoverable().get(&victim), Some(&true));
    let states = h.inspect();
    let stored = Harness::stored_refresh_token(&states[&victim]);
    assert!(!h.accepted(&victim, &stored), "the server's single use is spent");
    // What the server would still take is only the replacement lost with the answer.
    let view = h.sim.shop_state(&victim);
    let lost = view.refresh_token(&stored).unwrap().replacement.clone().unwrap();
    let live: Vec<_> = view
        .grants
        .iter()
        .flat_map(|g| &g.refresh_tokens)
        .filter(|r| r.accepted_now)
        .map(|r| r.token.clone())
        .collect();
    assert_eq!(live, vec![lost], "nothing tokenwal holds is alive");

    let restarted = h.run_clean();
    let report = restarted.report();
    assert_eq!((report["open"], report["resolved"], report["needs_reauth"]), (1, 0, 1), "{report:?}");
    let errors = restarted.errors();
    for round in 0..h.rounds {
        assert_eq!(errors.get(&(round, victim.clone())).map(String::as_str), Some("needs-reauth"), "{restarted:#?}");
        assert!(restarted.served().contains_key(&(round, other.clone())), "the other shop is served");
    }
    assert_eq!(restarted.phases()[&victim], "needs-reauth");
    assert_eq!(restarted.phases()[&other], "healthy");
    assert_eq!(h.requests(&victim), 2, "the lost request and one probe: no loop");
    assert_eq!(h.sim.counters().shop(&victim).total_rejections(), 1);

    // Another start does not touch it again.
    let again = h.run_clean();
    assert_eq!(again.report()["open"], 0);
    assert_eq!(again.phases()[&victim], "needs-reauth");
    assert_eq!(h.requests(&victim), 2);
    assert_eq!(h.sim.counters().shop(&other).total_rejections(), 0);
    h
}

on_both_backends! {
    #[test]
    fn strict_crash_after_response_needs_reauth, strict_crash_after_response_needs_reauth_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        strict_crash_after_response(backend, "strict", false);
    }
}

on_both_backends! {
    /// The same under a server that revokes the whole grant when a used token is presented again: the
    /// probe makes the server kill the grant outright, and it confirms the grant is dead.
    #[test]
    fn strict_family_revocation_crash_after_response_needs_reauth, strict_family_revocation_crash_after_response_needs_reauth_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        let h = strict_crash_after_response(backend, "strict-family", true);
        assert!(!h.sim.grant_alive(&h.shops[0]), "the server revoked the grant");
        assert_eq!(h.sim.counters().shop(&h.shops[0]).family_revocations, 1);
        assert!(h.sim.grant_alive(&h.shops[1]));
    }
}

on_both_backends! {
    /// Under the same strict server, a crash after the intent (nothing sent) is not a loss: the probe is
    /// the credential's first use and succeeds. No false re-auth.
    #[test]
    fn strict_crash_after_intent_recovers, strict_crash_after_intent_recovers_pg(backend) {
        if !runs_here(backend) {
            return;
        }
        let h = Harness::new(backend, "strict-intent", 2, PolicyKind::Strict);
        assert!(h.run(Some("after-intent:1")).aborted());
        assert_eq!(h.check_recoverable().get(&h.shops[0]), Some(&false));
        let restarted = h.run_clean();
        assert_eq!(restarted.report()["resolved"], 1);
        h.check_served(&restarted);
        assert_eq!(h.replays(), 0);
    }
}
