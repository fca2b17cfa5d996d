//! What the simulator saw and did, per shop and in total.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Event counts for one shop, or for all shops together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Requests to the token endpoint (every one, whatever its outcome or fault).
    pub token_requests: u64,
    /// First uses of a refresh token that minted a new pair.
    pub rotations: u64,
    /// Retries of an already-used refresh token answered from retention (same or new pair).
    pub replays: u64,
    /// New acquisitions: token exchange (expiring or not), migrations, and control-API seeds.
    pub acquisitions: u64,
    /// Migrations of a non-expiring token (first exchanges only).
    pub migrations: u64,
    /// Migration retries answered with the same pair.
    pub migration_replays: u64,
    /// Error answers of the token endpoint, by OAuth `error` code (includes `invalid_client`).
    pub rejections: BTreeMap<String, u64>,
    /// `invalid_client` answers (bad credentials or the injected fault).
    pub invalid_client: u64,
    /// Faults applied, by kind name.
    pub faults: BTreeMap<String, u64>,
    /// Grants wholly revoked because a retired refresh token was presented.
    pub family_revocations: u64,
    /// Admin API answers 200.
    pub admin_ok: u64,
    /// Admin API answers 401.
    pub admin_unauthorized: u64,
    /// Token requests that arrived while another token request to the same grant was still being
    /// handled (received, not yet answered): a sign of two refreshers racing one grant. Per grant
    /// here; the total is the sum over grants, so requests to two different grants never count.
    pub overlapping_token_requests: u64,
    /// The most token requests to one grant ever handled at the same time (1 when they never
    /// overlapped, 0 before any). The total is the maximum over grants.
    pub max_concurrent_token_requests: u64,
    /// Admin API answers 403 (non-expiring token refused, see
    /// [`ModelConfig::reject_non_expiring_admin`](crate::ModelConfig::reject_non_expiring_admin)).
    pub admin_forbidden: u64,
}

impl Counters {
    /// Total number of rejections, over all error codes.
    pub fn total_rejections(&self) -> u64 {
        self.rejections.values().sum()
    }

    /// Rejections with OAuth error `code`.
    pub fn rejections_of(&self, code: &str) -> u64 {
        self.rejections.get(code).copied().unwrap_or(0)
    }

    /// Faults of kind name `kind` (e.g. `"rotate_then_drop"`).
    pub fn faults_of(&self, kind: &str) -> u64 {
        self.faults.get(kind).copied().unwrap_or(0)
    }

    /// Total number of faults applied.
    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }
}

/// Counters in total and for each grant that saw a request: a shop domain for the Admin API, a
/// customer's `{shop_id}:{customer_id}` for the Customer Account API (see
/// [`customer_grant`](crate::model::customer_grant)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CounterSet {
    /// Sum over all shops.
    pub total: Counters,
    /// Per shop domain.
    pub shops: BTreeMap<String, Counters>,
}

impl CounterSet {
    /// The counters of `shop` (all zero if it saw nothing).
    pub fn shop(&self, shop: &str) -> Counters {
        self.shops.get(shop).cloned().unwrap_or_default()
    }

    /// The grants whose token requests ever overlapped, with their
    /// [`overlapping_token_requests`](Counters::overlapping_token_requests) and
    /// [`max_concurrent_token_requests`](Counters::max_concurrent_token_requests), by name.
    pub fn overlapping_grants(&self) -> BTreeMap<&str, (u64, u64)> {
        self.shops
            .iter()
            .filter(|(_, c)| c.overlapping_token_requests > 0)
            .map(|(g, c)| (g.as_str(), (c.overlapping_token_requests, c.max_concurrent_token_requests)))
            .collect()
    }

    /// Applies `f` to the shop's counters and to the total.
    pub(crate) fn bump(&mut self, shop: &str, f: impl Fn(&mut Counters)) {
        f(&mut self.total);
        f(self.shops.entry(shop.to_owned()).or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_counts_shop_and_total() {
        let mut c = CounterSet::default();
        c.bump("a", |c| c.rotations += 1);
        c.bump("b", |c| {
            *c.rejections.entry("invalid_request".into()).or_default() += 1;
        });
        c.bump("b", |c| c.rotations += 1);
        assert_eq!(c.total.rotations, 2);
        assert_eq!(c.shop("a").rotations, 1);
        assert_eq!(c.shop("b").rejections_of("invalid_request"), 1);
        assert_eq!(c.total.total_rejections(), 1);
        assert_eq!(c.shop("zzz"), Counters::default());
    }
}
