//! The token endpoint: parsing, app authentication, fault selection and dispatch by grant type;
//! how a fault turns a committed outcome into what goes on the wire.

use super::state::GrantKey;
use super::*;

/// Which token endpoint a request came to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Endpoint<'a> {
    /// `/admin/oauth/access_token` of a shop.
    Admin,
    /// `/authentication/{shop_id}/oauth/token`.
    Customer {
        /// The path's shop id.
        shop_id: &'a str,
        /// Whether the request carried an `Authorization` header.
        authorization: bool,
    },
}

impl Model {
    /// Handles a raw token request body (JSON or form; see [`TokenParams::parse`]).
    pub fn handle_token_request(
        &mut self,
        now: u64,
        shop: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> TokenReply {
        let params = TokenParams::parse(content_type, body);
        self.handle(now, shop, params.map_err(|e| e.to_string()), Endpoint::Admin)
    }

    /// Handles a parsed token request.
    pub fn handle_token_params(&mut self, now: u64, shop: &str, params: &TokenParams) -> TokenReply {
        self.handle(now, shop, Ok(params.clone()), Endpoint::Admin)
    }

    /// One token request to the grant named `shop` (a shop domain, or a customer's
    /// `{shop_id}:{customer_id}`): counters, the fault, processing by `endpoint`, the answer.
    pub(super) fn handle(
        &mut self,
        now: u64,
        shop: &str,
        params: Result<TokenParams, String>,
        endpoint: Endpoint<'_>,
    ) -> TokenReply {
        let grant = shop.to_owned();
        let request_id = self.next_request_id();
        self.counters.bump(shop, |c| c.token_requests += 1);
        let fault = self.faults.next(shop);
        if let Some(f) = fault {
            let kind = f.kind().as_str();
            self.counters.bump(shop, |c| *c.faults.entry(kind.to_owned()).or_default() += 1);
        }

        let outcome = match fault {
            Some(Fault::FailBeforeProcessing { status, json }) => {
                return TokenReply {
                    delivery: Delivery::Respond { reply: server_error_reply(status, json, &request_id), delay_ms: 0 },
                    request_id,
                    outcome: TokenOutcome::NotProcessed,
                    fault,
                    grant,
                };
            }
            Some(Fault::Throttle { retry_after_secs }) => {
                let mut reply = HttpReply::json(
                    429,
                    &serde_json::json!({"errors": "Exceeded rate limit for the token endpoint. Retry later."}),
                );
                reply.headers.push(("Retry-After", retry_after_secs.to_string()));
                return TokenReply {
                    delivery: Delivery::Respond { reply, delay_ms: 0 },
                    request_id,
                    outcome: TokenOutcome::NotProcessed,
                    fault,
                    grant,
                };
            }
            Some(Fault::InvalidClient) => TokenOutcome::Rejected(self.invalid_client()),
            _ => {
                let short_ttl = match fault {
                    Some(Fault::ShortRefreshTtl { secs }) => Some(secs.saturating_mul(1000)),
                    _ => None,
                };
                match (params, endpoint) {
                    (Ok(p), Endpoint::Admin) => self.process(now, shop, &p, short_ttl),
                    (Ok(p), Endpoint::Customer { shop_id, authorization }) => {
                        self.process_customer(now, shop_id, &p, authorization, short_ttl)
                    }
                    (Err(msg), _) => TokenOutcome::Rejected(OAuthError::invalid_request(&msg)),
                }
            }
        };

        if let TokenOutcome::Rejected(e) = &outcome {
            let code = e.error.clone();
            let invalid_client = code == "invalid_client";
            self.counters.bump(shop, |c| {
                *c.rejections.entry(code.clone()).or_default() += 1;
                if invalid_client {
                    c.invalid_client += 1;
                }
            });
        }

        let reply = match &outcome {
            TokenOutcome::Issued { tokens, .. } => HttpReply::json(200, tokens),
            TokenOutcome::IssuedNonExpiring(t) => HttpReply::json(200, t),
            TokenOutcome::Rejected(e) => e.to_reply(),
            TokenOutcome::NotProcessed => unreachable!("handled above"),
        };
        let delivery = realise_fault(fault, reply, &outcome);
        TokenReply { request_id, outcome, fault, delivery, grant }
    }

    pub(super) fn invalid_client(&self) -> OAuthError {
        OAuthError::new(self.config.invalid_client_status, "invalid_client", "Client credentials are invalid")
    }

    pub(super) fn inactive_refresh_error(&self, key: &GrantKey) -> OAuthError {
        if key.customer.is_some() {
            return self.customer_rejection();
        }
        match self.config.rejection_style {
            RejectionStyle::InvalidRequest => OAuthError::new(401, "invalid_request", ACTIVE_REFRESH_TOKEN_REQUIRED),
            RejectionStyle::InvalidGrant => OAuthError::new(400, "invalid_grant", REFRESH_TOKEN_INVALID_OR_EXPIRED),
        }
    }

    pub(super) fn migration_error(&self) -> OAuthError {
        match self.config.migration_error {
            MigrationErrorStyle::InvalidSubjectToken => OAuthError::bare(400, "invalid_subject_token"),
            MigrationErrorStyle::InvalidRequest => OAuthError::new(400, "invalid_request", "Invalid subject token"),
        }
    }

    pub(super) fn process(
        &mut self,
        now: u64,
        shop: &str,
        params: &TokenParams,
        short_ttl: Option<u64>,
    ) -> TokenOutcome {
        let (Some(client_id), Some(secret)) = (params.get("client_id"), params.get("client_secret")) else {
            return TokenOutcome::Rejected(OAuthError::invalid_request("Missing client_id or client_secret"));
        };
        if self.apps.get(client_id).map(ClientSecret::expose) != Some(secret) {
            return TokenOutcome::Rejected(self.invalid_client());
        }
        let key = GrantKey::new(client_id, shop);
        match params.get("grant_type") {
            None => TokenOutcome::Rejected(OAuthError::invalid_request("Missing grant_type")),
            Some(GRANT_REFRESH_TOKEN) => self.refresh_grant(now, &key, params, short_ttl),
            Some(GRANT_TOKEN_EXCHANGE) => self.token_exchange(now, &key, params, short_ttl),
            Some(GRANT_AUTHORIZATION_CODE) => TokenOutcome::Rejected(OAuthError::invalid_request(
                "The authorization code was not found or was already used",
            )),
            Some(_) => TokenOutcome::Rejected(OAuthError::bare(400, "unsupported_grant_type")),
        }
    }
}

/// The 5xx answer of [`Fault::FailBeforeProcessing`].
pub(super) fn server_error_reply(status: u16, json: bool, request_id: &str) -> HttpReply {
    let reason = match status {
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Server Error",
    };
    if json {
        HttpReply::json(status, &serde_json::json!({"errors": reason}))
    } else {
        HttpReply::text(
            status,
            format!("Internal error. Looks like something went wrong on our end.\nRequest ID: {request_id}\n"),
        )
    }
}

/// Applies a post-processing fault to the committed outcome's reply.
pub(super) fn realise_fault(fault: Option<Fault>, mut reply: HttpReply, outcome: &TokenOutcome) -> Delivery {
    let respond = |reply| Delivery::Respond { reply, delay_ms: 0 };
    match fault {
        Some(Fault::RotateThenDrop) => respond(HttpReply::text(520, EDGE_520_BODY)),
        Some(Fault::RotateThenHang) => Delivery::Hang,
        Some(Fault::RotateThenReset) => Delivery::Reset,
        Some(Fault::Slow { delay_ms }) => Delivery::Respond { reply, delay_ms },
        Some(Fault::Truncated) => {
            let keep = reply.body.len() / 2;
            reply.body.truncate(keep);
            respond(reply)
        }
        Some(Fault::Malformed) => {
            reply.body = b"<!DOCTYPE html><html><body><h1>Something went wrong</h1></body></html>".to_vec();
            respond(reply)
        }
        Some(f @ (Fault::MissingExpiresIn | Fault::MissingRefreshTokenExpiresIn)) => {
            if let TokenOutcome::Issued { tokens, .. } = outcome {
                let field = if f == Fault::MissingExpiresIn { "expires_in" } else { "refresh_token_expires_in" };
                let mut v = serde_json::to_value(tokens).expect("serialises");
                if let Some(obj) = v.as_object_mut() {
                    obj.remove(field);
                }
                reply = HttpReply::json(200, &v);
            }
            respond(reply)
        }
        Some(
            Fault::FailBeforeProcessing { .. }
            | Fault::Throttle { .. }
            | Fault::InvalidClient
            | Fault::ShortRefreshTtl { .. },
        )
        | None => respond(reply),
    }
}
