//! Per-provider retry policy: how long an old refresh token stays retryable after an ambiguous
//! attempt, and how attempts back off.

use crate::time::UnixMillis;
use std::time::Duration;

const DAY: Duration = Duration::from_secs(86_400);

/// How long the server keeps an already-presented refresh token usable, which bounds how long an
/// ambiguous rotation can be resolved by retrying it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Retention {
    /// Shopify since 2026-08-28: the previous refresh token stays usable until the replacement refresh
    /// token is first presented, at most `max` after the old token's first use and never past its
    /// own expiry.
    RetainUntilReplacementUsed {
        /// The cap (Shopify: 30 days).
        max: Duration,
    },
    /// The old token is retryable for a fixed window after its first use (Shopify before
    /// 2026-08-28: 60 minutes).
    Window(Duration),
    /// Strict single use (reuse may revoke the whole grant). A retry is still the only way to learn
    /// whether a lost request was processed: if it was, the grant is already lost with the
    /// response, and the server's rejection says so; if it was not, the retry succeeds.
    SingleUse,
    /// The server does not rotate (RFC 6749 §6 allows it): a presented refresh token stays usable
    /// until its own expiry, so a retry resolves an ambiguous attempt for as long as the token lives.
    NonRotating,
}

/// Exponential backoff with jitter and a cap.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// The largest delay.
    pub cap: Duration,
    /// The largest `Retry-After` honoured (a hostile or broken server cannot park a grant forever).
    pub max_retry_after: Duration,
}

impl Backoff {
    /// The delay before the next attempt after `failures` consecutive failures (1 = the first).
    /// `entropy` is any random u64 (the core has no RNG): the delay is uniform in `[d/2, d]`
    /// ("equal jitter"), so retries of many grants spread out but never come sooner than half the
    /// exponential step. A `Retry-After` is honoured up to `max_retry_after`.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>, entropy: u64) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let step = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let ms = u64::try_from(step.as_millis()).unwrap_or(u64::MAX);
        let half = ms / 2;
        let jittered = half + if half == 0 { 0 } else { entropy % (ms - half + 1) };
        let d = Duration::from_millis(jittered);
        match retry_after {
            Some(ra) => d.max(ra.min(self.max_retry_after)),
            None => d,
        }
    }
}

/// A provider's retry policy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RetryPolicy {
    /// Server-side retention of presented refresh tokens.
    pub retention: Retention,
    /// Backoff between attempts.
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// Shopify today: retain until the replacement is used, at most 30 days; backoff 1 s … 5 min.
    pub fn shopify() -> RetryPolicy {
        RetryPolicy {
            retention: Retention::RetainUntilReplacementUsed { max: 30 * DAY },
            backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(300),
                max_retry_after: Duration::from_secs(600),
            },
        }
    }

    /// Shopify before 2026-08-28: a 60-minute retry window.
    pub fn shopify_legacy_window() -> RetryPolicy {
        RetryPolicy { retention: Retention::Window(Duration::from_secs(3600)), ..RetryPolicy::shopify() }
    }

    /// A strict single-use server.
    pub fn single_use() -> RetryPolicy {
        RetryPolicy { retention: Retention::SingleUse, ..RetryPolicy::shopify() }
    }

    /// The last instant at which retrying a credential first presented at `first_presented` can
    /// still resolve an ambiguous rotation; `None` when no deadline is known.
    pub fn retry_deadline(
        &self,
        first_presented: UnixMillis,
        refresh_expires: Option<UnixMillis>,
    ) -> Option<UnixMillis> {
        let window = match self.retention {
            Retention::RetainUntilReplacementUsed { max } => Some(first_presented.saturating_add(max)),
            Retention::Window(w) => Some(first_presented.saturating_add(w)),
            Retention::SingleUse | Retention::NonRotating => None,
        };
        match (window, refresh_expires) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        let p = RetryPolicy::shopify();
        let t0 = UnixMillis(1_000);
        assert_eq!(p.retry_deadline(t0, None), Some(t0.saturating_add(30 * DAY)));
        // never past the token's own expiry
        assert_eq!(p.retry_deadline(t0, Some(UnixMillis(5_000))), Some(UnixMillis(5_000)));
        let w = RetryPolicy::shopify_legacy_window();
        assert_eq!(w.retry_deadline(t0, None), Some(UnixMillis(1_000 + 3_600_000)));
        assert_eq!(RetryPolicy::single_use().retry_deadline(t0, None), None);
        assert_eq!(RetryPolicy::single_use().retry_deadline(t0, Some(UnixMillis(9))), Some(UnixMillis(9)));
        let n = RetryPolicy { retention: Retention::NonRotating, ..RetryPolicy::shopify() };
        assert_eq!(n.retry_deadline(t0, None), None, "no deadline but the token's own");
        assert_eq!(n.retry_deadline(t0, Some(UnixMillis(9_000_000_000))), Some(UnixMillis(9_000_000_000)));
    }

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let b = RetryPolicy::shopify().backoff;
        for failures in 1..40 {
            for entropy in [0, 1, 12345, u64::MAX] {
                let d = b.delay(failures, None, entropy);
                let step = Duration::from_secs(1).saturating_mul(1 << (failures - 1).min(30)).min(b.cap);
                assert!(d >= step / 2 && d <= step, "failures={failures} d={d:?} step={step:?}");
            }
        }
        assert_eq!(b.delay(1, Some(Duration::from_secs(30)), 0), Duration::from_secs(30));
        assert_eq!(b.delay(1, Some(Duration::from_secs(1_000_000)), 0), b.max_retry_after);
    }
}
