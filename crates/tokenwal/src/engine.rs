//! The engine: a cheap cloneable handle over the store, the state machine and the transport.

use crate::cache::Slots;
use crate::clock::now;
use crate::compactor::TrimQueue;
use crate::config::{Config, Endpoint, StoreLocation};
use crate::driver::Driven;
use crate::error::Error;
use crate::inner::Inner;
use crate::metrics::Metrics;
use crate::serve::refusal;
use crate::transport::Transport;
use crate::{schedule, scheduler};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal_core::{
    AccessToken, Event, Generation, Goal, GrantKey, GrantState, InstallSource, Machine, NoChange, ShopDomain, Step,
    TokenSet, UnixMillis,
};
use tokenwal_store::{Store, StoreConfig, StoreError};
use tokio::sync::{broadcast, watch, Semaphore};
use tracing::info;

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
    /// Of those, intents without outcome (the process had stopped mid-attempt), as far as recovery
    /// had read them when open returned (all of them unless the budget ran out first: open learns
    /// which grants are open from the open index's keys, and reads their states in the background).
    pub interrupted: usize,
    /// Ambiguities resolved by retrying the old credential during open.
    pub resolved: usize,
    /// Ambiguities still unresolved after open (the scheduler keeps retrying).
    pub still_ambiguous: usize,
    /// Grants marked needs-reauth (rejected on retry, or retry window elapsed).
    pub needs_reauth: usize,
    /// Grants whose state is corrupt (quarantined: never served, never guessed).
    pub corrupt: Vec<String>,
    /// Grants still recovering in the background when open returned (its recovery budget ran out,
    /// e.g. because the token endpoint hangs). Callers for them get [`Error::Recovering`] until it
    /// ends; see [`Engine::recovering`].
    pub pending: usize,
    /// How long open took.
    pub elapsed: Duration,
}

impl Engine {
    /// Opens the store, **runs recovery before serving** (retries every ambiguous rotation with its
    /// old credential; marks truly dead grants needs-reauth), starts the proactive scheduler, and
    /// returns the engine with a report of what recovery found and did.
    ///
    /// Recovery gets [`Config::recovery_budget`] (default 5 s): the grants it has not finished by
    /// then keep recovering in the background ([`RecoveryReport::pending`], [`Engine::recovering`]),
    /// and only those grants answer [`Error::Recovering`] meanwhile.
    pub async fn open(config: Config) -> Result<(Engine, RecoveryReport), Error> {
        let started = Instant::now();
        config.endpoint.validate().map_err(Error::Config)?;
        if config.compaction.is_some_and(|c| c.history_per_grant == 0 || c.interval.is_zero()) {
            return Err(Error::Config(
                "compaction: history_per_grant must be at least 1 and interval more than 0".into(),
            ));
        }
        if config.max_concurrent_refreshes == 0 {
            return Err(Error::Config("max_concurrent_refreshes must be at least 1".into()));
        }
        // What a durable store needs (loaded only for one: an in-memory store needs no key).
        let durable = || -> Result<_, Error> {
            let keys = config.store_keys.load().map_err(StoreError::Key)?;
            let store_config = match config.compaction {
                Some(c) => StoreConfig::default().with_retention(c.retention),
                None => StoreConfig::default(),
            };
            Ok((keys, store_config))
        };
        let (store, corrupt) = match &config.store {
            StoreLocation::InMemory => (Store::in_memory(), Vec::new()),
            StoreLocation::Open(store) => (store.clone(), Vec::new()),
            StoreLocation::Path(p) => {
                let (p, (keys, store_config)) = (p.clone(), durable()?);
                let (store, report) = open_blocking(move || Store::open(p, &keys, store_config)).await?;
                (store, report.corrupt)
            }
            StoreLocation::Postgres(location) => {
                if config.timeouts.total >= location.lease() / 2 {
                    return Err(Error::Config(format!(
                        "the PostgreSQL membership lease ({:?}) must be more than twice the request timeout ({:?}): \
                         an intent is committed only while half the lease is left",
                        location.lease(),
                        config.timeouts.total
                    )));
                }
                let (location, (keys, store_config)) = ((**location).clone(), durable()?);
                let (store, report) =
                    open_blocking(move || Store::open_postgres(&location, &keys, store_config)).await?;
                (store, report.corrupt)
            }
        };
        if let Some(w) = &config.webhook {
            w.validate().map_err(Error::Config)?;
            // Before recovery: the events recovery journals are delivered too.
            let (s, n) = (store.clone(), w.cursor.clone());
            tokio::task::spawn_blocking(move || crate::webhook_sink::init_cursor(&s, &n))
                .await
                .map_err(|e| Error::Internal(format!("webhook cursor task failed: {e}")))??;
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
        let paused_until = Arc::new(AtomicU64::new(0));
        let metrics = Metrics::new(store.clone(), Arc::clone(&paused_until));
        let (events, _) = broadcast::channel(4096);
        let (shutdown, _) = watch::channel(false);
        let (scheduler, scheduler_rx) = schedule::channel();
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
            paused_until: Arc::clone(&paused_until),
            credentials_pause: config.credentials_pause,
            max_wait: config.max_wait,
            permits: Semaphore::new(config.max_concurrent_refreshes),
            max_refreshes: config.max_concurrent_refreshes,
            shutdown,
            scheduler,
            attempts: watch::channel(0).0,
            metrics,
            trim_queue: TrimQueue::default(),
            history_cap: config.compaction.map(|c| c.history_per_grant),
            recovering: crate::recover::Recovering::new(config.wait_for_recovery),
        });
        let engine = Engine { _guard: Arc::new(DropGuard(Arc::clone(&inner))), inner };
        if let Some(w) = config.webhook.clone() {
            let (store, events, stop) =
                (engine.inner.store.clone(), engine.inner.events.subscribe(), engine.inner.shutdown.subscribe());
            tokio::spawn(crate::webhook_sink::run(w, store, events, stop));
        }
        if engine.inner.store.is_shared() {
            // Another process's rotation drops this one's cache line for the grant at once, not
            // only at this process's next refresh attempt.
            let weak = Arc::downgrade(&engine.inner);
            engine.inner.store.on_remote_writes(move |w| {
                let Some(inner) = weak.upgrade() else { return };
                match w {
                    tokenwal_store::RemoteWrites::Grants(grants) => {
                        for (grant, version) in grants {
                            if let Some(slot) = inner.slots.get(grant.account()) {
                                slot.mark_stale(version);
                            }
                        }
                    }
                    tokenwal_store::RemoteWrites::Missed => inner.slots.mark_all_stale(),
                }
            })?;
        }
        let c = crate::recover::run(&engine.inner, config.recovery_budget).await?;
        let mut report = RecoveryReport {
            grants: engine.inner.store.grant_count(),
            open: c.open,
            interrupted: c.interrupted,
            resolved: c.resolved,
            still_ambiguous: c.still_ambiguous,
            needs_reauth: c.needs_reauth,
            corrupt,
            pending: c.pending,
            elapsed: Duration::ZERO,
        };
        if config.proactive {
            // Its initial scan also takes the grant census.
            scheduler::spawn(Arc::clone(&engine.inner), scheduler_rx);
        } else {
            scheduler::spawn_census(Arc::clone(&engine.inner));
        }
        if let Some(c) = config.compaction {
            crate::compactor::spawn(Arc::clone(&engine.inner), c);
        }
        if let StoreLocation::Postgres(location) = &config.store {
            // Other processes may die with attempts open: take those over a quarter lease after
            // their lease runs out, at the latest.
            crate::recover::spawn_orphan_sweep(&engine.inner, location.lease() / 4);
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
            pending = report.pending,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "engine open: recovery {}",
            if report.pending == 0 { "finished" } else { "goes on in the background (budget reached)" }
        );
        Ok((engine, report))
    }

    pub(crate) fn grant_of(&self, shop: &ShopDomain) -> GrantKey {
        GrantKey::shopify(shop)
    }

    /// A currently valid access token for `shop`, refreshing first if it is within the refresh margin.
    ///
    /// A valid cached token is returned without I/O. Concurrent callers for one shop share one
    /// refresh; callers for other shops are never blocked by it. If a refresh fails transiently while
    /// the current token is still valid, the current token is returned.
    ///
    /// The attempt belongs to the engine, not to this future: if the caller goes away (a timeout, an
    /// aborted task) after the intent is durable, the attempt still runs to its durable outcome.
    pub async fn access_token(&self, shop: &ShopDomain) -> Result<AccessToken, Error> {
        if let Some(t) = self.cached(shop.as_str())? {
            return Ok(t);
        }
        let grant = self.grant_of(shop);
        if let Some(t) = self.recovery_gate(&grant, false).await? {
            return Ok(t);
        }
        self.inner.slow_token(&grant, None).await
    }

    /// How many grants are still recovering in the background (open's recovery budget ran out
    /// before their recovery ended). 0 once recovery is done: a broker's readiness check can
    /// report it.
    pub fn recovering(&self) -> usize {
        self.inner.recovering.count()
    }

    /// Before the slow path: a grant still recovering answers [`Error::Recovering`] (or, by
    /// [`Config::wait_for_recovery`], is waited for up to `max_wait`) instead of queueing behind its
    /// recovery's flight lock. A still-valid token is served meanwhile, as during any refresh.
    /// `Ok(None)`: go on to the slow path.
    async fn recovery_gate(&self, grant: &GrantKey, rejected: bool) -> Result<Option<AccessToken>, Error> {
        let r = &self.inner.recovering;
        if !r.contains(grant) || self.inner.store.is_poisoned() {
            return Ok(None);
        }
        if r.wait && r.wait_for(grant, self.inner.max_wait).await {
            return Ok(None);
        }
        if !rejected {
            if let Some(t) = self.inner.slots.get(grant.account()).and_then(|s| s.still_valid(now())) {
                return Ok(Some(t));
            }
        }
        Err(Error::Recovering { grant: grant.clone(), retry_after: crate::recover::RETRY_AFTER })
    }

    /// The fast path: a cached token usable without a refresh. Nothing is served from a poisoned
    /// store (fail-stop: the cache may hold what a failed commit would have replaced).
    fn cached(&self, account: &str) -> Result<Option<AccessToken>, Error> {
        let token = self.inner.slots.fresh(account, now());
        if token.is_some() && self.inner.store.is_poisoned() {
            return Err(StoreError::Poisoned.into());
        }
        Ok(token)
    }

    /// [`Engine::access_token`] for any provider's grant.
    pub async fn access_token_for(&self, grant: &GrantKey) -> Result<AccessToken, Error> {
        self.check_provider(grant)?;
        if let Some(t) = self.cached(grant.account())? {
            return Ok(t);
        }
        if let Some(t) = self.recovery_gate(grant, false).await? {
            return Ok(t);
        }
        self.inner.slow_token(grant, None).await
    }

    /// An Admin API call answered 401 with `rejected`: refresh once if it is still the current
    /// token, otherwise return the newer one.
    pub async fn on_unauthorized(&self, shop: &ShopDomain, rejected: &AccessToken) -> Result<AccessToken, Error> {
        let grant = self.grant_of(shop);
        self.recovery_gate(&grant, true).await?;
        self.inner.slow_token(&grant, Some(rejected)).await
    }

    /// Registers tokens acquired elsewhere (OAuth install, the app front end's token exchange). The
    /// tokens become a new generation: an older in-flight result can never overwrite them.
    ///
    /// Checked: installing the very pair the shop holds changes nothing (returns its generation), and
    /// a pair older than the one held (its access token expires earlier) is refused with
    /// [`Error::OlderPair`] — a re-run import or a replayed install must never put a superseded
    /// refresh token back in use.
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
        self.install_checked(grant, tokens, source, false).await
    }

    /// [`Engine::install_grant`] even over a newer pair: an operator's explicit decision that the
    /// held pair is dead (e.g. revoked on the provider's side). Prefer the checked install.
    pub async fn force_install_grant(
        &self,
        grant: GrantKey,
        tokens: TokenSet,
        source: InstallSource,
    ) -> Result<Generation, Error> {
        self.install_checked(grant, tokens, source, true).await
    }

    async fn install_checked(
        &self,
        grant: GrantKey,
        tokens: TokenSet,
        source: InstallSource,
        force: bool,
    ) -> Result<Generation, Error> {
        self.check_provider(&grant)?;
        let goal = Goal::Install { tokens, source, force };
        match self.inner.driver().drive(&grant, &goal).await? {
            Driven::Wrote(done) => Ok(done.state().generation),
            Driven::Unchanged { state: Some(s), .. } => Ok(s.generation),
            Driven::Refused { refusal: r, .. } => Err(refusal(&grant, r)),
            other => Err(Error::Internal(format!("{grant}: install ended as {other:?}"))),
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
    /// `X-Shopify-Triggered-At`): ignored (returns `false`) if the shop's newest acquisition — done,
    /// or a token exchange or migration in flight or unresolved — happened or started after it, i.e.
    /// the app was reinstalled since. Returns whether the shop was uninstalled by this call.
    pub async fn uninstalled_as_of(&self, shop: &ShopDomain, triggered_at: UnixMillis) -> Result<bool, Error> {
        self.uninstall_grant(&self.grant_of(shop), Some(triggered_at)).await
    }

    async fn uninstall_grant(&self, grant: &GrantKey, as_of: Option<UnixMillis>) -> Result<bool, Error> {
        match self.inner.driver().drive(grant, &Goal::Uninstall { as_of }).await? {
            Driven::Wrote(_) => Ok(true),
            Driven::Unchanged { why: NoChange::AcquiredSince { acquired }, .. } => {
                info!(%grant, at = ?as_of, %acquired, "late uninstall webhook ignored: reinstalled since");
                Ok(false)
            }
            Driven::Unchanged { .. } => Ok(false),
            Driven::Refused { refusal: r, .. } => Err(refusal(grant, r)),
            other => Err(Error::Internal(format!("{grant}: uninstall ended as {other:?}"))),
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
        match self.inner.driver().drive(&grant, &Goal::UpdateScopes { scope }).await? {
            Driven::Wrote(_) | Driven::Unchanged { .. } => Ok(()),
            Driven::Refused { refusal: r, .. } => Err(refusal(&grant, r)),
            other => Err(Error::Internal(format!("{grant}: scopes update ended as {other:?}"))),
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

    /// The engine's metrics: [`crate::Metrics::register`] adds them to a Prometheus registry (see
    /// `crate::metrics` for the names).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
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
        .map_err(|e| Error::Internal(format!("scan task failed: {e}")))??;
        let n = due.len();
        let mut tasks = tokio::task::JoinSet::new();
        for grant in due {
            let inner = Arc::clone(&self.inner);
            tasks.spawn(async move {
                let _permit = inner.permits.acquire().await;
                inner.keep_fresh(&grant, false, None).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        Ok(n)
    }

    /// Stops background work and waits for in-flight attempts (the scheduler's and those whose
    /// callers went away) to reach their durable outcome.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send_replace(true);
        self.inner.scheduler.wait_stopped().await;
        self.inner.attempts_finished().await;
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

/// Runs a store open on the blocking pool (it does file or database I/O).
async fn open_blocking(
    open: impl FnOnce() -> Result<(Store, tokenwal_store::OpenReport), StoreError> + Send + 'static,
) -> Result<(Store, tokenwal_store::OpenReport), Error> {
    Ok(tokio::task::spawn_blocking(open)
        .await
        .map_err(|e| Error::Internal(format!("store open task failed: {e}")))??)
}
