//! The engine's shared state (behind every [`crate::Engine`] handle and every engine-owned task),
//! and what follows every durable transition: events, cache, scheduler.

use crate::cache::{Slot, Slots};
use crate::clock::now;
use crate::compactor::TrimQueue;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::schedule::SchedulerHandle;
use crate::transport::Transport;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokenwal_core::{ClientSecret, Durable, Event, GrantState, Machine, Pending, Phase, Transition, UnixMillis};
use tokenwal_store::Store;
use tokio::sync::{broadcast, watch, Semaphore};
use tracing::{debug, info, warn};

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) machine: Machine,
    pub(crate) transport: Transport,
    pub(crate) client_id: String,
    pub(crate) client_secret: ClientSecret,
    pub(crate) is_shopify: bool,
    pub(crate) provider: String,
    pub(crate) slots: Slots,
    pub(crate) events: broadcast::Sender<Event>,
    /// Refreshing is paused fleet-wide until this instant (ms) after an `invalid_client`.
    pub(crate) paused_until: Arc<AtomicU64>,
    pub(crate) credentials_pause: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) permits: Semaphore,
    /// The permits' number (`Config::max_concurrent_refreshes`).
    pub(crate) max_refreshes: usize,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) scheduler: SchedulerHandle,
    /// How many engine-owned attempt tasks are running (shutdown waits for none).
    pub(crate) attempts: watch::Sender<usize>,
    pub(crate) metrics: Metrics,
    /// Grants to trim at the next compaction pass, and the per-grant cap (`None`: no compaction).
    pub(crate) trim_queue: TrimQueue,
    pub(crate) history_cap: Option<usize>,
    /// The grants whose recovery is still running (after open's budget ran out).
    pub(crate) recovering: crate::recover::Recovering,
}

/// Counts one engine-owned attempt task while it lives.
pub(crate) struct AttemptTicket(watch::Sender<usize>);

impl Drop for AttemptTicket {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Inner {
    /// Registers an engine-owned attempt task.
    pub(crate) fn attempt_ticket(&self) -> AttemptTicket {
        self.attempts.send_modify(|n| *n += 1);
        AttemptTicket(self.attempts.clone())
    }

    /// Waits until no engine-owned attempt task runs.
    pub(crate) async fn attempts_finished(&self) {
        let mut rx = self.attempts.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
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
        self.metrics.census().moved(&s.grant, done.prior(), s.phase.name());
        if let Some(cap) = self.history_cap {
            self.trim_queue.offer(s, cap);
        }
        let slot = self.slots.get_or_create(s.grant.account());
        self.refresh_cache(&slot, s);
        self.emit(done.events());
        self.scheduler.notify(s, &self.machine, now());
    }

    /// Caches what `s` (a durable state) allows to be served, unless a newer state's line is cached.
    pub(crate) fn refresh_cache(&self, slot: &Slot, s: &GrantState) {
        match (&s.phase, &s.tokens) {
            (Phase::Healthy | Phase::Ambiguous(_) | Phase::Refreshing { .. }, Some(t)) => {
                slot.offer(t, s.version, self.machine.due_at(t, s.updated_at).min(t.access_expires_at))
            }
            (Phase::NeedsReauth { .. }, Some(t)) => {
                // The last access token stays valid until its own expiry (Shopify); serve it, never refresh.
                slot.offer(t, s.version, t.access_expires_at)
            }
            _ => slot.clear(s.version),
        }
    }

    /// Makes one planned transition durable (recovery's; no retry: a conflict is an error).
    pub(crate) async fn commit_transition(&self, t: Transition) -> Result<(), Error> {
        let done = Pending::from_transition(t).make_durable(&self.store).await?;
        self.after_durable(&done);
        Ok(())
    }

    /// Until when sending is paused fleet-wide (after the app's credentials were refused).
    pub(crate) fn paused(&self, now: UnixMillis) -> Option<UnixMillis> {
        let until = self.paused_until.load(Ordering::SeqCst);
        (now.0 < until).then_some(UnixMillis(until))
    }
}
