//! Test hooks: crash images, the ack hold, fault injection, raw writes and read counts. Compiled
//! only with the `test-hooks` feature (and in this crate's unit tests): a release build has none of
//! them.

use super::Store;
use crate::backend::mem::MemBackend;
use crate::backend::Backend;
use crate::hooks::{FaultPoint, Hold};
use crate::keys::KeyRing;
use crate::layout::Tree;
use crate::lock::lock;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The live [`ReadCount`]s: (the store's identity, its counter). Kept beside the store rather than
/// in it so that counting costs a release build nothing and a test-hooks build one relaxed load
/// per read while no test counts.
static READ_COUNTS: Mutex<Vec<(usize, Arc<AtomicU64>)>> = Mutex::new(Vec::new());
/// How many [`ReadCount`]s live (0: [`Store::note_read`] returns at once).
static COUNTING: AtomicUsize = AtomicUsize::new(0);
/// The identity a [`Store::count_all_reads`] counter is filed under (no store's `Arc` is at 0).
const ANY_STORE: usize = 0;

impl Store {
    /// restart after a power cut at this instant would find. Writes applied but not yet synced are
    /// absent. The crash image is not poisoned, whatever this store is.
    ///
    /// # Panics
    ///
    /// If this store is not in-memory ([`Store::in_memory`]).
    pub fn crash_image(&self) -> Store {
        match &self.shared().backend {
            Backend::Memory(m) => {
                let backend = Backend::Memory(MemBackend::from_image(m.durable_image()));
                Store::start(backend, self.shared().keys.clone(), self.shared().config.clone(), Instant::now(), None)
                    .expect("a crash image of an in-memory store always opens")
                    .0
            }
            Backend::Sled(_) | Backend::Postgres(_) => panic!("crash_image is only available on an in-memory store"),
        }
    }

    /// Test hook: [`Store::crash_image`], reopened under the ring `keys` makes of this store's ring
    /// (e.g. a rotated one).
    ///
    /// # Panics
    ///
    /// If this store is not in-memory, or the new ring cannot open it.
    pub fn crash_image_with_keys(&self, keys: impl FnOnce(&KeyRing) -> KeyRing) -> Store {
        match &self.shared().backend {
            Backend::Memory(m) => {
                let backend = Backend::Memory(MemBackend::from_image(m.durable_image()));
                let keys = keys(&self.shared().keys);
                Store::start(backend, keys, self.shared().config.clone(), Instant::now(), None)
                    .expect("the crash image opens under the new ring")
                    .0
            }
            Backend::Sled(_) | Backend::Postgres(_) => {
                panic!("crash_image_with_keys is only available on an in-memory store")
            }
        }
    }

    /// Test hook: holds every commit group between its writes and its sync until the returned guard
    /// is released or dropped. Writers are not answered meanwhile.
    pub fn hold_acks(&self) -> AckHold {
        let hold = Arc::clone(&self.shared().hooks.hold);
        hold.set(true, false);
        AckHold { hold }
    }

    /// Test hook: holds every commit group's **sync** until the guard is released or dropped (or
    /// [`AckHold::step`] lets one through). Unlike [`Store::hold_acks`], a store whose sync runs
    /// beside the writes (sled) goes on writing the next group while one is held: it then waits,
    /// written and unsynced, for its own sync.
    pub fn hold_syncs(&self) -> AckHold {
        let hold = Arc::clone(&self.shared().hooks.hold);
        hold.set(true, true);
        AckHold { hold }
    }

    /// Test hook: counts this store's [`Store::get`] calls (through any of its handles) while the
    /// returned guard lives.
    pub fn count_reads(&self) -> ReadCount {
        ReadCount::filed_under(self.identity())
    }

    /// Test hook: counts the [`Store::get`] calls of **every** store of this process while the returned
    /// guard lives — for a store that an engine opens itself, whose recovery reads before a handle
    /// could be counted. Only meaningful in a test binary that runs one test at a time.
    pub fn count_all_reads() -> ReadCount {
        ReadCount::filed_under(ANY_STORE)
    }

    /// Counts one [`Store::get`] for the [`ReadCount`]s of this store.
    pub(super) fn note_read(&self) {
        if COUNTING.load(Ordering::Relaxed) == 0 {
            return;
        }
        let me = self.identity();
        for (_, count) in lock(&READ_COUNTS).iter().filter(|(id, _)| *id == me || *id == ANY_STORE) {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What every handle of one store shares, as a number.
    fn identity(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Test hook: makes the `nth` (1 = next) visit of `point` fail with an I/O error.
    pub fn inject_fault(&self, point: FaultPoint, nth: u64) {
        self.shared().hooks.arm_fault(point, nth);
    }

    /// Test hook: overwrites one raw entry of the in-memory store's live and durable images
    /// (`tree` is one of the [`crate::layout`] tree names). Returns `false` for a sled store or an unknown
    /// tree.
    pub fn put_raw_for_test(&self, tree: &str, key: &[u8], value: &[u8]) -> bool {
        let Some(t) = Tree::ALL.into_iter().find(|t| t.name() == tree) else { return false };
        match &self.shared().backend {
            Backend::Memory(m) => {
                m.put_durable(t, key, value);
                true
            }
            Backend::Sled(_) | Backend::Postgres(_) => false,
        }
    }
}

/// Test hook returned by [`Store::count_reads`]: the number of [`Store::get`] calls made on the store
/// since, until it is dropped.
#[must_use = "counting ends when this guard is dropped"]
pub struct ReadCount {
    count: Arc<AtomicU64>,
}

impl ReadCount {
    /// A new counter of the reads of the store whose identity is `identity` (or of every store).
    fn filed_under(identity: usize) -> ReadCount {
        let count = Arc::new(AtomicU64::new(0));
        lock(&READ_COUNTS).push((identity, Arc::clone(&count)));
        COUNTING.fetch_add(1, Ordering::SeqCst);
        ReadCount { count }
    }

    /// The reads counted so far.
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// The reads counted so far, and starts again from zero.
    pub fn take(&self) -> u64 {
        self.count.swap(0, Ordering::SeqCst)
    }
}

impl Drop for ReadCount {
    fn drop(&mut self) {
        lock(&READ_COUNTS).retain(|(_, c)| !Arc::ptr_eq(c, &self.count));
        COUNTING.fetch_sub(1, Ordering::SeqCst);
    }
}

impl fmt::Debug for ReadCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadCount").field("reads", &self.get()).finish()
    }
}

/// Test hook returned by [`Store::hold_acks`]: while it lives, commit groups are written but not
/// synced, and their writers are not answered.
#[must_use = "the hold ends when this guard is dropped"]
pub struct AckHold {
    hold: Arc<Hold>,
}

impl AckHold {
    /// Waits until a commit group is parked at the hold (written, not synced). `false` on timeout.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        self.hold.wait_parked(timeout)
    }

    /// Lets one parked group (the one parked now, or else the next to park) sync; the hold stays.
    pub fn step(&self) {
        self.hold.step();
    }

    /// Lets the parked group (and every later one) sync.
    pub fn release(self) {}
}

impl Drop for AckHold {
    fn drop(&mut self) {
        self.hold.set(false, false);
    }
}

impl fmt::Debug for AckHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AckHold")
    }
}
