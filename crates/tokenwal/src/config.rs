//! Engine configuration.

use std::path::PathBuf;
use std::time::Duration;
use tokenwal_core::protocol::{check_template, ProviderSpec};
use tokenwal_core::{ClientSecret, GrantKey, ProviderProfile, RetryPolicy, SHOPIFY_PROVIDER};
use tokenwal_store::KeySource;
use url::Url;

pub(crate) use crate::net::is_loopback;
pub use crate::net::Timeouts;
/// How an OAuth 2.0 client authenticates (defined with the wire format in `tokenwal_core::protocol`).
pub use tokenwal_core::protocol::ClientAuth;

/// Where the token endpoint is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// `https://{shop}/admin/oauth/access_token`, the host taken only from the validated shop domain.
    Shopify,
    /// **Test only.** Shopify's protocol against a local server (such as `tokenwal-sim`) at a
    /// loopback address, over plain HTTP: `{base}/shops/{shop}/admin/oauth/access_token`. The client
    /// secret is sent there, so any non-loopback host is refused at build time.
    ShopifyTestServer {
        /// The server's base URL, e.g. `http://127.0.0.1:8080`.
        base: Url,
    },
    /// A generic OAuth 2.0 server (RFC 6749 §6): form-encoded refresh at a fixed token URL.
    OAuth2 {
        /// The provider id of this server's grants (`[a-z0-9_-]{1,32}`, not `shopify`).
        provider: String,
        /// The token endpoint. Must be `https`, or `http` on a loopback address.
        token_url: Url,
        /// How the client authenticates.
        client_auth: ClientAuth,
    },
    /// A provider profile ([`ProviderProfile`]: the built-in Customer Account API one, or one from
    /// a config file). Its token URL template, once filled, must be `https`, or `http` on a
    /// loopback address. Use [`Config::with_profile`], which also sets the policy and margin.
    Profile(Box<ProviderProfile>),
}

impl Endpoint {
    /// The provider id of grants served through this endpoint.
    pub fn provider(&self) -> &str {
        match self {
            Endpoint::Shopify | Endpoint::ShopifyTestServer { .. } => SHOPIFY_PROVIDER,
            Endpoint::OAuth2 { provider, .. } => provider,
            Endpoint::Profile(p) => &p.provider,
        }
    }

    /// The token URL of a profile with its placeholders filled by sample values (for the scheme
    /// and host checks), if this is a profile with a URL of its own.
    pub(crate) fn profile_sample_url(&self) -> Option<Result<Url, String>> {
        let Endpoint::Profile(p) = self else { return None };
        let ProviderSpec::OAuth2 { token_url, .. } = &p.spec else { return None };
        Some(
            check_template(token_url)
                .map_err(|e| e.to_string())
                .and_then(|u| Url::parse(&u).map_err(|e| format!("token URL: {e}"))),
        )
    }

    /// Checks the endpoint before any secret could be sent to it.
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            Endpoint::Shopify => Ok(()),
            Endpoint::ShopifyTestServer { base } => {
                if base.scheme() != "http" && base.scheme() != "https" {
                    return Err("test endpoint must be http(s)".into());
                }
                if !is_loopback(base) {
                    return Err("test endpoint must be a loopback address (127.0.0.0/8, ::1 or localhost)".into());
                }
                if !base.username().is_empty() || base.password().is_some() {
                    return Err("test endpoint must not carry credentials".into());
                }
                Ok(())
            }
            Endpoint::OAuth2 { provider, token_url, .. } => {
                if provider == SHOPIFY_PROVIDER {
                    return Err("use Endpoint::Shopify for Shopify".into());
                }
                GrantKey::new(provider, "x").map_err(|e| e.to_string())?;
                match token_url.scheme() {
                    "https" => Ok(()),
                    "http" if is_loopback(token_url) => Ok(()),
                    _ => Err("token URL must be https (or http on loopback)".into()),
                }
            }
            Endpoint::Profile(p) => {
                let name = &p.name;
                match &p.spec {
                    ProviderSpec::Shopify if p.provider == SHOPIFY_PROVIDER => Ok(()),
                    ProviderSpec::ShopifyTestServer { base } if p.provider == SHOPIFY_PROVIDER => {
                        let base = Url::parse(base).map_err(|e| e.to_string())?;
                        Endpoint::ShopifyTestServer { base }.validate()
                    }
                    ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. } => {
                        Err(format!("profile {name}: Shopify's Admin API serves provider `shopify` only"))
                    }
                    ProviderSpec::OAuth2 { token_url, .. } => {
                        profile_provider(&p.provider, token_url).map_err(|e| format!("profile {name}: {e}"))?;
                        let url = match self.profile_sample_url() {
                            Some(url) => url.map_err(|e| format!("profile {name}: {e}"))?,
                            None => return Err(format!("profile {name}: no token URL")),
                        };
                        if !url.username().is_empty() || url.password().is_some() {
                            return Err(format!("profile {name}: the token URL must not carry credentials"));
                        }
                        match url.scheme() {
                            "https" => Ok(()),
                            "http" if is_loopback(&url) => Ok(()),
                            _ => Err(format!("profile {name}: token URL must be https (or http on loopback)")),
                        }
                    }
                }
            }
        }
    }

    /// The wire format and URL of this endpoint ([`ProviderSpec`] builds every request and names
    /// the response rules). Only for a [`validate`](Endpoint::validate)d endpoint.
    pub(crate) fn spec(&self) -> ProviderSpec {
        match self {
            Endpoint::Shopify => ProviderSpec::Shopify,
            Endpoint::ShopifyTestServer { base } => ProviderSpec::ShopifyTestServer { base: base.as_str().into() },
            Endpoint::OAuth2 { token_url, client_auth, .. } => ProviderSpec::oauth2(token_url.as_str(), *client_auth),
            Endpoint::Profile(p) => p.spec.clone(),
        }
    }
}

/// Checks that an OAuth 2.0 profile's provider id can hold the values its token URL needs:
/// `{shop}` only Shopify shop grants (`shopify`), `{shop_id}` only Customer Account API grants
/// (`shopify-customer-account`); a URL without placeholders, any valid provider id.
pub(crate) fn profile_provider(provider: &str, token_url: &str) -> Result<(), String> {
    use tokenwal_core::SHOPIFY_CUSTOMER_ACCOUNT;
    let sample = match provider {
        SHOPIFY_PROVIDER => "a.myshopify.com",
        SHOPIFY_CUSTOMER_ACCOUNT => "1:1",
        _ => "x",
    };
    GrantKey::new(provider, sample).map_err(|e| e.to_string())?;
    if token_url.contains("{shop_id}") && provider != SHOPIFY_CUSTOMER_ACCOUNT {
        return Err(format!("a token URL with {{shop_id}} serves `{SHOPIFY_CUSTOMER_ACCOUNT}` grants only"));
    }
    if token_url.contains("{shop}") && provider != SHOPIFY_PROVIDER {
        return Err(format!("a token URL with {{shop}} serves `{SHOPIFY_PROVIDER}` grants only"));
    }
    Ok(())
}

/// Checks a profile as [`crate::Engine::open`] will, before any secret could be sent: its
/// provider id, its token URL (https, or http on loopback, no userinfo, only the placeholders its
/// grants can fill).
pub fn check_profile(profile: &ProviderProfile) -> Result<(), String> {
    Endpoint::Profile(Box::new(profile.clone())).validate()
}

/// Where the engine keeps its journal.
#[derive(Clone, Debug)]
pub enum StoreLocation {
    /// A sled store in this directory (created 0700 if missing), sealed under the keys of
    /// [`Config::store_keys`].
    Path(PathBuf),
    /// In memory (tests and demos: nothing survives the process).
    InMemory,
    /// A PostgreSQL store (fleet backend; `docs/journal.md`, "PostgreSQL"), sealed under the keys of
    /// [`Config::store_keys`] like a directory store. Any number of processes (a fleet) share it,
    /// each under a membership lease on the database's clock: a grant's attempt in flight belongs
    /// to the process that journaled it, and recovery claims only the attempts of processes that
    /// are gone. Half the lease must exceed the request timeout.
    Postgres(Box<tokenwal_store::PgLocation>),
    /// A store the caller already opened (tests restart engines on a crash image of an in-memory
    /// store this way). One engine at a time may use a store.
    Open(tokenwal_store::Store),
}

/// Everything the engine needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The store.
    pub store: StoreLocation,
    /// Where the keys sealing a [`StoreLocation::Path`] store come from. Default
    /// [`KeySource::Env`]: `TOKENWAL_STORE_KEY` (base64 of 32 bytes) or the key file named by
    /// `TOKENWAL_STORE_KEY_FILE`. No key is an error at [`crate::Engine::open`], never a plaintext
    /// fallback. In-memory stores use an ephemeral key and ignore this.
    pub store_keys: KeySource,
    /// The token endpoint.
    pub endpoint: Endpoint,
    /// The app's client id (API key).
    pub client_id: String,
    /// The app's client secret.
    pub client_secret: ClientSecret,
    /// The provider's retry policy.
    pub policy: RetryPolicy,
    /// Refresh this long before the access token expires (default 5 minutes).
    pub refresh_margin: Duration,
    /// Refresh idle grants this long before their refresh token expires (default 7 days).
    pub refresh_token_margin: Duration,
    /// HTTP timeouts.
    pub timeouts: Timeouts,
    /// Whether a background scheduler keeps every grant fresh without callers (default true).
    pub proactive: bool,
    /// The most refreshes in flight at once across all grants (default 64).
    pub max_concurrent_refreshes: usize,
    /// How long refreshing pauses fleet-wide after an `invalid_client` (default 60 s).
    pub credentials_pause: Duration,
    /// How long `access_token` waits for a backoff to end before returning an error (default 10 s).
    pub max_wait: Duration,
    /// The optional webhook sink (default none; see [`crate::webhook_sink`]).
    pub webhook: Option<crate::webhook_sink::WebhookConfig>,
    /// Background compaction of the journal (default on: [`Compaction::default`]); `None` keeps
    /// every record (the disk then grows with every refresh).
    pub compaction: Option<Compaction>,
    /// How long [`crate::Engine::open`] waits for recovery (default 5 s). Grants not recovered by
    /// then keep recovering in the background (see [`crate::Engine::recovering`]); callers for them
    /// get [`crate::Error::Recovering`] (or wait, see [`Config::wait_for_recovery`]); every other
    /// grant is served at once. `Duration::ZERO` returns at once.
    pub recovery_budget: Duration,
    /// Whether callers for a grant still recovering wait for its recovery (up to
    /// [`Config::max_wait`], then [`crate::Error::Recovering`]) instead of being answered
    /// [`crate::Error::Recovering`] at once (default false).
    pub wait_for_recovery: bool,
}

/// How the engine keeps its journal bounded in the background (`crate::compactor`): every
/// `interval`, each recently written grant keeps its newest `history_per_grant` records, and records
/// older than `retention` go. Grant states and open intents are never compacted; neither is anything
/// a journal cursor (the webhook sink) has not consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// Records older than this are deleted (default 30 days). Applies to stores the engine opens
    /// ([`StoreLocation::Path`]); a store passed in ([`StoreLocation::Open`]) keeps its own setting.
    pub retention: Duration,
    /// The records each grant keeps, newest first, whatever their age (default 64: about a day and
    /// a half of hourly refreshes). A grant's history stays under 1.5 × this plus one transition.
    pub history_per_grant: usize,
    /// Time between passes (default 10 minutes; the first pass starts at most a minute after open).
    pub interval: Duration,
}

impl Default for Compaction {
    fn default() -> Compaction {
        Compaction {
            retention: Duration::from_secs(30 * 86_400),
            history_per_grant: 64,
            interval: Duration::from_secs(600),
        }
    }
}

impl Config {
    /// A Shopify configuration with defaults.
    pub fn shopify(store: StoreLocation, client_id: impl Into<String>, client_secret: ClientSecret) -> Config {
        Config {
            store,
            store_keys: KeySource::Env,
            endpoint: Endpoint::Shopify,
            client_id: client_id.into(),
            client_secret,
            policy: RetryPolicy::shopify(),
            refresh_margin: Duration::from_secs(300),
            refresh_token_margin: Duration::from_secs(7 * 86_400),
            timeouts: Timeouts::default(),
            proactive: true,
            max_concurrent_refreshes: 64,
            credentials_pause: Duration::from_secs(60),
            max_wait: Duration::from_secs(10),
            webhook: None,
            compaction: Some(Compaction::default()),
            recovery_budget: Duration::from_secs(5),
            wait_for_recovery: false,
        }
    }

    /// Sets [`Config::store_keys`].
    pub fn with_store_keys(mut self, keys: KeySource) -> Config {
        self.store_keys = keys;
        self
    }

    /// Serves the grants of `profile`: its endpoint (Shopify's Admin API stays
    /// [`Endpoint::Shopify`]), its retry policy and its refresh buffer as [`Config::refresh_margin`].
    pub fn with_profile(mut self, profile: ProviderProfile) -> Config {
        self.policy = profile.retry_policy();
        self.refresh_margin = profile.refresh_buffer;
        self.endpoint = match &profile.spec {
            ProviderSpec::Shopify => Endpoint::Shopify,
            ProviderSpec::ShopifyTestServer { base } => match Url::parse(base) {
                Ok(base) => Endpoint::ShopifyTestServer { base },
                // Refused at open, naming the profile.
                Err(_) => Endpoint::Profile(Box::new(profile)),
            },
            ProviderSpec::OAuth2 { .. } => Endpoint::Profile(Box::new(profile)),
        };
        self
    }

    /// **Test only**: point the Shopify profile at a local server (see [`Endpoint::ShopifyTestServer`]).
    pub fn with_insecure_test_endpoint(mut self, base: Url) -> Config {
        self.endpoint = Endpoint::ShopifyTestServer { base };
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenwal_core::ShopDomain;

    fn grant(s: &str) -> GrantKey {
        GrantKey::shopify(&ShopDomain::parse(s).unwrap())
    }

    // The Shopify URL (the validated domain and nothing else) is tested with the wire format:
    // tokenwal-core `protocol::request::tests::the_shopify_url_is_the_validated_domain_and_nothing_else`.

    #[test]
    fn the_test_endpoint_must_be_loopback_and_keeps_the_shop_in_the_path() {
        for ok in
            ["http://127.0.0.1:8080", "http://127.9.9.9", "http://[::1]:9", "http://localhost:1", "http://2130706433"]
        {
            let e = Endpoint::ShopifyTestServer { base: Url::parse(ok).unwrap() };
            assert!(e.validate().is_ok(), "{ok}");
            let url = Url::parse(&e.spec().token_url(&grant("a.myshopify.com")).unwrap()).unwrap();
            assert!(is_loopback(&url), "{url}");
            assert!(url.path().ends_with("/shops/a.myshopify.com/admin/oauth/access_token"), "{url}");
        }
        for bad in [
            "http://evil.com",
            "http://127.0.0.1.evil.com",
            "http://localhost.evil.com",
            "http://0.0.0.0:80",
            "http://10.0.0.1",
            "http://169.254.169.254",
            "http://[::ffff:7f00:1]",
            "http://user:pw@127.0.0.1",
            "http://user@127.0.0.1",
            "ftp://127.0.0.1",
            "file:///etc/passwd",
        ] {
            let e = Endpoint::ShopifyTestServer { base: Url::parse(bad).unwrap() };
            assert!(e.validate().is_err(), "{bad}");
        }
    }

    /// `shopify-admin` is today's default, bit for bit: same endpoint, policy and margin.
    #[test]
    fn the_admin_profile_changes_nothing() {
        let base = Config::shopify(StoreLocation::InMemory, "id", ClientSecret::new("s"));
        let with = base.clone().with_profile(ProviderProfile::shopify_admin());
        assert!(matches!(with.endpoint, Endpoint::Shopify));
        assert_eq!((with.policy, with.refresh_margin), (base.policy, base.refresh_margin));
        assert!(matches!(with.endpoint.spec(), ProviderSpec::Shopify));
    }

    #[test]
    fn profiles_are_checked_before_any_secret_could_be_sent() {
        let customer = ProviderProfile::shopify_customer_account();
        assert_eq!(check_profile(&customer), Ok(()));
        let c = Config::shopify(StoreLocation::InMemory, "id", ClientSecret::new("s")).with_profile(customer.clone());
        assert_eq!(c.endpoint.provider(), "shopify-customer-account");
        assert_eq!(c.refresh_margin, Duration::from_secs(120));
        let with_url = |u: &str, provider: &str| {
            let mut p = customer.clone();
            p.provider = provider.into();
            let ProviderSpec::OAuth2 { token_url, .. } = &mut p.spec else { unreachable!() };
            *token_url = u.into();
            check_profile(&p)
        };
        assert_eq!(with_url("http://127.0.0.1:9/{shop_id}/t", "shopify-customer-account"), Ok(()));
        assert_eq!(with_url("https://idp.example/t", "idp"), Ok(()));
        assert_eq!(with_url("https://{shop}/t", "shopify"), Ok(()));
        for (bad, provider) in [
            ("http://idp.example/{shop_id}/t", "shopify-customer-account"),
            ("https://u:p@idp.example/{shop_id}", "shopify-customer-account"),
            ("https://idp.example/{shop_id}", "idp"),
            ("https://{shop}/t", "idp"),
            ("https://idp.example/{tenant}", "idp"),
            ("not a url", "idp"),
            ("https://idp.example/t", "Bad"),
        ] {
            assert!(with_url(bad, provider).is_err(), "{bad} for {provider}");
        }
    }

    #[test]
    fn oauth2_token_urls_are_https_or_loopback_http() {
        let e = |u: &str| Endpoint::OAuth2 {
            provider: "oidc".into(),
            token_url: Url::parse(u).unwrap(),
            client_auth: ClientAuth::Body,
        };
        assert!(e("https://auth.example.com/token").validate().is_ok());
        assert!(e("http://127.0.0.1:9/token").validate().is_ok());
        for bad in ["http://auth.example.com/token", "http://10.0.0.1/token", "ftp://auth.example.com/"] {
            assert!(e(bad).validate().is_err(), "{bad}");
        }
        let shopify = Endpoint::OAuth2 {
            provider: "shopify".into(),
            token_url: Url::parse("https://x.myshopify.com/admin/oauth/access_token").unwrap(),
            client_auth: ClientAuth::Body,
        };
        assert!(shopify.validate().is_err());
    }
}
