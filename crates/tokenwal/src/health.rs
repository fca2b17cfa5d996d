//! The engine's health as a supervisor sees it: healthy, or fail-stopped by its store.
//!
//! The store is fail-stop (docs/journal.md §6): after the first failed write or sync it refuses
//! every call until it is reopened, and reopening runs recovery. A worker that embeds the engine
//! must therefore notice the fail-stop and restart (or reopen), or every grant silently ages out
//! while the process looks alive. [`Engine::health`] answers now; [`Engine::fail_stopped`] waits.

use crate::engine::Engine;
use std::future::Future;
use std::time::SystemTime;

/// The engine's health.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// The store accepts writes; the engine serves and refreshes.
    Healthy,
    /// The store failed a write or sync and is fail-stopped: nothing is served, no token request is
    /// sent, the scheduler has stopped. Reopen the store (restart the process) to run recovery.
    FailStopped {
        /// When the failure was seen.
        since: SystemTime,
        /// What failed: an operation and an OS error, never a token or secret.
        error: String,
    },
}

impl Engine {
    /// The engine's health now.
    pub fn health(&self) -> Health {
        match self.inner.store.fail_stop() {
            None => Health::Healthy,
            Some(f) => Health::FailStopped { since: f.since, error: f.error },
        }
    }

    /// Resolves when the store fail-stops (at once if it already has), with
    /// [`Health::FailStopped`]. Never resolves for an engine that stays healthy (nor once the
    /// store is closed). The future holds no handle on the engine or the store (dropping every
    /// [`Engine`] still stops it); cancel-safe.
    ///
    /// ```no_run
    /// # async fn worker(engine: tokenwal::Engine) {
    /// let health = engine.fail_stopped().await;
    /// eprintln!("tokenwal fail-stopped ({health:?}): exiting so the supervisor restarts us");
    /// std::process::exit(74);
    /// # }
    /// ```
    pub fn fail_stopped(&self) -> impl Future<Output = Health> + Send + 'static {
        let mut rx = self.inner.store.watch_fail_stop();
        async move {
            let failed = match rx.wait_for(Option::is_some).await {
                Ok(f) => f.clone(),
                // The store is closed: it can no longer fail.
                Err(_) => None,
            };
            match failed {
                Some(f) => Health::FailStopped { since: f.since, error: f.error },
                None => std::future::pending().await,
            }
        }
    }
}
