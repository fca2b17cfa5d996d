//! State shared by the HTTP front end, the control API and the [`SimHandle`](crate::SimHandle):
//! the model, the clock, the holds and the shutdown signal. A leaf module: it knows neither
//! routes nor handlers, so `http` and `control` both depend on it and not on each other.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::hold::Holds;
use crate::model::Model;

/// The simulator's clock: wall time plus an adjustable offset, in unix milliseconds.
#[derive(Debug, Default)]
pub struct SimClock {
    offset_ms: AtomicI64,
}

impl SimClock {
    /// Wall time plus the offset.
    pub fn now_ms(&self) -> u64 {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        wall.saturating_add(self.offset_ms()).max(0) as u64
    }

    /// The current offset.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }

    /// Moves the clock by `ms` (negative moves it back).
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

/// State shared by the handlers and the [`SimHandle`](crate::SimHandle).
pub(crate) struct Shared {
    pub(crate) model: Mutex<Model>,
    pub(crate) clock: SimClock,
    pub(crate) holds: Holds,
    pub(crate) hang_cap: Duration,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// Locks the model. A panic while holding the lock leaves a consistent-enough model for a
    /// simulator, so poisoning is ignored.
    pub(crate) fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolves when shutdown was requested or the handle is gone.
pub(crate) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}
