//! The store handle, by subject.
//!
//! * `open` — [`Store::open`] (sled), [`Store::in_memory`], and what every open does: read or
//!   create the `meta` tree, count the open index, start the committer.
//! * `upgrade` — [`Store::upgrade_format1`]: sealing a format-1 store in place.
//! * `write` — [`Store::apply`]: validate, seal on the caller's thread, hand to the committer.
//! * `read` — [`Store::get`], [`Store::open_grants`], [`Store::for_each_grant`],
//!   [`Store::history`]: durable state only (pre-images first).
//! * `rekey` — [`Store::reseal_blocking`], [`Store::key_usage`]: moving states to the active key.
//! * `compact` — [`Store::compact`]: deleting journal records past retention.
//! * `hooks` — test hooks (crash images, the ack hold, fault injection, raw writes, read counts), compiled only
//!   with the `test-hooks` feature.

mod compact;
#[cfg(any(test, feature = "test-hooks"))]
mod hooks;
mod open;
mod read;
mod rekey;
mod upgrade;
mod write;

#[cfg(any(test, feature = "test-hooks"))]
pub use hooks::{AckHold, ReadCount};
pub use rekey::{KeyUsage, Reseal};

use crate::backend::pg::notify::RemoteWrites;
use crate::backend::Backend;
use crate::commit::Request;
use crate::config::{StoreConfig, StoreStats};
use crate::error::StoreError;
use crate::keys::KeyId;
use crate::shared::{FailStop, Shared};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use tokenwal_core::{DurableLog, FingerprintKey, WriteBatch};
use tokio::sync::watch;

/// The durable journal and token store: a cheap, cloneable handle.
///
/// One committer thread owns all writes ([`Store::apply`]); reads run on the caller's thread and
/// see only durable state. Dropping the last handle stops the committer (after it answers the
/// writes already queued) and closes the backend.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Request>>,
    committer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A test's ack hold must not keep the committer parked forever.
        self.shared.hooks.shutdown();
        drop(self.tx.take());
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.shared().backend.name())
            .field("grants", &self.grant_count())
            .field("poisoned", &self.shared().is_poisoned())
            .finish_non_exhaustive()
    }
}

impl Store {
    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    pub(crate) fn check(&self) -> Result<(), StoreError> {
        if self.shared().is_poisoned() {
            Err(StoreError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// The key of credential fingerprints: 32 random bytes created with the store, persisted in it.
    pub fn fingerprint_key(&self) -> FingerprintKey {
        self.shared().fingerprint.clone()
    }

    /// The ids of the store keys this handle holds (active first).
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.shared().keys.ids()
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.shared().config
    }

    /// Counters since open (batches applied, records, syncs, conflicts, …).
    pub fn stats(&self) -> StoreStats {
        self.shared().counters.snapshot()
    }

    /// The number of durable grants (kept as a counter: O(1)).
    pub fn grant_count(&self) -> usize {
        self.shared().durable_grants.load(Ordering::Relaxed) as usize
    }

    /// Whether an earlier write or sync failed (every call now fails until the store is reopened).
    pub fn is_poisoned(&self) -> bool {
        self.shared().is_poisoned()
    }

    /// Why and since when the store is fail-stopped (`None`: it is not).
    pub fn fail_stop(&self) -> Option<FailStop> {
        self.shared().fail_stop.borrow().clone()
    }

    /// Whether other processes may write this store at the same time (PostgreSQL: a fleet). Then a
    /// grant read a moment ago may have moved on, another process may hold a grant's attempt in
    /// flight ([`StoreError::Busy`]), and recovery takes over only the attempts of processes that
    /// are gone ([`Store::recoverable_grants`]).
    pub fn is_shared(&self) -> bool {
        matches!(self.shared().backend, Backend::Postgres(_))
    }

    /// What is left of this process's membership lease of a shared store, by the local monotonic
    /// clock from its last renewal (zero once lost); `None`: the store has no lease (sled, memory).
    /// A request whose timeout does not fit in it must not be sent: another process may take its
    /// attempt over once the lease runs out.
    pub fn lease_left(&self) -> Option<std::time::Duration> {
        match &self.shared().backend {
            Backend::Postgres(p) => Some(p.lease_left()),
            _ => None,
        }
    }

    /// This process's member id in a shared store (`None`: not shared).
    pub fn member_id(&self) -> Option<i64> {
        match &self.shared().backend {
            Backend::Postgres(p) => Some(p.member()),
            _ => None,
        }
    }

    /// The live members of a shared store: `(member id, holder)` where the holder is
    /// `host pid=N start=T`. Empty for a store that is not shared.
    pub fn members(&self) -> Result<Vec<(i64, String)>, StoreError> {
        self.check()?;
        match &self.shared().backend {
            Backend::Postgres(p) => p.live_members(),
            _ => Ok(Vec::new()),
        }
    }

    /// The bytes a PostgreSQL store's schema takes in the database (tables, indexes, TOAST);
    /// `None` for the other backends (a sled store's size is its directory's).
    pub fn database_bytes(&self) -> Result<Option<u64>, StoreError> {
        self.check()?;
        match &self.shared().backend {
            Backend::Postgres(p) => p.size_bytes().map(Some),
            _ => Ok(None),
        }
    }

    /// Calls `f` with the grants other processes of a shared store commit, soon after each
    /// commit (PostgreSQL `LISTEN`/`NOTIFY`, on a connection and thread of its own; see
    /// [`RemoteWrites`]), so that a process can drop what it caches of them. `f` must be quick (it
    /// runs on the listener's thread). Returns `false` (and never calls `f`) for a store that is
    /// not shared. A later call replaces the earlier `f`.
    pub fn on_remote_writes(&self, f: impl Fn(RemoteWrites) + Send + Sync + 'static) -> Result<bool, StoreError> {
        self.check()?;
        match &self.shared().backend {
            Backend::Postgres(p) => p.listen(Box::new(f)).map(|()| true),
            _ => Ok(false),
        }
    }

    /// Watches for the fail-stop: the value turns `Some` once, when the first write, sync or
    /// compaction fails (`wait_for(Option::is_some)` waits for it).
    pub fn watch_fail_stop(&self) -> watch::Receiver<Option<FailStop>> {
        self.shared().fail_stop.subscribe()
    }
}

impl DurableLog for Store {
    type Error = StoreError;

    fn apply(&self, batch: WriteBatch) -> impl std::future::Future<Output = Result<(), StoreError>> + Send {
        Store::apply(self, batch)
    }
}
