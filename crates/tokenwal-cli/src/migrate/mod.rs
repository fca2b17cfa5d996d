//! `tokenwal migrate [FILE|-]`: bulk migration of legacy non-expiring offline tokens to expiring
//! pairs, built on [`Engine::migrate`] (each migration is journaled: the legacy token is durable
//! before it is sent, and a shop counts as migrated only once its new pair is durable).
//!
//! * **Input**: JSON lines `{"shop": "...", "access_token": "shpat_..."}` (other keys ignored). Every
//!   line is validated before anything is sent; a bad line is reported with its number and reason,
//!   never its values, and skipped; a shop given twice is refused at its second line.
//! * **Resumable**: the store's state of each shop is read before the engine opens (its recovery
//!   completes interrupted migrations): a shop already holding an expiring pair is skipped
//!   (`already-migrated`); one whose migration was interrupted or ambiguous is completed with its
//!   *durable* legacy token (`resumed`).
//! * **Bounded and polite**: `--concurrency` workers share one rate limiter (`--rate` requests per
//!   second); a 429 pauses *every* worker until its `Retry-After` has passed.
//! * **Canary**: `--canary N|P%` migrates the first N shops (or P% of them, at least one) still to
//!   migrate, in file order, then stops: if any canary shop failed, the run ends there; otherwise it
//!   continues only with `--yes` (or a "y" typed at a terminal prompt). A re-run skips the canary's
//!   shops, so "canary, look, re-run with --yes" loses nothing.
//! * **Failures** never stop other shops, except `invalid_client` (the app's own credentials:
//!   every further request would fail the same way), which stops sending at once.
//! * **Exit codes**: 0 every valid line migrated or already migrated (or stopped after a clean
//!   canary); 65 some input lines were invalid (the rest were migrated); 1 some shops failed
//!   definitively (rejected legacy token → needs re-auth, uninstalled); 75 some shops are still
//!   unresolved or were throttled past the attempt budget (re-run later: they resume);
//!   78 app credentials rejected. The highest-priority code wins in the order 78, 75, 1, 65.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenwal::core::{AttemptKind, GrantKey, GrantState, LegacyToken, Phase, ShopDomain};
use tokenwal::{Engine, MigrateError, MigrateOutcome, StoreLocation};
use tokio::sync::Semaphore;
use tokio::time::Instant as TokioInstant;

use crate::commands::open_store;
use crate::error::{CliError, EXIT_CONFIG, EXIT_DATAERR, EXIT_FAILURE, EXIT_TEMPFAIL};
use crate::settings::Settings;

mod input;

use input::read_input;
pub use input::InputError;

/// How many shops to migrate first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Canary {
    /// This many shops.
    Count(usize),
    /// This percentage of the shops still to migrate (rounded up, at least one).
    Percent(f64),
}

impl std::str::FromStr for Canary {
    type Err = String;

    fn from_str(s: &str) -> Result<Canary, String> {
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| format!("{s:?}: expected N or P%"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("{s:?}: a percentage must be in (0, 100]"));
            }
            return Ok(Canary::Percent(p));
        }
        match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Canary::Count(n)),
            _ => Err(format!("{s:?}: expected a positive count N or a percentage P%")),
        }
    }
}

impl Canary {
    fn size(self, of: usize) -> usize {
        match self {
            Canary::Count(n) => n.min(of),
            Canary::Percent(p) => (((of as f64) * p / 100.0).ceil() as usize).clamp(1, of.max(1)).min(of),
        }
    }
}

/// The options of `tokenwal migrate`.
pub struct Options {
    /// The input file, or `-` for stdin.
    pub file: String,
    /// Workers.
    pub concurrency: usize,
    /// Requests per second across all workers (0: unlimited).
    pub rate: f64,
    /// Migrate a sample first.
    pub canary: Option<Canary>,
    /// Continue past a clean canary without asking.
    pub yes: bool,
    /// Report what would be done; send and write nothing.
    pub dry_run: bool,
    /// Attempts per shop per run for retryable failures (throttled, ambiguous, not sent, busy).
    pub max_attempts: u32,
    /// The longest single wait for a shop's retry (an ambiguous answer's backoff).
    pub max_retry_wait: Duration,
    /// JSON report on stdout.
    pub json: bool,
}

/// Where a shop stood before this run (read from the store before the engine's recovery).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Before {
    NotMigrated,
    Migrated(u64),
    /// An interrupted or ambiguous migration: completed with its durable legacy token.
    Unresolved,
    /// Another acquisition or a refresh is open (the engine answers `Busy` until it ends).
    Busy,
    Uninstalled,
}

fn before(state: Option<&GrantState>) -> Before {
    let Some(s) = state else { return Before::NotMigrated };
    if s.has_live_pair() {
        return Before::Migrated(s.generation.0);
    }
    match (s.open_kind(), &s.phase) {
        (Some(AttemptKind::Migration), _) => Before::Unresolved,
        (Some(_), _) => Before::Busy,
        (None, Phase::Uninstalled { .. }) => Before::Uninstalled,
        _ => Before::NotMigrated,
    }
}

/// What became of one shop.
#[derive(Serialize, Clone)]
pub struct ShopReport {
    /// The shop.
    pub shop: String,
    /// The input line.
    pub line: usize,
    /// `migrated`, `already-migrated`, `resumed`, `failed`, `not-attempted` (after a canary stop
    /// or an `invalid_client`); with `--dry-run`: `would-migrate`, `would-resume`,
    /// `already-migrated`, `would-fail`.
    pub result: &'static str,
    /// The shop's generation afterwards (success only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Why it failed or was not attempted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether a re-run may succeed without changing anything (failures only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// Attempts made in this run.
    pub attempts: u32,
}

/// The final report (`--json` prints it as one document).
#[derive(Serialize)]
pub struct Report {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Valid input lines.
    pub shops: usize,
    /// Migrated by this run.
    pub migrated: usize,
    /// Already holding an expiring pair (nothing sent).
    pub already_migrated: usize,
    /// Interrupted or ambiguous migrations completed by this run.
    pub resumed: usize,
    /// Failed (see `results`).
    pub failed: usize,
    /// Not attempted (canary stop, or stopped by `invalid_client`).
    pub not_attempted: usize,
    /// Canary size, if `--canary` was given.
    pub canary: Option<usize>,
    /// Whether the run stopped after the canary.
    pub stopped_after_canary: bool,
    /// Whether the app's credentials were rejected (the run stopped sending).
    pub app_credentials_rejected: bool,
    /// Invalid input lines.
    pub input_errors: Vec<InputError>,
    /// One entry per valid input line, in input order.
    pub results: Vec<ShopReport>,
    /// Wall time.
    pub elapsed_ms: u64,
}

/// A rate limiter shared by every worker: evenly spaced slots, and a fleet-wide pause after a 429.
struct Limiter {
    interval: Duration,
    state: Mutex<(TokioInstant, TokioInstant)>, // (next free slot, paused until)
}

impl Limiter {
    fn new(rate: f64) -> Limiter {
        let interval = if rate > 0.0 { Duration::from_secs_f64(1.0 / rate) } else { Duration::ZERO };
        let now = TokioInstant::now();
        Limiter { interval, state: Mutex::new((now, now)) }
    }

    /// Waits for this worker's slot (after any pause).
    async fn acquire(&self) {
        loop {
            let (slot, paused_until) = {
                let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = TokioInstant::now();
                let slot = g.0.max(now).max(g.1);
                g.0 = slot + self.interval;
                (slot, g.1)
            };
            tokio::time::sleep_until(slot).await;
            // A pause that began while this worker slept applies to it too.
            let paused = self.state.lock().unwrap_or_else(|e| e.into_inner()).1;
            if paused <= paused_until || paused <= TokioInstant::now() {
                return;
            }
        }
    }

    /// Every worker waits until `d` from now (a 429's `Retry-After`).
    fn pause(&self, d: Duration) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = g.1.max(TokioInstant::now() + d);
    }
}

struct Work {
    line: usize,
    shop: ShopDomain,
    token: LegacyToken,
    before: Before,
}

fn success(w: &Work, attempts: u32, o: MigrateOutcome) -> ShopReport {
    // "resumed" is about runs: a migration an earlier run left interrupted or ambiguous. A lost
    // answer retried within this run (the engine's `Resumed`) is this run's migration.
    let result = match o {
        _ if w.before == Before::Unresolved => "resumed",
        MigrateOutcome::Migrated { .. } | MigrateOutcome::Resumed { .. } => "migrated",
        MigrateOutcome::AlreadyMigrated { .. } => "already-migrated",
    };
    ShopReport {
        shop: w.shop.to_string(),
        line: w.line,
        result,
        generation: Some(o.generation().0),
        reason: None,
        retryable: None,
        attempts,
    }
}

fn failure(w: &Work, attempts: u32, result: &'static str, reason: String, retryable: bool) -> ShopReport {
    ShopReport {
        shop: w.shop.to_string(),
        line: w.line,
        result,
        generation: None,
        reason: Some(reason),
        retryable: Some(retryable),
        attempts,
    }
}

/// Migrates one shop, retrying what is retryable within the attempt budget.
async fn migrate_one(engine: &Engine, w: &Work, limiter: &Limiter, stop: &AtomicBool, o: &Options) -> ShopReport {
    let mut attempts = 0u32;
    let mut last = String::new();
    while attempts < o.max_attempts {
        if stop.load(Ordering::SeqCst) {
            return failure(w, attempts, "not-attempted", "stopped: app credentials rejected".into(), true);
        }
        limiter.acquire().await;
        if stop.load(Ordering::SeqCst) {
            return failure(w, attempts, "not-attempted", "stopped: app credentials rejected".into(), true);
        }
        attempts += 1;
        let err = match engine.migrate(&w.shop, w.token.clone()).await {
            Ok(outcome) => return success(w, attempts, outcome),
            Err(e) => e,
        };
        last = err.to_string();
        let wait = match &err {
            MigrateError::Throttled { retry_after, .. } => {
                limiter.pause(retry_after.unwrap_or(Duration::from_secs(1)));
                Duration::ZERO
            }
            MigrateError::Ambiguous { retry_at, .. } => {
                let now = tokenwal::core::UnixMillis::from_system_time(std::time::SystemTime::now());
                retry_at.since(now).min(o.max_retry_wait)
            }
            MigrateError::AppCredentials { .. } => {
                stop.store(true, Ordering::SeqCst);
                return failure(w, attempts, "failed", last, false);
            }
            e if e.is_retryable() => Duration::from_millis(100u64 << attempts.min(6)).min(o.max_retry_wait),
            _ => return failure(w, attempts, "failed", last, false),
        };
        tracing::info!(shop = %w.shop, attempts, error = %last, "migration will be retried");
        tokio::time::sleep(wait).await;
    }
    failure(w, attempts, "failed", format!("gave up after {attempts} attempts: {last}"), true)
}

/// Runs `works` with `o.concurrency` workers; results in input order.
async fn run_batch(
    engine: &Engine,
    works: Vec<Work>,
    limiter: &Arc<Limiter>,
    stop: &Arc<AtomicBool>,
    o: &Arc<Options>,
    bar: &ProgressBar,
) -> Vec<ShopReport> {
    let sem = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let n = works.len();
    for (i, w) in works.into_iter().enumerate() {
        let permit = Arc::clone(&sem).acquire_owned().await.expect("semaphore never closed");
        let (engine, limiter, stop, o, bar) =
            (engine.clone(), Arc::clone(limiter), Arc::clone(stop), Arc::clone(o), bar.clone());
        tasks.spawn(async move {
            let r = migrate_one(&engine, &w, &limiter, &stop, &o).await;
            drop(permit);
            bar.inc(1);
            if r.result == "failed" {
                bar.suspend(|| eprintln!("{}: {}", r.shop, r.reason.as_deref().unwrap_or("failed")));
            }
            (i, r)
        });
    }
    let mut out: Vec<Option<ShopReport>> = (0..n).map(|_| None).collect();
    while let Some(j) = tasks.join_next().await {
        if let Ok((i, r)) = j {
            out[i] = Some(r);
        }
    }
    out.into_iter().flatten().collect()
}

fn ask_to_continue(rest: usize) -> bool {
    use std::io::{IsTerminal, Write};
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        return false;
    }
    eprint!("canary clean: migrate the remaining {rest} shop(s)? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
}

/// `tokenwal migrate`.
pub async fn migrate(settings: &Settings, o: Options) -> Result<(), CliError> {
    if o.concurrency == 0 || o.concurrency > 256 {
        return Err(CliError::Usage("--concurrency must be between 1 and 256".into()));
    }
    if !(o.rate.is_finite() && o.rate >= 0.0) {
        return Err(CliError::Usage("--rate must be a non-negative number of requests per second".into()));
    }
    if o.max_attempts == 0 {
        return Err(CliError::Usage("--max-attempts must be at least 1".into()));
    }
    let started = Instant::now();
    let (valid, input_errors) = read_input(&o.file)?;
    for e in &input_errors {
        eprintln!("line {}: {}", e.line, e.error);
    }
    // Credentials are checked before the store is touched (a dry run needs none).
    let config = if o.dry_run { None } else { Some(settings.engine_config(false)?) };
    // A dry run against a store that does not exist yet: every shop would be migrated.
    let store = if o.dry_run && !settings.db.exists() { None } else { Some(open_store(settings, !o.dry_run)?.0) };
    let works: Vec<Work> = valid
        .into_iter()
        .map(|(line, shop, token)| {
            let state = store.as_ref().and_then(|s| s.get(&GrantKey::shopify(&shop)).ok().flatten());
            Work { line, before: before(state.as_ref()), shop, token }
        })
        .collect();
    let shops = works.len();
    let mut report = Report {
        dry_run: o.dry_run,
        shops,
        migrated: 0,
        already_migrated: 0,
        resumed: 0,
        failed: 0,
        not_attempted: 0,
        canary: None,
        stopped_after_canary: false,
        app_credentials_rejected: false,
        input_errors,
        results: Vec::new(),
        elapsed_ms: 0,
    };
    let mut results: Vec<ShopReport> = Vec::with_capacity(shops);
    let (done, todo): (Vec<Work>, Vec<Work>) = works.into_iter().partition(|w| matches!(w.before, Before::Migrated(_)));
    for w in &done {
        let Before::Migrated(g) = w.before else { continue };
        results.push(ShopReport {
            shop: w.shop.to_string(),
            line: w.line,
            result: "already-migrated",
            generation: Some(g),
            reason: None,
            retryable: None,
            attempts: 0,
        });
    }
    if o.dry_run {
        for w in &todo {
            let (result, reason) = match w.before {
                Before::Unresolved => ("would-resume", None),
                Before::Uninstalled => ("would-fail", Some("the app is uninstalled from this shop".to_string())),
                Before::Busy => ("would-migrate", Some("another attempt is open; it is resolved first".into())),
                _ => ("would-migrate", None),
            };
            results.push(ShopReport {
                shop: w.shop.to_string(),
                line: w.line,
                result,
                generation: None,
                reason,
                retryable: None,
                attempts: 0,
            });
        }
        drop(store);
        return finish(report, results, started, o.json);
    }
    let mut config = config.expect("credentials checked above");
    config.store = StoreLocation::Open(store.expect("opened above"));
    config.proactive = false;
    let (engine, _) = Engine::open(config).await?;

    let canary = o.canary.map(|c| c.size(todo.len()));
    report.canary = canary;
    let bar = ProgressBar::with_draw_target(Some(todo.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} migrating [{bar:30}] {pos}/{len} shops, {per_sec}, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let o = Arc::new(o);
    let limiter = Arc::new(Limiter::new(o.rate));
    let stop = Arc::new(AtomicBool::new(false));
    let mut todo = todo;
    let rest = match canary {
        Some(k) if k < todo.len() => todo.split_off(k),
        _ => Vec::new(),
    };
    let first = run_batch(&engine, todo, &limiter, &stop, &o, &bar).await;
    let canary_failed =
        first.iter().any(|r| r.result != "migrated" && r.result != "resumed" && r.result != "already-migrated");
    results.extend(first);
    if !rest.is_empty() {
        let go =
            !canary_failed && !stop.load(Ordering::SeqCst) && (o.yes || bar.suspend(|| ask_to_continue(rest.len())));
        if go {
            results.extend(run_batch(&engine, rest, &limiter, &stop, &o, &bar).await);
        } else {
            report.stopped_after_canary = true;
            let why = if canary_failed {
                "not attempted: the canary had failures"
            } else {
                "not attempted: stopped after the canary (re-run with --yes to continue)"
            };
            for w in rest {
                results.push(failure(&w, 0, "not-attempted", why.into(), true));
            }
        }
    }
    bar.finish_and_clear();
    report.app_credentials_rejected = stop.load(Ordering::SeqCst);
    engine.shutdown().await;
    finish(report, results, started, o.json)
}

fn finish(mut report: Report, mut results: Vec<ShopReport>, started: Instant, json: bool) -> Result<(), CliError> {
    results.sort_by_key(|r| r.line);
    for r in &results {
        match r.result {
            "migrated" => report.migrated += 1,
            "already-migrated" => report.already_migrated += 1,
            "resumed" => report.resumed += 1,
            "failed" | "would-fail" => report.failed += 1,
            "not-attempted" => report.not_attempted += 1,
            _ => {}
        }
    }
    report.results = results;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    if json {
        let s =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?;
        println!("{s}");
    } else {
        print_text(&report);
    }
    exit_status(&report)
}

fn print_text(r: &Report) {
    let would = |n: &str| r.results.iter().filter(|x| x.result == n).count();
    if r.dry_run {
        println!("dry run: nothing sent, nothing written");
        println!("shops              {}", r.shops);
        println!("would migrate      {}", would("would-migrate"));
        println!("would resume       {}", would("would-resume"));
        println!("already migrated   {}", r.already_migrated);
        println!("would fail         {}", r.failed);
    } else {
        println!("shops              {}", r.shops);
        println!("migrated           {}", r.migrated);
        println!("already migrated   {}", r.already_migrated);
        println!("resumed            {}", r.resumed);
        println!("failed             {}", r.failed);
        if r.not_attempted > 0 {
            println!("not attempted      {}", r.not_attempted);
        }
    }
    if !r.input_errors.is_empty() {
        println!("invalid lines      {}", r.input_errors.len());
    }
    println!("elapsed            {:.1}s", r.elapsed_ms as f64 / 1000.0);
    let failed: Vec<&ShopReport> =
        r.results.iter().filter(|x| x.result == "failed" || x.result == "would-fail").collect();
    if !failed.is_empty() {
        println!();
        println!("FAILED");
        for f in failed {
            println!("  {} (line {}): {}", f.shop, f.line, f.reason.as_deref().unwrap_or(""));
        }
    }
    if r.stopped_after_canary {
        println!();
        println!("stopped after the canary ({} shop(s)); re-run with --yes to migrate the rest", r.canary.unwrap_or(0));
    }
}

fn exit_status(r: &Report) -> Result<(), CliError> {
    let retryable_failure = r.results.iter().any(|x| x.result == "failed" && x.retryable == Some(true));
    let (code, what) = if r.app_credentials_rejected {
        (EXIT_CONFIG, "app credentials rejected (invalid_client): migration stopped; check TOKENWAL_CLIENT_ID / TOKENWAL_CLIENT_SECRET")
    } else if retryable_failure {
        (EXIT_TEMPFAIL, "some shops are not migrated yet: re-run later, they resume")
    } else if r.failed > 0 {
        (EXIT_FAILURE, "some shops failed (see the report)")
    } else if !r.input_errors.is_empty() {
        (EXIT_DATAERR, "some input lines were invalid (the others were processed)")
    } else {
        return Ok(());
    };
    Err(CliError::Migration { code, summary: what.into() })
}

#[cfg(test)]
mod tests {
    use super::input::parse_line;
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_worker_and_slots_are_spaced() {
        let l = Arc::new(Limiter::new(10.0));
        let t0 = tokio::time::Instant::now();
        l.acquire().await;
        l.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(100), "10 per second");
        // Another worker is already waiting for its slot when the 429 arrives.
        let other = {
            let l = Arc::clone(&l);
            tokio::spawn(async move {
                l.acquire().await;
                tokio::time::Instant::now()
            })
        };
        tokio::task::yield_now().await;
        l.pause(Duration::from_secs(2));
        let resumed = other.await.unwrap();
        assert!(resumed - t0 >= Duration::from_millis(2100), "{:?}", resumed - t0);
        l.acquire().await;
        assert!(t0.elapsed() >= Duration::from_millis(2100));
    }

    #[test]
    fn canary_sizes() {
        assert_eq!("10".parse::<Canary>().unwrap().size(300), 10);
        assert_eq!("10".parse::<Canary>().unwrap().size(4), 4);
        assert_eq!("5%".parse::<Canary>().unwrap().size(300), 15);
        assert_eq!("0.1%".parse::<Canary>().unwrap().size(300), 1);
        assert!("0".parse::<Canary>().is_err() && "0%".parse::<Canary>().is_err() && "x".parse::<Canary>().is_err());
        assert!("101%".parse::<Canary>().is_err());
    }

    #[test]
    fn input_errors_never_quote_the_token() {
        for line in [
            r#"{"shop":"a.myshopify.com","access_token":42424242}"#,
            r#"{"shop":"shpat_SECRET","access_token":"shpat_SECRET"}"#,
            r#"{"shop":"a.myshopify.com","access_token":" shpat_SECRET"}"#,
            r#"{"shop":"a.myshopify.com","access_token":"shpat_SECRET""#,
            r#"["shpat_SECRET"]"#,
        ] {
            let e = parse_line(line).unwrap_err();
            assert!(!e.contains("SECRET") && !e.contains("42424242"), "{e}");
        }
        let (shop, token) = parse_line(r#"{"shop":"a.myshopify.com","access_token":"shpat_x","x":1}"#).unwrap();
        assert_eq!((shop.as_str(), token.expose_secret()), ("a.myshopify.com", "shpat_x"));
    }
}
