//! The Customer Account API mode: per-customer grants of public clients, refreshed at
//! `POST /authentication/{shop_id}/oauth/token` (the path of tokenwal's `shopify-customer-account`
//! profile), and the Customer Account API's token check.
//!
//! * **Grants** are keyed by shop id + customer id (and the public client). Their name in every
//!   per-shop table — scripted faults, counters, holds, [`Model::shop_state`] — is
//!   [`customer_grant`]`(shop_id, customer_id)`, `{shop_id}:{customer_id}`, the same text as
//!   tokenwal's grant account. A request whose refresh token is unknown (or belongs to another
//!   shop) is counted under the path's `{shop_id}`.
//! * **A public client**: the body carries `client_id` (a client registered with
//!   [`Model::register_public_client`]), `grant_type=refresh_token` and `refresh_token`, no secret.
//!   A request with a `client_secret` field or an `Authorization` header, or with an unknown
//!   `client_id`, is refused `invalid_client` (status [`ModelConfig::invalid_client_status`],
//!   401 by default): not a verdict on the customer, so tokenwal does not log anyone out for it.
//! * **Refusal of a dead or reused refresh token**: 400 `invalid_grant` or 401 `invalid_token`,
//!   JSON ([`CustomerRejectionStyle`](super::CustomerRejectionStyle)); tokenwal's profile reads
//!   either as "log the customer in again".
//! * **Rotation**: [`CustomerAccountConfig::policy`](super::CustomerAccountConfig::policy), strict
//!   single use by default (the profile's Retention); [`ModelConfig::revoke_family_on_reuse`]
//!   applies too. Lifetimes are the model's (`access_ttl_ms`, `refresh_ttl_ms`).
//! * **Faults**: the same [`faults`](crate::faults) — scripted per grant name, or random — with
//!   the same meaning (commit-then-drop under strict single use kills the customer's grant, as it
//!   would at a real single-use server).
//! * Tokens are `shcat_…` (access) and `shcrt_…` (refresh).

use super::state::GrantKey;
use super::*;

/// `error_description` of a refused customer refresh.
pub const CUSTOMER_REFRESH_REFUSED: &str = "The refresh token is invalid or expired";
/// `error_description` of a public-client request that authenticated with a secret.
pub const PUBLIC_CLIENT_MUST_NOT_AUTHENTICATE: &str = "Public clients must not send a client secret";
/// `scope` of customer token answers.
pub const CUSTOMER_SCOPE: &str = "openid email customer-account-api:full";

/// The name of a customer's grant in the simulator's per-shop tables (faults, counters, holds,
/// shop state, the `/_sim/shops/{shop}/…` control routes): `{shop_id}:{customer_id}`.
pub fn customer_grant(shop_id: u64, customer_id: u64) -> String {
    format!("{shop_id}:{customer_id}")
}

impl Model {
    /// Registers a public client of the Customer Account API (no secret). The first one registered
    /// is the default of control operations that name none.
    pub fn register_public_client(&mut self, client_id: &str) {
        self.public_clients.insert(client_id.to_owned());
        if self.default_public_client.is_none() {
            self.default_public_client = Some(client_id.to_owned());
        }
    }

    /// The default public client.
    pub fn default_public_client(&self) -> Option<&str> {
        self.default_public_client.as_deref()
    }

    fn resolve_public_client(&self, client_id: Option<&str>) -> Result<String, ModelError> {
        match client_id {
            Some(id) if self.public_clients.contains(id) => Ok(id.to_owned()),
            Some(id) => Err(ModelError::UnknownApp(id.to_owned())),
            None => self.default_public_client.clone().ok_or(ModelError::NoApp),
        }
    }

    /// Creates (or replaces) the grant of a customer of shop `shop_id` with the public client
    /// `client_id` (the default when `None`), as the app's PKCE code exchange would, and returns
    /// its token set. Not subject to faults.
    pub fn seed_customer(
        &mut self,
        now: u64,
        shop_id: u64,
        customer_id: u64,
        client_id: Option<&str>,
    ) -> Result<TokenSet, ModelError> {
        let client_id = self.resolve_public_client(client_id)?;
        let key = GrantKey::customer(&client_id, shop_id, customer_id);
        let (a, r) = self.acquire(now, &key, None);
        Ok(self.token_set(now, &a, &r))
    }

    /// Whether some refresh token of the customer's grant (any public client) would be accepted at
    /// `now`. False means the customer must log in again.
    pub fn customer_alive(&self, shop_id: u64, customer_id: u64, now: u64) -> bool {
        self.grant_alive(&customer_grant(shop_id, customer_id), now)
    }

    /// Handles a raw request to `POST /authentication/{shop_id}/oauth/token` (JSON or form body;
    /// `authorization` is the request's `Authorization` header, if any).
    pub fn handle_customer_token_request(
        &mut self,
        now: u64,
        shop_id: &str,
        content_type: Option<&str>,
        body: &[u8],
        authorization: Option<&str>,
    ) -> TokenReply {
        let params = TokenParams::parse(content_type, body).map_err(|e| e.to_string());
        let grant = self.customer_request_grant(shop_id, params.as_ref().ok());
        self.handle(now, &grant, params, Endpoint::Customer { shop_id, authorization: authorization.is_some() })
    }

    /// Handles a parsed customer token request (no `Authorization` header).
    pub fn handle_customer_token_params(&mut self, now: u64, shop_id: &str, params: &TokenParams) -> TokenReply {
        let grant = self.customer_request_grant(shop_id, Some(params));
        self.handle(now, &grant, Ok(params.clone()), Endpoint::Customer { shop_id, authorization: false })
    }

    /// The grant a customer token request is counted under: its refresh token's customer when that
    /// token is one of `shop_id`'s, else `shop_id` itself.
    fn customer_request_grant(&self, shop_id: &str, params: Option<&TokenParams>) -> String {
        params
            .and_then(|p| p.get("refresh_token"))
            .and_then(|t| self.refresh.get(t))
            .filter(|r| r.key.customer.is_some_and(|(s, _)| s.to_string() == shop_id))
            .map_or_else(|| shop_id.to_owned(), |r| r.key.shop.clone())
    }

    pub(super) fn process_customer(
        &mut self,
        now: u64,
        shop_id: &str,
        params: &TokenParams,
        authorization: bool,
        short_ttl: Option<u64>,
    ) -> TokenOutcome {
        if authorization || params.get("client_secret").is_some() {
            return TokenOutcome::Rejected(OAuthError::new(
                self.config.invalid_client_status,
                "invalid_client",
                PUBLIC_CLIENT_MUST_NOT_AUTHENTICATE,
            ));
        }
        let Some(client_id) = params.get("client_id") else {
            return TokenOutcome::Rejected(OAuthError::invalid_request("Missing client_id"));
        };
        if !self.public_clients.contains(client_id) {
            return TokenOutcome::Rejected(self.invalid_client());
        }
        match params.get("grant_type") {
            None => TokenOutcome::Rejected(OAuthError::invalid_request("Missing grant_type")),
            Some(GRANT_REFRESH_TOKEN) => {
                let Some(token) = params.get("refresh_token") else {
                    return TokenOutcome::Rejected(OAuthError::invalid_request("Missing refresh_token"));
                };
                let key =
                    self.refresh.get(token).map(|r| r.key.clone()).filter(|k| {
                        k.client_id == client_id && k.customer.is_some_and(|(s, _)| s.to_string() == shop_id)
                    });
                match key {
                    Some(key) => self.refresh_grant(now, &key, params, short_ttl),
                    None => TokenOutcome::Rejected(self.customer_rejection()),
                }
            }
            Some(GRANT_AUTHORIZATION_CODE) => TokenOutcome::Rejected(OAuthError::new(
                400,
                "invalid_grant",
                "The authorization code was not found or was already used",
            )),
            Some(_) => TokenOutcome::Rejected(OAuthError::bare(400, "unsupported_grant_type")),
        }
    }

    pub(super) fn customer_rejection(&self) -> OAuthError {
        match self.config.customer_account.rejection_style {
            CustomerRejectionStyle::InvalidGrant => OAuthError::new(400, "invalid_grant", CUSTOMER_REFRESH_REFUSED),
            CustomerRejectionStyle::InvalidToken => OAuthError::new(401, "invalid_token", CUSTOMER_REFRESH_REFUSED),
        }
    }

    /// The customer whose access token `token` is, if the Customer Account API of shop `shop_id`
    /// would accept it at `now`.
    pub fn customer_access_token_valid(&self, shop_id: &str, token: &str, now: u64) -> Option<u64> {
        let a = self.access.get(token)?;
        let (s, c) = a.key.customer?;
        (s.to_string() == shop_id && !a.revoked && now < a.expires_at).then_some(c)
    }

    /// Handles a Customer Account API request (`POST /{shop_id}/account/customer/api/{version}/graphql`)
    /// carrying `Authorization: token` (a `Bearer ` prefix is tolerated): 200 with the customer's
    /// id, or 401. Counted as `admin_ok` / `admin_unauthorized` under the customer's grant (or the
    /// shop id when the token is unknown).
    pub fn handle_customer_api(&mut self, now: u64, shop_id: &str, token: Option<&str>) -> AdminReply {
        let request_id = self.next_request_id();
        let token = token.map(|t| t.strip_prefix("Bearer ").unwrap_or(t).trim());
        let customer = token.and_then(|t| self.customer_access_token_valid(shop_id, t, now));
        let reply = match customer {
            Some(c) => {
                let grant = format!("{shop_id}:{c}");
                self.counters.bump(&grant, |c| c.admin_ok += 1);
                HttpReply::json(
                    200,
                    &serde_json::json!({"data": {"customer": {"id": format!("gid://shopify/Customer/{c}")}}}),
                )
            }
            None => {
                self.counters.bump(shop_id, |c| c.admin_unauthorized += 1);
                HttpReply::json(401, &serde_json::json!({"errors": [{"message": "Unauthorized"}]}))
            }
        };
        AdminReply { request_id, authorized: customer.is_some(), reply }
    }
}
