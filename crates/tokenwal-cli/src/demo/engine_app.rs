//! tokenwal under test: the real engine on a real sled store (real fsyncs) in a temporary
//! directory, crashed by shutting down the runtime it runs on.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{
    AccessToken, AmbiguityReason, ClientSecret, GrantKey, Phase, Record, RefreshToken, Resolution, ShopDomain, TokenSet,
};
use tokenwal::{Config, Engine, Error, KeyRing, KeySource, RecoveryReport, StoreLocation};
use tokenwal_sim::SimHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::report::{RecoverySum, RunReport, Verdict};
use super::{App, CallResult, Calls, World};
use crate::error::CliError;
use crate::timefmt::now;

/// One incarnation: the engine handle and its app workers.
struct Live {
    engine: Engine,
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

/// tokenwal as the app under test.
pub(crate) struct TokenwalApp<'w> {
    world: &'w World,
    path: PathBuf,
    /// The demo's store key: ephemeral (random, never written anywhere), kept across the simulated
    /// crashes of this run.
    keys: KeyRing,
    shops: Arc<[ShopDomain]>,
    calls: Arc<Calls>,
    reports: Vec<RecoveryReport>,
    incarnation: u64,
    live: Option<Live>,
    started: Instant,
}

impl<'w> TokenwalApp<'w> {
    pub fn new(world: &'w World, path: PathBuf) -> TokenwalApp<'w> {
        TokenwalApp {
            world,
            path,
            keys: KeyRing::ephemeral(),
            shops: world.shops.clone().into(),
            calls: Arc::new(Calls::default()),
            reports: Vec::new(),
            incarnation: 0,
            live: None,
            started: Instant::now(),
        }
    }

    fn config(&self, sim: &SimHandle) -> Result<Config, CliError> {
        let a = &self.world.args;
        let sc = self.world.sim_config();
        let base = url::Url::parse(&sim.base_url()).map_err(|e| CliError::Config(e.to_string()))?;
        let mut c = Config::shopify(
            StoreLocation::Path(self.path.clone()),
            sc.client_id.clone(),
            ClientSecret::new(sc.client_secret.clone()),
        )
        .with_insecure_test_endpoint(base)
        .with_store_keys(KeySource::Ring(self.keys.clone()));
        c.refresh_margin = a.refresh_margin.to_std();
        c.timeouts.total = a.timeout.to_std();
        c.timeouts.connect = a.timeout.to_std().min(Duration::from_secs(1));
        c.policy.backoff.base = Duration::from_millis(100);
        c.policy.backoff.cap = Duration::from_secs(1);
        c.policy.backoff.max_retry_after = Duration::from_secs(2);
        // Spurious invalid_client answers are part of the fault mix; a real one pauses for 60 s.
        c.credentials_pause = Duration::from_millis(300);
        c.max_wait = Duration::from_secs(2);
        c.proactive = true;
        Ok(c)
    }
}

/// Opens the engine; after a crash the previous incarnation's store may take a moment to close.
async fn open(config: Config) -> Result<(Engine, RecoveryReport), CliError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match Engine::open(config.clone()).await {
            Ok(opened) => return Ok(opened),
            Err(Error::Store(_)) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e.into()),
        }
    }
}

fn accepted(sim: &SimHandle, shop: &ShopDomain, token: &AccessToken) -> bool {
    let now = sim.now_ms();
    sim.with_model(|m| m.access_token_valid(shop.as_str(), token.expose_secret(), now))
}

async fn worker(
    engine: Engine,
    shops: Arc<[ShopDomain]>,
    sim: Arc<SimHandle>,
    calls: Arc<Calls>,
    mut rng: StdRng,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let shop = &shops[rng.gen_range(0..shops.len())];
        let asked = Instant::now();
        let result = engine.access_token(shop).await;
        let took = asked.elapsed();
        match result {
            Ok(t) if accepted(&sim, shop, &t) => calls.record(took, CallResult::Working),
            Ok(t) => {
                calls.record(took, CallResult::Rejected);
                // What an app does on a 401 from the Admin API.
                let _ = engine.on_unauthorized(shop, &t).await;
            }
            Err(_) => calls.record(took, CallResult::NoToken),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// What tokenwal says about a shop it cannot serve (without the shop's name, for grouping).
fn app_says(engine: &Engine, shop: &ShopDomain, result: &Result<AccessToken, Error>) -> String {
    let state = engine.state(&GrantKey::shopify(shop)).ok().flatten();
    match (state.map(|s| s.phase), result) {
        (Some(Phase::NeedsReauth { reason, .. }), _) => format!("tokenwal marked it needs-reauth: {reason}"),
        (Some(p), Ok(_)) => format!("{}, but its token was rejected", p.name()),
        (Some(p), Err(e)) => {
            let what = match e {
                Error::Ambiguous { reason, .. } => format!("refresh outcome unknown ({reason})"),
                Error::Unavailable { .. } => "token endpoint unavailable".into(),
                Error::AppCredentialsRejected { .. } => "app credentials rejected".into(),
                other => format!("{other:?}").split_whitespace().next().unwrap_or("error").to_owned(),
            };
            format!("{}: {what}", p.name())
        }
        (None, _) => "not in the store".into(),
    }
}

impl App for TokenwalApp<'_> {
    fn name(&self) -> &'static str {
        "tokenwal"
    }

    fn setup(&mut self, rt: &tokio::runtime::Runtime, sim: &Arc<SimHandle>) -> Result<(), CliError> {
        self.started = Instant::now();
        let config = self.config(sim)?;
        let world = self.world;
        rt.block_on(async {
            let (engine, _) = open(config).await?;
            let mut installs = tokio::task::JoinSet::new();
            for (i, shop) in world.shops.iter().enumerate() {
                let t = sim.seed_shop(shop.as_str());
                let now = now();
                let life = Duration::from_secs(t.expires_in).mul_f64(world.initial_life[i]);
                let tokens = TokenSet {
                    access_token: AccessToken::new(t.access_token.as_str()),
                    access_expires_at: now.saturating_add(life),
                    refresh_token: RefreshToken::new(t.refresh_token.as_str()),
                    refresh_expires_at: Some(now.saturating_add(Duration::from_secs(t.refresh_token_expires_in))),
                    scope: Some(t.scope.clone()),
                };
                let (engine, shop) = (engine.clone(), shop.clone());
                installs.spawn(async move { engine.install(&shop, tokens).await });
            }
            while let Some(r) = installs.join_next().await {
                r.map_err(|e| CliError::Config(format!("install task failed: {e}")))??;
            }
            engine.shutdown().await;
            Ok::<_, CliError>(())
        })
    }

    fn start(&mut self, rt: &tokio::runtime::Runtime, sim: &Arc<SimHandle>) -> Result<(), CliError> {
        let config = self.config(sim)?;
        let (engine, report) = rt.block_on(open(config))?;
        if self.incarnation > 0 {
            self.reports.push(report);
        }
        self.incarnation += 1;
        let (stop, stop_rx) = watch::channel(false);
        let workers = (0..self.world.args.workers)
            .map(|w| {
                let rng = StdRng::seed_from_u64(self.world.args.seed ^ (self.incarnation << 32) ^ u64::from(w));
                rt.spawn(worker(
                    engine.clone(),
                    Arc::clone(&self.shops),
                    Arc::clone(sim),
                    Arc::clone(&self.calls),
                    rng,
                    stop_rx.clone(),
                ))
            })
            .collect();
        self.live = Some(Live { engine, stop, workers });
        Ok(())
    }

    fn crashed(&mut self) {
        // The runtime is gone; the handle is the last thing holding the store open.
        self.live = None;
    }

    fn finish(&mut self, rt: &tokio::runtime::Runtime, sim: &Arc<SimHandle>) -> Result<RunReport, CliError> {
        let Live { engine, stop, workers } = self.live.take().ok_or_else(|| CliError::Config("not running".into()))?;
        let _ = stop.send(true);
        let shops = Arc::clone(&self.shops);
        let (verdicts, journal) = rt.block_on(async {
            for w in workers {
                let _ = w.await;
            }
            // Settle: drive everything due (and every ambiguity) until nothing is open.
            for round in 0..40 {
                let _ = engine.refresh_due().await;
                let mut open = 0;
                let _ = engine.store().for_each_grant(|s| open += usize::from(s.phase.is_open()));
                if open == 0 && round > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let mut verdicts = Vec::with_capacity(shops.len());
            for shop in shops.iter() {
                let result = engine.access_token(shop).await;
                let working = result.as_ref().is_ok_and(|t| accepted(sim, shop, t));
                let says = app_says(&engine, shop, &result);
                verdicts.push((shop.to_string(), Verdict::of(working, sim.grant_alive(shop.as_str()), says)));
            }
            let journal = JournalCounts::of(&engine, &shops);
            engine.shutdown().await;
            (verdicts, journal)
        });
        drop(engine);
        let mut r = RunReport { app: "tokenwal", ..RunReport::default() };
        r.judge(&verdicts);
        r.ambiguous = journal.ambiguities;
        r.resolved_by_retry = journal.resolved_by_retry;
        r.interrupted_by_crash = Some(journal.interrupted);
        r.recovery = Some(RecoverySum {
            reports: self.reports.len(),
            open: self.reports.iter().map(|r| r.open).sum(),
            interrupted: self.reports.iter().map(|r| r.interrupted).sum(),
            resolved: self.reports.iter().map(|r| r.resolved).sum(),
            still_ambiguous: self.reports.iter().map(|r| r.still_ambiguous).sum(),
            needs_reauth: self.reports.iter().map(|r| r.needs_reauth).sum(),
            corrupt: self.reports.iter().map(|r| r.corrupt.len()).sum(),
            max_elapsed_ms: self.reports.iter().map(|r| r.elapsed.as_millis() as u64).max().unwrap_or(0),
        });
        self.calls.fill(&mut r);
        r.elapsed_ms = self.started.elapsed().as_millis() as u64;
        Ok(r)
    }

    fn progress(&self) -> String {
        self.calls.line()
    }
}

/// Counted from the durable journal: the record of what really happened, crashes included.
#[derive(Default)]
struct JournalCounts {
    /// Distinct ambiguous rotations: every one that ended has a `Resolved` record; the rest are
    /// still open.
    ambiguities: u64,
    resolved_by_retry: u64,
    /// Intents found without outcome by recovery (attempts cut by a crash).
    interrupted: u64,
}

impl JournalCounts {
    fn of(engine: &Engine, shops: &[ShopDomain]) -> JournalCounts {
        let mut c = JournalCounts::default();
        for shop in shops {
            let grant = GrantKey::shopify(shop);
            if let Ok(history) = engine.store().history(&grant) {
                for (_, r) in history {
                    match r {
                        Record::Resolved { how, .. } => {
                            c.ambiguities += 1;
                            c.resolved_by_retry += u64::from(matches!(how, Resolution::Succeeded { .. }));
                        }
                        Record::Ambiguous { why: AmbiguityReason::Interrupted, .. } => c.interrupted += 1,
                        _ => {}
                    }
                }
            }
            if let Ok(Some(s)) = engine.state(&grant) {
                c.ambiguities += u64::from(s.phase.is_open());
            }
        }
        c
    }
}
