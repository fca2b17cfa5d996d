//! The proactive scheduler: keeps every grant fresh without callers.
//!
//! It holds a min-heap of (due instant, grant). At start it loads every grant's due time with one
//! full scan (in the background: startup does not wait for it); afterwards every durable transition
//! tells it the grant's next due time (through [`crate::schedule::SchedulerHandle`]). When an entry
//! comes due, a task (bounded by the engine's refresh permits) drives the grant: refresh access
//! tokens before they expire, refresh idle grants well before their refresh token expires, and retry
//! ambiguous rotations after their backoff. Stale heap entries are skipped (the map holds each
//! grant's one live due time).

use crate::clock::now;
use crate::inner::Inner;
use crate::schedule::SchedulerRx;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokenwal_core::{GrantKey, GrantState, UnixMillis};
use tracing::{debug, warn};

pub(crate) fn spawn(inner: Arc<Inner>, rx: SchedulerRx) {
    let stopped = inner.scheduler.stopped.clone();
    let _ = stopped.send_replace(false);
    tokio::spawn(async move {
        run(inner, rx).await;
        // Every handle on the engine's internals (and so on the store) is gone by now: whoever waits
        // for this may reopen the store at once.
        let _ = stopped.send_replace(true);
    });
}

/// Without the scheduler: the grant census's scan alone, in the background.
pub(crate) fn spawn_census(inner: Arc<Inner>) {
    // Shutdown waits for the ticket, and the engine's state goes before it.
    let ticket = inner.attempt_ticket();
    tokio::task::spawn_blocking(move || {
        census_scan(&inner, |_| {});
        drop(inner);
        drop(ticket);
    });
}

/// One full scan of the store that takes the grant census (`crate::metrics`) and hands every state
/// to `also`; it stops early at shutdown (the census then stays incomplete).
fn census_scan(inner: &Inner, mut also: impl FnMut(&GrantState)) {
    let census = inner.metrics.census();
    census.begin();
    let mut stopped = false;
    let r = inner.store.for_each_grant(|s| {
        if *inner.shutdown.borrow() {
            stopped = true;
            return;
        }
        census.scanned(&s);
        also(&s);
    });
    if let Err(e) = &r {
        warn!(error = %e, "could not scan the store (the scheduler's initial load, the grant census)");
    }
    census.finish(r.is_ok() && !stopped);
}

async fn run(inner: Arc<Inner>, mut rx: SchedulerRx) {
    let mut shutdown = inner.shutdown.subscribe();
    // Fail-stop: nothing can be written, so nothing is driven (recovery after a reopen takes over).
    let mut fail_stop = inner.store.watch_fail_stop();
    // Initial load, off the async threads; awaited before the scheduler reports itself stopped.
    let scan = {
        let inner2 = Arc::clone(&inner);
        tokio::task::spawn_blocking(move || {
            let t = now();
            census_scan(&inner2, |s| inner2.scheduler.notify(s, &inner2.machine, t));
        })
    };
    let mut due = DueQueue::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let next = due.next();
        let sleep = match next {
            Some(at) => at.since(now()),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = fail_stop.wait_for(Option::is_some) => {
                warn!("store fail-stopped: the scheduler stops; reopen the store to run recovery");
                break;
            }
            msg = rx.rx.recv() => {
                let Some((grant, at)) = msg else { break };
                due.offer(grant, at, now());
            }
            _ = tokio::time::sleep(sleep), if next.is_some() => {
                while let Some(grant) = due.pop_due(now()) {
                    let inner = Arc::clone(&inner);
                    tasks.spawn(async move {
                        let Ok(_permit) = inner.permits.acquire().await else { return };
                        debug!(%grant, "scheduled drive");
                        inner.keep_fresh(&grant, false, None).await;
                    });
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    // Graceful stop: attempts in flight finish (or stay journaled as intents if the process dies).
    while tasks.join_next().await.is_some() {}
    let _ = scan.await;
}

/// The scheduler's due times: each grant's one live due time, and a min-heap of (due time, grant)
/// that may also hold superseded entries (skipped when they come up). One key per grant, shared by
/// its map entry and its heap entries (memory: a `GrantKey` is two strings, and the scheduler holds
/// every grant).
#[derive(Default)]
struct DueQueue {
    heap: BinaryHeap<Reverse<(UnixMillis, Arc<GrantKey>)>>,
    live: HashMap<Arc<GrantKey>, UnixMillis>,
}

impl DueQueue {
    /// `grant` should be looked at by `at`. An earlier time than the live one replaces it; a later
    /// one replaces it only once the live one has passed (a look already due is not postponed: it
    /// will find nothing to do and notify again).
    fn offer(&mut self, grant: GrantKey, at: UnixMillis, now: UnixMillis) {
        let key = match self.live.get_key_value(&grant) {
            Some((key, cur)) if at < *cur || *cur <= now => Arc::clone(key),
            Some(_) => return,
            None => Arc::new(grant),
        };
        self.live.insert(Arc::clone(&key), at);
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest due time held (possibly a superseded entry's: waking early is harmless).
    fn next(&self) -> Option<UnixMillis> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// A grant whose live due time has come by `now`, taken out of the queue; `None` when none is due.
    fn pop_due(&mut self, now: UnixMillis) -> Option<Arc<GrantKey>> {
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                return None;
            }
            let Reverse((at, grant)) = self.heap.pop().expect("peeked");
            if self.live.get(&*grant) == Some(&at) {
                self.live.remove(&*grant);
                return Some(grant);
            }
            // Superseded by a later notification: skipped.
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::DueQueue;
    use tokenwal_core::{GrantKey, ShopDomain, UnixMillis};

    fn grant(shop: &str) -> GrantKey {
        GrantKey::shopify(&ShopDomain::parse(&format!("{shop}.myshopify.com")).unwrap())
    }

    fn drain(q: &mut DueQueue, now: u64) -> Vec<String> {
        std::iter::from_fn(|| q.pop_due(UnixMillis(now))).map(|g| g.to_string()).collect()
    }

    #[test]
    fn an_earlier_due_time_replaces_the_live_one() {
        let mut q = DueQueue::default();
        q.offer(grant("a"), UnixMillis(1_000), UnixMillis(0));
        q.offer(grant("a"), UnixMillis(100), UnixMillis(0));
        assert_eq!(q.next(), Some(UnixMillis(100)));
        assert_eq!(drain(&mut q, 100), vec![grant("a").to_string()], "due at the earlier time");
        assert!(drain(&mut q, 1_000).is_empty(), "the superseded entry is skipped, not driven twice");
    }

    #[test]
    fn a_later_due_time_waits_for_the_live_one_to_pass() {
        let mut q = DueQueue::default();
        q.offer(grant("a"), UnixMillis(100), UnixMillis(0));
        // Not postponed while the earlier look is still ahead.
        q.offer(grant("a"), UnixMillis(1_000), UnixMillis(50));
        assert_eq!(drain(&mut q, 100), vec![grant("a").to_string()]);
        assert!(drain(&mut q, 1_000).is_empty());
        // Once the live time has passed (its look is overdue), a new time replaces it.
        q.offer(grant("b"), UnixMillis(100), UnixMillis(0));
        q.offer(grant("b"), UnixMillis(1_000), UnixMillis(200));
        assert!(drain(&mut q, 999).is_empty(), "the overdue entry was replaced by the later one");
        assert_eq!(drain(&mut q, 1_000), vec![grant("b").to_string()]);
    }

    #[test]
    fn grants_come_due_in_time_order_and_once() {
        let mut q = DueQueue::default();
        for (shop, at) in [("c", 300), ("a", 100), ("b", 200), ("d", 5_000)] {
            q.offer(grant(shop), UnixMillis(at), UnixMillis(0));
        }
        let order: Vec<String> = ["a", "b", "c"].iter().map(|s| grant(s).to_string()).collect();
        assert_eq!(drain(&mut q, 300), order);
        assert_eq!(q.next(), Some(UnixMillis(5_000)));
        assert!(drain(&mut q, 4_999).is_empty());
        assert_eq!(drain(&mut q, 5_000), vec![grant("d").to_string()]);
        assert_eq!(q.next(), None);
    }
}
