//! The token cache: sharded, with lock-free reads of each grant's cached access token.
//!
//! The hot path ([`crate::Engine::access_token`] with a valid cached token) takes one shard read lock
//! (uncontended unless a new grant is being added to the same shard) and one `ArcSwap` load; no I/O,
//! no global lock.

use arc_swap::ArcSwapOption;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use tokenwal_core::{AccessToken, TokenSet, UnixMillis};
use tokio::sync::{Mutex, OwnedMutexGuard};

const SHARDS: usize = 64;

/// A grant's cache line: its access token, or a tombstone (no token may be served) left by a state
/// without one.
pub(crate) struct Cached {
    /// `None`: a tombstone.
    pub(crate) token: Option<AccessToken>,
    /// Serve without a refresh until then (expiry minus the refresh margin).
    pub(crate) refresh_at: UnixMillis,
    /// The token is usable until then.
    pub(crate) expires_at: UnixMillis,
    /// The version of the durable state it came from. States are versioned per grant, one step per
    /// transition: a line from an older state never replaces a newer one (a state read just before
    /// an uninstall cannot re-cache a token after it).
    pub(crate) version: u64,
}

/// The single-flight lock of one grant, held (owned) by whoever decides about or runs its attempt:
/// a caller, or the engine's attempt task the caller handed it to.
pub(crate) type Flight = OwnedMutexGuard<()>;

/// Per-grant slot: the cached token and the single-flight lock.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) cached: ArcSwapOption<Cached>,
    flight: Arc<Mutex<()>>,
}

impl Slot {
    /// Caches `tokens` from the state at `version` unless a newer state's line is cached already.
    pub(crate) fn offer(&self, tokens: &TokenSet, version: u64, refresh_at: UnixMillis) {
        let token = Some(tokens.access_token.clone());
        self.put(Cached { token, refresh_at, expires_at: tokens.access_expires_at, version });
    }

    /// Serves nothing from the state at `version` on (a tombstone: older states cannot re-cache).
    pub(crate) fn clear(&self, version: u64) {
        self.put(Cached { token: None, refresh_at: UnixMillis(0), expires_at: UnixMillis(0), version });
    }

    /// Another process wrote the grant's state `version`: a line from an older state is no longer
    /// served by the fast path (the next caller reads the durable state), though it stays usable
    /// while valid for callers who would otherwise queue behind a refresh.
    pub(crate) fn mark_stale(&self, version: u64) {
        self.cached.rcu(|cur| match cur {
            Some(c) if c.version < version && c.refresh_at > UnixMillis(0) => Some(Arc::new(Cached {
                token: c.token.clone(),
                refresh_at: UnixMillis(0),
                expires_at: c.expires_at,
                version: c.version,
            })),
            other => other.clone(),
        });
    }

    fn put(&self, line: Cached) {
        let new = Arc::new(line);
        self.cached.rcu(|cur| match cur {
            Some(c) if c.version > new.version => Some(Arc::clone(c)),
            _ => Some(Arc::clone(&new)),
        });
    }

    /// The cached token if it has not expired (it may be inside the refresh margin).
    pub(crate) fn still_valid(&self, now: UnixMillis) -> Option<AccessToken> {
        let guard = self.cached.load();
        guard.as_ref().filter(|c| now < c.expires_at).and_then(|c| c.token.clone())
    }

    /// Waits for the grant's flight lock.
    pub(crate) async fn flight(&self) -> Flight {
        Arc::clone(&self.flight).lock_owned().await
    }

    /// The grant's flight lock, if it is free.
    pub(crate) fn try_flight(&self) -> Option<Flight> {
        Arc::clone(&self.flight).try_lock_owned().ok()
    }
}

/// Grants' slots, sharded by account.
pub(crate) struct Slots {
    shards: Vec<RwLock<HashMap<String, Arc<Slot>>>>,
}

impl Slots {
    pub(crate) fn new() -> Slots {
        Slots { shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect() }
    }

    fn shard(&self, account: &str) -> &RwLock<HashMap<String, Arc<Slot>>> {
        let mut h = DefaultHasher::new();
        account.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The slot, if the grant has one.
    pub(crate) fn get(&self, account: &str) -> Option<Arc<Slot>> {
        self.shard(account).read().unwrap_or_else(|p| p.into_inner()).get(account).cloned()
    }

    /// The slot, created if missing.
    pub(crate) fn get_or_create(&self, account: &str) -> Arc<Slot> {
        if let Some(s) = self.get(account) {
            return s;
        }
        let mut w = self.shard(account).write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(w.entry(account.to_owned()).or_default())
    }

    /// Marks every cached line stale (see [`Slot::mark_stale`]): what other processes wrote while
    /// nobody was listening is unknown.
    pub(crate) fn mark_all_stale(&self) {
        for shard in &self.shards {
            for slot in shard.read().unwrap_or_else(|p| p.into_inner()).values() {
                slot.mark_stale(u64::MAX);
            }
        }
    }

    /// A cached token usable without a refresh at `now`.
    ///
    /// Checked under the shard's read lock, without cloning the slot's `Arc` (no shared refcount
    /// traffic on the hot path).
    pub(crate) fn fresh(&self, account: &str, now: UnixMillis) -> Option<AccessToken> {
        let shard = self.shard(account).read().unwrap_or_else(|p| p.into_inner());
        let guard = shard.get(account)?.cached.load();
        match guard.as_ref() {
            Some(c) if now < c.refresh_at => c.token.clone(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenwal_core::RefreshToken;

    fn set(access: &str) -> TokenSet {
        TokenSet {
            access_token: AccessToken::new(access),
            access_expires_at: UnixMillis(10_000),
            refresh_token: RefreshToken::new("r"),
            refresh_expires_at: None,
            scope: None,
        }
    }

    #[test]
    fn an_older_state_never_replaces_a_newer_line() {
        let slot = Slot::default();
        slot.offer(&set("new"), 5, UnixMillis(9_000));
        slot.offer(&set("old"), 4, UnixMillis(9_000));
        assert_eq!(slot.still_valid(UnixMillis(1)).unwrap(), AccessToken::new("new"));
    }

    /// Regression (issue 18.4): after `clear`, `offer` accepted any generation, so a state read just
    /// before a concurrent uninstall was re-cached and served.
    #[test]
    fn a_tombstone_keeps_older_states_out() {
        let slot = Slot::default();
        slot.offer(&set("a"), 3, UnixMillis(9_000));
        slot.clear(4);
        slot.offer(&set("a"), 3, UnixMillis(9_000));
        assert!(slot.still_valid(UnixMillis(1)).is_none());
        let slots = Slots::new();
        slots.get_or_create("s").clear(4);
        slots.get_or_create("s").offer(&set("a"), 3, UnixMillis(9_000));
        assert!(slots.fresh("s", UnixMillis(1)).is_none());
        // A newer state (a reinstall) is cached again.
        slot.offer(&set("b"), 5, UnixMillis(9_000));
        assert_eq!(slot.still_valid(UnixMillis(1)).unwrap(), AccessToken::new("b"));
    }

    #[test]
    fn a_line_another_process_superseded_leaves_the_fast_path_until_reread() {
        let slots = Slots::new();
        slots.get_or_create("s").offer(&set("a"), 3, UnixMillis(9_000));
        slots.get_or_create("s").mark_stale(3);
        assert!(slots.fresh("s", UnixMillis(1)).is_some(), "not newer than the cached state: kept");
        slots.get_or_create("s").mark_stale(4);
        assert!(slots.fresh("s", UnixMillis(1)).is_none(), "a newer state elsewhere: the caller re-reads");
        assert!(slots.get_or_create("s").still_valid(UnixMillis(1)).is_some(), "still valid meanwhile");
        slots.get_or_create("s").offer(&set("b"), 4, UnixMillis(9_000));
        assert_eq!(slots.fresh("s", UnixMillis(1)).unwrap(), AccessToken::new("b"));
        slots.mark_all_stale();
        assert!(slots.fresh("s", UnixMillis(1)).is_none());
        slots.get_or_create("s").offer(&set("b"), 4, UnixMillis(9_000));
        assert!(slots.fresh("s", UnixMillis(1)).is_some(), "re-read: served from the cache again");
    }
}
