//! `tokenwal run`: the engine as a daemon, with periodic summaries and graceful shutdown.

use std::time::Duration;
use tokenwal::core::Event;
use tokenwal::store::StoreError;
use tokenwal::{Engine, Health};
use tracing::{info, warn};

use super::open_engine;
use super::recover::report_line;
use crate::error::CliError;
use crate::settings::Settings;

/// `tokenwal run`. A store that fail-stops (a failed write or sync) ends it with
/// [`CliError::FailStopped`] (exit 74) at once: idle, it would look healthy to a supervisor while
/// every token aged out; restarted, it runs recovery.
pub async fn run(settings: &Settings, once: bool, sweep: Duration, grace: Duration) -> Result<(), CliError> {
    // Signals are handled from the start: recovery at open may wait on a hung token endpoint.
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let (engine, report) = tokio::select! {
        opened = open_retrying(settings, !once) => opened.map_err(fail_stop_at_open)?,
        _ = &mut stop => {
            warn!("stopped during recovery: what it had not finished stays journaled for the next start");
            return Ok(());
        }
    };
    info!(store = %settings.db_display(), "{}", report_line(&report));
    let failed = engine.fail_stopped();
    tokio::pin!(failed);
    if once {
        let result = tokio::select! {
            r = engine.refresh_due() => r,
            h = &mut failed => return Err(fail_stopped(h)),
            _ = &mut stop => {
                warn!("stopped: refreshes in flight stay journaled for the next start");
                return Ok(());
            }
        };
        engine.shutdown().await;
        let n = result?;
        let counts = phase_counts(&engine)?;
        drop(engine);
        info!(attempted = n, "refreshed every due shop; {counts}");
        return Ok(());
    }
    keep_running(&engine, stop.as_mut(), failed.as_mut(), sweep).await?;
    wind_down(&engine, grace).await;
    drop(engine);
    Ok(())
}

/// [`open_engine`], except that a PostgreSQL store that cannot be reached yet is retried with
/// backoff (1 s doubling to 30 s) instead of ending the process: a fleet (`run` and `serve`)
/// restarted with its database comes up by itself.
pub(crate) async fn open_retrying(
    settings: &Settings,
    proactive: bool,
) -> Result<(Engine, tokenwal::RecoveryReport), CliError> {
    if settings.postgres().is_none() {
        return open_engine(settings, proactive, false).await;
    }
    let mut delay = Duration::from_secs(1);
    loop {
        match Engine::open(settings.engine_config(proactive)?).await {
            Ok(opened) => return Ok(opened),
            Err(tokenwal::Error::Store(e @ StoreError::Database { op: "connect", .. })) => {
                warn!(store = %settings.db_display(), error = %e, retry_in_s = delay.as_secs(), "the PostgreSQL store is not available yet: retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The steady state shared by `run` and `serve`: tally events into a summary a minute, sweep for
/// due shops every `sweep` (a safety net under the scheduler), until `stop` resolves (`Ok`) or the
/// store fail-stops (`Err`, exit 74).
pub(crate) async fn keep_running(
    engine: &Engine,
    mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    mut failed: std::pin::Pin<&mut impl std::future::Future<Output = Health>>,
    sweep: Duration,
) -> Result<(), CliError> {
    let mut events = engine.subscribe();
    let mut tally = EventTally::default();
    let mut summary = tokio::time::interval(Duration::from_secs(60));
    summary.tick().await;
    let mut sweeper = tokio::time::interval(sweep.max(Duration::from_secs(1)));
    sweeper.tick().await;
    info!("running: keeping every shop fresh until SIGINT or SIGTERM");
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            h = &mut failed => return Err(fail_stopped(h)),
            e = events.recv() => match e {
                Ok(e) => tally.add(&e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tally.lagged += n,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            _ = summary.tick() => {
                info!("last minute: {tally}");
                tally = EventTally::default();
            }
            _ = sweeper.tick() => {
                // A safety net under the scheduler: anything due that it has not picked up.
                match engine.refresh_due().await {
                    Ok(0) => {}
                    Ok(n) => info!(attempted = n, "sweep refreshed due shops the scheduler had not"),
                    Err(e) => warn!(error = %e, "sweep failed"),
                }
            }
        }
    }
}

/// Graceful shutdown shared by `run` and `serve`: let refreshes in flight finish within `grace`
/// (a second signal cuts it short).
pub(crate) async fn wind_down(engine: &Engine, grace: Duration) {
    info!(grace_secs = grace.as_secs_f64(), "stopping: waiting for refreshes in flight");
    tokio::select! {
        _ = engine.shutdown() => info!("stopped"),
        // Safe by the durability contract: an attempt cut short stays journaled as an intent and
        // the next start's recovery retries its old refresh token.
        _ = tokio::time::sleep(grace) => warn!(
            "refreshes still in flight after the grace period: abandoned; they stay journaled and recovery \
             resolves them at the next start"
        ),
        _ = shutdown_signal() => warn!("second signal: refreshes in flight abandoned; recovery resolves them at the next start"),
    }
}

/// The error that ends `run` once the store has fail-stopped.
pub(crate) fn fail_stopped(health: Health) -> CliError {
    match health {
        Health::FailStopped { error, .. } => CliError::FailStopped { error },
        other => CliError::FailStopped { error: format!("unexpected health {other:?}") },
    }
}

/// An open that failed because the store failed a write or sync (recovery writes) is a fail-stop too.
pub(crate) fn fail_stop_at_open(e: CliError) -> CliError {
    match e {
        CliError::Store(e @ (StoreError::Io { .. } | StoreError::Poisoned)) => {
            CliError::FailStopped { error: e.to_string() }
        }
        other => other,
    }
}

fn phase_counts(engine: &Engine) -> Result<String, CliError> {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    engine.store().for_each_grant(|s| *counts.entry(s.phase.name()).or_default() += 1)?;
    Ok(counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "))
}

/// Events seen since the last summary.
#[derive(Default)]
struct EventTally {
    refreshed: u64,
    ambiguous: u64,
    resolved: u64,
    needs_reauth: u64,
    credentials: u64,
    throttled: u64,
    other: u64,
    lagged: u64,
}

impl EventTally {
    fn add(&mut self, e: &Event) {
        match e {
            Event::Refreshed { .. } => self.refreshed += 1,
            Event::Ambiguous { .. } => self.ambiguous += 1,
            Event::Resolved { .. } => self.resolved += 1,
            Event::NeedsReauth { .. } => self.needs_reauth += 1,
            Event::AppCredentialsRejected { .. } => self.credentials += 1,
            Event::Throttled { .. } => self.throttled += 1,
            _ => self.other += 1,
        }
    }
}

impl std::fmt::Display for EventTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} refreshed, {} ambiguous, {} resolved, {} needs-reauth, {} app-credentials-rejected, {} throttled, \
             {} other",
            self.refreshed,
            self.ambiguous,
            self.resolved,
            self.needs_reauth,
            self.credentials,
            self.throttled,
            self.other
        )?;
        if self.lagged > 0 {
            write!(f, " ({} events missed)", self.lagged)?;
        }
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
