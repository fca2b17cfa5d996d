//! The token endpoint's wire format, for every provider: the request an attempt sends and what its
//! answer means. Pure: no I/O, no HTTP client; the engine's transport only sends a [`Request`] and
//! hands back what it read.
//!
//! * [`request`] — [`build`]: the URL, method, headers, client authentication and body fields of
//!   each [`AttemptKind`](crate::AttemptKind) for each [`ProviderSpec`] / [`ClientAuth`].
//! * [`classify`](mod@classify) — [`classify_attempt`]: what an HTTP answer or a transport failure means
//!   ([`Outcome`]), under the provider's [`ResponseRules`] ([`ProviderSpec::response_rules`]).
//!
//! A new provider (or client-authentication style) is a variant of [`ProviderSpec`] (or
//! [`ClientAuth`]) here: its URL, its fields and its response rules are all in this module.
//!
//! | provider | URL | body | client authentication | kinds |
//! |---|---|---|---|---|
//! | [`ProviderSpec::Shopify`] | `https://{shop}/admin/oauth/access_token` | JSON | `client_id` + `client_secret` in the body | refresh, token exchange, migration |
//! | [`ProviderSpec::ShopifyTestServer`] | `{base}/shops/{shop}/admin/oauth/access_token` | JSON | as Shopify | as Shopify |
//! | [`ProviderSpec::OAuth2`] | the configured token URL (`{shop}`/`{shop_id}` filled from the grant key) | form | [`ClientAuth::Body`], [`ClientAuth::Basic`] or [`ClientAuth::Public`] (no secret) | refresh only |
//!
//! Every request carries `Accept: application/json`. The host of a Shopify URL comes only from the
//! validated [`ShopDomain`](crate::ShopDomain) of the grant; a test server's base and an OAuth 2.0
//! token URL are validated by whoever configures them (the engine refuses anything but `https` or
//! loopback before a transport exists).

pub mod classify;
pub mod request;

pub use classify::{
    classify, classify_attempt, Exchange, HttpAnswer, Outcome, ResponseRules, TransportFailure, MAX_BODY,
};
pub use request::{
    build, check_template, BuildError, ClientAuth, ClientCredentials, Encoding, ProviderSpec, Request, TemplateError,
    GRANT_TOKEN_EXCHANGE, PLACEHOLDERS, RESERVED_FIELDS, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_OFFLINE,
};
