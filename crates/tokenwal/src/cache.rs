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
use tokenwal_core::{AccessToken, Generation, TokenSet, UnixMillis};

const SHARDS: usize = 64;

/// A cached access token.
pub(crate) struct Cached {
    pub(crate) token: AccessToken,
    /// Serve without a refresh until then (expiry minus the refresh margin).
    pub(crate) refresh_at: UnixMillis,
    /// The token is usable until then.
    pub(crate) expires_at: UnixMillis,
    /// The generation it came from: an older generation never replaces a newer one.
    pub(crate) generation: Generation,
}

/// Per-grant slot: the cached token and the single-flight lock.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) cached: ArcSwapOption<Cached>,
    /// Held by whoever is deciding about or running this grant's attempt.
    pub(crate) flight: tokio::sync::Mutex<()>,
}

impl Slot {
    /// Caches `tokens` of `generation` unless a newer generation is cached already.
    pub(crate) fn offer(&self, tokens: &TokenSet, generation: Generation, refresh_at: UnixMillis) {
        let new = Arc::new(Cached {
            token: tokens.access_token.clone(),
            refresh_at,
            expires_at: tokens.access_expires_at,
            generation,
        });
        self.cached.rcu(|cur| match cur {
            Some(c) if c.generation > generation => Some(Arc::clone(c)),
            _ => Some(Arc::clone(&new)),
        });
    }

    /// The cached token if it has not expired (it may be inside the refresh margin).
    pub(crate) fn still_valid(&self, now: UnixMillis) -> Option<AccessToken> {
        let guard = self.cached.load();
        guard.as_ref().filter(|c| now < c.expires_at).map(|c| c.token.clone())
    }

    pub(crate) fn clear(&self) {
        self.cached.store(None);
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

    /// A cached token usable without a refresh at `now`.
    ///
    /// Checked under the shard's read lock, without cloning the slot's `Arc` (no shared refcount
    /// traffic on the hot path).
    pub(crate) fn fresh(&self, account: &str, now: UnixMillis) -> Option<AccessToken> {
        let shard = self.shard(account).read().unwrap_or_else(|p| p.into_inner());
        let guard = shard.get(account)?.cached.load();
        match guard.as_ref() {
            Some(c) if now < c.refresh_at => Some(c.token.clone()),
            _ => None,
        }
    }
}
