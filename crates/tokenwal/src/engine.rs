//! The engine: a cheap cloneable handle over the store, the state machine and the transport.

use crate::cache::{Slot, Slots};
use crate::config::{Config, Endpoint, StoreLocation};
use crate::error::Error;
use crate::failpoint;
use crate::scheduler::{self, SchedulerHandle};
use crate::transport::Transport;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal_core::{
    recovery, AccessToken, AttemptRequest, ClientSecret, Durable, Event, Generation, GrantKey, GrantState,
    InstallSource, Intention, Machine, Outcome, Pending, Phase, Record, Refusal, ShopDomain, Step, TokenSet,
    Transition, UnixMillis,
};
use tokenwal_store::{Store, StoreConfig, StoreError};
use tokio::sync::{broadcast, watch, Semaphore};
use tracing::{debug, info, warn};

/// The current time by the system clock.
pub(crate) fn now() -> UnixMillis {
    UnixMillis::from_system_time(std::time::SystemTime::now())
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) machine: Machine,
    transport: Transport,
    pub(crate) client_id: String,
    pub(crate) client_secret: ClientSecret,
    pub(crate) is_shopify: bool,
    pub(crate) provider: String,
    pub(crate) slots: Slots,
    events: broadcast::Sender<Event>,
    /// Refreshing is paused fleet-wide until this instant (ms) after an `invalid_client`.
    paused_until: AtomicU64,
    credentials_pause: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) permits: Semaphore,
    pub(crate) shutdown: watch::Sender<bool>,
    scheduler: SchedulerHandle,
}

/// Sends the shutdown signal when the last [`Engine`] handle is dropped.
struct DropGuard(Arc<Inner>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        let _ = self.0.shutdown.send_replace(true);
    }
}

/// The tokenwal engine. Clone it freely: every clone is a handle to the same engine. When the last
/// handle is dropped, background work stops (an attempt cut short stays journaled as an intent and is
/// resolved by recovery at the next start).
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

/// What recovery found and did at [`Engine::open`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Grants in the store.
    pub grants: usize,
    /// Grants found with an open attempt (an intent without outcome, or an ambiguity).
    pub open: usize,
    /// Of those, intents without outcome (the process had stopped mid-attempt).
    pub interrupted: usize,
    /// Ambiguities resolved by retrying the old credential during open.
    pub resolved: usize,
    /// Ambiguities still unresolved after open (the scheduler keeps retrying).
    pub still_ambiguous: usize,
    /// Grants marked needs-reauth (rejected on retry, or retry window elapsed).
    pub needs_reauth: usize,
    /// Grants whose state is corrupt (quarantined: never served, never guessed).
    pub corrupt: Vec<String>,
    /// How long open took.
    pub elapsed: Duration,
}

/// The result of one attempt.
pub(crate) type Settled = Durable<Option<TokenSet>>;

impl Engine {
    /// Opens the store, **runs recovery before serving** (retries every ambiguous rotation with its
    /// old credential; marks truly dead grants needs-reauth), starts the proactive scheduler, and
    /// returns the engine with a report of what recovery found and did.
    pub async fn open(config: Config) -> Result<(Engine, RecoveryReport), Error> {
        let started = Instant::now();
        config.endpoint.validate().map_err(Error::Config)?;
        if config.max_concurrent_refreshes == 0 {
            return Err(Error::Config("max_concurrent_refreshes must be at least 1".into()));
        }
        let (store, corrupt) = match &config.store {
            StoreLocation::InMemory => (Store::in_memory(), Vec::new()),
            StoreLocation::Open(store) => (store.clone(), Vec::new()),
            StoreLocation::Path(p) => {
                let p = p.clone();
                let keys = config.store_keys.load().map_err(StoreError::Key)?;
                let (store, report) =
                    tokio::task::spawn_blocking(move || Store::open(p, &keys, StoreConfig::default()))
                        .await
                        .map_err(|e| Error::Config(format!("store open task failed: {e}")))??;
                (store, report.corrupt)
            }
        };
        if let Some(w) = &config.webhook {
            w.validate().map_err(Error::Config)?;
            // Before recovery: the events recovery journals are delivered too.
            let (s, n) = (store.clone(), w.cursor.clone());
            tokio::task::spawn_blocking(move || crate::webhook_sink::init_cursor(&s, &n))
                .await
                .map_err(|e| Error::Config(format!("webhook cursor task failed: {e}")))??;
        }
        let transport = Transport::new(
            config.endpoint.clone(),
            config.client_id.clone(),
            config.client_secret.clone(),
            config.timeouts,
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let machine = Machine {
            policy: config.policy,
            refresh_margin: config.refresh_margin,
            refresh_token_margin: config.refresh_token_margin,
            fingerprints: store.fingerprint_key(),
        };
        let (events, _) = broadcast::channel(4096);
        let (shutdown, _) = watch::channel(false);
        let (scheduler, scheduler_rx) = scheduler::channel();
        let inner = Arc::new(Inner {
            store,
            machine,
            transport,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            is_shopify: matches!(config.endpoint, Endpoint::Shopify | Endpoint::ShopifyTestServer { .. }),
            provider: config.endpoint.provider().to_owned(),
            slots: Slots::new(),
            events,
            paused_until: AtomicU64::new(0),
            credentials_pause: config.credentials_pause,
            max_wait: config.max_wait,
            permits: Semaphore::new(config.max_concurrent_refreshes),
            shutdown,
            scheduler,
        });
        let engine = Engine { _guard: Arc::new(DropGuard(Arc::clone(&inner))), inner };
        if let Some(w) = config.webhook.clone() {
            let (store, events, stop) =
                (engine.inner.store.clone(), engine.inner.events.subscribe(), engine.inner.shutdown.subscribe());
            tokio::spawn(crate::webhook_sink::run(w, store, events, stop));
        }
        let mut report = engine.recover().await?;
        report.corrupt = corrupt;
        report.grants = engine.inner.store.grant_count();
        if config.proactive {
            scheduler::spawn(Arc::clone(&engine.inner), scheduler_rx);
        }
        report.elapsed = started.elapsed();
        info!(
            grants = report.grants,
            open = report.open,
            interrupted = report.interrupted,
            resolved = report.resolved,
            still_ambiguous = report.still_ambiguous,
            needs_reauth = report.needs_reauth,
            corrupt = report.corrupt.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "recovery finished"
        );
        Ok((engine, report))
    }

    /// Recovery: turn interrupted intents into ambiguities, give up on those past their window, and
    /// retry the rest with their old credential.
    async fn recover(&self) -> Result<RecoveryReport, Error> {
        let store = self.inner.store.clone();
        let open = tokio::task::spawn_blocking(move || store.open_grants())
            .await
            .map_err(|e| Error::Config(format!("recovery task failed: {e}")))??;
        let plan = recovery::plan(&self.inner.machine, &open, now(), rand::random());
        let (interrupted, _, _) = plan.summary();
        let mut report = RecoveryReport { open: open.len(), interrupted, ..RecoveryReport::default() };
        let mut to_resolve = Vec::new();
        for item in plan.items {
            if let Some(t) = item.transition {
                self.inner.commit_transition(t).await?;
                failpoint::hit("during-recovery");
            }
            match item.intention {
                Intention::Resolve { .. } => to_resolve.push(item.grant),
                Intention::NeedsReauth(_) => report.needs_reauth += 1,
                Intention::Nothing => {}
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for grant in to_resolve {
            let inner = Arc::clone(&self.inner);
            tasks.spawn(async move {
                let _permit = inner.permits.acquire().await;
                inner.drive(&grant, true).await;
                inner.store.get(&grant).ok().flatten().map(|s| s.phase)
            });
        }
        while let Some(r) = tasks.join_next().await {
            match r.ok().flatten() {
                Some(Phase::Healthy) => report.resolved += 1,
                Some(Phase::NeedsReauth { .. }) => report.needs_reauth += 1,
                Some(_) => report.still_ambiguous += 1,
                None => {}
            }
        }
        Ok(report)
    }

    pub(crate) fn grant_of(&self, shop: &ShopDomain) -> GrantKey {
        GrantKey::shopify(shop)
    }

    /// A currently valid access token for `shop`, refreshing first if it is within the refresh margin.
    ///
    /// A valid cached token is returned without I/O. Concurrent callers for one shop share one
    /// refresh; callers for other shops are never blocked by it. If a refresh fails transiently while
    /// the current token is still valid, the current token is returned.
    pub async fn access_token(&self, shop: &ShopDomain) -> Result<AccessToken, Error> {
        if let Some(t) = self.inner.slots.fresh(shop.as_str(), now()) {
            return Ok(t);
        }
        self.inner.slow_token(&self.grant_of(shop), None).await
    }

    /// [`Engine::access_token`] for any provider's grant.
    pub async fn access_token_for(&self, grant: &GrantKey) -> Result<AccessToken, Error> {
        self.check_provider(grant)?;
        if let Some(t) = self.inner.slots.fresh(grant.account(), now()) {
            return Ok(t);
        }
        self.inner.slow_token(grant, None).await
    }

    /// An Admin API call answered 401 with `rejected`: refresh once if it is still the current
    /// token, otherwise return the newer one.
    pub async fn on_unauthorized(&self, shop: &ShopDomain, rejected: &AccessToken) -> Result<AccessToken, Error> {
        self.inner.slow_token(&self.grant_of(shop), Some(rejected)).await
    }

    /// Registers tokens acquired elsewhere (OAuth install, the app front end's token exchange). The
    /// tokens become a new generation: an older in-flight result can never overwrite them.
    pub async fn install(&self, shop: &ShopDomain, tokens: TokenSet) -> Result<Generation, Error> {
        self.install_grant(self.grant_of(shop), tokens, InstallSource::Application).await
    }

    /// [`Engine::install`] for any grant, with its source recorded in the journal.
    pub async fn install_grant(
        &self,
        grant: GrantKey,
        tokens: TokenSet,
        source: InstallSource,
    ) -> Result<Generation, Error> {
        self.check_provider(&grant)?;
        let inner = &self.inner;
        loop {
            let current = inner.store.get(&grant)?;
            let pending = inner.machine.install(current.as_ref(), grant.clone(), tokens.clone(), source, now());
            match pending.make_durable(&inner.store).await {
                Ok(done) => {
                    let generation = done.state().generation;
                    inner.after_durable(&done);
                    return Ok(generation);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The app was uninstalled from `shop` (the `app/uninstalled` webhook; it may arrive more than once
    /// and late): stop refreshing and drop the secrets, keeping the audit trail. Idempotent: a
    /// duplicate changes nothing and writes nothing. An attempt in flight at that moment can no
    /// longer store anything (its outcome is journaled as stale). A later [`Engine::install`] or
    /// token exchange revives the shop.
    ///
    /// Prefer [`Engine::uninstalled_as_of`] when the webhook's trigger time is known: a late
    /// uninstall webhook must not uninstall a newer installation.
    pub async fn uninstalled(&self, shop: &ShopDomain) -> Result<(), Error> {
        self.uninstall_grant(&self.grant_of(shop), None).await.map(|_| ())
    }

    /// [`Engine::uninstalled`] for a webhook triggered at `triggered_at` (Shopify's
    /// `X-Shopify-Triggered-At`): ignored (returns `false`) if the shop's current tokens were acquired
    /// after it, i.e. the app was reinstalled since. Returns whether the shop was uninstalled by this
    /// call.
    pub async fn uninstalled_as_of(&self, shop: &ShopDomain, triggered_at: UnixMillis) -> Result<bool, Error> {
        self.uninstall_grant(&self.grant_of(shop), Some(triggered_at)).await
    }

    async fn uninstall_grant(&self, grant: &GrantKey, triggered_at: Option<UnixMillis>) -> Result<bool, Error> {
        let inner = &self.inner;
        loop {
            let Some(current) = inner.store.get(grant)? else { return Ok(false) };
            if let (Some(at), Some(acquired)) = (triggered_at, current.acquired_at) {
                if acquired > at {
                    info!(%grant, %at, %acquired, "late uninstall webhook ignored: reinstalled since");
                    return Ok(false);
                }
            }
            let Some(t) = inner.machine.uninstall(&current, now()) else { return Ok(false) };
            match Pending::from_transition(t).make_durable(&inner.store).await {
                Ok(done) => {
                    inner.after_durable(&done);
                    return Ok(true);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The granted scopes of `shop` changed (the `app/scopes_update` webhook's `current` list):
    /// journaled, and the stored token set's scope replaced. `NotInstalled` if tokenwal does not know
    /// the shop.
    pub async fn scopes_updated<I, S>(&self, shop: &ShopDomain, scopes: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let scope = scopes.into_iter().map(|s| s.as_ref().trim().to_owned()).collect::<Vec<_>>().join(",");
        let grant = self.grant_of(shop);
        let inner = &self.inner;
        loop {
            let current = inner.store.get(&grant)?.ok_or_else(|| Error::NotInstalled { grant: grant.clone() })?;
            let t = inner.machine.scopes_updated(&current, &scope, now());
            match Pending::from_transition(t).make_durable(&inner.store).await {
                Ok(done) => {
                    inner.after_durable(&done);
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The durable state of a grant (secrets redacted in its `Debug`).
    pub fn state(&self, grant: &GrantKey) -> Result<Option<GrantState>, Error> {
        Ok(self.inner.store.get(grant)?)
    }

    /// Subscribes to engine events (refreshed, ambiguous, resolved, needs-reauth,
    /// app-credentials-rejected, recovered, …). A slow subscriber misses events (it sees `Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The underlying store (for inspection tools).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Refreshes every due grant now and waits for those attempts (used by `tokenwal run --once` and
    /// tests). Returns how many grants were attempted.
    pub async fn refresh_due(&self) -> Result<usize, Error> {
        let store = self.inner.store.clone();
        let now = now();
        let machine = self.inner.machine.clone();
        let due = tokio::task::spawn_blocking(move || {
            let mut due = Vec::new();
            let r = store.for_each_grant(|s| {
                if matches!(machine.step(&s, now), Step::Attempt) {
                    due.push(s.grant);
                }
            });
            r.map(|_| due)
        })
        .await
        .map_err(|e| Error::Config(format!("scan task failed: {e}")))??;
        let n = due.len();
        let mut tasks = tokio::task::JoinSet::new();
        for grant in due {
            let inner = Arc::clone(&self.inner);
            tasks.spawn(async move {
                let _permit = inner.permits.acquire().await;
                inner.drive(&grant, false).await
            });
        }
        while tasks.join_next().await.is_some() {}
        Ok(n)
    }

    /// Stops background work and waits for the scheduler's in-flight attempts to finish.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send_replace(true);
        self.inner.scheduler.wait_stopped().await;
    }

    fn check_provider(&self, grant: &GrantKey) -> Result<(), Error> {
        if grant.provider() != self.inner.provider {
            return Err(Error::Config(format!(
                "grant {grant} belongs to provider {:?}, this engine serves {:?}",
                grant.provider(),
                self.inner.provider
            )));
        }
        Ok(())
    }
}

impl Inner {
    pub(crate) fn scheduler_handle(&self) -> &SchedulerHandle {
        &self.scheduler
    }

    fn emit(&self, events: &[Event]) {
        for e in events {
            match e {
                Event::NeedsReauth { grant, reason } => warn!(%grant, %reason, "grant needs re-auth"),
                Event::AppCredentialsRejected { grant, status, error } => {
                    let until = now().saturating_add(self.credentials_pause);
                    self.paused_until.fetch_max(until.0, Ordering::SeqCst);
                    warn!(%grant, status, error, %until, "app credentials rejected: refreshing paused fleet-wide");
                }
                Event::Ambiguous { grant, reason } => warn!(%grant, %reason, "rotation outcome unknown"),
                Event::Resolved { grant, how } => info!(%grant, ?how, "ambiguous rotation resolved"),
                Event::Refreshed { grant, generation } => debug!(%grant, generation = generation.0, "refreshed"),
                other => debug!(?other, "event"),
            }
            let _ = self.events.send(e.clone());
        }
    }

    /// Everything that follows a durable transition: events, cache, scheduler.
    pub(crate) fn after_durable<T>(&self, done: &Durable<T>) {
        let s = done.state();
        let slot = self.slots.get_or_create(s.grant.account());
        self.refresh_cache(&slot, s);
        self.emit(done.events());
        self.scheduler.notify(s, &self.machine, now());
    }

    fn refresh_cache(&self, slot: &Slot, s: &GrantState) {
        match (&s.phase, &s.tokens) {
            (Phase::Healthy | Phase::Ambiguous(_) | Phase::Refreshing { .. }, Some(t)) => {
                slot.offer(t, s.generation, self.machine.due_at(t, s.updated_at).min(t.access_expires_at))
            }
            (Phase::NeedsReauth { .. }, Some(t)) => {
                // The last access token stays valid until its own expiry (Shopify); serve it, never refresh.
                slot.offer(t, s.generation, t.access_expires_at)
            }
            _ => slot.clear(),
        }
    }

    pub(crate) async fn commit_transition(&self, t: Transition) -> Result<(), Error> {
        let done = Pending::from_transition(t).make_durable(&self.store).await?;
        self.after_durable(&done);
        Ok(())
    }

    pub(crate) fn paused(&self, now: UnixMillis) -> Option<UnixMillis> {
        let until = self.paused_until.load(Ordering::SeqCst);
        (now.0 < until).then_some(UnixMillis(until))
    }

    /// Runs one attempt from `state`: intent durable → send → outcome durable. `recovery` lets an
    /// ambiguous grant's retry go despite its backoff (see `Machine::plan_recovery_attempt`). An
    /// unresolved token exchange whose session token expired falls back instead (nothing is sent).
    pub(crate) async fn attempt(&self, state: &GrantState, recovery: bool) -> Result<Settled, Error> {
        let grant = &state.grant;
        let planned = if recovery {
            self.machine.plan_recovery_attempt(state, now())
        } else {
            self.machine.plan_attempt(state, now())
        };
        match planned {
            Ok(pending) => Ok(self.run(pending).await?.0),
            Err(Refusal::SubjectExpired) => self.expire(state).await,
            Err(r) => Err(refusal(grant, r)),
        }
    }

    /// Falls back from an unresolved token exchange whose session token has expired.
    pub(crate) async fn expire(&self, state: &GrantState) -> Result<Settled, Error> {
        let mut current = state.clone();
        loop {
            let Some(pending) = self.machine.expire_acquisition(&current, now()) else {
                return Err(Error::InFlight { grant: state.grant.clone() });
            };
            match pending.make_durable(&self.store).await {
                Ok(done) => {
                    self.after_durable(&done);
                    return Ok(done);
                }
                Err(StoreError::Conflict { .. }) => {
                    current = self
                        .store
                        .get(&state.grant)?
                        .ok_or_else(|| Error::NotInstalled { grant: state.grant.clone() })?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs a planned attempt: intent durable → send → outcome durable. Returns the settled state, the
    /// outcome, and whether the outcome applied (`false`: it was stale — journaled, changing nothing —
    /// and the settled state shows where a newer write left the grant). A conflict on the intent (someone else wrote first) is returned as
    /// `Error::Store(Conflict)`: nothing was sent; re-read and re-plan.
    pub(crate) async fn run(&self, pending: Pending<AttemptRequest>) -> Result<(Settled, Outcome, bool), Error> {
        let grant = pending.transition().grant().clone();
        let grant = &grant;
        failpoint::hit("before-intent");
        // Journal before network: the request exists only once the intent is durable.
        let permit = pending.make_durable(&self.store).await?;
        failpoint::hit("after-intent");
        self.after_durable(&permit);
        let attempt = permit.value().attempt().0;
        let (outcome, status) = self.transport.send(permit.value(), now).await;
        failpoint::hit("after-response");
        log_outcome(grant, attempt, status, &outcome);
        let mut current = permit.state().clone();
        loop {
            let pending = self.machine.on_outcome(&current, &permit, outcome.clone(), now(), rand::random());
            let applied = !matches!(pending.transition().records(), [Record::StaleOutcome { .. }]);
            failpoint::hit("before-commit");
            // Commit before use: tokens are released only by a durable commit.
            match pending.make_durable(&self.store).await {
                Ok(done) => {
                    failpoint::hit("after-commit");
                    self.after_durable(&done);
                    return Ok((done, outcome, applied));
                }
                Err(StoreError::Conflict { .. }) => {
                    // Someone else wrote (an install, an uninstall): re-read before acting.
                    current = self.store.get(grant)?.ok_or_else(|| Error::NotInstalled { grant: grant.clone() })?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Drives a grant until it needs nothing now (used by the scheduler and recovery). Errors are
    /// logged, not returned: the next schedule retries.
    pub(crate) async fn drive(&self, grant: &GrantKey, resolve_only: bool) {
        let slot = self.slots.get_or_create(grant.account());
        let _flight = slot.flight.lock().await;
        let mut first = true;
        for _ in 0..4 {
            let state = match self.store.get(grant) {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(e) => {
                    warn!(%grant, error = %e, "cannot read grant");
                    return;
                }
            };
            if resolve_only && !state.phase.is_open() {
                return;
            }
            let now = now();
            let step = match self.machine.step(&state, now) {
                // Recovery probes an ambiguity at once, whatever backoff the stopped process set.
                Step::Wait { .. } if resolve_only && first && matches!(state.phase, Phase::Ambiguous(_)) => {
                    Step::Attempt
                }
                s => s,
            };
            let recovery = resolve_only && first;
            first = false;
            match step {
                Step::Attempt => {
                    if let Some(until) = self.paused(now) {
                        // Fleet-wide pause after invalid_client: look again when it ends.
                        self.scheduler.notify_at(&state.grant, until);
                        return;
                    }
                    match self.attempt(&state, recovery).await {
                        Ok(done) if done.value().is_some() => return,
                        Ok(done) => {
                            // Not resolved yet: go again only if no backoff applies.
                            if !matches!(self.machine.step(done.state(), crate::engine::now()), Step::Attempt) {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(%grant, error = %e, "attempt failed");
                            return;
                        }
                    }
                }
                Step::Idle { .. } | Step::Wait { .. } | Step::InFlight | Step::Dormant => {
                    self.refresh_cache(&slot, &state);
                    self.scheduler.notify(&state, &self.machine, now);
                    return;
                }
            }
        }
    }

    /// The slow path of `access_token` / `on_unauthorized`.
    async fn slow_token(&self, grant: &GrantKey, rejected: Option<&AccessToken>) -> Result<AccessToken, Error> {
        let slot = self.slots.get_or_create(grant.account());
        let _flight = match slot.flight.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // Someone is refreshing this grant. A token that is still valid (merely inside the
                // refresh margin) is served at once rather than queueing behind that refresh.
                if rejected.is_none() {
                    if let Some(t) = slot.still_valid(now()) {
                        return Ok(t);
                    }
                }
                slot.flight.lock().await
            }
        };
        let deadline = now().saturating_add(self.max_wait);
        let mut force = rejected.is_some();
        for _ in 0..64 {
            if *self.shutdown.borrow() {
                return Err(Error::ShuttingDown);
            }
            let now = now();
            // Double-checked: another caller may have refreshed while we waited for the lock.
            if !force {
                if let Some(t) = self.slots.fresh(grant.account(), now) {
                    return Ok(t);
                }
            }
            let state = self.store.get(grant)?.ok_or_else(|| Error::NotInstalled { grant: grant.clone() })?;
            let tokens = state.tokens.as_ref();
            // A token the caller just saw rejected is never "still valid", whatever its expiry says.
            let still_valid = tokens
                .filter(|t| now < t.access_expires_at && Some(&t.access_token) != rejected)
                .map(|t| t.access_token.clone());
            if let (true, Some(rej), Some(t)) = (force, rejected, tokens) {
                if t.access_token != *rej {
                    // Someone already replaced the rejected token.
                    self.refresh_cache(&slot, &state);
                    return Ok(t.access_token.clone());
                }
            }
            let step = match self.machine.step(&state, now) {
                Step::Idle { .. } if force => Step::Attempt,
                s => s,
            };
            match step {
                Step::Idle { .. } => {
                    self.refresh_cache(&slot, &state);
                    return still_valid.ok_or_else(|| Error::Unavailable { grant: grant.clone(), retry_at: now });
                }
                Step::Attempt => {
                    if let Some(until) = self.paused(now) {
                        return still_valid.ok_or(Error::AppCredentialsRejected { until });
                    }
                    force = false;
                    let done = match self.attempt(&state, false).await {
                        Ok(done) => done,
                        Err(e) if e.is_transient() => continue,
                        Err(e) => return Err(e),
                    };
                    if let Some(t) = done.value() {
                        return Ok(t.access_token.clone());
                    }
                    // No tokens: ambiguous, refused or dead. Loop to decide (wait, serve, or fail).
                    if let Phase::NeedsReauth { .. } = done.state().phase {
                        continue;
                    }
                    if let Some(t) = &still_valid {
                        if !matches!(self.machine.step(done.state(), crate::engine::now()), Step::Attempt) {
                            return Ok(t.clone());
                        }
                    }
                }
                Step::Wait { until } => {
                    if let Some(t) = still_valid {
                        return Ok(t);
                    }
                    if until > deadline {
                        return Err(match &state.phase {
                            Phase::Ambiguous(a) => Error::Ambiguous {
                                grant: grant.clone(),
                                reason: a.last_reason.clone(),
                                retry_at: until,
                            },
                            _ => Error::Unavailable { grant: grant.clone(), retry_at: until },
                        });
                    }
                    tokio::time::sleep(until.since(now)).await;
                }
                Step::InFlight => return Err(Error::InFlight { grant: grant.clone() }),
                Step::Dormant => {
                    return match state.phase {
                        Phase::NeedsReauth { reason, .. } => match still_valid {
                            // The last access token is valid until its own expiry; only then is the
                            // grant unusable.
                            Some(t) if rejected.is_none() => Ok(t),
                            _ => Err(Error::NeedsReauth { grant: grant.clone(), reason }),
                        },
                        Phase::Uninstalled { .. } => Err(Error::Uninstalled { grant: grant.clone() }),
                        _ => Err(Error::NotInstalled { grant: grant.clone() }),
                    };
                }
            }
        }
        Err(Error::Unavailable { grant: grant.clone(), retry_at: now() })
    }
}

fn refusal(grant: &GrantKey, r: Refusal) -> Error {
    match r {
        Refusal::NeedsReauth(reason) => Error::NeedsReauth { grant: grant.clone(), reason },
        Refusal::Uninstalled | Refusal::NoTokens => Error::Uninstalled { grant: grant.clone() },
        Refusal::InFlight => Error::InFlight { grant: grant.clone() },
        Refusal::BackingOff(until) => Error::Unavailable { grant: grant.clone(), retry_at: until },
        other => Error::Config(other.to_string()),
    }
}

fn log_outcome(grant: &GrantKey, attempt: u64, status: Option<u16>, outcome: &Outcome) {
    let request_id = match outcome {
        Outcome::Success { request_id, .. }
        | Outcome::Throttled { request_id, .. }
        | Outcome::Rejected { request_id, .. }
        | Outcome::BadCredentials { request_id, .. }
        | Outcome::Ambiguous { request_id, .. } => request_id.as_deref(),
        Outcome::NotSent(_) => None,
    };
    info!(%grant, attempt, status, request_id, outcome = outcome.label(), "token endpoint answered");
}
