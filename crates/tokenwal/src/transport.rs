//! The HTTP transport: one reqwest client (rustls, explicit timeouts, no redirects), built once.
//!
//! # Sent or not?
//!
//! Every failure is split by whether the request may have reached the server's token logic, because
//! that decides whether a rotation may have happened:
//!
//! | reqwest error | meaning | classified as |
//! |---|---|---|
//! | `is_builder()` | the request could not be built | not sent |
//! | `is_connect()` (refused, DNS, TLS handshake, connect timeout) | no connection was established | not sent |
//! | `is_timeout()` (not connect) | the connection was up; no complete answer in time | **ambiguous** |
//! | `is_request()`, `is_body()`, `is_decode()`, anything else | the connection broke after it was up | **ambiguous** |
//!
//! What is sent — URL, method, headers, client authentication, body — is built by
//! [`tokenwal_core::protocol::build`]; this module only sends it. An HTTP answer is read up to
//! [`tokenwal_core::MAX_BODY`] bytes and handed to [`tokenwal_core::classify_attempt`] under the
//! provider's response rules. Redirects are never followed (a 3xx is ambiguous).

use crate::config::{Endpoint, Timeouts};
use std::collections::BTreeMap;
use std::time::Duration;
use tokenwal_core::protocol::{self, ClientCredentials, Encoding, ProviderSpec, Request};
use tokenwal_core::{
    classify_attempt, AttemptRequest, ClientSecret, Exchange, HttpAnswer, Outcome, ResponseRules, TransportFailure,
    UnixMillis, MAX_BODY,
};

/// Sends token requests.
pub(crate) struct Transport {
    client: reqwest::Client,
    spec: ProviderSpec,
    credentials: ClientCredentials,
    rules: ResponseRules,
    /// The deadline of one whole attempt.
    total: Duration,
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct TransportBuildError(String);

impl Transport {
    /// The deadline of one whole attempt (connect, send, answer).
    pub(crate) fn total_timeout(&self) -> Duration {
        self.total
    }

    pub(crate) fn new(
        endpoint: Endpoint,
        client_id: String,
        client_secret: ClientSecret,
        timeouts: Timeouts,
    ) -> Result<Transport, TransportBuildError> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(timeouts.connect)
            // One deadline for the whole attempt, body included: reqwest carries it into the response
            // body stream, so a peer that trickles a byte every few hundred ms (which a per-read
            // timeout would never cut) is ambiguous at `total` (tests/hostile_http.rs
            // `slow_and_silent_peers_are_cut_by_the_total_timeout`).
            .timeout(timeouts.total)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokenwal/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60));
        // A loopback endpoint (a test server) is never reached through an HTTP(S)_PROXY from the
        // environment; production endpoints honour the usual proxy variables.
        let client = match &endpoint {
            Endpoint::ShopifyTestServer { .. } => client.no_proxy(),
            Endpoint::OAuth2 { token_url, .. } if crate::config::is_loopback(token_url) => client.no_proxy(),
            Endpoint::Profile(_)
                if endpoint.profile_sample_url().is_some_and(|u| u.is_ok_and(|u| crate::config::is_loopback(&u))) =>
            {
                client.no_proxy()
            }
            _ => client,
        };
        let client = client.build().map_err(|e| TransportBuildError(e.without_url().to_string()))?;
        let spec = endpoint.spec();
        let rules = spec.response_rules();
        let credentials = ClientCredentials { id: client_id, secret: client_secret };
        let total = timeouts.total;
        Ok(Transport { client, spec, credentials, rules, total })
    }

    /// Sends one token request and classifies what happened. Never returns an error: every failure is
    /// an [`Outcome`].
    pub(crate) async fn send(&self, req: &AttemptRequest, now: impl Fn() -> UnixMillis) -> (Outcome, Option<u16>) {
        let reuse = req.refresh_token();
        let kind = req.kind();
        let result = self.exchange(req).await;
        let received_at = now();
        match result {
            Ok(answer) => {
                let status = answer.status;
                let a = HttpAnswer {
                    status,
                    request_id: answer.request_id.as_deref(),
                    retry_after: answer.retry_after.as_deref(),
                    body: &answer.body,
                    body_truncated: answer.truncated,
                };
                (classify_attempt(kind, Exchange::Answer(a), &self.rules, reuse, received_at), Some(status))
            }
            Err(f) => (classify_attempt(kind, Exchange::Failed(&f), &self.rules, reuse, received_at), None),
        }
    }

    async fn exchange(&self, req: &AttemptRequest) -> Result<RawAnswer, TransportFailure> {
        let request = protocol::build(&self.spec, &self.credentials, req)
            .map_err(|e| TransportFailure::Build { detail: e.to_string() })?;
        let builder = self.request(&request)?;
        let mut resp = builder.send().await.map_err(failure)?;
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let request_id = header("x-request-id");
        let retry_after = header("retry-after");
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = resp.chunk().await.map_err(failure)? {
            if body.len() + chunk.len() > MAX_BODY {
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(RawAnswer { status, request_id, retry_after, body, truncated })
    }

    /// The reqwest form of a protocol [`Request`]: nothing is added or left out.
    fn request(&self, request: &Request<'_>) -> Result<reqwest::RequestBuilder, TransportFailure> {
        let build = |detail: String| TransportFailure::Build { detail };
        let url = reqwest::Url::parse(request.url()).map_err(|e| build(e.to_string()))?;
        let method = reqwest::Method::from_bytes(Request::METHOD.as_bytes()).map_err(|e| build(e.to_string()))?;
        let mut builder = self.client.request(method, url);
        for (name, value) in Request::HEADERS {
            builder = builder.header(*name, *value);
        }
        if let Some(origin) = request.origin() {
            builder = builder.header("origin", origin);
        }
        if let Some((user, password)) = request.expose_basic_auth() {
            // reqwest marks the `Authorization` header sensitive.
            builder = builder.basic_auth(user, Some(password));
        }
        Ok(match request.encoding() {
            // A JSON object of strings, its keys sorted.
            Encoding::Json => builder.json(&request.expose_fields().iter().copied().collect::<BTreeMap<_, _>>()),
            Encoding::Form => builder.form(request.expose_fields()),
        })
    }
}

struct RawAnswer {
    status: u16,
    request_id: Option<String>,
    retry_after: Option<String>,
    body: Vec<u8>,
    truncated: bool,
}

/// Maps a reqwest error (see the module table). The error's URL is stripped: it names the shop only,
/// but nothing from a request goes into an error text.
fn failure(e: reqwest::Error) -> TransportFailure {
    let e = e.without_url();
    if e.is_builder() {
        TransportFailure::Build { detail: e.to_string() }
    } else if e.is_connect() {
        TransportFailure::NotSent { detail: "connection failed".into() }
    } else if e.is_timeout() {
        TransportFailure::Timeout
    } else {
        TransportFailure::ConnectionLost
    }
}
