//! Named crash points for crash tests (cargo feature `failpoints`; without it every call is a no-op).
//!
//! `TOKENWAL_FAILPOINT=NAME` aborts the process (`std::process::abort`, no unwinding, no destructors:
//! as close to a kill as a process can do to itself) the first time `NAME` is hit;
//! `TOKENWAL_FAILPOINT=NAME:N` on the N-th hit (and on any later one, by a thread that got there
//! meanwhile). The names follow the crash-point table of
//! `docs/journal.md`:
//!
//! | name | where |
//! |---|---|
//! | `before-intent` | an attempt is planned; its intent is not yet durable |
//! | `after-intent` | the intent is durable; nothing was sent |
//! | `after-response` | the server answered (and may have rotated); nothing of the answer is recorded |
//! | `before-commit` | the outcome's transition is computed; not yet durable |
//! | `after-commit` | the outcome is durable; the caller has not got the token yet |
//! | `during-recovery` | recovery wrote one grant's transition (others of its commit group may be durable too); the rest are not yet written |
//! | `during-compaction` | a compaction chunk deleted records (not synced: a later commit's sync makes it durable); the pass has more to do |

/// Every failpoint name.
pub const NAMES: [&str; 7] = [
    "before-intent",
    "after-intent",
    "after-response",
    "before-commit",
    "after-commit",
    "during-recovery",
    "during-compaction",
];

#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &'static str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("TOKENWAL_FAILPOINT").ok()?;
        let (n, k) = match v.split_once(':') {
            Some((n, k)) => (n.to_owned(), k.parse().ok()?),
            None => (v, 1),
        };
        Some((n, k))
    });
    if let Some((n, k)) = spec {
        // Every hit from the k-th on aborts: a thread that reaches the point while the k-th hit's
        // thread is still on its way to `abort` (preempted on a loaded machine) must not get past
        // it and, say, commit a grant the test expects still open.
        if n == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *k {
            eprintln!("tokenwal failpoint {name}: aborting");
            std::process::abort();
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &'static str) {}
