//! The naive baseline, modelled on the official libraries (shared/docs/shopify-token-protocol.md
//! §5), on the same faults and crash times as tokenwal:
//!
//! * **no journal, no lock**: app workers and a background sweeper each refresh a due shop on
//!   their own (last writer wins);
//! * **refresh when due** (access expiry minus the same margin tokenwal uses); a success without
//!   `expires_in` stores "no expiry" and the shop is never refreshed again (shopify-app-js #3400);
//!   the refresh token is kept only if `refresh_token_expires_in` came with it (`createSession`);
//! * **use at once, save lazily**: the new pair is used immediately and written to the app's
//!   database by a flush every second (the libraries return the session; the app calls
//!   `storeSession` in its own time). A crash loses the pairs not yet flushed;
//! * **5xx and timeouts** (and resets) are retried twice at once with the same refresh token
//!   (shopify-app-php), then given up until the next time the shop is due; an unparseable 200 or a
//!   429 is given up at once;
//! * **401 `invalid_request`, 400 `invalid_grant` and `invalid_client`** mean "the shop must
//!   re-auth": the app stops serving it;
//! * on a failed refresh the old session is used anyway (shopify-app-express logs and swallows).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokenwal_sim::SimHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::report::{RunReport, Verdict};
use super::{App, CallResult, Calls, World};
use crate::error::CliError;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    crate::timefmt::now().0
}

/// A stored session, as the libraries keep it.
#[derive(Clone, PartialEq, Eq)]
struct Session {
    access: String,
    /// `None`: the response had no `expires_in`, so "it never expires".
    expires: Option<u64>,
    refresh: Option<String>,
    /// Set when the app decided the shop must re-auth.
    dead: Option<String>,
}

impl Session {
    fn due(&self, now: u64, margin: u64) -> bool {
        self.dead.is_none() && self.expires.is_some_and(|e| now.saturating_add(margin) >= e)
    }
}

/// The process: its memory (lost in a crash) and its HTTP client.
struct Process {
    memory: Mutex<HashMap<usize, Session>>,
    dirty: Mutex<HashSet<usize>>,
    http: reqwest::Client,
    base: String,
    client_id: String,
    client_secret: String,
    margin: u64,
}

/// Measurements that outlive crashes (not app state).
#[derive(Default)]
struct Meter {
    /// (shop, refresh token) pairs whose refresh had an unknown outcome, not yet resolved.
    open_ambiguities: Mutex<HashSet<(usize, String)>>,
    ambiguous: AtomicU64,
    resolved: AtomicU64,
    lost_in_crashes: AtomicU64,
}

enum Failure {
    /// Given up for now.
    Later,
    /// The app decided the shop must re-auth.
    Dead,
}

impl Process {
    fn url(&self, shop: &str) -> String {
        format!("{}/shops/{shop}/admin/oauth/access_token", self.base)
    }

    /// One refresh, the way the libraries do it.
    async fn refresh(&self, i: usize, shop: &str, snapshot: &Session, meter: &Meter) -> Result<Session, Failure> {
        let Some(rt) = snapshot.refresh.clone() else { return Err(Failure::Later) };
        let body = serde_json::json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "grant_type": "refresh_token",
            "refresh_token": rt,
        });
        let ambiguous = |meter: &Meter| {
            if lock(&meter.open_ambiguities).insert((i, rt.clone())) {
                meter.ambiguous.fetch_add(1, Ordering::Relaxed);
            }
        };
        for _try in 0..3 {
            let resp = match self.http.post(self.url(shop)).json(&body).send().await {
                Ok(r) => r,
                Err(_) => {
                    // Timeout or connection lost: retried at once (and counted unknown).
                    ambiguous(meter);
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let Ok(bytes) = resp.bytes().await else {
                ambiguous(meter);
                continue;
            };
            match status {
                200 => {
                    let Some(new) = parse_session(&bytes, now_ms()) else {
                        // `res.json()` throws: the request fails, no retry.
                        ambiguous(meter);
                        return Err(Failure::Later);
                    };
                    if lock(&meter.open_ambiguities).remove(&(i, rt.clone())) {
                        meter.resolved.fetch_add(1, Ordering::Relaxed);
                    }
                    // Used at once; saved by the next flush. Last writer wins.
                    lock(&self.memory).insert(i, new.clone());
                    lock(&self.dirty).insert(i);
                    return Ok(new);
                }
                500..=599 => {
                    ambiguous(meter);
                    continue;
                }
                429 => return Err(Failure::Later),
                _ => {
                    let error = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned));
                    let terminal = matches!(
                        (status, error.as_deref()),
                        (401, Some("invalid_request")) | (400, Some("invalid_grant")) | (_, Some("invalid_client"))
                    );
                    if terminal {
                        let why = format!("naive gave up on it: {status} {}", error.unwrap_or_default());
                        if let Some(s) = lock(&self.memory).get_mut(&i) {
                            s.dead = Some(why);
                        }
                        lock(&self.dirty).insert(i);
                        return Err(Failure::Dead);
                    }
                    return Err(Failure::Later);
                }
            }
        }
        Err(Failure::Later)
    }

    /// What an app request for the shop gets: a token, or nothing (the app stopped serving it).
    async fn access_token(&self, i: usize, shop: &str, meter: &Meter) -> Option<String> {
        let s = lock(&self.memory).get(&i).cloned()?;
        if s.dead.is_some() {
            return None;
        }
        if s.due(now_ms(), self.margin) {
            match self.refresh(i, shop, &s, meter).await {
                Ok(new) => return Some(new.access),
                Err(Failure::Dead) => return None,
                Err(Failure::Later) => {}
            }
        }
        // Use whatever is stored (another worker may have refreshed meanwhile).
        lock(&self.memory).get(&i).filter(|s| s.dead.is_none()).map(|s| s.access.clone())
    }
}

/// `createSession` of shopify-app-js: `expires` only with `expires_in`; the refresh token only
/// with `refresh_token_expires_in`.
fn parse_session(body: &[u8], now: u64) -> Option<Session> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let access = v.get("access_token")?.as_str()?.to_owned();
    let expires = v.get("expires_in").and_then(Value::as_u64).map(|s| now + s * 1000);
    let refresh = match (v.get("refresh_token").and_then(Value::as_str), v.get("refresh_token_expires_in")) {
        (Some(r), Some(x)) if x.is_u64() => Some(r.to_owned()),
        _ => None,
    };
    Some(Session { access, expires, refresh, dead: None })
}

/// One incarnation.
struct Live {
    process: Arc<Process>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// The naive refresher as the app under test.
pub(crate) struct NaiveApp<'w> {
    world: &'w World,
    /// The app's database: survives crashes.
    db: Arc<Mutex<HashMap<usize, Session>>>,
    meter: Arc<Meter>,
    calls: Arc<Calls>,
    incarnation: u64,
    live: Option<Live>,
    started: Instant,
}

impl<'w> NaiveApp<'w> {
    pub fn new(world: &'w World) -> NaiveApp<'w> {
        NaiveApp {
            world,
            db: Arc::default(),
            meter: Arc::default(),
            calls: Arc::default(),
            incarnation: 0,
            live: None,
            started: Instant::now(),
        }
    }
}

fn accepted(sim: &SimHandle, shop: &str, token: &str) -> bool {
    let now = sim.now_ms();
    sim.with_model(|m| m.access_token_valid(shop, token, now))
}

fn flush(process: &Process, db: &Mutex<HashMap<usize, Session>>) {
    let dirty: Vec<usize> = lock(&process.dirty).drain().collect();
    let memory = lock(&process.memory);
    let mut db = lock(db);
    for i in dirty {
        if let Some(s) = memory.get(&i) {
            db.insert(i, s.clone());
        }
    }
}

impl App for NaiveApp<'_> {
    fn name(&self) -> &'static str {
        "naive"
    }

    fn setup(&mut self, _rt: &tokio::runtime::Runtime, sim: &Arc<SimHandle>) -> Result<(), CliError> {
        self.started = Instant::now();
        let mut db = lock(&self.db);
        for (i, shop) in self.world.shops.iter().enumerate() {
            let t = sim.seed_shop(shop.as_str());
            let life = Duration::from_secs(t.expires_in).mul_f64(self.world.initial_life[i]);
            db.insert(
                i,
                Session {
                    access: t.access_token.as_str().to_owned(),
                    expires: Some(now_ms() + life.as_millis() as u64),
                    refresh: Some(t.refresh_token.as_str().to_owned()),
                    dead: None,
                },
            );
        }
        Ok(())
    }

    fn start(&mut self, rt: &tokio::runtime::Runtime, sim: &Arc<SimHandle>) -> Result<(), CliError> {
        let a = &self.world.args;
        let sc = self.world.sim_config();
        let http = {
            let _guard = rt.enter();
            reqwest::Client::builder()
                // Loopback only: never through a proxy from the environment.
                .no_proxy()
                .connect_timeout(a.timeout.to_std().min(Duration::from_secs(1)))
                .timeout(a.timeout.to_std())
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| CliError::Config(format!("cannot build an HTTP client: {e}")))?
        };
        let process = Arc::new(Process {
            memory: Mutex::new(lock(&self.db).clone()),
            dirty: Mutex::default(),
            http,
            base: sim.base_url(),
            client_id: sc.client_id.clone(),
            client_secret: sc.client_secret.clone(),
            margin: a.refresh_margin.as_millis(),
        });
        self.incarnation += 1;
        let (stop, stop_rx) = watch::channel(false);
        let n = self.world.n();
        let names: Arc<[String]> = self.world.shops.iter().map(|s| s.to_string()).collect();
        let mut tasks = Vec::new();
        // The lazy save.
        {
            let (process, db, mut stop) = (Arc::clone(&process), Arc::clone(&self.db), stop_rx.clone());
            tasks.push(rt.spawn(async move {
                while !*stop.borrow() {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => flush(&process, &db),
                        _ = stop.changed() => {}
                    }
                }
            }));
        }
        // A background job refreshing due shops (like `ensureValidOfflineSession` in a cron), 16 at
        // a time, with no lock against the app workers.
        {
            let (process, meter, names, mut stop) =
                (Arc::clone(&process), Arc::clone(&self.meter), Arc::clone(&names), stop_rx.clone());
            tasks.push(rt.spawn(async move {
                while !*stop.borrow() {
                    let due: Vec<(usize, Session)> = {
                        let now = now_ms();
                        let memory = lock(&process.memory);
                        (0..n)
                            .filter_map(|i| {
                                memory.get(&i).filter(|s| s.due(now, process.margin)).map(|s| (i, s.clone()))
                            })
                            .collect()
                    };
                    let sem = Arc::new(tokio::sync::Semaphore::new(16));
                    let mut jobs = tokio::task::JoinSet::new();
                    for (i, s) in due {
                        let (process, meter, names, sem) =
                            (Arc::clone(&process), Arc::clone(&meter), Arc::clone(&names), Arc::clone(&sem));
                        jobs.spawn(async move {
                            let _permit = sem.acquire().await;
                            let _ = process.refresh(i, &names[i], &s, &meter).await;
                        });
                    }
                    while jobs.join_next().await.is_some() {}
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }));
        }
        for w in 0..a.workers {
            let (process, meter, names, calls, sim, mut stop) = (
                Arc::clone(&process),
                Arc::clone(&self.meter),
                Arc::clone(&names),
                Arc::clone(&self.calls),
                Arc::clone(sim),
                stop_rx.clone(),
            );
            let mut rng = StdRng::seed_from_u64(a.seed ^ (self.incarnation << 32) ^ u64::from(w));
            tasks.push(rt.spawn(async move {
                while !*stop.borrow() {
                    let i = rng.gen_range(0..n);
                    let asked = Instant::now();
                    let token = process.access_token(i, &names[i], &meter).await;
                    let took = asked.elapsed();
                    match token {
                        Some(t) if accepted(&sim, &names[i], &t) => calls.record(took, CallResult::Working),
                        Some(_) => calls.record(took, CallResult::Rejected),
                        None => calls.record(took, CallResult::NoToken),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }));
        }
        self.live = Some(Live { process, stop, tasks });
        Ok(())
    }

    fn crashed(&mut self) {
        if let Some(live) = self.live.take() {
            // Whatever the process held in memory and had not flushed is gone.
            let memory = lock(&live.process.memory);
            let db = lock(&self.db);
            let lost = memory.iter().filter(|(i, s)| db.get(i).map(|d| &d.refresh) != Some(&s.refresh)).count();
            self.meter.lost_in_crashes.fetch_add(lost as u64, Ordering::Relaxed);
        }
    }

    fn finish(&mut self, rt: &tokio::runtime::Runtime, sim: &Arc<SimHandle>) -> Result<RunReport, CliError> {
        let Live { process, stop, tasks } = self.live.take().ok_or_else(|| CliError::Config("not running".into()))?;
        let _ = stop.send(true);
        let world = self.world;
        let meter = Arc::clone(&self.meter);
        let verdicts = rt.block_on(async {
            for t in tasks {
                let _ = t.await;
            }
            // Settle: give every due shop its refreshes, the naive way, until nothing is due.
            for _round in 0..12 {
                let now = now_ms();
                let due: Vec<usize> = {
                    let memory = lock(&process.memory);
                    (0..world.n()).filter(|i| memory.get(i).is_some_and(|s| s.due(now, process.margin))).collect()
                };
                if due.is_empty() {
                    break;
                }
                let mut jobs = tokio::task::JoinSet::new();
                for i in due {
                    let (process, meter) = (Arc::clone(&process), Arc::clone(&meter));
                    let shop = world.shops[i].to_string();
                    jobs.spawn(async move {
                        let _ = process.access_token(i, &shop, &meter).await;
                    });
                }
                while jobs.join_next().await.is_some() {}
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let mut verdicts = Vec::with_capacity(world.n());
            for (i, shop) in world.shops.iter().enumerate() {
                let token = process.access_token(i, shop.as_str(), &meter).await;
                let working = token.as_deref().is_some_and(|t| accepted(sim, shop.as_str(), t));
                let session = lock(&process.memory).get(&i).cloned();
                let says = match session {
                    None => "no session".to_owned(),
                    Some(Session { dead: Some(why), .. }) => why,
                    Some(Session { expires: None, .. }) => {
                        "stored \"no expiry\" after a response without expires_in: never refreshed (#3400)".to_owned()
                    }
                    Some(Session { refresh: Some(rt), .. }) => {
                        let now = sim.now_ms();
                        let client = world.sim_config().client_id;
                        if sim.with_model(|m| m.refresh_token_accepted(&client, shop.as_str(), &rt, now)) {
                            "refresh token valid, but refreshing kept failing".to_owned()
                        } else {
                            "its stored refresh token is retired: a newer pair was lost".to_owned()
                        }
                    }
                    Some(Session { refresh: None, .. }) => "no refresh token stored".to_owned(),
                };
                verdicts.push((shop.to_string(), Verdict::of(working, sim.grant_alive(shop.as_str()), says)));
            }
            flush(&process, &self.db);
            verdicts
        });
        let mut r = RunReport { app: "naive", ..RunReport::default() };
        r.judge(&verdicts);
        r.ambiguous = self.meter.ambiguous.load(Ordering::Relaxed);
        r.resolved_by_retry = self.meter.resolved.load(Ordering::Relaxed);
        r.pairs_lost_in_crashes = Some(self.meter.lost_in_crashes.load(Ordering::Relaxed));
        self.calls.fill(&mut r);
        r.elapsed_ms = self.started.elapsed().as_millis() as u64;
        Ok(r)
    }

    fn progress(&self) -> String {
        self.calls.line()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_session_like_create_session() {
        let full =
            br#"{"access_token":"a","expires_in":4,"refresh_token":"r","refresh_token_expires_in":9,"scope":"x"}"#;
        let s = parse_session(full, 1000).unwrap();
        assert_eq!((s.expires, s.refresh.as_deref()), (Some(5000), Some("r")));
        let no_expiry = br#"{"access_token":"a","refresh_token":"r","refresh_token_expires_in":9}"#;
        let s = parse_session(no_expiry, 1000).unwrap();
        assert_eq!(s.expires, None, "#3400: no expiry, never refreshed");
        assert!(!s.due(u64::MAX - 10, 5));
        let no_rt_expiry = br#"{"access_token":"a","expires_in":4,"refresh_token":"r"}"#;
        assert_eq!(parse_session(no_rt_expiry, 0).unwrap().refresh, None);
        assert!(parse_session(b"<html>", 0).is_none());
        assert!(parse_session(br#"{"access_token":"a","expi"#, 0).is_none());
    }
}
