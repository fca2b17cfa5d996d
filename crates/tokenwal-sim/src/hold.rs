//! Holds: a test makes the simulator keep a shop's next token answer until it says so.
//!
//! A hold is armed per shop. The next token request to that shop is processed by the model as
//! usual (a rotation it makes is committed) and its answer is then *held*: the connection stays
//! open with nothing written until the test releases it (the answer goes out as the model and
//! any scripted fault decided) or cancels it (the connection is reset: the answer is lost).
//! `wait_held` tells the test that a request is on the wire and processed, which replaces
//! sleeping for "long enough" with an explicit hand-off.
//!
//! A leaf module: the HTTP front end and the control API both use it, it uses neither.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, watch};

/// What a held answer is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send the answer the model decided.
    Answer,
    /// Reset the connection: the answer is lost.
    Cancel,
}

/// The hold state of one shop, as reported by [`SimHandle::hold_status`](crate::SimHandle::hold_status)
/// and `GET /_sim/shops/{shop}/hold`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HoldStatus {
    /// The shop's next token request will be held.
    pub armed: bool,
    /// Token requests to the shop processed and waiting for a release or a cancel.
    pub held: usize,
}

#[derive(Default)]
struct Slot {
    armed: bool,
    /// Oldest first.
    held: VecDeque<oneshot::Sender<Verdict>>,
}

impl Slot {
    fn prune(&mut self) {
        // A client that gave up drops its handler, and with it the receiver.
        self.held.retain(|tx| !tx.is_closed());
    }

    fn status(&mut self) -> HoldStatus {
        self.prune();
        HoldStatus { armed: self.armed, held: self.held.len() }
    }
}

/// Every shop's holds. Shops are compared exactly (callers lowercase them).
pub(crate) struct Holds {
    slots: Mutex<HashMap<String, Slot>>,
    /// Bumped on every change, so that `wait_held` never misses one.
    changed: watch::Sender<u64>,
}

impl Default for Holds {
    fn default() -> Self {
        Holds { slots: Mutex::new(HashMap::new()), changed: watch::Sender::new(0) }
    }
}

impl Holds {
    fn with_slot<R>(&self, shop: &str, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(slots.entry(shop.to_owned()).or_default());
        drop(slots);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        r
    }

    /// Arms a hold of `shop`'s next token request (idempotent while unused).
    pub(crate) fn arm(&self, shop: &str) -> HoldStatus {
        self.with_slot(shop, |s| {
            s.armed = true;
            s.status()
        })
    }

    /// The hold state of `shop`.
    pub(crate) fn status(&self, shop: &str) -> HoldStatus {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get_mut(shop).map(Slot::status).unwrap_or_default()
    }

    /// Called by a token request to `shop` after the model processed it: `Some` if the request
    /// must wait for a verdict (the hold is then used up).
    pub(crate) fn take(&self, shop: &str) -> Option<oneshot::Receiver<Verdict>> {
        self.with_slot(shop, |s| {
            if !s.armed {
                return None;
            }
            s.armed = false;
            let (tx, rx) = oneshot::channel();
            s.held.push_back(tx);
            Some(rx)
        })
    }

    /// Sends the oldest held answer of `shop`. Returns whether one was waiting.
    pub(crate) fn release(&self, shop: &str) -> bool {
        self.with_slot(shop, |s| {
            while let Some(tx) = s.held.pop_front() {
                if tx.send(Verdict::Answer).is_ok() {
                    return true;
                }
            }
            false
        })
    }

    /// Disarms `shop`'s unused hold and resets the connection of every held request to it.
    /// Returns whether anything was armed or held.
    pub(crate) fn cancel(&self, shop: &str) -> bool {
        self.with_slot(shop, |s| {
            let mut any = std::mem::take(&mut s.armed);
            for tx in s.held.drain(..) {
                any |= tx.send(Verdict::Cancel).is_ok();
            }
            any
        })
    }

    /// Waits until at least one token request to `shop` is held, at most `timeout`. Returns
    /// whether one is.
    pub(crate) async fn wait_held(&self, shop: &str, timeout: Duration) -> bool {
        let mut changes = self.changed.subscribe();
        let wait = async {
            loop {
                if self.status(shop).held > 0 {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.status(shop).held > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_hold_holds_one_request() {
        let h = Holds::default();
        assert!(h.take("a").is_none(), "nothing armed");
        h.arm("a");
        assert_eq!(h.status("a"), HoldStatus { armed: true, held: 0 });
        assert!(!h.wait_held("a", Duration::from_millis(20)).await);
        let rx = h.take("a").expect("armed");
        assert!(h.take("a").is_none(), "the hold is used up");
        assert!(h.take("b").is_none(), "holds are per shop");
        assert!(h.wait_held("a", Duration::from_millis(20)).await);
        assert!(h.release("a"));
        assert_eq!(rx.await.unwrap(), Verdict::Answer);
        assert!(!h.release("a"), "nothing left to release");
    }

    #[tokio::test]
    async fn cancel_disarms_and_resets() {
        let h = Holds::default();
        h.arm("a");
        let rx = h.take("a").unwrap();
        h.arm("a");
        assert!(h.cancel("a"));
        assert_eq!(rx.await.unwrap(), Verdict::Cancel);
        assert_eq!(h.status("a"), HoldStatus::default());
        assert!(!h.cancel("a"));
    }

    #[tokio::test]
    async fn a_client_that_gave_up_is_not_held() {
        let h = Holds::default();
        h.arm("a");
        drop(h.take("a").unwrap());
        assert_eq!(h.status("a").held, 0);
        assert!(!h.release("a"));
    }

    #[tokio::test]
    async fn wait_held_wakes_on_a_later_request() {
        let h = std::sync::Arc::new(Holds::default());
        h.arm("a");
        let waiter = {
            let h = h.clone();
            tokio::spawn(async move { h.wait_held("a", Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        let _rx = h.take("a").unwrap();
        assert!(waiter.await.unwrap());
    }
}
