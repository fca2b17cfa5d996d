//! Background compaction: keeps the journal bounded without stalling refreshes.
//!
//! Every [`Compaction::interval`] one pass runs, in chunks, each on a blocking thread (the store's
//! `compact_chunk` records at most), resting after each chunk as long as it took (at most
//! [`MAX_REST`]) so that a pass keeps the store busy at most half of the time and refreshes and
//! their commit groups go on (a pass over a backlog without the rests multiplied refresh p99 by up to
//! 7.7: `docs/benchmarks.md` §16): first each grant queued for trimming loses its records beyond its newest
//! [`Compaction::history_per_grant`] ([`tokenwal_store::Store::trim_history`]), then records older
//! than the retention go ([`tokenwal_store::Store::compact`]). A grant is queued for trimming when
//! its state version reaches a multiple of half the cap, so the queue holds a small fraction of the
//! grants written in an interval and a grant's history stays under 1.5 × the cap plus one
//! transition's records. Nothing it deletes is needed by recovery (grant states and the open index
//! are never compacted) or by a journal cursor's consumer (records at or above the lowest cursor
//! stay). Deletions are made durable by the next commit group's sync; a crash before that undoes
//! them, and a later pass redoes them (`docs/journal.md`, crash points).

use crate::clock::now;
use crate::config::Compaction;
use crate::failpoint;
use crate::inner::Inner;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokenwal_core::{GrantKey, GrantState};
use tracing::{debug, warn};

/// Grants whose history may have outgrown the cap, for the next pass.
#[derive(Default)]
pub(crate) struct TrimQueue {
    grants: Mutex<HashSet<GrantKey>>,
}

impl TrimQueue {
    /// Queues `s`'s grant if its version is a multiple of half of `cap`.
    pub(crate) fn offer(&self, s: &GrantState, cap: usize) {
        let every = (cap / 2).max(1) as u64;
        if s.version % every == 0 {
            self.grants.lock().unwrap_or_else(PoisonError::into_inner).insert(s.grant.clone());
        }
    }

    fn take(&self) -> Vec<GrantKey> {
        std::mem::take(&mut *self.grants.lock().unwrap_or_else(PoisonError::into_inner)).into_iter().collect()
    }
}

pub(crate) fn spawn(inner: Arc<Inner>, c: Compaction) {
    // Shutdown waits for the ticket: no chunk runs on the store after it returns, and the engine's
    // state (with the store and its file lock) is released before the ticket is.
    let ticket = inner.attempt_ticket();
    tokio::spawn(async move {
        run(inner, c).await;
        drop(ticket);
    });
}

async fn run(inner: Arc<Inner>, c: Compaction) {
    {
        let mut shutdown = inner.shutdown.subscribe();
        let mut fail_stop = inner.store.watch_fail_stop();
        // The first pass soon after open (a store written by an older release may hold a backlog).
        let mut wait = c.interval.min(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = fail_stop.wait_for(Option::is_some) => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = c.interval;
            match pass(&inner, &c).await {
                Ok((trimmed, expired)) => {
                    if trimmed + expired > 0 {
                        debug!(trimmed, expired, "compaction pass")
                    }
                }
                Err(Stop::Shutdown) => return,
                Err(Stop::Failed(e)) => {
                    // A failed deletion poisons the store (fail-stop): nothing more to do here.
                    warn!(error = %e, "compaction stopped");
                    return;
                }
            }
        }
    }
}

enum Stop {
    Shutdown,
    Failed(String),
}

/// One pass: trims, then retention. Returns the records deleted by each.
async fn pass(inner: &Arc<Inner>, c: &Compaction) -> Result<(usize, usize), Stop> {
    let chunk = inner.store.config().compact_chunk.max(1);
    let mut trimmed = 0;
    let queued = inner.trim_queue.take();
    for grants in queued.chunks(64) {
        let (store, grants, keep) = (inner.store.clone(), grants.to_vec(), c.history_per_grant);
        let n = blocking(inner, move || {
            let mut n = 0;
            for g in &grants {
                // Usually one call; a grant with a backlog takes a few.
                loop {
                    let k = store.trim_history(g, keep)?;
                    n += k;
                    if k < chunk {
                        break;
                    }
                }
            }
            Ok(n)
        })
        .await?;
        if n > 0 {
            failpoint::hit("during-compaction");
        }
        trimmed += n;
    }
    let mut expired = 0;
    loop {
        let store = inner.store.clone();
        let r = blocking(inner, move || store.compact(now())).await?;
        expired += r.removed;
        if r.removed > 0 {
            failpoint::hit("during-compaction");
        }
        if !r.more {
            break;
        }
    }
    Ok((trimmed, expired))
}

/// The longest rest between two chunks of a pass.
const MAX_REST: Duration = Duration::from_secs(1);

/// Runs one chunk on a blocking thread, then rests as long as it took (at most [`MAX_REST`]; cut
/// short by shutdown); stops at shutdown.
async fn blocking<T: Send + 'static>(
    inner: &Inner,
    f: impl FnOnce() -> Result<T, tokenwal_store::StoreError> + Send + 'static,
) -> Result<T, Stop> {
    if *inner.shutdown.borrow() {
        return Err(Stop::Shutdown);
    }
    let started = Instant::now();
    let r = tokio::task::spawn_blocking(f).await.map_err(|e| Stop::Failed(format!("compaction task failed: {e}")))?;
    let rest = started.elapsed().min(MAX_REST);
    let mut shutdown = inner.shutdown.subscribe();
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => {}
        _ = tokio::time::sleep(rest) => {}
    }
    r.map_err(|e| Stop::Failed(e.to_string()))
}
