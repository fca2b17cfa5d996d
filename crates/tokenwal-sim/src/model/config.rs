//! The model's behaviour switches. Every point the protocol reference marks UNCONFIRMED is a
//! field here, with the reference's suggested default.

use serde::{Deserialize, Serialize};

/// One minute in milliseconds.
pub const MINUTE_MS: u64 = 60_000;
/// One day in milliseconds.
pub const DAY_MS: u64 = 24 * 60 * MINUTE_MS;

/// What a retry of a used refresh token returns while it is retained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryReturns {
    /// The pair minted at first use (default; matches the pre-2026 docs and migration retries).
    #[default]
    SamePair,
    /// A freshly minted pair; the previously returned refresh token is retired.
    NewPair,
}

/// How refresh tokens rotate and how long a used one stays retryable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RotationPolicy {
    /// Shopify since 2026-08-28: a used refresh token R stays retryable until its replacement
    /// R′ is presented in a refresh request, at most `max_retention_ms` after R's first use,
    /// and never past R's own expiry.
    RetainUntilReplacementUsed {
        /// Longest retention after first use (30 days).
        #[serde(default = "default_retention")]
        max_retention_ms: u64,
        /// What a retry returns (UNCONFIRMED; default same pair).
        #[serde(default)]
        retry_returns: RetryReturns,
        /// Whether a same-pair retry pushes the access token's expiry to `now + access TTL`
        /// (UNCONFIRMED; default true). The refresh token's expiry is never extended.
        #[serde(default = "default_true")]
        extend_access_expiry: bool,
    },
    /// Shopify before 2026-08-28: a used refresh token can be retried for `window_ms` from its
    /// first use and returns the same pair (expiries unchanged); after that it is rejected.
    /// Purely time-based: using the replacement does not end the window.
    Window {
        /// The retry window (60 minutes).
        #[serde(default = "default_window")]
        window_ms: u64,
    },
    /// Single use: any second presentation of a refresh token is rejected.
    Strict,
}

fn default_retention() -> u64 {
    30 * DAY_MS
}
fn default_window() -> u64 {
    60 * MINUTE_MS
}
fn default_true() -> bool {
    true
}

impl Default for RotationPolicy {
    fn default() -> Self {
        RotationPolicy::RetainUntilReplacementUsed {
            max_retention_ms: default_retention(),
            retry_returns: RetryReturns::SamePair,
            extend_access_expiry: true,
        }
    }
}

/// How an inactive refresh token is rejected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionStyle {
    /// 401 `{"error":"invalid_request","error_description":"This request requires an active
    /// refresh_token"}` (observed).
    #[default]
    InvalidRequest,
    /// 400 `{"error":"invalid_grant","error_description":"The refresh token is invalid or
    /// expired"}` (OAuth-standard; UNCONFIRMED for Shopify).
    InvalidGrant,
}

/// How a refused migration is answered (UNCONFIRMED; only library mocks exist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationErrorStyle {
    /// 400 `{"error":"invalid_subject_token"}` (shopify-api-ruby mock).
    #[default]
    InvalidSubjectToken,
    /// 400 `{"error":"invalid_request","error_description":"Invalid subject token"}`
    /// (shopify-app-js mock).
    InvalidRequest,
}

/// How the Customer Account API refuses a dead or reused refresh token (UNCONFIRMED: no public
/// document shows the body; docs/providers.md). Both are JSON; tokenwal's
/// `shopify-customer-account` profile treats any 400/401 but `invalid_client` as "log in again".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerRejectionStyle {
    /// 400 `{"error":"invalid_grant","error_description":"The refresh token is invalid or
    /// expired"}` (RFC 6749 §5.2; default).
    #[default]
    InvalidGrant,
    /// 401 `{"error":"invalid_token","error_description":"The refresh token is invalid or
    /// expired"}`.
    InvalidToken,
}

/// Behaviour of the Customer Account API mode (`POST /authentication/{shop_id}/oauth/token`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CustomerAccountConfig {
    /// Rotation of customer refresh tokens. Default [`RotationPolicy::Strict`], as the
    /// `shopify-customer-account` profile's rotation (strict single use) says.
    pub policy: RotationPolicy,
    /// Body and status of a refused refresh.
    pub rejection_style: CustomerRejectionStyle,
}

impl Default for CustomerAccountConfig {
    fn default() -> Self {
        Self { policy: RotationPolicy::Strict, rejection_style: CustomerRejectionStyle::InvalidGrant }
    }
}

/// Behaviour of the simulated token endpoint and Admin API.
///
/// Serialises to JSON for the control API (`GET`/`PATCH /_sim/config`); absent fields take
/// their defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Rotation and retention of refresh tokens.
    pub policy: RotationPolicy,
    /// RFC 9700 style: presenting a retired refresh token revokes the whole grant (every
    /// refresh and access token of it). Default off (no evidence Shopify does this).
    pub revoke_family_on_reuse: bool,
    /// A successful Admin API call with A′ retires the refresh token R whose first use minted
    /// it (UNCONFIRMED; default off). Only meaningful under
    /// [`RotationPolicy::RetainUntilReplacementUsed`] (under the others a used token is
    /// already bounded by its window or single use, though the switch applies there too).
    pub admin_use_retires_previous: bool,
    /// A new acquisition revokes the grant's older access tokens at once instead of letting
    /// them live to expiry (older doc wording; default off).
    pub revoke_old_access_on_acquisition: bool,
    /// Expiring-token answers carry a `session` field, as the Ruby and Rust libraries model
    /// (UNCONFIRMED; default off).
    pub include_session_field: bool,
    /// The Admin API answers non-expiring tokens with 403 "Non-expiring access tokens are no
    /// longer accepted…" (after the enforcement date; default off: they work until migrated).
    pub reject_non_expiring_admin: bool,
    /// Body and status of an inactive-refresh-token rejection.
    pub rejection_style: RejectionStyle,
    /// Status of `invalid_client` answers (UNCONFIRMED; default 401).
    pub invalid_client_status: u16,
    /// Body of a refused migration.
    pub migration_error: MigrationErrorStyle,
    /// Access token lifetime (3600 s).
    pub access_ttl_ms: u64,
    /// Refresh token lifetime, restarted at each rotation (90 days).
    pub refresh_ttl_ms: u64,
    /// How long after a migration its retry returns the same pair (7 days).
    pub migration_retry_ms: u64,
    /// Leeway applied to session-token `exp`/`nbf` checks (UNCONFIRMED; default 0).
    pub session_token_leeway_ms: u64,
    /// `scope` reported in token answers.
    pub scope: String,
    /// The Customer Account API mode (its rotation and refusal shape; lifetimes, faults, family
    /// revocation and `invalid_client_status` are shared with the Admin API mode).
    pub customer_account: CustomerAccountConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            policy: RotationPolicy::default(),
            revoke_family_on_reuse: false,
            admin_use_retires_previous: false,
            revoke_old_access_on_acquisition: false,
            include_session_field: false,
            reject_non_expiring_admin: false,
            rejection_style: RejectionStyle::InvalidRequest,
            invalid_client_status: 401,
            migration_error: MigrationErrorStyle::InvalidSubjectToken,
            access_ttl_ms: 3_600_000,
            refresh_ttl_ms: 90 * DAY_MS,
            migration_retry_ms: 7 * DAY_MS,
            session_token_leeway_ms: 0,
            scope: "write_products,read_orders".to_owned(),
            customer_account: CustomerAccountConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_json_defaults() {
        let p: RotationPolicy = serde_json::from_str(r#"{"kind":"retain_until_replacement_used"}"#).unwrap();
        assert_eq!(p, RotationPolicy::default());
        let w: RotationPolicy = serde_json::from_str(r#"{"kind":"window"}"#).unwrap();
        assert_eq!(w, RotationPolicy::Window { window_ms: 3_600_000 });
        let s: RotationPolicy = serde_json::from_str(r#"{"kind":"strict"}"#).unwrap();
        assert_eq!(s, RotationPolicy::Strict);
    }

    #[test]
    fn config_round_trips_and_defaults_missing_fields() {
        let c = ModelConfig::default();
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(serde_json::from_value::<ModelConfig>(v).unwrap(), c);
        let partial: ModelConfig = serde_json::from_str(r#"{"revoke_family_on_reuse":true}"#).unwrap();
        assert!(partial.revoke_family_on_reuse);
        assert_eq!(partial.access_ttl_ms, 3_600_000);
    }
}
