//! Test hooks of the committer: injected I/O faults and a gate between a group's writes and its
//! sync.
//!
//! They exist only with the `test-hooks` cargo feature (and in this crate's own unit tests).
//! Without it, [`Hooks`] is an empty struct whose calls do nothing, so a release build carries
//! neither the code nor the public items ([`FaultPoint`], `Store::inject_fault`,
//! `Store::hold_acks`, …).

/// Where a test can make the store fail.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FaultPoint {
    /// Before a batch's transaction: nothing of it is written.
    BeforeWrite,
    /// After a batch's transaction: it is written (visible, not yet synced) but reported failed.
    AfterWrite,
    /// Instead of the group's flush and sync: the group is written but not made durable.
    Sync,
}

/// Test hook (only with the `test-hooks` feature): a store opened while this environment variable
/// holds `N` fails its `N`-th group sync (1 = the first), as `Store::inject_fault(FaultPoint::Sync, N)`
/// would. It lets process tests make a `tokenwal` binary built with the feature fail-stop.
#[cfg(any(test, feature = "test-hooks"))]
pub const SYNC_FAULT_ENV: &str = "TOKENWAL_TEST_INJECT_SYNC_FAULT";

#[cfg(any(test, feature = "test-hooks"))]
pub(crate) use enabled::{Hold, Hooks};

#[cfg(any(test, feature = "test-hooks"))]
mod enabled {
    use super::FaultPoint;
    use crate::lock::lock;
    use std::io;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct HoldState {
        held: bool,
        /// Only the sync step parks (with a pipelined sync, the writer goes on writing).
        syncs_only: bool,
        /// Parks each let through (`AckHold::step`).
        passes: u64,
        parked: bool,
        shutdown: bool,
    }

    /// A gate between a group's writes and its sync.
    #[derive(Default)]
    pub(crate) struct Hold {
        state: Mutex<HoldState>,
        cv: Condvar,
    }

    impl Hold {
        pub(crate) fn set(&self, held: bool, syncs_only: bool) {
            let mut g = lock(&self.state);
            (g.held, g.syncs_only, g.passes) = (held, syncs_only, 0);
            drop(g);
            self.cv.notify_all();
        }

        pub(crate) fn step(&self) {
            lock(&self.state).passes += 1;
            self.cv.notify_all();
        }

        fn shutdown(&self) {
            lock(&self.state).shutdown = true;
            self.cv.notify_all();
        }

        fn park_if_held(&self, at_sync: bool) -> bool {
            let mut g = lock(&self.state);
            if !g.held || g.shutdown || (g.syncs_only && !at_sync) {
                return false;
            }
            while g.held && !g.shutdown {
                if g.passes > 0 {
                    g.passes -= 1;
                    break;
                }
                g.parked = true;
                self.cv.notify_all();
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.parked = false;
            self.cv.notify_all();
            true
        }

        pub(crate) fn wait_parked(&self, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            let mut g = lock(&self.state);
            while !g.parked {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
            }
            true
        }
    }

    /// The hooks of one store.
    #[derive(Default)]
    pub(crate) struct Hooks {
        pub(crate) hold: Arc<Hold>,
        faults: Mutex<Option<(FaultPoint, u64)>>,
    }

    impl Hooks {
        pub(crate) fn new() -> Hooks {
            let hooks = Hooks::default();
            // Process tests of a binary built with this feature: its stores fail the n-th sync.
            if let Some(n) = std::env::var(super::SYNC_FAULT_ENV).ok().and_then(|v| v.parse().ok()) {
                hooks.arm_fault(FaultPoint::Sync, n);
            }
            hooks
        }

        /// Unparks a held committer for good (the last store handle is gone).
        pub(crate) fn shutdown(&self) {
            self.hold.shutdown();
        }

        /// Called by the committer between a group's writes and its sync.
        pub(crate) fn park_if_held(&self) {
            self.hold.park_if_held(true);
        }

        /// Called by the committer, with a pipelined sync, before writing a group while another
        /// is being synced: it parks too unless only syncs are held. Whether it parked.
        pub(crate) fn park_writer_if_held(&self) -> bool {
            self.hold.park_if_held(false)
        }

        pub(crate) fn arm_fault(&self, point: FaultPoint, nth: u64) {
            *lock(&self.faults) = Some((point, nth.max(1)));
        }

        /// Fails if a fault is armed at `point` and this is its n-th visit.
        pub(crate) fn fault(&self, point: FaultPoint) -> io::Result<()> {
            let mut f = lock(&self.faults);
            if let Some((p, n)) = f.as_mut() {
                if *p == point {
                    *n -= 1;
                    if *n == 0 {
                        *f = None;
                        return Err(io::Error::other(format!("injected fault at {point:?}")));
                    }
                }
            }
            Ok(())
        }
    }
}

/// Without the `test-hooks` feature: no hooks, every call a no-op.
#[cfg(not(any(test, feature = "test-hooks")))]
pub(crate) struct Hooks;

#[cfg(not(any(test, feature = "test-hooks")))]
impl Hooks {
    pub(crate) fn new() -> Hooks {
        Hooks
    }

    #[inline(always)]
    pub(crate) fn shutdown(&self) {}

    #[inline(always)]
    pub(crate) fn park_if_held(&self) {}

    #[inline(always)]
    pub(crate) fn park_writer_if_held(&self) -> bool {
        false
    }

    #[inline(always)]
    pub(crate) fn fault(&self, _point: FaultPoint) -> std::io::Result<()> {
        Ok(())
    }
}
