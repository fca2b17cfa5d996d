//! The request of one attempt: built from the provider, the app's client credentials, the grant and
//! the credential presented. Pure; the engine's transport sends it as it is.
//!
//! | provider | kind | fields | client authentication |
//! |---|---|---|---|
//! | Shopify (JSON) | refresh | `grant_type=refresh_token`, `refresh_token` | `client_id`, `client_secret` in the body |
//! | Shopify (JSON) | token exchange | `grant_type=`[`GRANT_TOKEN_EXCHANGE`], `subject_token` (the session token), `subject_token_type=`[`TOKEN_TYPE_ID_TOKEN`], `requested_token_type=`[`TOKEN_TYPE_OFFLINE`], `expiring=1` | in the body |
//! | Shopify (JSON) | migration | as token exchange, `subject_token` the legacy token, `subject_token_type=`[`TOKEN_TYPE_OFFLINE`] | in the body |
//! | OAuth 2.0 (form) | refresh | `grant_type=refresh_token`, `refresh_token` | [`ClientAuth::Body`]: `client_id`, `client_secret` in the body; [`ClientAuth::Basic`]: `Authorization: Basic`, nothing in the body |
//! | OAuth 2.0 | token exchange, migration | — ([`BuildError::AcquisitionNotSupported`]: nothing is sent) | — |

use super::classify::ResponseRules;
use crate::domain::GrantKey;
use crate::machine::{AttemptRequest, Credential};
use crate::secret::ClientSecret;
use std::fmt;
use std::time::Duration;

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
    /// A generic OAuth 2.0 server (RFC 6749 §6): a form-encoded refresh at a fixed token URL.
    OAuth2 {
        /// The token endpoint, serialized; validated by whoever configures it (`https`, or `http` on
        /// loopback).
        token_url: String,
        /// How the client authenticates.
        client_auth: ClientAuth,
    },
}

/// How an OAuth 2.0 client authenticates at the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    Body,
    /// HTTP Basic (`client_secret_basic`).
    Basic,
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
}

/// One token request. Every token request is a `POST`. It borrows the secrets it carries and its
/// `Debug` shows the URL, the encoding and the field *names* only.
pub struct Request<'a> {
    url: String,
    encoding: Encoding,
    fields: Vec<(&'static str, &'a str)>,
    basic_auth: Option<(&'a str, &'a str)>,
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
    pub fn expose_fields(&self) -> &[(&'static str, &'a str)] {
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
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.fields.iter().map(|(n, _)| *n).collect();
        f.debug_struct("Request")
            .field("url", &self.url)
            .field("encoding", &self.encoding)
            .field("fields", &names)
            .field("basic_auth", &self.basic_auth.map(|_| "<redacted>"))
            .finish()
    }
}

impl ProviderSpec {
    /// What this provider's successful token response must contain.
    pub fn response_rules(&self) -> ResponseRules {
        match self {
            ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. } => ResponseRules::SHOPIFY,
            ProviderSpec::OAuth2 { .. } => ResponseRules {
                require_refresh_token: false,
                require_expires_in: false,
                default_access_lifetime: Duration::from_secs(3600),
            },
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
            ProviderSpec::OAuth2 { token_url, .. } => Ok(token_url.clone()),
        }
    }
}

/// Builds the request of `attempt` (see the module table).
pub fn build<'a>(
    spec: &ProviderSpec,
    client: &'a ClientCredentials,
    attempt: &'a AttemptRequest,
) -> Result<Request<'a>, BuildError> {
    build_for(spec, client, attempt.grant(), attempt.credential())
}

fn build_for<'a>(
    spec: &ProviderSpec,
    client: &'a ClientCredentials,
    grant: &GrantKey,
    credential: &'a Credential,
) -> Result<Request<'a>, BuildError> {
    let url = spec.token_url(grant)?;
    let secret = client.secret.expose_secret();
    match spec {
        ProviderSpec::Shopify | ProviderSpec::ShopifyTestServer { .. } => {
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
            Ok(Request { url, encoding: Encoding::Json, fields, basic_auth: None })
        }
        ProviderSpec::OAuth2 { client_auth, .. } => {
            let Credential::RefreshToken(refresh) = credential else {
                return Err(BuildError::AcquisitionNotSupported);
            };
            let mut fields = vec![("grant_type", "refresh_token"), ("refresh_token", refresh.expose_secret())];
            let basic_auth = match client_auth {
                ClientAuth::Body => {
                    fields.extend([("client_id", client.id.as_str()), ("client_secret", secret)]);
                    None
                }
                ClientAuth::Basic => Some((client.id.as_str(), secret)),
            };
            Ok(Request { url, encoding: Encoding::Form, fields, basic_auth })
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
