//! Provider profiles from a TOML file (`providers_file` in the JSON `--config`, or
//! `TOKENWAL_PROVIDERS`): named token endpoints beyond Shopify's Admin API, and settings of the
//! two built-in profiles. The library's types are `tokenwal::core::profile`; this module only reads
//! the file and refuses anything doubtful, naming the line.
//!
//! ```toml
//! # A generic OAuth 2.0 server: grants `my-idp/{account}`.
//! [providers.my-idp]
//! token_url = "https://auth.example.com/oauth/token"
//! client_auth = "client_secret_basic"     # client_secret_post | client_secret_basic | none
//! rotation = "family-revoke-on-reuse"     # retain-until-replacement-used | strict-single-use
//!                                         # | family-revoke-on-reuse | non-rotating
//! refresh_buffer = "5m"
//! extra_fields = { audience = "https://api.example.com" }
//!
//! # The built-in Customer Account API profile, with its unconfirmed points set (docs/providers.md).
//! [providers.shopify-customer-account]
//! token_url = "https://shopify.com/authentication/{shop_id}/oauth/token"
//! origin = "https://shop.example.com"
//! ```
//!
//! Keys of a profile (every one optional for a built-in, which they override; a new profile needs
//! `token_url`, `client_auth` and `rotation`):
//!
//! | key | meaning |
//! |---|---|
//! | `provider` | the provider id of its grants (`[a-z0-9_-]{1,32}`; default: the profile's name). A built-in's is fixed |
//! | `token_url` | `https` (or `http` on loopback); `{shop}` (for `shopify` grants) or `{shop_id}` (for `shopify-customer-account` grants) are filled from the grant's typed key |
//! | `client_auth` | `client_secret_post`, `client_secret_basic`, `none` (a public client: the secret is never sent) |
//! | `rotation` | `retain-until-replacement-used` (with `retain_max`, default `30d`), `strict-single-use`, `family-revoke-on-reuse`, `non-rotating` |
//! | `refresh_buffer` | refresh this long before the access token expires |
//! | `extra_fields` | a table of strings appended to every refresh body (not `grant_type`, `refresh_token`, `client_id`, `client_secret`, …) |
//! | `origin` | an `Origin` header to send (`scheme://host[:port]`) |
//! | `require_expires_in`, `require_refresh_token` | a success without the field is unusable (ambiguous) |
//! | `default_access_lifetime` | assumed when `expires_in` is absent and not required |
//! | `rejected_on_400_401` | a refresh answered 400/401 is definitive: the user must log in again |
//!
//! Durations are strings with a unit (`ms`, `s`, `m`, `h`, `d`) or a number of seconds. The
//! Admin API's profile takes `refresh_buffer` and `rotation` only: its wire format is fixed.

use crate::error::CliError;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;
use tokenwal::core::profile::{ProviderProfile, Rotation};
use tokenwal::core::protocol::{ClientAuth, ProviderSpec, RESERVED_FIELDS};
use tokenwal_sim::SimDuration;
use toml::Spanned;
use url::Url;

/// The profiles a file defines, with the built-ins (perhaps overridden).
#[derive(Debug, Clone)]
pub struct Providers {
    profiles: BTreeMap<String, ProviderProfile>,
}

impl Default for Providers {
    /// The built-in profiles only.
    fn default() -> Providers {
        let profiles = ProviderProfile::BUILTIN
            .iter()
            .filter_map(|n| ProviderProfile::builtin(n))
            .map(|p| (p.name.clone(), p))
            .collect();
        Providers { profiles }
    }
}

impl Providers {
    /// Reads a providers file.
    pub fn load(path: &Path) -> Result<Providers, CliError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Config(format!("cannot read providers file {}: {e}", path.display())))?;
        Providers::parse(&text).map_err(|e| CliError::Config(format!("providers file {}: {e}", path.display())))
    }

    /// Parses a providers file's text. The error names the line (and column) of the offending
    /// key or table.
    pub fn parse(text: &str) -> Result<Providers, String> {
        let file: RawFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        let mut providers = Providers::default();
        for (name, raw) in file.providers {
            let name = name.into_inner();
            let table = raw.span();
            let raw = raw.into_inner();
            // The engine's checks are about the token URL (the provider id is checked while
            // reading): point at it when the table has one.
            let url = raw.token_url.as_ref().map_or(table.clone(), Spanned::span);
            let profile = build(&name, raw).map_err(|e| at(text, table, &format!("[providers.{name}]: {e}")))?;
            tokenwal::check_profile(&profile).map_err(|e| {
                let e = e.strip_prefix(&format!("profile {name}: ")).unwrap_or(&e);
                at(text, url, &format!("[providers.{name}]: {e}"))
            })?;
            providers.profiles.insert(profile.name.clone(), profile);
        }
        Ok(providers)
    }

    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Result<&ProviderProfile, CliError> {
        self.profiles.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            CliError::Config(format!("no provider profile {name:?} (known: {})", known.join(", ")))
        })
    }
}

/// `message` prefixed with the 1-based line and column of `span` in `text`.
fn at(text: &str, span: Range<usize>, message: &str) -> String {
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    providers: BTreeMap<Spanned<String>, Spanned<RawProfile>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    provider: Option<ProviderId>,
    token_url: Option<Spanned<String>>,
    client_auth: Option<Auth>,
    rotation: Option<RotationName>,
    retain_max: Option<Dur>,
    refresh_buffer: Option<Dur>,
    #[serde(default)]
    extra_fields: Option<BTreeMap<String, String>>,
    origin: Option<Origin>,
    require_expires_in: Option<bool>,
    require_refresh_token: Option<bool>,
    default_access_lifetime: Option<Dur>,
    rejected_on_400_401: Option<bool>,
}

/// Builds (or overrides) the profile `name` from its table; the engine's own checks
/// (`tokenwal::check_profile`) run after.
fn build(name: &str, raw: RawProfile) -> Result<ProviderProfile, String> {
    let builtin = ProviderProfile::builtin(name);
    let mut p = match builtin.clone() {
        Some(p) => p,
        None => {
            let missing: Vec<&str> = [
                ("token_url", raw.token_url.is_none()),
                ("client_auth", raw.client_auth.is_none()),
                ("rotation", raw.rotation.is_none()),
            ]
            .into_iter()
            .filter_map(|(k, m)| m.then_some(k))
            .collect();
            if !missing.is_empty() {
                return Err(format!("a new profile needs {} (no default is guessed)", missing.join(", ")));
            }
            ProviderProfile {
                name: name.to_owned(),
                provider: name.to_owned(),
                spec: ProviderSpec::oauth2("", ClientAuth::Body),
                rotation: Rotation::StrictSingleUse,
                refresh_buffer: Duration::from_secs(300),
            }
        }
    };
    let id_ok = |s: &str| {
        (1..=32).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    if builtin.is_none() && raw.provider.is_none() && !id_ok(name) {
        return Err(format!(
            "the profile's name is its grants' provider id unless `provider` is set, and {name:?} is not \
             1-32 bytes of [a-z0-9_-]"
        ));
    }
    if let Some(ProviderId(provider)) = raw.provider {
        if builtin.is_some() && provider != p.provider {
            return Err(format!("the provider id of a built-in profile is fixed ({})", p.provider));
        }
        p.provider = provider;
    }
    if let Some(d) = raw.refresh_buffer {
        p.refresh_buffer = d.0;
    }
    match (raw.rotation, raw.retain_max) {
        (Some(RotationName::Retain), max) => {
            p.rotation =
                Rotation::RetainUntilReplacementUsed { max: max.map_or(Duration::from_secs(30 * 86_400), |d| d.0) }
        }
        (Some(_), Some(_)) => {
            return Err("retain_max goes with rotation = \"retain-until-replacement-used\" only".into())
        }
        (Some(r), None) => p.rotation = r.rotation(),
        (None, Some(max)) => match &mut p.rotation {
            Rotation::RetainUntilReplacementUsed { max: m } => *m = max.0,
            _ => return Err("retain_max goes with rotation = \"retain-until-replacement-used\" only".into()),
        },
        (None, None) => {}
    }
    let wire = raw.token_url.is_some()
        || raw.client_auth.is_some()
        || raw.extra_fields.is_some()
        || raw.origin.is_some()
        || raw.require_expires_in.is_some()
        || raw.require_refresh_token.is_some()
        || raw.default_access_lifetime.is_some()
        || raw.rejected_on_400_401.is_some();
    match &mut p.spec {
        ProviderSpec::OAuth2 { token_url, client_auth, extra_fields, origin, rules } => {
            if let Some(u) = raw.token_url {
                *token_url = u.into_inner();
            }
            if let Some(Auth(a)) = raw.client_auth {
                *client_auth = a;
            }
            if let Some(fields) = raw.extra_fields {
                if let Some(bad) = fields.keys().find(|k| RESERVED_FIELDS.contains(&k.as_str())) {
                    return Err(format!("extra_fields may not set {bad:?}: tokenwal sets it"));
                }
                if let Some(bad) = fields.keys().find(|k| k.is_empty() || k.chars().any(char::is_control)) {
                    return Err(format!("extra_fields has an unusable name {bad:?}"));
                }
                *extra_fields = fields.into_iter().collect();
            }
            if let Some(Origin(o)) = raw.origin {
                *origin = Some(o);
            }
            if let Some(b) = raw.require_expires_in {
                rules.require_expires_in = b;
            }
            if let Some(b) = raw.require_refresh_token {
                rules.require_refresh_token = b;
            }
            if let Some(d) = raw.default_access_lifetime {
                rules.default_access_lifetime = d.0;
            }
            if let Some(b) = raw.rejected_on_400_401 {
                rules.rejected_on_400_401 = b;
            }
            if matches!(p.rotation, Rotation::NonRotating) {
                // A non-rotating server answers without a new refresh token: keep the presented one.
                rules.require_refresh_token = raw.require_refresh_token.unwrap_or(false);
            }
        }
        ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. } if wire => {
            return Err("the Admin API's wire format is fixed: only refresh_buffer and rotation can be set".into());
        }
        ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. } => {}
    }
    Ok(p)
}

/// A duration: `"90s"`-style string or a number of seconds.
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a duration is a string with a unit (\"90s\", \"5m\", \"1h\", \"30d\") or whole seconds",
            )
        })? {
            Raw::Secs(s) => Ok(Dur(Duration::from_secs(s))),
            Raw::Text(t) => t.parse::<SimDuration>().map(|d| Dur(d.to_std())).map_err(serde::de::Error::custom),
        }
    }
}

/// A provider id: `[a-z0-9_-]{1,32}`, the first half of its grants' keys.
struct ProviderId(String);

impl<'de> Deserialize<'de> for ProviderId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ProviderId, D::Error> {
        let s = String::deserialize(d)?;
        let ok = (1..=32).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(serde::de::Error::custom(format!("provider id {s:?} is not 1-32 bytes of [a-z0-9_-]")));
        }
        Ok(ProviderId(s))
    }
}

/// `client_auth`, as RFC 7591 names the methods.
struct Auth(ClientAuth);

impl<'de> Deserialize<'de> for Auth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Auth, D::Error> {
        match String::deserialize(d)?.as_str() {
            "client_secret_post" => Ok(Auth(ClientAuth::Body)),
            "client_secret_basic" => Ok(Auth(ClientAuth::Basic)),
            "none" => Ok(Auth(ClientAuth::Public)),
            other => Err(serde::de::Error::custom(format!(
                "client_auth {other:?} is not one of client_secret_post, client_secret_basic, none"
            ))),
        }
    }
}

enum RotationName {
    Retain,
    Strict,
    Family,
    NonRotating,
}

impl RotationName {
    fn rotation(&self) -> Rotation {
        match self {
            RotationName::Retain => Rotation::RetainUntilReplacementUsed { max: Duration::from_secs(30 * 86_400) },
            RotationName::Strict => Rotation::StrictSingleUse,
            RotationName::Family => Rotation::FamilyRevokeOnReuse,
            RotationName::NonRotating => Rotation::NonRotating,
        }
    }
}

impl<'de> Deserialize<'de> for RotationName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RotationName, D::Error> {
        match String::deserialize(d)?.as_str() {
            "retain-until-replacement-used" => Ok(RotationName::Retain),
            "strict-single-use" => Ok(RotationName::Strict),
            "family-revoke-on-reuse" => Ok(RotationName::Family),
            "non-rotating" => Ok(RotationName::NonRotating),
            other => Err(serde::de::Error::custom(format!(
                "rotation {other:?} is not one of retain-until-replacement-used, strict-single-use, \
                 family-revoke-on-reuse, non-rotating"
            ))),
        }
    }
}

/// An `Origin` header value: `scheme://host[:port]`, nothing else.
struct Origin(String);

impl<'de> Deserialize<'de> for Origin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Origin, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("origin {s:?} is not scheme://host[:port]"));
        let u = Url::parse(&s).map_err(|_| bad())?;
        let origin = u.origin().ascii_serialization();
        if !matches!(u.scheme(), "http" | "https") || origin != s {
            return Err(bad());
        }
        Ok(Origin(origin))
    }
}

#[cfg(test)]
mod tests;
