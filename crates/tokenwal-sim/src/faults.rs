//! Fault injection: what can go wrong between the token endpoint and the client.
//!
//! A fault is chosen per token request, either from a per-shop script (FIFO) or, when the
//! script for that shop is empty, by a seeded random draw. The model applies it and returns a
//! [`Delivery`](crate::Delivery) that the HTTP front end realises.

use std::collections::{BTreeMap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One injected fault.
///
/// "Rotate then …" faults commit whatever the request did to server state (a rotation, an
/// acquisition, or a rejection) and then lose or mangle the answer: exactly the case a
/// write-ahead engine must survive. The others either fail before touching state or alter
/// what is minted.
///
/// JSON form (control API): `{"kind":"rotate_then_drop"}`,
/// `{"kind":"fail_before_processing","status":503,"json":true}`, …
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Fault {
    /// Commit, then answer 520 `text/plain` `error code: 520` (Cloudflare style).
    RotateThenDrop,
    /// Commit, then never answer: hold the connection until the client gives up (or the
    /// server's hang cap passes, after which the connection is reset).
    RotateThenHang,
    /// Commit, then close the connection without any HTTP response.
    RotateThenReset,
    /// Answer `status` (500/502/503/504) without processing the request.
    FailBeforeProcessing {
        /// The 5xx status to answer.
        status: u16,
        /// JSON body (`{"errors":"…"}`) instead of the default plain-text page.
        #[serde(default)]
        json: bool,
    },
    /// Answer 429 with `Retry-After` without processing the request.
    Throttle {
        /// Value of the `Retry-After` header, seconds.
        retry_after_secs: u64,
    },
    /// Process normally, then wait before answering.
    Slow {
        /// Delay before the answer is sent, milliseconds (real time).
        delay_ms: u64,
    },
    /// Commit, then send the answer's status with its body cut in half.
    Truncated,
    /// Commit, then send the answer's status with a body that is not JSON.
    Malformed,
    /// Commit, then answer a success without `expires_in` (shopify-app-js #3400).
    MissingExpiresIn,
    /// Commit, then answer a success without `refresh_token_expires_in`.
    MissingRefreshTokenExpiresIn,
    /// The refresh token minted by this request lives only `secs` seconds (api-ruby #1453).
    /// A same-pair retry mints nothing, so the fault has no effect on it.
    ShortRefreshTtl {
        /// Lifetime of the minted refresh token, seconds.
        secs: u64,
    },
    /// Answer `invalid_client` whatever the credentials; no state change.
    InvalidClient,
}

impl Fault {
    /// The fault's kind, for counters.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::RotateThenDrop => FaultKind::RotateThenDrop,
            Fault::RotateThenHang => FaultKind::RotateThenHang,
            Fault::RotateThenReset => FaultKind::RotateThenReset,
            Fault::FailBeforeProcessing { .. } => FaultKind::FailBeforeProcessing,
            Fault::Throttle { .. } => FaultKind::Throttle,
            Fault::Slow { .. } => FaultKind::Slow,
            Fault::Truncated => FaultKind::Truncated,
            Fault::Malformed => FaultKind::Malformed,
            Fault::MissingExpiresIn => FaultKind::MissingExpiresIn,
            Fault::MissingRefreshTokenExpiresIn => FaultKind::MissingRefreshTokenExpiresIn,
            Fault::ShortRefreshTtl { .. } => FaultKind::ShortRefreshTtl,
            Fault::InvalidClient => FaultKind::InvalidClient,
        }
    }

    /// Whether the request is processed (state may change) under this fault.
    pub fn processes_request(&self) -> bool {
        !matches!(self, Fault::FailBeforeProcessing { .. } | Fault::Throttle { .. } | Fault::InvalidClient)
    }
}

/// The kind of a [`Fault`], without parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FaultKind {
    /// [`Fault::RotateThenDrop`].
    RotateThenDrop,
    /// [`Fault::RotateThenHang`].
    RotateThenHang,
    /// [`Fault::RotateThenReset`].
    RotateThenReset,
    /// [`Fault::FailBeforeProcessing`].
    FailBeforeProcessing,
    /// [`Fault::Throttle`].
    Throttle,
    /// [`Fault::Slow`].
    Slow,
    /// [`Fault::Truncated`].
    Truncated,
    /// [`Fault::Malformed`].
    Malformed,
    /// [`Fault::MissingExpiresIn`].
    MissingExpiresIn,
    /// [`Fault::MissingRefreshTokenExpiresIn`].
    MissingRefreshTokenExpiresIn,
    /// [`Fault::ShortRefreshTtl`].
    ShortRefreshTtl,
    /// [`Fault::InvalidClient`].
    InvalidClient,
}

impl FaultKind {
    /// The snake_case name used in counters and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::RotateThenDrop => "rotate_then_drop",
            FaultKind::RotateThenHang => "rotate_then_hang",
            FaultKind::RotateThenReset => "rotate_then_reset",
            FaultKind::FailBeforeProcessing => "fail_before_processing",
            FaultKind::Throttle => "throttle",
            FaultKind::Slow => "slow",
            FaultKind::Truncated => "truncated",
            FaultKind::Malformed => "malformed",
            FaultKind::MissingExpiresIn => "missing_expires_in",
            FaultKind::MissingRefreshTokenExpiresIn => "missing_refresh_token_expires_in",
            FaultKind::ShortRefreshTtl => "short_refresh_ttl",
            FaultKind::InvalidClient => "invalid_client",
        }
    }
}

/// Per-request probability of each fault kind, each in `[0, 1]`. Their sum must not exceed 1;
/// at most one fault is drawn per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultProbabilities {
    /// Probability of [`Fault::RotateThenDrop`].
    pub rotate_then_drop: f64,
    /// Probability of [`Fault::RotateThenHang`].
    pub rotate_then_hang: f64,
    /// Probability of [`Fault::RotateThenReset`].
    pub rotate_then_reset: f64,
    /// Probability of [`Fault::FailBeforeProcessing`] (status drawn from 500/502/503/504,
    /// body plain or JSON).
    pub fail_before_processing: f64,
    /// Probability of [`Fault::Throttle`].
    pub throttle: f64,
    /// Probability of [`Fault::Slow`].
    pub slow: f64,
    /// Probability of [`Fault::Truncated`].
    pub truncated: f64,
    /// Probability of [`Fault::Malformed`].
    pub malformed: f64,
    /// Probability of [`Fault::MissingExpiresIn`].
    pub missing_expires_in: f64,
    /// Probability of [`Fault::MissingRefreshTokenExpiresIn`].
    pub missing_refresh_token_expires_in: f64,
    /// Probability of [`Fault::ShortRefreshTtl`].
    pub short_refresh_ttl: f64,
    /// Probability of [`Fault::InvalidClient`].
    pub invalid_client: f64,
}

impl FaultProbabilities {
    fn entries(&self) -> [(FaultKind, f64); 12] {
        [
            (FaultKind::RotateThenDrop, self.rotate_then_drop),
            (FaultKind::RotateThenHang, self.rotate_then_hang),
            (FaultKind::RotateThenReset, self.rotate_then_reset),
            (FaultKind::FailBeforeProcessing, self.fail_before_processing),
            (FaultKind::Throttle, self.throttle),
            (FaultKind::Slow, self.slow),
            (FaultKind::Truncated, self.truncated),
            (FaultKind::Malformed, self.malformed),
            (FaultKind::MissingExpiresIn, self.missing_expires_in),
            (FaultKind::MissingRefreshTokenExpiresIn, self.missing_refresh_token_expires_in),
            (FaultKind::ShortRefreshTtl, self.short_refresh_ttl),
            (FaultKind::InvalidClient, self.invalid_client),
        ]
    }

    /// Sum of all probabilities.
    pub fn total(&self) -> f64 {
        self.entries().iter().map(|(_, p)| p).sum()
    }

    /// Whether every probability is zero.
    pub fn is_zero(&self) -> bool {
        self.total() == 0.0
    }
}

/// Random fault injection: a seed, probabilities, and the parameters of the drawn faults.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RandomFaults {
    /// Seed of the fault RNG (independent of the token RNG, so enabling faults does not change
    /// which token strings are minted).
    pub seed: u64,
    /// Per-kind probabilities.
    pub probabilities: FaultProbabilities,
    /// `delay_ms` of drawn [`Fault::Slow`].
    pub slow_delay_ms: u64,
    /// `secs` of drawn [`Fault::ShortRefreshTtl`].
    pub short_refresh_ttl_secs: u64,
    /// `retry_after_secs` of drawn [`Fault::Throttle`].
    pub throttle_retry_after_secs: u64,
}

impl Default for RandomFaults {
    fn default() -> Self {
        Self {
            seed: 0,
            probabilities: FaultProbabilities::default(),
            slow_delay_ms: 2_000,
            short_refresh_ttl_secs: 60,
            throttle_retry_after_secs: 1,
        }
    }
}

/// Why a fault configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FaultConfigError {
    /// A probability is negative, NaN or above 1.
    #[error("fault probability {kind} = {value} is outside [0, 1]")]
    BadProbability {
        /// The offending kind's name.
        kind: &'static str,
        /// The value given.
        value: f64,
    },
    /// The probabilities add up to more than 1.
    #[error("fault probabilities add up to {0}, more than 1")]
    SumAboveOne(f64),
    /// A scripted [`Fault::FailBeforeProcessing`] status is not a 5xx.
    #[error("fail_before_processing status {0} is not a 5xx")]
    BadStatus(u16),
}

impl RandomFaults {
    /// Checks the probabilities.
    pub fn validate(&self) -> Result<(), FaultConfigError> {
        for (kind, p) in self.probabilities.entries() {
            if !(0.0..=1.0).contains(&p) {
                return Err(FaultConfigError::BadProbability { kind: kind.as_str(), value: p });
            }
        }
        let total = self.probabilities.total();
        if total > 1.0 + 1e-9 {
            return Err(FaultConfigError::SumAboveOne(total));
        }
        Ok(())
    }
}

/// Checks a scripted fault's parameters.
pub fn validate_fault(fault: &Fault) -> Result<(), FaultConfigError> {
    match fault {
        Fault::FailBeforeProcessing { status, .. } if !(500..=599).contains(status) => {
            Err(FaultConfigError::BadStatus(*status))
        }
        _ => Ok(()),
    }
}

const FAIL_STATUSES: [u16; 4] = [500, 502, 503, 504];

/// Chooses the fault (if any) for each token request.
#[derive(Debug, Clone)]
pub(crate) struct FaultInjector {
    scripted: BTreeMap<String, VecDeque<Fault>>,
    random: Option<(RandomFaults, ChaCha8Rng)>,
}

impl FaultInjector {
    pub(crate) fn new() -> Self {
        Self { scripted: BTreeMap::new(), random: None }
    }

    pub(crate) fn push(&mut self, shop: &str, faults: impl IntoIterator<Item = Fault>) {
        self.scripted.entry(shop.to_owned()).or_default().extend(faults);
    }

    pub(crate) fn clear(&mut self, shop: &str) {
        self.scripted.remove(shop);
    }

    pub(crate) fn pending(&self, shop: &str) -> Vec<Fault> {
        self.scripted.get(shop).map(|q| q.iter().copied().collect()).unwrap_or_default()
    }

    pub(crate) fn set_random(&mut self, random: Option<RandomFaults>) {
        self.random = random.filter(|r| !r.probabilities.is_zero()).map(|r| (r, ChaCha8Rng::seed_from_u64(r.seed)));
    }

    pub(crate) fn random(&self) -> Option<RandomFaults> {
        self.random.as_ref().map(|(r, _)| *r)
    }

    /// The fault for the next token request to `shop`: the head of its script, else a random
    /// draw, else none.
    pub(crate) fn next(&mut self, shop: &str) -> Option<Fault> {
        if let Some(q) = self.scripted.get_mut(shop) {
            if let Some(f) = q.pop_front() {
                if q.is_empty() {
                    self.scripted.remove(shop);
                }
                return Some(f);
            }
        }
        let (cfg, rng) = self.random.as_mut()?;
        let u: f64 = rng.gen();
        let mut acc = 0.0;
        let kind = cfg.probabilities.entries().into_iter().find_map(|(k, p)| {
            acc += p;
            (p > 0.0 && u < acc).then_some(k)
        })?;
        Some(match kind {
            FaultKind::RotateThenDrop => Fault::RotateThenDrop,
            FaultKind::RotateThenHang => Fault::RotateThenHang,
            FaultKind::RotateThenReset => Fault::RotateThenReset,
            FaultKind::FailBeforeProcessing => Fault::FailBeforeProcessing {
                status: FAIL_STATUSES[rng.gen_range(0..FAIL_STATUSES.len())],
                json: rng.gen(),
            },
            FaultKind::Throttle => Fault::Throttle { retry_after_secs: cfg.throttle_retry_after_secs },
            FaultKind::Slow => Fault::Slow { delay_ms: cfg.slow_delay_ms },
            FaultKind::Truncated => Fault::Truncated,
            FaultKind::Malformed => Fault::Malformed,
            FaultKind::MissingExpiresIn => Fault::MissingExpiresIn,
            FaultKind::MissingRefreshTokenExpiresIn => Fault::MissingRefreshTokenExpiresIn,
            FaultKind::ShortRefreshTtl => Fault::ShortRefreshTtl { secs: cfg.short_refresh_ttl_secs },
            FaultKind::InvalidClient => Fault::InvalidClient,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripted_faults_are_fifo_per_shop() {
        let mut inj = FaultInjector::new();
        inj.push("a", [Fault::RotateThenDrop, Fault::Truncated]);
        inj.push("b", [Fault::Malformed]);
        assert_eq!(inj.next("a"), Some(Fault::RotateThenDrop));
        assert_eq!(inj.next("b"), Some(Fault::Malformed));
        assert_eq!(inj.pending("a"), vec![Fault::Truncated]);
        assert_eq!(inj.next("a"), Some(Fault::Truncated));
        assert_eq!(inj.next("a"), None);
        inj.push("a", [Fault::InvalidClient]);
        inj.clear("a");
        assert_eq!(inj.next("a"), None);
    }

    #[test]
    fn random_faults_follow_seed_and_probabilities() {
        let cfg = RandomFaults {
            seed: 7,
            probabilities: FaultProbabilities { rotate_then_drop: 0.5, throttle: 0.25, ..Default::default() },
            ..Default::default()
        };
        cfg.validate().unwrap();
        let draw = || {
            let mut inj = FaultInjector::new();
            inj.set_random(Some(cfg));
            (0..2000).map(|_| inj.next("s")).collect::<Vec<_>>()
        };
        let a = draw();
        assert_eq!(a, draw(), "same seed, same faults");
        let drops = a.iter().filter(|f| **f == Some(Fault::RotateThenDrop)).count();
        let throttles = a.iter().filter(|f| matches!(f, Some(Fault::Throttle { retry_after_secs: 1 }))).count();
        let none = a.iter().filter(|f| f.is_none()).count();
        assert!((900..1100).contains(&drops), "{drops}");
        assert!((400..600).contains(&throttles), "{throttles}");
        assert_eq!(drops + throttles + none, 2000);
    }

    #[test]
    fn scripted_faults_take_precedence_over_random() {
        let mut inj = FaultInjector::new();
        inj.set_random(Some(RandomFaults {
            probabilities: FaultProbabilities { malformed: 1.0, ..Default::default() },
            ..Default::default()
        }));
        inj.push("s", [Fault::Truncated]);
        assert_eq!(inj.next("s"), Some(Fault::Truncated));
        assert_eq!(inj.next("s"), Some(Fault::Malformed));
    }

    #[test]
    fn validation() {
        let mut cfg = RandomFaults::default();
        cfg.probabilities.slow = 1.5;
        assert!(matches!(cfg.validate(), Err(FaultConfigError::BadProbability { .. })));
        cfg.probabilities.slow = 0.6;
        cfg.probabilities.truncated = 0.6;
        assert!(matches!(cfg.validate(), Err(FaultConfigError::SumAboveOne(_))));
        assert!(validate_fault(&Fault::FailBeforeProcessing { status: 404, json: false }).is_err());
        assert!(validate_fault(&Fault::FailBeforeProcessing { status: 503, json: false }).is_ok());
    }

    #[test]
    fn fault_json_shape() {
        let f: Fault = serde_json::from_str(r#"{"kind":"fail_before_processing","status":502}"#).unwrap();
        assert_eq!(f, Fault::FailBeforeProcessing { status: 502, json: false });
        assert_eq!(
            serde_json::to_value(Fault::Throttle { retry_after_secs: 3 }).unwrap(),
            serde_json::json!({"kind":"throttle","retry_after_secs":3})
        );
    }
}
