//! Command-line configuration of a simulator server.
//!
//! [`SimConfig`] is a `clap::Args` so a CLI can `#[command(flatten)]` it. Its defaults are the
//! clap defaults; [`SimConfig::default`] parses an empty command line, so there is one source
//! of truth.

use clap::{ArgAction, Args, Parser, ValueEnum};

use crate::duration::SimDuration;
use crate::faults::{FaultProbabilities, RandomFaults};
use crate::model::{
    CustomerAccountConfig, CustomerRejectionStyle, MigrationErrorStyle, Model, ModelConfig, RejectionStyle,
    RetryReturns, RotationPolicy,
};

/// Rotation policy selector (see [`RotationPolicy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyKind {
    /// Retry the used refresh token until its replacement is used (Shopify since 2026-08-28).
    RetainUntilReplacementUsed,
    /// Retry the used refresh token within a fixed window (Shopify before 2026-08-28).
    Window,
    /// Single use.
    Strict,
}

/// [`RetryReturns`] selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RetryReturnsArg {
    /// Same pair as the first answer.
    SamePair,
    /// A freshly minted pair.
    NewPair,
}

/// [`RejectionStyle`] selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RejectionStyleArg {
    /// 401 `invalid_request` "This request requires an active refresh_token".
    InvalidRequest,
    /// 400 `invalid_grant`.
    InvalidGrant,
}

/// [`CustomerRejectionStyle`] selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CustomerRejectionArg {
    /// 400 `invalid_grant`.
    InvalidGrant,
    /// 401 `invalid_token`.
    InvalidToken,
}

/// [`MigrationErrorStyle`] selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MigrationErrorArg {
    /// 400 `{"error":"invalid_subject_token"}`.
    InvalidSubjectToken,
    /// 400 `{"error":"invalid_request","error_description":"Invalid subject token"}`.
    InvalidRequest,
}

/// Simulator settings: policy, switches, lifetimes, the default app, and random faults.
///
/// `Debug` redacts the client secret.
#[derive(Clone, Args)]
pub struct SimConfig {
    /// Refresh-token rotation policy.
    #[arg(long, value_enum, default_value = "retain-until-replacement-used")]
    pub policy: PolicyKind,
    /// Retry window of `--policy window`.
    #[arg(long, default_value = "60m", value_name = "DURATION")]
    pub window: SimDuration,
    /// Longest retention of a used refresh token under retain-until-replacement-used.
    #[arg(long, default_value = "30d", value_name = "DURATION")]
    pub retention: SimDuration,
    /// What a retry of a retained refresh token returns.
    #[arg(long, value_enum, default_value = "same-pair")]
    pub retry_returns: RetryReturnsArg,
    /// Whether a same-pair retry extends the access token's expiry to now + access TTL.
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub extend_access_expiry: bool,
    /// Presenting a retired refresh token revokes the whole grant (RFC 9700 style).
    #[arg(long)]
    pub revoke_family_on_reuse: bool,
    /// Admin API use of a rotated access token retires the refresh token that minted it.
    #[arg(long)]
    pub admin_use_retires_previous: bool,
    /// A new acquisition revokes older access tokens immediately.
    #[arg(long)]
    pub revoke_old_access_on_acquisition: bool,
    /// Add a `session` field to expiring-token answers.
    #[arg(long)]
    pub include_session_field: bool,
    /// The Admin API refuses non-expiring tokens with 403 (post-enforcement behaviour).
    #[arg(long)]
    pub reject_non_expiring_admin: bool,
    /// Access token lifetime.
    #[arg(long, default_value = "3600s", value_name = "DURATION")]
    pub access_ttl: SimDuration,
    /// Refresh token lifetime.
    #[arg(long, default_value = "90d", value_name = "DURATION")]
    pub refresh_ttl: SimDuration,
    /// How long a migration can be retried with the same non-expiring token.
    #[arg(long, default_value = "7d", value_name = "DURATION")]
    pub migration_retry: SimDuration,
    /// Leeway of session-token exp/nbf checks.
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    pub session_token_leeway: SimDuration,
    /// Seed of the token RNG (reproducible token strings). Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Client id of the default app.
    #[arg(long, default_value = "sim-client-id")]
    pub client_id: String,
    /// Client secret of the default app.
    #[arg(long, default_value = "sim-client-secret")]
    pub client_secret: String,
    /// Client id of the default public client of the Customer Account API mode
    /// (`POST /authentication/{shop_id}/oauth/token`; no secret).
    #[arg(long, default_value = "sim-public-client-id")]
    pub public_client_id: String,
    /// Rotation policy of customer refresh tokens (the shopify-customer-account profile: strict
    /// single use). `--window` and `--retention` apply as for the Admin API.
    #[arg(long, value_enum, default_value = "strict")]
    pub customer_policy: PolicyKind,
    /// How a dead or reused customer refresh token is refused.
    #[arg(long, value_enum, default_value = "invalid-grant")]
    pub customer_rejection_style: CustomerRejectionArg,
    /// Scope reported in token answers.
    #[arg(long, default_value = "write_products,read_orders")]
    pub scope: String,
    /// How an inactive refresh token is rejected.
    #[arg(long, value_enum, default_value = "invalid-request")]
    pub rejection_style: RejectionStyleArg,
    /// Status of invalid_client answers.
    #[arg(long, default_value_t = 401)]
    pub invalid_client_status: u16,
    /// Body of a refused migration.
    #[arg(long, value_enum, default_value = "invalid-subject-token")]
    pub migration_error: MigrationErrorArg,
    /// Longest time a hung answer holds its connection before resetting it.
    #[arg(long, default_value = "120s", value_name = "DURATION")]
    pub hang_cap: SimDuration,
    /// Seed of the random-fault RNG.
    #[arg(long, default_value_t = 0)]
    pub fault_seed: u64,
    /// Probability of commit-then-520.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_rotate_then_drop: f64,
    /// Probability of commit-then-hang.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_rotate_then_hang: f64,
    /// Probability of commit-then-reset.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_rotate_then_reset: f64,
    /// Probability of a 5xx before processing.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_fail_before_processing: f64,
    /// Probability of a 429.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_throttle: f64,
    /// Probability of a slow answer.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_slow: f64,
    /// Probability of a truncated body.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_truncated: f64,
    /// Probability of a non-JSON body.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_malformed: f64,
    /// Probability of a success without expires_in.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_missing_expires_in: f64,
    /// Probability of a success without refresh_token_expires_in.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_missing_refresh_token_expires_in: f64,
    /// Probability of a short-lived refresh token.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_short_refresh_ttl: f64,
    /// Probability of a spurious invalid_client.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub p_invalid_client: f64,
    /// Delay of random slow answers.
    #[arg(long, default_value = "2s", value_name = "DURATION")]
    pub slow_delay: SimDuration,
    /// Lifetime of refresh tokens minted under a random short-refresh-ttl fault.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub short_refresh_ttl: SimDuration,
    /// Retry-After of random throttles.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub throttle_retry_after: SimDuration,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("model", &self.model_config())
            .field("seed", &self.seed)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("hang_cap", &self.hang_cap)
            .field("random_faults", &self.random_faults())
            .finish()
    }
}

#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    config: SimConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        DefaultsOnly::parse_from(["tokenwal-sim"]).config
    }
}

impl SimConfig {
    /// The model switches these settings select.
    pub fn model_config(&self) -> ModelConfig {
        let customer_policy = self.policy_of(self.customer_policy);
        ModelConfig {
            customer_account: CustomerAccountConfig {
                policy: customer_policy,
                rejection_style: match self.customer_rejection_style {
                    CustomerRejectionArg::InvalidGrant => CustomerRejectionStyle::InvalidGrant,
                    CustomerRejectionArg::InvalidToken => CustomerRejectionStyle::InvalidToken,
                },
            },
            ..self.admin_model_config()
        }
    }

    fn policy_of(&self, kind: PolicyKind) -> RotationPolicy {
        match kind {
            PolicyKind::RetainUntilReplacementUsed => RotationPolicy::RetainUntilReplacementUsed {
                max_retention_ms: self.retention.as_millis(),
                retry_returns: match self.retry_returns {
                    RetryReturnsArg::SamePair => RetryReturns::SamePair,
                    RetryReturnsArg::NewPair => RetryReturns::NewPair,
                },
                extend_access_expiry: self.extend_access_expiry,
            },
            PolicyKind::Window => RotationPolicy::Window { window_ms: self.window.as_millis() },
            PolicyKind::Strict => RotationPolicy::Strict,
        }
    }

    fn admin_model_config(&self) -> ModelConfig {
        ModelConfig {
            policy: self.policy_of(self.policy),
            revoke_family_on_reuse: self.revoke_family_on_reuse,
            admin_use_retires_previous: self.admin_use_retires_previous,
            revoke_old_access_on_acquisition: self.revoke_old_access_on_acquisition,
            include_session_field: self.include_session_field,
            reject_non_expiring_admin: self.reject_non_expiring_admin,
            rejection_style: match self.rejection_style {
                RejectionStyleArg::InvalidRequest => RejectionStyle::InvalidRequest,
                RejectionStyleArg::InvalidGrant => RejectionStyle::InvalidGrant,
            },
            invalid_client_status: self.invalid_client_status,
            migration_error: match self.migration_error {
                MigrationErrorArg::InvalidSubjectToken => MigrationErrorStyle::InvalidSubjectToken,
                MigrationErrorArg::InvalidRequest => MigrationErrorStyle::InvalidRequest,
            },
            access_ttl_ms: self.access_ttl.as_millis(),
            refresh_ttl_ms: self.refresh_ttl.as_millis(),
            migration_retry_ms: self.migration_retry.as_millis(),
            session_token_leeway_ms: self.session_token_leeway.as_millis(),
            scope: self.scope.clone(),
            customer_account: CustomerAccountConfig::default(),
        }
    }

    /// The random-fault settings, or `None` when every probability is zero.
    pub fn random_faults(&self) -> Option<RandomFaults> {
        let probabilities = FaultProbabilities {
            rotate_then_drop: self.p_rotate_then_drop,
            rotate_then_hang: self.p_rotate_then_hang,
            rotate_then_reset: self.p_rotate_then_reset,
            fail_before_processing: self.p_fail_before_processing,
            throttle: self.p_throttle,
            slow: self.p_slow,
            truncated: self.p_truncated,
            malformed: self.p_malformed,
            missing_expires_in: self.p_missing_expires_in,
            missing_refresh_token_expires_in: self.p_missing_refresh_token_expires_in,
            short_refresh_ttl: self.p_short_refresh_ttl,
            invalid_client: self.p_invalid_client,
        };
        (!probabilities.is_zero()).then(|| RandomFaults {
            seed: self.fault_seed,
            probabilities,
            slow_delay_ms: self.slow_delay.as_millis(),
            short_refresh_ttl_secs: self.short_refresh_ttl.as_millis() / 1000,
            throttle_retry_after_secs: self.throttle_retry_after.as_millis() / 1000,
        })
    }

    /// Builds the model: switches, seed (random when unset), the default app, random faults.
    pub fn build_model(&self) -> Result<Model, crate::faults::FaultConfigError> {
        let seed = self.seed.unwrap_or_else(rand::random);
        let mut model = Model::new(self.model_config(), seed);
        model.register_app(&self.client_id, &self.client_secret);
        model.register_public_client(&self.public_client_id);
        model.set_random_faults(self.random_faults())?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_model_defaults() {
        let c = SimConfig::default();
        assert_eq!(c.model_config(), ModelConfig::default());
        assert_eq!(c.random_faults(), None);
        assert_eq!(c.hang_cap.as_millis(), 120_000);
    }

    #[test]
    fn flags_select_switches() {
        let c = DefaultsOnly::parse_from([
            "x",
            "--policy",
            "window",
            "--window",
            "5m",
            "--revoke-family-on-reuse",
            "--rejection-style",
            "invalid-grant",
            "--access-ttl",
            "1500ms",
            "--refresh-ttl",
            "2d",
            "--p-rotate-then-drop",
            "0.25",
            "--fault-seed",
            "9",
            "--extend-access-expiry",
            "false",
        ])
        .config;
        let m = c.model_config();
        assert_eq!(m.policy, RotationPolicy::Window { window_ms: 300_000 });
        assert!(m.revoke_family_on_reuse);
        assert_eq!(m.rejection_style, RejectionStyle::InvalidGrant);
        assert_eq!(m.access_ttl_ms, 1_500);
        assert_eq!(m.refresh_ttl_ms, 2 * 86_400_000);
        let rf = c.random_faults().unwrap();
        assert_eq!(rf.seed, 9);
        assert_eq!(rf.probabilities.rotate_then_drop, 0.25);
        assert!(!c.extend_access_expiry);
    }

    #[test]
    fn retain_flags() {
        let c = DefaultsOnly::parse_from(["x", "--retention", "1h", "--retry-returns", "new-pair"]).config;
        assert_eq!(
            c.model_config().policy,
            RotationPolicy::RetainUntilReplacementUsed {
                max_retention_ms: 3_600_000,
                retry_returns: RetryReturns::NewPair,
                extend_access_expiry: true
            }
        );
    }

    #[test]
    fn bad_probabilities_are_refused() {
        let c = SimConfig { p_slow: 2.0, ..SimConfig::default() };
        assert!(c.build_model().is_err());
    }

    #[test]
    fn debug_redacts_secret() {
        let c = SimConfig { client_secret: "very-secret-value".into(), ..SimConfig::default() };
        assert!(!format!("{c:?}").contains("very-secret-value"));
    }
}
