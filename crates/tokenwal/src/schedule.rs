//! The scheduler's handle: how durable transitions tell the proactive scheduler (`scheduler.rs`) when
//! to look at a grant next.

use tokenwal_core::{GrantKey, GrantState, Machine, Step, UnixMillis};
use tokio::sync::{mpsc, watch};

pub(crate) struct SchedulerHandle {
    tx: mpsc::UnboundedSender<(GrantKey, UnixMillis)>,
    pub(crate) stopped: watch::Sender<bool>,
}

pub(crate) struct SchedulerRx {
    pub(crate) rx: mpsc::UnboundedReceiver<(GrantKey, UnixMillis)>,
}

pub(crate) fn channel() -> (SchedulerHandle, SchedulerRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (stopped, _) = watch::channel(true);
    (SchedulerHandle { tx, stopped }, SchedulerRx { rx })
}

/// When the scheduler should next look at `s`, if ever.
pub(crate) fn next_look(s: &GrantState, machine: &Machine, now: UnixMillis) -> Option<UnixMillis> {
    match machine.step(s, now) {
        Step::Idle { due } => due,
        Step::Wait { until } => Some(until),
        Step::Attempt => Some(now),
        Step::InFlight | Step::Dormant => None,
    }
}

impl SchedulerHandle {
    pub(crate) fn notify(&self, s: &GrantState, machine: &Machine, now: UnixMillis) {
        if let Some(at) = next_look(s, machine, now) {
            let _ = self.tx.send((s.grant.clone(), at));
        }
    }

    /// Look at `grant` again at `at` (e.g. when a fleet-wide pause ends).
    pub(crate) fn notify_at(&self, grant: &GrantKey, at: UnixMillis) {
        let _ = self.tx.send((grant.clone(), at));
    }

    pub(crate) async fn wait_stopped(&self) {
        let mut rx = self.stopped.subscribe();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}
