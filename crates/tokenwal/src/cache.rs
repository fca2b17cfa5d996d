//! The token cache: sharded, with lock-free reads of each grant's cached access token.
//!
//! The hot path ([`crate::Engine::access_token`] with a valid cached token) takes one shard read lock
//! (uncontended unless a new grant is being added to the same shard) and one `ArcSwap` load; no I/O,
//! no global lock.

use arc_swap::ArcSwapOption;
use hashbrown::hash_table::{Entry, HashTable};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock};
use tokenwal_core::{AccessToken, TokenSet, UnixMillis};
use tokio::sync::Semaphore;
use zeroize::Zeroize;

const SHARDS: usize = 64;

// Memory (issue 15: ≤ 1 KiB of RSS per grant at 1M grants, every token cached). A cached grant
// costs, on a 64-bit target with glibc's malloc (chunks of 16 B steps, 8 B of overhead each): its
// table bucket (one `Arc<Slot>` pointer and one control byte, × 1.1–2.3 buckets per entry at a
// hash table's load), the `Slot` (its account text inline when short, the line pointer and the
// flight lock: 112 B), the line (`Cached`, 64 B) and the token's text: three allocations, no
// second copy of the key, no separate allocation for the lock. docs/benchmarks.md §15 has the
// breakdown.

/// A cached access token's text: one exact-size allocation, zeroized when the last line holding it
/// drops, and never printed (no `Debug`). Served as an [`AccessToken`] copy.
struct CachedToken(Box<str>);

impl CachedToken {
    fn of(token: &AccessToken) -> CachedToken {
        // The cache keeps its own copy of the secret inside the process; it leaves only as an
        // `AccessToken` (itself zeroizing and redacted).
        CachedToken(token.expose_secret().into())
    }

    fn serve(&self) -> AccessToken {
        AccessToken::new(String::from(&*self.0))
    }
}

impl Clone for CachedToken {
    fn clone(&self) -> CachedToken {
        CachedToken(self.0.clone())
    }
}

impl Drop for CachedToken {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A grant's cache line: its access token, or a tombstone (no token may be served) left by a state
/// without one.
pub(crate) struct Cached {
    /// `None`: a tombstone.
    token: Option<CachedToken>,
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
/// a caller, or the engine's attempt task the caller handed it to. It holds the slot's only flight
/// permit and gives it back when dropped.
pub(crate) struct Flight {
    slot: Arc<Slot>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.slot.flight.add_permits(1);
    }
}

/// Per-grant slot: the grant's account (its key in [`Slots`]), the cached token and the
/// single-flight lock (a one-permit semaphore: FIFO like `tokio::sync::Mutex`, which is one inside,
/// but inline instead of a second `Arc`).
pub(crate) struct Slot {
    account: Account,
    pub(crate) cached: ArcSwapOption<Cached>,
    flight: Semaphore,
}

/// The longest account text kept inside its [`Slot`] (a shop domain of up to 24 characters before
/// `.myshopify.com`, a Customer Account API `{shop_id}:{customer_id}` of Shopify's usual 25 bytes);
/// longer ones take an allocation of their own. 38 makes `Account` 40 bytes.
const INLINE_ACCOUNT: usize = 38;

/// A slot's account text (its key), inline when short.
enum Account {
    Inline { len: u8, bytes: [u8; INLINE_ACCOUNT] },
    Heap(Box<[u8]>),
}

impl Account {
    fn new(account: &str) -> Account {
        let text = account.as_bytes();
        if text.len() <= INLINE_ACCOUNT {
            let mut bytes = [0; INLINE_ACCOUNT];
            bytes[..text.len()].copy_from_slice(text);
            Account::Inline { len: text.len() as u8, bytes }
        } else {
            Account::Heap(text.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Account::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Account::Heap(bytes) => bytes,
        }
    }
}

impl Slot {
    fn new(account: &str) -> Slot {
        Slot { account: Account::new(account), cached: ArcSwapOption::empty(), flight: Semaphore::new(1) }
    }

    /// Whether this is `account`'s slot.
    fn is(&self, account: &str) -> bool {
        self.account.as_bytes() == account.as_bytes()
    }

    /// Caches `tokens` from the state at `version` unless a newer state's line is cached already.
    pub(crate) fn offer(&self, tokens: &TokenSet, version: u64, refresh_at: UnixMillis) {
        let token = Some(CachedToken::of(&tokens.access_token));
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
        guard.as_ref().filter(|c| now < c.expires_at).and_then(|c| c.token.as_ref().map(CachedToken::serve))
    }

    /// Waits for the grant's flight lock.
    pub(crate) async fn flight(self: &Arc<Self>) -> Flight {
        // The semaphore is never closed. The permit is forgotten here, with no await in between,
        // and returned by `Flight`'s drop: a cancelled wait takes nothing.
        self.flight.acquire().await.expect("a slot's flight semaphore is never closed").forget();
        Flight { slot: Arc::clone(self) }
    }

    /// The grant's flight lock, if it is free.
    pub(crate) fn try_flight(self: &Arc<Self>) -> Option<Flight> {
        self.flight.try_acquire().ok()?.forget();
        Some(Flight { slot: Arc::clone(self) })
    }
}

type Shard = RwLock<HashTable<Arc<Slot>>>;

/// Grants' slots, sharded by account. One keyed hash per lookup picks both the shard (bits 32–37)
/// and the place in its table (hashbrown: the low bits, and the top 7 as the control byte).
pub(crate) struct Slots {
    hasher: RandomState,
    shards: Box<[Shard]>,
}

impl Slots {
    pub(crate) fn new() -> Slots {
        Slots { hasher: RandomState::new(), shards: (0..SHARDS).map(|_| RwLock::new(HashTable::new())).collect() }
    }

    fn locate(&self, account: &str) -> (u64, &Shard) {
        let hash = self.hasher.hash_one(account.as_bytes());
        (hash, &self.shards[(hash >> 32) as usize % SHARDS])
    }

    /// The slot, if the grant has one.
    pub(crate) fn get(&self, account: &str) -> Option<Arc<Slot>> {
        let (hash, shard) = self.locate(account);
        shard.read().unwrap_or_else(|p| p.into_inner()).find(hash, |s| s.is(account)).cloned()
    }

    /// The slot, created if missing.
    pub(crate) fn get_or_create(&self, account: &str) -> Arc<Slot> {
        if let Some(s) = self.get(account) {
            return s;
        }
        let (hash, shard) = self.locate(account);
        let mut w = shard.write().unwrap_or_else(|p| p.into_inner());
        match w.entry(hash, |s| s.is(account), |s| self.hasher.hash_one(s.account.as_bytes())) {
            Entry::Occupied(e) => Arc::clone(e.get()),
            Entry::Vacant(v) => Arc::clone(v.insert(Arc::new(Slot::new(account))).get()),
        }
    }

    /// Marks every cached line stale (see [`Slot::mark_stale`]): what other processes wrote while
    /// nobody was listening is unknown.
    pub(crate) fn mark_all_stale(&self) {
        for shard in &self.shards {
            for slot in shard.read().unwrap_or_else(|p| p.into_inner()).iter() {
                slot.mark_stale(u64::MAX);
            }
        }
    }

    /// A cached token usable without a refresh at `now`.
    ///
    /// Checked under the shard's read lock, without cloning the slot's `Arc` (no shared refcount
    /// traffic on the hot path).
    pub(crate) fn fresh(&self, account: &str, now: UnixMillis) -> Option<AccessToken> {
        let (hash, shard) = self.locate(account);
        let shard = shard.read().unwrap_or_else(|p| p.into_inner());
        let guard = shard.find(hash, |s| s.is(account))?.cached.load();
        match guard.as_ref() {
            Some(c) if now < c.refresh_at => c.token.as_ref().map(CachedToken::serve),
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
        let slot = Slot::new("s");
        slot.offer(&set("new"), 5, UnixMillis(9_000));
        slot.offer(&set("old"), 4, UnixMillis(9_000));
        assert_eq!(slot.still_valid(UnixMillis(1)).unwrap(), AccessToken::new("new"));
    }

    /// Regression (issue 18.4): after `clear`, `offer` accepted any generation, so a state read just
    /// before a concurrent uninstall was re-cached and served.
    #[test]
    fn a_tombstone_keeps_older_states_out() {
        let slot = Slot::new("s");
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

    #[tokio::test]
    async fn the_flight_lock_admits_one_holder_and_is_released_on_drop() {
        let slots = Slots::new();
        let slot = slots.get_or_create("s");
        let held = slot.try_flight().expect("free at first");
        assert!(slots.get_or_create("s").try_flight().is_none(), "one holder per grant");
        assert!(slots.get_or_create("t").try_flight().is_some(), "other grants are not blocked");
        let waiter = tokio::spawn({
            let slot = Arc::clone(&slot);
            async move { slot.flight().await }
        });
        // A wait given up before it got the lock takes nothing.
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(20), slot.flight()).await;
        assert!(gave_up.is_err(), "held: the wait times out");
        assert!(!waiter.is_finished(), "held: the waiter waits");
        drop(held);
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter gets the lock once it is dropped")
            .expect("waiter task");
        assert!(slot.try_flight().is_none(), "the waiter holds it now");
        drop(next);
        assert!(slot.try_flight().is_some(), "free again");
    }

    #[test]
    fn each_account_has_one_slot_found_by_its_text() {
        let slots = Slots::new();
        // Inline (≤ 38 bytes) and heap (longer) account texts, alike but for their last bytes.
        let accounts: Vec<String> = (0..2_000)
            .map(|i| format!("68000000016:{i:013}"))
            .chain((0..2_000).map(|i| format!("{}{i:013}.myshopify.com", "x".repeat(30))))
            .collect();
        for (i, a) in accounts.iter().enumerate() {
            slots.get_or_create(a).offer(&set(&format!("t{i}")), 1, UnixMillis(9_000));
        }
        for (i, a) in accounts.iter().enumerate() {
            assert!(Arc::ptr_eq(&slots.get_or_create(a), &slots.get(a).expect("created")));
            assert_eq!(slots.fresh(a, UnixMillis(1)).unwrap(), AccessToken::new(format!("t{i}")));
        }
        assert!(slots.get("68000000016:").is_none());
        assert!(slots.get("68000000016:00000000000000").is_none(), "a prefix's match is not enough");
        let long = "y".repeat(60);
        for (stored, other) in [("ab", "abc"), ("abc", "ab"), (&long[..59], &long[..]), (&long[..], &long[..59])] {
            assert!(Slot::new(stored).is(stored) && !Slot::new(stored).is(other), "{stored} vs {other}");
        }
        assert!(slots.fresh("nobody", UnixMillis(1)).is_none());
        assert_eq!(slots.shards.iter().map(|s| s.read().unwrap().len()).sum::<usize>(), accounts.len());
    }

    /// The per-grant allocations (issue 15's memory target). 64-bit sizes; `Arc` adds 16 B of
    /// counters, glibc's malloc 8 B of overhead, rounded up to 16 B.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_cached_grant_is_three_small_allocations() {
        use std::mem::size_of;
        let chunk = |bytes: usize| (bytes + 8).div_ceil(16) * 16;
        assert_eq!(size_of::<Arc<Slot>>(), 8, "a table bucket holds one pointer");
        assert_eq!(chunk(16 + size_of::<Cached>()), 64, "a line: {} B", size_of::<Cached>());
        assert_eq!(size_of::<Account>(), 40);
        assert_eq!(chunk(16 + size_of::<Slot>()), 112, "a slot: {} B", size_of::<Slot>());
    }
}
