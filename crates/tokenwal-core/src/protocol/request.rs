//! The request of one attempt: built from the provider, the app's client credentials, the grant and
//! the credential presented. Pure; the engine's transport sends it as it is.
//!
//! | provider | kind | fields | client authentication |
//! |---|---|---|---|
//! | Shopify (JSON) | refresh | `grant_type=refresh_token`, `refresh_token` | `client_id`, `client_secret` in the body |
//! | Shopify (JSON) | token exchange | `grant_type=`[`GRANT_TOKEN_EXCHANGE`], `subject_token` (the session token), `subject_token_type=`[`TOKEN_TYPE_ID_TOKEN`], `requested_token_type=`[`TOKEN_TYPE_OFFLINE`], `expiring=1` | in the body |
//! | Shopify (JSON) | migration | as token exchange, `subject_token` the legacy token, `subject_token_type=`[`TOKEN_TYPE_OFFLINE`] | in the body |
//! | OAuth 2.0 (form) | refresh | `grant_type=refresh_token`, `refresh_token`, then the configured extra fields | [`ClientAuth::Body`]: `client_id`, `client_secret` in the body; [`ClientAuth::Basic`]: `Authorization: Basic`, nothing in the body; [`ClientAuth::Public`]: `client_id` in the body, no secret anywhere |
//! | OAuth 2.0 | token exchange, migration | — ([`BuildError::AcquisitionNotSupported`]: nothing is sent) | — |
//!
//! An OAuth 2.0 token URL may hold the placeholders `{shop}` (the grant's validated
//! [`ShopDomain`](crate::ShopDomain)) and `{shop_id}` (the shop id of a
//! [`CustomerAccount`](crate::CustomerAccount) grant): both values come from the typed grant key only
//! (a lowercase DNS name, a decimal number), so no account text can change the URL's shape, and a
//! grant without the value is refused before anything is sent ([`BuildError::MissingPlaceholder`]).

use super::classify::ResponseRules;
use crate::domain::GrantKey;
use crate::machine::{AttemptRequest, Credential};
use crate::secret::ClientSecret;
use std::fmt;

/// `grant_type` of token exchange (RFC 8693), for session tokens and migrations alike.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// `subject_token_type` of an App Bridge session token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// Shopify's offline access token type (the requested type, and the subject type of a migration).
pub const TOKEN_TYPE_OFFLINE: &str = "urn:shopify:params:oauth:token-type:offline-access-token";

/// Which token endpoint, and which dialect it speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderSpec {
    /// Shopify: `https://{shop}/admin/oauth/access_token`, the host taken only from the grant's
    /// validated shop domain; a JSON body (the official libraries send JSON) with the client
    /// credentials in it.
    Shopify,
    /// Shopify's dialect against a test server: `{base}/shops/{shop}/admin/oauth/access_token`.
    /// The client secret is sent there: `base` must already be validated (the engine accepts only an
    /// `http(s)` loopback URL without userinfo).
    ShopifyTestServer {
        /// The server's base URL, serialized (e.g. `http://127.0.0.1:8080/`).
        base: String,
    },
    /// A generic OAuth 2.0 server (RFC 6749 §6): a form-encoded refresh at a configured token URL
    /// (build one with [`ProviderSpec::oauth2`]; a provider profile sets the rest).
    OAuth2 {
        /// The token endpoint, serialized, perhaps with the placeholders `{shop}` and `{shop_id}`
        /// (see the module doc; [`check_template`] lists what is allowed); validated by whoever
        /// configures it (`https`, or `http` on loopback, once the placeholders are filled).
        token_url: String,
        /// How the client authenticates.
        client_auth: ClientAuth,
        /// Fields appended to every refresh body, in order (never one of the fields tokenwal sets:
        /// [`RESERVED_FIELDS`]). Not secrets: they show in the request's `Debug`.
        extra_fields: Vec<(String, String)>,
        /// An `Origin` header to send (Shopify's Customer Account API public clients send one).
        origin: Option<String>,
        /// What a response must contain, and whether a 400/401 to a refresh is definitive.
        rules: ResponseRules,
    },
}

/// The body fields tokenwal itself sets; a provider's extra fields may not name them.
pub const RESERVED_FIELDS: &[&str] = &[
    "grant_type",
    "refresh_token",
    "client_id",
    "client_secret",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
];

/// The placeholders an OAuth 2.0 token URL may hold.
pub const PLACEHOLDERS: &[&str] = &["{shop}", "{shop_id}"];

/// Why a token URL template is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A `{` or `}` that is not one of [`PLACEHOLDERS`].
    #[error("unknown placeholder in token URL (allowed: {{shop}}, {{shop_id}})")]
    UnknownPlaceholder,
    /// Both placeholders: no grant key has both a shop domain and a shop id.
    #[error("a token URL cannot hold both {{shop}} and {{shop_id}} (no grant has both)")]
    BothPlaceholders,
}

/// Checks a token URL template: only [`PLACEHOLDERS`], at most one kind. Returns the template with
/// each placeholder replaced by a sample value (`a.myshopify.com`, `1`), for the caller to check
/// the URL's scheme and host.
pub fn check_template(template: &str) -> Result<String, TemplateError> {
    let filled = template.replace("{shop_id}", "1").replace("{shop}", "a.myshopify.com");
    if filled.contains(['{', '}']) {
        return Err(TemplateError::UnknownPlaceholder);
    }
    if template.contains("{shop}") && template.contains("{shop_id}") {
        return Err(TemplateError::BothPlaceholders);
    }
    Ok(filled)
}

/// How an OAuth 2.0 client authenticates at the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    Body,
    /// HTTP Basic (`client_secret_basic`).
    Basic,
    /// A public client (`none`): `client_id` in the body, and the client secret is never sent,
    /// whatever the configuration holds.
    Public,
}

/// The app's client credentials.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    /// The client id (Shopify: the API key). Not a secret.
    pub id: String,
    /// The client secret.
    pub secret: ClientSecret,
}

/// How the body is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// A JSON object of string values (`Content-Type: application/json`).
    Json,
    /// `application/x-www-form-urlencoded`, fields in order.
    Form,
}

/// Why no request could be built; nothing is sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A Shopify endpoint and a grant that is not a Shopify shop: nothing else may become the host.
    #[error("not a shopify grant")]
    NotAShopifyGrant,
    /// A token exchange or migration at a provider that has none.
    #[error("token exchange and migration are Shopify grants")]
    AcquisitionNotSupported,
    /// The token URL holds a placeholder the grant has no value for (`{shop}` needs a Shopify shop
    /// grant, `{shop_id}` a Customer Account API grant).
    #[error("the token URL needs {0} and this grant has none")]
    MissingPlaceholder(&'static str),
}

/// One token request. Every token request is a `POST`. It borrows the secrets it carries and its
/// `Debug` shows the URL, the encoding and the field *names* only.
pub struct Request<'a> {
    url: String,
    encoding: Encoding,
    fields: Vec<(&'a str, &'a str)>,
    basic_auth: Option<(&'a str, &'a str)>,
    origin: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// The HTTP method of every token request.
    pub const METHOD: &'static str = "POST";
    /// The headers every token request carries besides `Content-Type` (from [`Request::encoding`])
    /// and `Authorization` (from [`Request::expose_basic_auth`]).
    pub const HEADERS: &'static [(&'static str, &'static str)] = &[("accept", "application/json")];

    /// Where to send it (serialized; the host is a validated shop domain or a validated configured
    /// URL).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How the body fields are encoded.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The body fields, in order. Holds secrets: for the request body only.
    pub fn expose_fields(&self) -> &[(&'a str, &'a str)] {
        &self.fields
    }

    /// The value of one body field. Holds secrets: for the request body (and tests) only.
    pub fn expose_field(&self, name: &str) -> Option<&'a str> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// `(user, password)` of an `Authorization: Basic` header, if the client authenticates so. The
    /// password is the client secret: the transport must mark the header sensitive.
    pub fn expose_basic_auth(&self) -> Option<(&'a str, &'a str)> {
        self.basic_auth
    }

    /// The `Origin` header to send, if the provider wants one (not a secret).
    pub fn origin(&self) -> Option<&'a str> {
        self.origin
    }
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.fields.iter().map(|(n, _)| *n).collect();
        f.debug_struct("Request")
            .field("url", &self.url)
            .field("encoding", &self.encoding)
            .field("fields", &names)
            .field("basic_auth", &self.basic_auth.map(|_| "<redacted>"))
            .field("origin", &self.origin)
            .finish()
    }
}

impl ProviderSpec {
    /// A generic OAuth 2.0 server at `token_url` with [`ResponseRules::OAUTH2`], no extra fields
    /// and no `Origin`.
    pub fn oauth2(token_url: impl Into<String>, client_auth: ClientAuth) -> ProviderSpec {
        ProviderSpec::OAuth2 {
            token_url: token_url.into(),
            client_auth,
            extra_fields: Vec::new(),
            origin: None,
            rules: ResponseRules::OAUTH2,
        }
    }

    /// What this provider's successful token response must contain.
    pub fn response_rules(&self) -> ResponseRules {
        match self {
            ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. } => ResponseRules::SHOPIFY,
            ProviderSpec::OAuth2 { rules, .. } => *rules,
        }
    }

    /// The token URL for `grant`, serialized.
    pub fn token_url(&self, grant: &GrantKey) -> Result<String, BuildError> {
        match self {
            ProviderSpec::Shopify => {
                let shop = grant.shop().ok_or(BuildError::NotAShopifyGrant)?;
                // The shop is a validated `{handle}.myshopify.com`: nothing else can become the host.
                Ok(format!("https://{}/admin/oauth/access_token", shop.as_str()))
            }
            ProviderSpec::ShopifyTestServer { base } => {
                let shop = grant.shop().ok_or(BuildError::NotAShopifyGrant)?;
                // `base` with one empty last path segment dropped and the segments appended, its
                // query and fragment kept (what `Url::path_segments_mut().pop_if_empty().extend(..)`
                // does; the shop's characters need no escaping).
                let cut = base.find(['?', '#']).unwrap_or(base.len());
                let (head, tail) = base.split_at(cut);
                let head = head.strip_suffix('/').unwrap_or(head);
                Ok(format!("{head}/shops/{}/admin/oauth/access_token{tail}", shop.as_str()))
            }
            ProviderSpec::OAuth2 { token_url, .. } => fill(token_url, grant),
        }
    }
}

/// Fills a token URL template's placeholder from the typed grant key (never from account text).
fn fill(template: &str, grant: &GrantKey) -> Result<String, BuildError> {
    if template.contains("{shop_id}") {
        let customer = grant.customer().ok_or(BuildError::MissingPlaceholder("{shop_id}"))?;
        return Ok(template.replace("{shop_id}", &customer.shop_id().to_string()));
    }
    if template.contains("{shop}") {
        let shop = grant.shop().ok_or(BuildError::MissingPlaceholder("{shop}"))?;
        return Ok(template.replace("{shop}", shop.as_str()));
    }
    Ok(template.to_owned())
}

/// Builds the request of `attempt` (see the module table).
pub fn build<'a>(
    spec: &'a ProviderSpec,
    client: &'a ClientCredentials,
    attempt: &'a AttemptRequest,
) -> Result<Request<'a>, BuildError> {
    build_for(spec, client, attempt.grant(), attempt.credential())
}

fn build_for<'a>(
    spec: &'a ProviderSpec,
    client: &'a ClientCredentials,
    grant: &GrantKey,
    credential: &'a Credential,
) -> Result<Request<'a>, BuildError> {
    let url = spec.token_url(grant)?;
    match spec {
        ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. } => {
            let secret = client.secret.expose_secret();
            let mut fields = vec![("client_id", client.id.as_str()), ("client_secret", secret)];
            match credential {
                Credential::RefreshToken(t) => {
                    fields.extend([("grant_type", "refresh_token"), ("refresh_token", t.expose_secret())]);
                }
                Credential::SessionToken(t) => {
                    fields.extend(exchange(t.expose_secret(), TOKEN_TYPE_ID_TOKEN));
                }
                Credential::LegacyToken(t) => {
                    fields.extend(exchange(t.expose_secret(), TOKEN_TYPE_OFFLINE));
                }
            }
            Ok(Request { url, encoding: Encoding::Json, fields, basic_auth: None, origin: None })
        }
        ProviderSpec::OAuth2 { client_auth, extra_fields, origin, .. } => {
            let Credential::RefreshToken(refresh) = credential else {
                return Err(BuildError::AcquisitionNotSupported);
            };
            let mut fields = vec![("grant_type", "refresh_token"), ("refresh_token", refresh.expose_secret())];
            let basic_auth = match client_auth {
                ClientAuth::Body => {
                    fields
                        .extend([("client_id", client.id.as_str()), ("client_secret", client.secret.expose_secret())]);
                    None
                }
                ClientAuth::Basic => Some((client.id.as_str(), client.secret.expose_secret())),
                // A public client: the secret is never read, let alone sent.
                ClientAuth::Public => {
                    fields.push(("client_id", client.id.as_str()));
                    None
                }
            };
            fields.extend(
                extra_fields
                    .iter()
                    .filter(|(n, _)| !RESERVED_FIELDS.contains(&n.as_str()))
                    .map(|(n, v)| (n.as_str(), v.as_str())),
            );
            Ok(Request { url, encoding: Encoding::Form, fields, basic_auth, origin: origin.as_deref() })
        }
    }
}

/// The fields of a Shopify token exchange (RFC 8693) of `subject` for an expiring offline token.
fn exchange<'a>(subject: &'a str, subject_type: &'static str) -> [(&'static str, &'a str); 5] {
    [
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", subject),
        ("subject_token_type", subject_type),
        ("requested_token_type", TOKEN_TYPE_OFFLINE),
        ("expiring", "1"),
    ]
}

#[cfg(test)]
mod tests;
