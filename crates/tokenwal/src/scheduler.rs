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
    // One key per grant, shared by its map entry and its heap entries (memory: a `GrantKey` is two
    // strings, and the scheduler holds every grant).
    let mut heap: BinaryHeap<Reverse<(UnixMillis, Arc<GrantKey>)>> = BinaryHeap::new();
    let mut live: HashMap<Arc<GrantKey>, UnixMillis> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
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
                let keep = match live.get_key_value(&grant) {
                    Some((key, cur)) => (at < *cur || *cur <= now()).then(|| Arc::clone(key)),
                    None => Some(Arc::new(grant)),
                };
                if let Some(key) = keep {
                    live.insert(Arc::clone(&key), at);
                    heap.push(Reverse((at, key)));
                }
            }
            _ = tokio::time::sleep(sleep), if next.is_some() => {
                let t = now();
                while let Some(Reverse((at, _))) = heap.peek() {
                    if *at > t {
                        break;
                    }
                    let Reverse((at, grant)) = heap.pop().expect("peeked");
                    if live.get(&*grant) != Some(&at) {
                        continue; // superseded by a later notification
                    }
                    live.remove(&*grant);
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
