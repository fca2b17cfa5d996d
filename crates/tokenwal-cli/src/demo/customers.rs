//! `tokenwal demo --scenario customer-accounts`: a headless storefront's customer sessions
//! (Customer Account API, per-customer grants of a public client, strict single use) refreshed by
//! tokenwal and by the naive per-session-mutex baseline, each against its own simulator, under the
//! same per-customer fault scripts.
//!
//! * **The storefront**: `--storefront-instances` instances (edge workers, serverless functions,
//!   Node processes) serve page loads; a page load of a customer asks for that customer's token from
//!   three loaders at once, each on a random instance. The session (access token, refresh token,
//!   expiry) is shared by all instances — the customer's cookie or the session store.
//! * **The naive baseline** (Hydrogen's pattern, docs/providers.md): each instance holds a mutex
//!   per session, so one instance never refreshes a session twice at once; it refreshes 2 min (here
//!   `--refresh-margin`) before expiry, writes the new pair back (last writer wins), and on any
//!   refresh failure — a 4xx, a 5xx, a timeout, an unreadable body — clears the session: the
//!   customer must log in again. Two instances refreshing one session race with the same refresh
//!   token, and under single use the loser's 400 logs the customer out.
//! * **tokenwal**: every instance asks one engine (`tokenwal serve` or the library) with the
//!   `shopify-customer-account` profile; one refresh per customer at a time, ambiguous answers
//!   retried with the same token, only a definitive 400/401 means "log in again".
//! * **Judged from outside**: after the run faults stop; a customer is *forced to log in again* if
//!   the app has no session for it (naive) or the engine says it needs re-auth (tokenwal). How many
//!   of those had a rotation committed by the simulator with its answer lost (a 520, a reset, a
//!   truncated or malformed body, a success without `expires_in`) — unavoidable under single use,
//!   whoever refreshes — comes from the simulator's per-customer counters, as do the requests and the
//!   overlapping token requests per customer.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenwal::core::protocol::ProviderSpec;
use tokenwal::core::{
    AccessToken, ClientSecret, CustomerAccount, GrantKey, InstallSource, ProviderProfile, RefreshToken, TokenSet,
};
use tokenwal::{Config, Engine, Error, KeyRing, KeySource, StoreLocation};
use tokenwal_sim::{Counters, Fault, SimConfig, SimDuration, SimHandle};

use super::{DemoArgs, NO_FAULT};
use crate::error::CliError;

/// Faults that answer after the simulator committed a rotation, the answer lost or unusable.
const LOSSY: [&str; 6] =
    ["rotate_then_drop", "rotate_then_hang", "rotate_then_reset", "truncated", "malformed", "missing_expires_in"];

/// Loaders of one page load asking for the customer's token at once.
const FANOUT: usize = 3;

/// One customer: its shop id and customer id.
#[derive(Clone, Copy)]
struct Customer {
    shop_id: u64,
    customer_id: u64,
}

impl Customer {
    fn grant(self) -> String {
        tokenwal_sim::model::customer_grant(self.shop_id, self.customer_id)
    }

    fn key(self) -> GrantKey {
        GrantKey::customer_account(&CustomerAccount::new(self.shop_id, self.customer_id).expect("positive ids"))
    }
}

/// What both runs share.
struct World {
    args: DemoArgs,
    customers: Vec<Customer>,
    scripts: Vec<Vec<Fault>>,
    duration: Duration,
}

impl World {
    fn new(args: DemoArgs) -> World {
        let mut rng = StdRng::seed_from_u64(args.seed);
        let shops = u64::from(args.customer_shops.max(1));
        let n = args.customers as usize;
        let customers: Vec<Customer> = (0..n as u64)
            .map(|i| Customer { shop_id: 60_000_000 + i % shops, customer_id: 7_000_000 + i / shops })
            .collect();
        let duration = args.duration.to_std();
        let period =
            args.access_ttl.to_std().saturating_sub(args.refresh_margin.to_std()).max(Duration::from_millis(200));
        let script_len = (4.0 * duration.as_secs_f64() / period.as_secs_f64()) as usize + 20;
        let scripts = (0..n)
            .map(|_| {
                (0..script_len)
                    .map(|_| {
                        if rng.gen_bool(args.fault_rate) {
                            // No spurious invalid_client here: it is not the customer's.
                            loop {
                                let f = super::draw_fault(&mut rng);
                                if f != Fault::InvalidClient {
                                    break f;
                                }
                            }
                        } else {
                            NO_FAULT
                        }
                    })
                    .collect()
            })
            .collect();
        World { args, customers, scripts, duration }
    }

    fn sim_config(&self) -> SimConfig {
        SimConfig {
            access_ttl: self.args.access_ttl,
            seed: Some(self.args.seed),
            hang_cap: SimDuration::from_millis(self.args.timeout.as_millis() + 500),
            ..SimConfig::default()
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CustomerReport {
    customers: usize,
    page_loads: u64,
    token_requests: u64,
    rotations: u64,
    faults: u64,
    overlapping_token_requests: u64,
    customers_with_overlaps: usize,
    forced_to_log_in_again: usize,
    of_which_rotation_lost: usize,
    needlessly_logged_out: usize,
}

/// How a run's app answers a loader.
trait Storefront: Send + Sync {
    /// A token for customer `i` on instance `inst`, or `false` when the customer is logged out.
    fn token(&self, inst: usize, i: usize) -> impl std::future::Future<Output = bool> + Send;
}

// ---------------------------------------------------------------- the naive baseline

#[derive(Clone)]
struct Session {
    access: String,
    refresh: String,
    expires_at_ms: u64,
}

struct Naive {
    /// The shared session store (the cookie): `None` once the customer was logged out.
    sessions: Vec<Mutex<Option<Session>>>,
    /// Per instance, a mutex per session.
    locks: Vec<Vec<tokio::sync::Mutex<()>>>,
    http: reqwest::Client,
    url: String,
    client_id: String,
    margin_ms: u64,
}

fn now_ms() -> u64 {
    crate::timefmt::now().0
}

impl Naive {
    async fn refresh(&self, c: Customer, rt: &str) -> Option<Session> {
        let url = self.url.replace("{shop_id}", &c.shop_id.to_string());
        let form = [("grant_type", "refresh_token"), ("client_id", self.client_id.as_str()), ("refresh_token", rt)];
        let resp = self.http.post(url).form(&form).send().await.ok()?;
        if resp.status().as_u16() != 200 {
            return None;
        }
        let v: serde_json::Value = resp.json().await.ok()?;
        Some(Session {
            access: v["access_token"].as_str()?.to_owned(),
            refresh: v["refresh_token"].as_str()?.to_owned(),
            expires_at_ms: now_ms().saturating_add(v["expires_in"].as_u64()?.saturating_mul(1000)),
        })
    }
}

impl Naive {
    async fn token_inner(&self, customers: &[Customer], inst: usize, i: usize) -> bool {
        let _guard = self.locks[inst][i].lock().await;
        let Some(s) = self.sessions[i].lock().unwrap_or_else(|e| e.into_inner()).clone() else { return false };
        if now_ms().saturating_add(self.margin_ms) < s.expires_at_ms {
            return !s.access.is_empty();
        }
        let fresh = self.refresh(customers[i], &s.refresh).await;
        // Hydrogen: any refresh failure clears the session; a success is written back, last writer wins.
        *self.sessions[i].lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
        fresh.is_some()
    }
}

struct NaiveFront {
    naive: Naive,
    customers: Vec<Customer>,
}

impl Storefront for NaiveFront {
    async fn token(&self, inst: usize, i: usize) -> bool {
        self.naive.token_inner(&self.customers, inst, i).await
    }
}

// ---------------------------------------------------------------- tokenwal

struct Tokenwal {
    engine: Engine,
    keys: Vec<GrantKey>,
}

impl Storefront for Tokenwal {
    async fn token(&self, _inst: usize, i: usize) -> bool {
        !matches!(self.engine.access_token_for(&self.keys[i]).await, Err(Error::NeedsReauth { .. }))
    }
}

fn engine_config(world: &World, sim: &SimHandle, path: std::path::PathBuf) -> Config {
    let a = &world.args;
    let mut profile = ProviderProfile::shopify_customer_account();
    if let ProviderSpec::OAuth2 { token_url, .. } = &mut profile.spec {
        *token_url = sim.customer_token_url_template();
    }
    profile.refresh_buffer = a.refresh_margin.to_std();
    let sc = world.sim_config();
    let mut c = Config::shopify(StoreLocation::Path(path), sc.public_client_id, ClientSecret::new("unused"))
        .with_profile(profile)
        .with_store_keys(KeySource::Ring(KeyRing::ephemeral()));
    c.timeouts.total = a.timeout.to_std();
    c.timeouts.connect = a.timeout.to_std().min(Duration::from_secs(1));
    c.policy.backoff.base = Duration::from_millis(100);
    c.policy.backoff.cap = Duration::from_secs(1);
    c.policy.backoff.max_retry_after = Duration::from_secs(2);
    c.max_wait = Duration::from_secs(2);
    c.proactive = false;
    c
}

// ---------------------------------------------------------------- the driver

/// Page loads for `duration`: `workers` tasks, each picking a random customer and asking from
/// [`FANOUT`] loaders at once on random instances.
async fn traffic<S: Storefront + 'static>(front: Arc<S>, world: &World) -> u64 {
    let loads = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + world.duration;
    let n = world.customers.len();
    let instances = world.args.storefront_instances as usize;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..world.args.workers {
        let front = Arc::clone(&front);
        let loads = Arc::clone(&loads);
        let mut rng = StdRng::seed_from_u64(world.args.seed ^ (u64::from(w) << 32));
        tasks.spawn(async move {
            while Instant::now() < stop {
                let i = rng.gen_range(0..n);
                let insts: Vec<usize> = (0..FANOUT).map(|_| rng.gen_range(0..instances)).collect();
                let calls = insts.into_iter().map(|inst| {
                    let front = Arc::clone(&front);
                    async move { front.token(inst, i).await }
                });
                futures_join_all(calls).await;
                loads.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    loads.load(Ordering::Relaxed)
}

/// Runs futures concurrently on this task and waits for all (a tiny `join_all`).
async fn futures_join_all<F: std::future::Future<Output = bool>>(futs: impl Iterator<Item = F>) {
    let mut set = Vec::from_iter(futs.map(Box::pin));
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

async fn start_sim(world: &World) -> Result<SimHandle, CliError> {
    tokenwal_sim::serve(world.sim_config(), "127.0.0.1:0".parse().expect("literal"))
        .await
        .map_err(|e| CliError::io("cannot start the simulator", e))
}

/// Seeds every customer and queues its script; returns each one's first tokens.
fn seed(world: &World, sim: &SimHandle) -> Result<Vec<tokenwal_sim::TokenSet>, CliError> {
    let mut out = Vec::with_capacity(world.customers.len());
    for (c, script) in world.customers.iter().zip(&world.scripts) {
        out.push(sim.seed_customer(c.shop_id, c.customer_id));
        sim.push_faults(&c.grant(), script.iter().copied())
            .map_err(|e| CliError::Config(format!("fault script refused: {e}")))?;
    }
    Ok(out)
}

fn faults_off(world: &World, sim: &SimHandle) {
    sim.with_model(|m| {
        for c in &world.customers {
            m.clear_faults(&c.grant());
        }
    });
}

fn report(world: &World, sim: &SimHandle, page_loads: u64, logged_out: &[bool]) -> CustomerReport {
    let counters = sim.counters();
    let lossy = |c: &Counters| LOSSY.iter().any(|k| c.faults_of(k) > 0);
    let mut r = CustomerReport {
        customers: world.customers.len(),
        page_loads,
        token_requests: counters.total.token_requests,
        rotations: counters.total.rotations,
        faults: counters.total.total_faults() - counters.total.faults_of("slow"),
        overlapping_token_requests: counters.total.overlapping_token_requests,
        customers_with_overlaps: counters.overlapping_grants().len(),
        ..CustomerReport::default()
    };
    for (c, out) in world.customers.iter().zip(logged_out) {
        if *out {
            r.forced_to_log_in_again += 1;
            if lossy(&counters.shop(&c.grant())) {
                r.of_which_rotation_lost += 1;
            } else {
                r.needlessly_logged_out += 1;
            }
        }
    }
    r
}

fn run_naive(world: &World, rt: &tokio::runtime::Runtime) -> Result<CustomerReport, CliError> {
    rt.block_on(async {
        let sim = start_sim(world).await?;
        let seeded = seed(world, &sim)?;
        let instances = world.args.storefront_instances as usize;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(world.args.timeout.to_std())
            .build()
            .map_err(|e| CliError::Config(e.to_string()))?;
        let naive = Naive {
            sessions: seeded
                .iter()
                .map(|t| {
                    Mutex::new(Some(Session {
                        access: t.access_token.as_str().to_owned(),
                        refresh: t.refresh_token.as_str().to_owned(),
                        expires_at_ms: now_ms(),
                    }))
                })
                .collect(),
            locks: (0..instances)
                .map(|_| (0..world.customers.len()).map(|_| tokio::sync::Mutex::new(())).collect())
                .collect(),
            http,
            url: sim.customer_token_url_template(),
            client_id: world.sim_config().public_client_id,
            margin_ms: world.args.refresh_margin.as_millis(),
        };
        let front = Arc::new(NaiveFront { naive, customers: world.customers.clone() });
        let loads = traffic(Arc::clone(&front), world).await;
        faults_off(world, &sim);
        // Settle: every customer still signed in gets one more page load, faults off.
        let mut logged_out = Vec::with_capacity(world.customers.len());
        for i in 0..world.customers.len() {
            logged_out.push(!front.token(0, i).await);
        }
        let r = report(world, &sim, loads, &logged_out);
        sim.shutdown().await;
        Ok(r)
    })
}

fn run_tokenwal(
    world: &World,
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> Result<CustomerReport, CliError> {
    rt.block_on(async {
        let sim = start_sim(world).await?;
        let seeded = seed(world, &sim)?;
        let (engine, _) = Engine::open(engine_config(world, &sim, dir.join("customers-store"))).await?;
        let keys: Vec<GrantKey> = world.customers.iter().map(|c| c.key()).collect();
        let front = Arc::new(Tokenwal { engine, keys });
        // Installs, 256 at a time (they group-commit).
        let mut set = tokio::task::JoinSet::new();
        for (i, t) in seeded.iter().enumerate() {
            let front = Arc::clone(&front);
            let tokens = TokenSet {
                access_token: AccessToken::new(t.access_token.as_str()),
                access_expires_at: tokenwal::core::UnixMillis(now_ms()),
                refresh_token: RefreshToken::new(t.refresh_token.as_str()),
                refresh_expires_at: None,
                scope: Some(t.scope.clone()),
            };
            set.spawn(async move {
                front.engine.install_grant(front.keys[i].clone(), tokens, InstallSource::Application).await
            });
            if set.len() >= 256 {
                if let Some(r) = set.join_next().await {
                    r.map_err(|e| CliError::Config(format!("install task failed: {e}")))??;
                }
            }
        }
        while let Some(r) = set.join_next().await {
            r.map_err(|e| CliError::Config(format!("install task failed: {e}")))??;
        }
        let loads = traffic(Arc::clone(&front), world).await;
        faults_off(world, &sim);
        // Settle: ask for every customer until the engine answers a token or "log in again".
        let mut logged_out = vec![false; world.customers.len()];
        let mut set = tokio::task::JoinSet::new();
        for i in 0..world.customers.len() {
            let front = Arc::clone(&front);
            set.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match front.engine.access_token_for(&front.keys[i]).await {
                        Ok(_) => return (i, false),
                        Err(Error::NeedsReauth { .. }) => return (i, true),
                        Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                        Err(_) => return (i, true),
                    }
                }
            });
            if set.len() >= 512 {
                if let Some(Ok((i, out))) = set.join_next().await {
                    logged_out[i] = out;
                }
            }
        }
        while let Some(r) = set.join_next().await {
            if let Ok((i, out)) = r {
                logged_out[i] = out;
            }
        }
        let r = report(world, &sim, loads, &logged_out);
        sim.shutdown().await;
        Ok(r)
    })
}

#[derive(Serialize)]
struct ScenarioJson<'a> {
    scenario: &'static str,
    seed: u64,
    customers: usize,
    shops: u32,
    storefront_instances: u32,
    duration_ms: u64,
    access_ttl_ms: u64,
    fault_rate: f64,
    tokenwal: &'a CustomerReport,
    naive: Option<&'a CustomerReport>,
}

fn table(ours: &CustomerReport, theirs: Option<&CustomerReport>) -> String {
    let mut rows: Vec<(&str, String, String)> = Vec::new();
    let mut row = |label: &'static str, f: &dyn Fn(&CustomerReport) -> String| {
        rows.push((label, f(ours), theirs.map_or_else(|| "—".to_owned(), f)));
    };
    row("customers", &|r| r.customers.to_string());
    row("page loads (3 loaders each)", &|r| r.page_loads.to_string());
    row("token requests (sim)", &|r| r.token_requests.to_string());
    row("rotations (sim)", &|r| r.rotations.to_string());
    row("faults injected (sim)", &|r| r.faults.to_string());
    row("overlapping token requests (sim)", &|r| r.overlapping_token_requests.to_string());
    row("  customers with overlaps", &|r| r.customers_with_overlaps.to_string());
    row("customers forced to log in again", &|r| r.forced_to_log_in_again.to_string());
    row("  a rotation lost at the server (unavoidable)", &|r| r.of_which_rotation_lost.to_string());
    row("  NEEDLESSLY (no rotation lost)", &|r| r.needlessly_logged_out.to_string());
    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(8);
    let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(0).max(8);
    let mut out = format!("\n{:<w0$}  {:>w1$}  {:>w2$}\n", "", "tokenwal", if theirs.is_some() { "naive" } else { "" });
    for (l, a, b) in rows {
        out.push_str(&format!("{l:<w0$}  {a:>w1$}  {b:>w2$}\n"));
    }
    out
}

/// `tokenwal demo --scenario customer-accounts`.
pub(crate) fn run(args: DemoArgs) -> Result<(), CliError> {
    let json = args.json;
    let world = World::new(args);
    let rt = super::runtime(4, "demo-customers")?;
    let dir = super::work_dir()?;
    if !json {
        eprintln!(
            "tokenwal demo --scenario customer-accounts: {} customers across {} shops, {} storefront instances, {} per \
             run, access tokens live {}, ~{:.0}% of token requests faulted, seed {}",
            world.customers.len(),
            world.args.customer_shops,
            world.args.storefront_instances,
            world.args.duration,
            world.args.access_ttl,
            world.args.fault_rate * 100.0,
            world.args.seed
        );
        eprintln!("  tokenwal ...");
    }
    let ours = run_tokenwal(&world, &rt, dir.path())?;
    let theirs = if world.args.no_baseline {
        None
    } else {
        if !json {
            eprintln!("  naive per-session-mutex baseline ...");
        }
        Some(run_naive(&world, &rt)?)
    };
    if json {
        let doc = ScenarioJson {
            scenario: "customer-accounts",
            seed: world.args.seed,
            customers: world.customers.len(),
            shops: world.args.customer_shops,
            storefront_instances: world.args.storefront_instances,
            duration_ms: world.duration.as_millis() as u64,
            access_ttl_ms: world.args.access_ttl.as_millis(),
            fault_rate: world.args.fault_rate,
            tokenwal: &ours,
            naive: theirs.as_ref(),
        };
        let s = serde_json::to_string_pretty(&doc).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?;
        println!("{s}");
    } else {
        print!("{}", table(&ours, theirs.as_ref()));
        println!(
            "\nverdict: tokenwal sent {} customer(s) to log in again needlessly{}",
            ours.needlessly_logged_out,
            theirs.map_or(String::new(), |t| format!("; the naive baseline {}", t.needlessly_logged_out))
        );
    }
    if ours.needlessly_logged_out > 0 {
        return Err(CliError::DemoLockout(ours.needlessly_logged_out));
    }
    Ok(())
}
