//! Provider profiles: everything that differs between token endpoints, as one value — which grants
//! it serves (the provider id of their [`GrantKey`](crate::GrantKey)s), the wire format
//! ([`ProviderSpec`]: token URL, client authentication, extra fields, response rules), how the
//! server rotates refresh tokens ([`Rotation`] → [`RetryPolicy`]) and how early to refresh.
//!
//! Two profiles are built in ([`ProviderProfile::builtin`]):
//!
//! | name | grants | token URL | client auth | rotation | refresh buffer |
//! |---|---|---|---|---|---|
//! | `shopify-admin` | `shopify/{shop}` | `https://{shop}/admin/oauth/access_token` (JSON) | secret in the body | retain until the replacement is used (30 days) | 5 min |
//! | `shopify-customer-account` | `shopify-customer-account/{shop_id}:{customer_id}` | `https://shopify.com/authentication/{shop_id}/oauth/token` (form) | public client: `client_id` only | strict single use | 2 min |
//!
//! The Customer Account API's points that no public specification confirms (docs/providers.md) are
//! settings of the profile, not constants: the token URL, the `Origin` header, the rotation, the
//! buffer. Config files (the CLI's `--providers` TOML) build profiles from these types.

use crate::domain::{SHOPIFY, SHOPIFY_CUSTOMER_ACCOUNT};
use crate::policy::{Retention, RetryPolicy};
use crate::protocol::{ClientAuth, ProviderSpec, ResponseRules};
use std::time::Duration;

const DAY: Duration = Duration::from_secs(86_400);

/// The built-in profile of Shopify's Admin API (today's default).
pub const SHOPIFY_ADMIN: &str = "shopify-admin";
/// The built-in profile of Shopify's Customer Account API.
pub const SHOPIFY_CUSTOMER_ACCOUNT_PROFILE: &str = "shopify-customer-account";
/// The Customer Account API's token URL as Shopify's Hydrogen sends it (docs/providers.md: older
/// examples use `/{shop_id}/auth/oauth/token`; the URL is a setting).
pub const CUSTOMER_ACCOUNT_TOKEN_URL: &str = "https://shopify.com/authentication/{shop_id}/oauth/token";

/// How a provider treats a refresh token once it has been presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// Shopify's Admin API since 2026-08-28: the old token stays usable until its replacement is
    /// first presented, at most `max` after its own first use.
    RetainUntilReplacementUsed {
        /// The cap (Shopify: 30 days).
        max: Duration,
    },
    /// Strict single use: a presented token is spent; presenting it again is refused.
    StrictSingleUse,
    /// Single use, and presenting a spent token revokes the whole token family (OAuth 2.1 /
    /// RFC 9700 reuse detection). tokenwal treats it as [`Rotation::StrictSingleUse`]: it only
    /// ever presents an old token again to resolve an ambiguous attempt, and then the server's
    /// answer (success, or a rejection that the grant is lost) is the only way to learn the truth.
    FamilyRevokeOnReuse,
    /// The server never rotates: the refresh token stays until it expires.
    NonRotating,
}

impl Rotation {
    /// The retry policy's view of this rotation.
    pub fn retention(self) -> Retention {
        match self {
            Rotation::RetainUntilReplacementUsed { max } => Retention::RetainUntilReplacementUsed { max },
            Rotation::StrictSingleUse | Rotation::FamilyRevokeOnReuse => Retention::SingleUse,
            Rotation::NonRotating => Retention::NonRotating,
        }
    }

    /// The config name (`retain-until-replacement-used`, `strict-single-use`,
    /// `family-revoke-on-reuse`, `non-rotating`).
    pub fn name(self) -> &'static str {
        match self {
            Rotation::RetainUntilReplacementUsed { .. } => "retain-until-replacement-used",
            Rotation::StrictSingleUse => "strict-single-use",
            Rotation::FamilyRevokeOnReuse => "family-revoke-on-reuse",
            Rotation::NonRotating => "non-rotating",
        }
    }
}

/// The config name of a client authentication (`client_secret_post`, `client_secret_basic`,
/// `none`), as RFC 7591's `token_endpoint_auth_method` spells them.
pub fn client_auth_name(auth: ClientAuth) -> &'static str {
    match auth {
        ClientAuth::Body => "client_secret_post",
        ClientAuth::Basic => "client_secret_basic",
        ClientAuth::Public => "none",
    }
}

/// One provider: which grants, which wire format, which rotation, how early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderProfile {
    /// The profile's name (the config table's name).
    pub name: String,
    /// The provider id of the grants it serves (`[a-z0-9_-]{1,32}`).
    pub provider: String,
    /// The wire format.
    pub spec: ProviderSpec,
    /// How the server rotates refresh tokens.
    pub rotation: Rotation,
    /// Refresh this long before the access token expires.
    pub refresh_buffer: Duration,
}

impl ProviderProfile {
    /// Shopify's Admin API, exactly as tokenwal has always spoken it.
    pub fn shopify_admin() -> ProviderProfile {
        ProviderProfile {
            name: SHOPIFY_ADMIN.into(),
            provider: SHOPIFY.into(),
            spec: ProviderSpec::Shopify,
            rotation: Rotation::RetainUntilReplacementUsed { max: 30 * DAY },
            refresh_buffer: Duration::from_secs(300),
        }
    }

    /// Shopify's Customer Account API: a public client refreshing per customer at
    /// [`CUSTOMER_ACCOUNT_TOKEN_URL`], `expires_in` and a new `refresh_token` required in every
    /// answer, a 400/401 to a refresh meaning "log the customer in again", strict single use (no
    /// grace for the old token is documented), a 2-minute buffer (Hydrogen refreshes 120 s early).
    pub fn shopify_customer_account() -> ProviderProfile {
        ProviderProfile {
            name: SHOPIFY_CUSTOMER_ACCOUNT_PROFILE.into(),
            provider: SHOPIFY_CUSTOMER_ACCOUNT.into(),
            spec: ProviderSpec::OAuth2 {
                token_url: CUSTOMER_ACCOUNT_TOKEN_URL.into(),
                client_auth: ClientAuth::Public,
                extra_fields: Vec::new(),
                origin: None,
                rules: ResponseRules {
                    require_refresh_token: true,
                    require_expires_in: true,
                    default_access_lifetime: Duration::from_secs(3600),
                    rejected_on_400_401: true,
                },
            },
            rotation: Rotation::StrictSingleUse,
            refresh_buffer: Duration::from_secs(120),
        }
    }

    /// The built-in profile called `name`.
    pub fn builtin(name: &str) -> Option<ProviderProfile> {
        match name {
            SHOPIFY_ADMIN => Some(ProviderProfile::shopify_admin()),
            SHOPIFY_CUSTOMER_ACCOUNT_PROFILE => Some(ProviderProfile::shopify_customer_account()),
            _ => None,
        }
    }

    /// The names of the built-in profiles.
    pub const BUILTIN: &'static [&'static str] = &[SHOPIFY_ADMIN, SHOPIFY_CUSTOMER_ACCOUNT_PROFILE];

    /// The retry policy: the rotation's retention with Shopify's backoff (1 s … 5 min).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy { retention: self.rotation.retention(), ..RetryPolicy::shopify() }
    }

    /// Whether this is Shopify's Admin API (token exchange and migration exist only there).
    pub fn is_shopify_admin(&self) -> bool {
        matches!(self.spec, ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CustomerAccount, GrantKey, ShopDomain};

    #[test]
    fn the_admin_profile_is_todays_default() {
        let p = ProviderProfile::shopify_admin();
        assert_eq!(p.spec, ProviderSpec::Shopify);
        assert_eq!(p.provider, SHOPIFY);
        assert_eq!(p.retry_policy(), RetryPolicy::shopify());
        assert_eq!(p.refresh_buffer, Duration::from_secs(300));
        assert!(p.is_shopify_admin());
    }

    #[test]
    fn the_customer_account_profile_refreshes_per_customer_at_its_shop() {
        let p = ProviderProfile::shopify_customer_account();
        assert!(!p.is_shopify_admin());
        assert_eq!(p.retry_policy().retention, Retention::SingleUse);
        let grant = GrantKey::customer_account(&CustomerAccount::new(42, 7).unwrap());
        assert_eq!(p.spec.token_url(&grant).unwrap(), "https://shopify.com/authentication/42/oauth/token");
        let rules = p.spec.response_rules();
        assert!(rules.require_expires_in && rules.require_refresh_token && rules.rejected_on_400_401);
        // An Admin API grant has no shop id: nothing is sent for it.
        let shop = GrantKey::shopify(&ShopDomain::parse("a.myshopify.com").unwrap());
        assert!(p.spec.token_url(&shop).is_err());
    }

    #[test]
    fn builtins_and_names() {
        for name in ProviderProfile::BUILTIN {
            assert_eq!(ProviderProfile::builtin(name).unwrap().name, *name);
        }
        assert_eq!(ProviderProfile::builtin("nope"), None);
        assert_eq!(Rotation::FamilyRevokeOnReuse.retention(), Retention::SingleUse);
        assert_eq!(Rotation::NonRotating.retention(), Retention::NonRotating);
        assert_eq!(client_auth_name(ClientAuth::Public), "none");
    }
}
