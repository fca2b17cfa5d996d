//! Response classification: a pure function from what the transport saw to what it means.
//!
//! The one rule that matters: **only a definitive answer is definitive.** Anything that could have
//! followed a server-side rotation (a 5xx, a timeout or reset after the request was written, a 2xx
//! that does not parse, a status nobody documented) is [`Outcome::Ambiguous`]; it is never read as
//! success and never as a dead grant. `invalid_client` is about the app, not the shop.
//!
//! | what came back | outcome |
//! |---|---|
//! | connect / DNS / TLS failure, connect timeout | `NotSent` (the server never saw it) |
//! | timeout or connection loss after the request may have been written | `Ambiguous` |
//! | 2xx with `access_token`, `refresh_token`*, non-negative `expires_in`* | `Success` (0 = expires now) |
//! | 2xx otherwise (truncated, not JSON, BOM, invalid UTF-8, missing or empty field, a token with control/non-ASCII characters, negative/fractional/exponent/huge/string lifetime, duplicate key) | `Ambiguous` |
//! | 429 | `Throttled` (with `Retry-After` seconds if given) |
//! | any 4xx with `error` = `invalid_client` or `unauthorized_client` | `BadCredentials` |
//! | any 4xx with `error` = `invalid_grant` or `invalid_subject_token` | `Rejected` |
//! | 401 with `error` = `invalid_request` (Shopify: "requires an active refresh_token") | `Rejected` |
//! | a refresh's 400 or 401 with any other (or no) `error`, when [`ResponseRules::rejected_on_400_401`] (the Customer Account API: "log the customer in again") | `Rejected` |
//! | 5xx (520 with `error code: 520` in plain text included), 1xx, 3xx, any other 4xx | `Ambiguous` |
//! | a body over the size cap | `Ambiguous` |
//!
//! (*) as required by the provider's [`ResponseRules`].
//!
//! For acquisitions ([`classify_attempt`] with `TokenExchange` or `Migration`), a 400 `invalid_request`
//! whose description names the subject token (shopify-app-js's migration mock: "Invalid subject
//! token") is `Rejected` too: the subject credential was refused. Any other 400 `invalid_request`
//! stays ambiguous.

use crate::domain::TokenSet;
use crate::record::{AmbiguityReason, AttemptKind, NotSentReason};
use crate::secret::{AccessToken, RefreshToken};
use crate::time::UnixMillis;
use serde::Deserialize;
use std::time::Duration;

/// The most response-body bytes a transport should read; a larger body is classified as ambiguous.
pub const MAX_BODY: usize = 64 * 1024;
/// The longest lifetime accepted for an access token (a larger `expires_in` is treated as garbage).
pub const MAX_ACCESS_LIFETIME: Duration = Duration::from_secs(366 * 86_400);
/// The longest lifetime accepted for a refresh token.
pub const MAX_REFRESH_LIFETIME: Duration = Duration::from_secs(10 * 366 * 86_400);

/// An HTTP answer as the transport read it.
#[derive(Debug, Clone, Copy)]
pub struct HttpAnswer<'a> {
    /// The status code.
    pub status: u16,
    /// The `x-request-id` header, if any.
    pub request_id: Option<&'a str>,
    /// The raw `Retry-After` header, if any.
    pub retry_after: Option<&'a str>,
    /// The body bytes read (at most [`MAX_BODY`]).
    pub body: &'a [u8],
    /// Whether the body was longer than what was read.
    pub body_truncated: bool,
}

/// A transport failure, split by whether the request may have reached the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportFailure {
    /// Connect refused, DNS failure, TLS handshake failure, connect timeout: nothing was sent.
    NotSent {
        /// A description without secret material.
        detail: String,
    },
    /// The request could not be built; nothing was sent.
    Build {
        /// A description without secret material.
        detail: String,
    },
    /// No complete answer within the timeout, after the connection was up.
    Timeout,
    /// The connection broke after it was up (reset, EOF, a body read error).
    ConnectionLost,
}

/// What the transport observed for one attempt.
#[derive(Debug, Clone, Copy)]
pub enum Exchange<'a> {
    /// An HTTP answer arrived.
    Answer(HttpAnswer<'a>),
    /// It did not.
    Failed(&'a TransportFailure),
}

/// What a provider's successful token response must contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseRules {
    /// A response without `refresh_token` is unusable (Shopify: yes). When `false`, the presented
    /// refresh token is kept (RFC 6749 §6 lets servers not rotate).
    pub require_refresh_token: bool,
    /// A response without `expires_in` is unusable (Shopify: yes; see shopify-app-js #3400).
    /// When `false`, `default_access_lifetime` applies.
    pub require_expires_in: bool,
    /// The access lifetime assumed when `expires_in` is absent and not required.
    pub default_access_lifetime: Duration,
    /// A refresh answered 400 or 401 is definitive (`Rejected`) whatever its `error` code, except
    /// `invalid_client`/`unauthorized_client` (still the app's credentials). For providers whose
    /// documented contract is "400/401 on refresh: the user must log in again" (the Customer
    /// Account API). A 5xx, a timeout or any other 4xx stays ambiguous; token exchanges and
    /// migrations are not affected.
    pub rejected_on_400_401: bool,
}

impl ResponseRules {
    /// Shopify's expiring offline tokens.
    pub const SHOPIFY: ResponseRules = ResponseRules {
        require_refresh_token: true,
        require_expires_in: true,
        default_access_lifetime: Duration::from_secs(3600),
        rejected_on_400_401: false,
    };

    /// A generic OAuth 2.0 server (RFC 6749 §6): the refresh token may not rotate, `expires_in`
    /// may be absent (an hour is assumed).
    pub const OAUTH2: ResponseRules = ResponseRules {
        require_refresh_token: false,
        require_expires_in: false,
        default_access_lifetime: Duration::from_secs(3600),
        rejected_on_400_401: false,
    };
}

/// The classified outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A complete, usable token set (not yet durable: nothing may use it before its commit).
    Success {
        /// The tokens.
        tokens: TokenSet,
        /// `x-request-id`.
        request_id: Option<String>,
    },
    /// The server never saw the request; the same credential is safe to retry.
    NotSent(NotSentReason),
    /// 429: the server did not process the credential.
    Throttled {
        /// `Retry-After`, if given in seconds.
        retry_after: Option<Duration>,
        /// `x-request-id`.
        request_id: Option<String>,
    },
    /// The credential is dead (definitive).
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// The OAuth `error_description` (sanitised, capped).
        description: Option<String>,
        /// `x-request-id`.
        request_id: Option<String>,
    },
    /// The app's own client credentials were refused: a fleet-wide configuration alarm.
    BadCredentials {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code.
        error: String,
        /// `x-request-id`.
        request_id: Option<String>,
    },
    /// The server may or may not have rotated.
    Ambiguous {
        /// Why.
        reason: AmbiguityReason,
        /// `x-request-id`, if an answer arrived.
        request_id: Option<String>,
    },
}

impl Outcome {
    /// The server's request id (`x-request-id`, sanitized), if an answer arrived.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Outcome::Success { request_id, .. }
            | Outcome::Throttled { request_id, .. }
            | Outcome::Rejected { request_id, .. }
            | Outcome::BadCredentials { request_id, .. }
            | Outcome::Ambiguous { request_id, .. } => request_id.as_deref(),
            Outcome::NotSent(_) => None,
        }
    }

    /// A short label for logs and stale-outcome records (no secret material).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::NotSent(_) => "not-sent",
            Outcome::Throttled { .. } => "throttled",
            Outcome::Rejected { .. } => "rejected",
            Outcome::BadCredentials { .. } => "bad-credentials",
            Outcome::Ambiguous { .. } => "ambiguous",
        }
    }
}

#[derive(Deserialize)]
struct WireTokens {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    refresh_token_expires_in: Option<serde_json::Value>,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct WireError {
    error: Option<String>,
    error_description: Option<String>,
}

/// Printable ASCII only, at most `max` chars: server text goes into logs and errors.
fn sanitize(s: &str, max: usize) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(max).collect()
}

fn lifetime(v: &serde_json::Value, field: &str, max: Duration) -> Result<Duration, String> {
    // Zero is a real answer ("expires now"): a same-pair replay does not extend the refresh token's
    // life, so a replay near its end carries 0. Treating it as garbage would leave the rotation
    // ambiguous forever; storing it lets the next attempt get the server's definitive word.
    let secs = v.as_u64().ok_or_else(|| format!("{field} is not a non-negative integer"))?;
    let d = Duration::from_secs(secs);
    if d > max {
        return Err(format!("{field} of {secs} s is implausibly large"));
    }
    Ok(d)
}

/// A token must be RFC 6749 `VSCHAR`s (printable ASCII and space) without surrounding spaces: a token
/// with a control character, a newline or non-ASCII would be a header-injection hazard where the app
/// uses it, so such a "success" is unusable (and, being a 2xx, ambiguous). The message names the
/// field, never the value.
fn token_chars(t: &str, field: &str) -> Result<(), String> {
    let printable = t.bytes().all(|b| (0x20..=0x7e).contains(&b));
    if !printable || t.starts_with(' ') || t.ends_with(' ') {
        return Err(format!("{field} contains characters a token cannot have"));
    }
    Ok(())
}

/// Describes a JSON error without quoting the input: serde_json's own messages quote string values
/// (`invalid type: string "shpat_…", expected …`), and the body may hold tokens, so only the
/// category, the position and (for duplicates) one of our own field names are kept.
fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Eof => format!("body is not a token response (JSON ends early at {at})"),
        Category::Syntax | Category::Io => format!("body is not a token response (not JSON: syntax error at {at})"),
        Category::Data => {
            let m = e.to_string();
            for f in ["access_token", "expires_in", "refresh_token", "refresh_token_expires_in", "scope"] {
                if m.starts_with(&format!("duplicate field `{f}`")) {
                    return format!("body is not a token response (duplicate field `{f}`)");
                }
            }
            format!("body is not a token response (a field has the wrong type or shape at {at})")
        }
    }
}

/// Parses a 2xx token response body.
fn parse_tokens(
    body: &[u8],
    rules: &ResponseRules,
    reuse_refresh: Option<&RefreshToken>,
    received_at: UnixMillis,
) -> Result<TokenSet, String> {
    let wire: WireTokens = serde_json::from_slice(body).map_err(|e| json_error(&e))?;
    let access = wire.access_token.filter(|s| !s.is_empty()).ok_or("access_token missing")?;
    token_chars(&access, "access_token")?;
    let refresh = match wire.refresh_token.filter(|s| !s.is_empty()) {
        Some(r) => {
            token_chars(&r, "refresh_token")?;
            RefreshToken::new(r)
        }
        None if !rules.require_refresh_token => reuse_refresh.cloned().ok_or("refresh_token missing")?,
        None => return Err("refresh_token missing".into()),
    };
    let access_life = match &wire.expires_in {
        Some(v) => lifetime(v, "expires_in", MAX_ACCESS_LIFETIME)?,
        None if !rules.require_expires_in => rules.default_access_lifetime,
        None => return Err("expires_in missing".into()),
    };
    let refresh_expires_at = match &wire.refresh_token_expires_in {
        Some(v) => Some(received_at.saturating_add(lifetime(v, "refresh_token_expires_in", MAX_REFRESH_LIFETIME)?)),
        None => None,
    };
    Ok(TokenSet {
        access_token: AccessToken::new(access),
        access_expires_at: received_at.saturating_add(access_life),
        refresh_token: refresh,
        refresh_expires_at,
        scope: wire.scope.map(|s| sanitize(&s, 4096)),
    })
}

fn retry_after_secs(raw: Option<&str>) -> Option<Duration> {
    raw.and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs)
}

/// [`classify`] for an attempt of `kind` (see the module table for what differs for acquisitions).
pub fn classify_attempt(
    kind: AttemptKind,
    exchange: Exchange<'_>,
    rules: &ResponseRules,
    reuse_refresh: Option<&RefreshToken>,
    received_at: UnixMillis,
) -> Outcome {
    let outcome = classify(exchange, rules, reuse_refresh, received_at);
    if kind == AttemptKind::Refresh {
        return match (exchange, outcome) {
            (Exchange::Answer(a), Outcome::Ambiguous { .. })
                if rules.rejected_on_400_401 && matches!(a.status, 400 | 401) =>
            {
                let err = serde_json::from_slice::<WireError>(a.body).ok();
                Outcome::Rejected {
                    status: a.status,
                    error: err.as_ref().and_then(|e| e.error.as_deref()).map(|c| sanitize(c, 64)).unwrap_or_default(),
                    description: err.as_ref().and_then(|e| e.error_description.as_deref()).map(|d| sanitize(d, 256)),
                    request_id: a.request_id.map(|s| sanitize(s, 128)),
                }
            }
            (_, outcome) => outcome,
        };
    }
    let Exchange::Answer(answer) = exchange else { return outcome };
    if answer.status != 400 || !matches!(outcome, Outcome::Ambiguous { .. }) {
        return outcome;
    }
    let Ok(err) = serde_json::from_slice::<WireError>(answer.body) else { return outcome };
    let subject_refused = err.error.as_deref() == Some("invalid_request")
        && err.error_description.as_deref().is_some_and(|d| d.to_ascii_lowercase().contains("subject token"));
    if !subject_refused {
        return outcome;
    }
    Outcome::Rejected {
        status: answer.status,
        error: "invalid_request".into(),
        description: err.error_description.as_deref().map(|d| sanitize(d, 256)),
        request_id: answer.request_id.map(|s| sanitize(s, 128)),
    }
}

/// Classifies one exchange. Pure and total: never panics, whatever the bytes.
///
/// `reuse_refresh` is the presented refresh token, kept when the provider's rules allow a response
/// without a new one. `received_at` anchors the server-supplied lifetimes.
pub fn classify(
    exchange: Exchange<'_>,
    rules: &ResponseRules,
    reuse_refresh: Option<&RefreshToken>,
    received_at: UnixMillis,
) -> Outcome {
    let answer = match exchange {
        Exchange::Failed(TransportFailure::NotSent { detail }) => {
            return Outcome::NotSent(NotSentReason::Connect { detail: sanitize(detail, 200) })
        }
        Exchange::Failed(TransportFailure::Build { detail }) => {
            return Outcome::NotSent(NotSentReason::Build { detail: sanitize(detail, 200) })
        }
        Exchange::Failed(TransportFailure::Timeout) => {
            return Outcome::Ambiguous { reason: AmbiguityReason::Timeout, request_id: None }
        }
        Exchange::Failed(TransportFailure::ConnectionLost) => {
            return Outcome::Ambiguous { reason: AmbiguityReason::ConnectionLost, request_id: None }
        }
        Exchange::Answer(a) => a,
    };
    let status = answer.status;
    let request_id = answer.request_id.map(|s| sanitize(s, 128));
    let ambiguous = |reason| Outcome::Ambiguous { reason, request_id: request_id.clone() };
    if answer.body_truncated || answer.body.len() > MAX_BODY {
        return ambiguous(AmbiguityReason::BodyTooLarge { status });
    }
    match status {
        200..=299 => match parse_tokens(answer.body, rules, reuse_refresh, received_at) {
            Ok(tokens) => Outcome::Success { tokens, request_id },
            Err(detail) => ambiguous(AmbiguityReason::UnparseableSuccess { status, detail }),
        },
        429 => Outcome::Throttled { retry_after: retry_after_secs(answer.retry_after), request_id },
        400..=499 => {
            let err = serde_json::from_slice::<WireError>(answer.body).ok();
            let code = err.as_ref().and_then(|e| e.error.as_deref()).map(|c| sanitize(c, 64));
            let description = err.as_ref().and_then(|e| e.error_description.as_deref()).map(|d| sanitize(d, 256));
            match code.as_deref() {
                Some("invalid_client" | "unauthorized_client") => {
                    Outcome::BadCredentials { status, error: code.unwrap_or_default(), request_id }
                }
                Some("invalid_grant" | "invalid_subject_token") => {
                    Outcome::Rejected { status, error: code.unwrap_or_default(), description, request_id }
                }
                Some("invalid_request") if status == 401 => {
                    Outcome::Rejected { status, error: code.unwrap_or_default(), description, request_id }
                }
                _ => ambiguous(AmbiguityReason::UnexpectedStatus { status }),
            }
        }
        500..=599 => ambiguous(AmbiguityReason::ServerError { status }),
        _ => ambiguous(AmbiguityReason::UnexpectedStatus { status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn answer(status: u16, body: &str) -> Outcome {
        let a = HttpAnswer {
            status,
            request_id: Some("rid-1"),
            retry_after: None,
            body: body.as_bytes(),
            body_truncated: false,
        };
        classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, NOW)
    }

    fn is_ambiguous(o: &Outcome) -> bool {
        matches!(o, Outcome::Ambiguous { .. })
    }

    #[test]
    fn shopify_success() {
        let o = answer(
            200,
            r#"{"access_token":"shpat_y","expires_in":3600,"refresh_token":"shprt_z","refresh_token_expires_in":7776000,"scope":"write_products,read_orders"}"#,
        );
        let Outcome::Success { tokens, request_id } = o else { panic!("{o:?}") };
        assert_eq!(tokens.access_token.expose_secret(), "shpat_y");
        assert_eq!(tokens.refresh_token.expose_secret(), "shprt_z");
        assert_eq!(tokens.access_expires_at, UnixMillis(1_000_000 + 3_600_000));
        assert_eq!(tokens.refresh_expires_at, Some(UnixMillis(1_000_000 + 7_776_000_000)));
        assert_eq!(tokens.scope.as_deref(), Some("write_products,read_orders"));
        assert_eq!(request_id.as_deref(), Some("rid-1"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_short_refresh_lifetimes_are_kept() {
        let o = answer(
            200,
            r#"{"access_token":"a","expires_in":60,"refresh_token":"r","refresh_token_expires_in":120,"session":"s"}"#,
        );
        let Outcome::Success { tokens, .. } = o else { panic!("{o:?}") };
        assert_eq!(tokens.refresh_expires_at, Some(UnixMillis(1_120_000)));
    }

    #[test]
    fn incomplete_or_garbled_success_is_ambiguous() {
        for body in [
            "",
            "error code: 520",
            "<html>oops</html>",
            r#"{"access_token":"a","expires_in":3600,"refresh_token":"r""#,
            r#"{"access_token":"a","refresh_token":"r"}"#,
            r#"{"access_token":"a","expires_in":3600}"#,
            r#"{"expires_in":3600,"refresh_token":"r"}"#,
            r#"{"access_token":"","expires_in":3600,"refresh_token":"r"}"#,
            r#"{"access_token":"a","expires_in":-5,"refresh_token":"r"}"#,
            r#"{"access_token":"a","expires_in":1e300,"refresh_token":"r"}"#,
            r#"{"access_token":"a","expires_in":99999999999999,"refresh_token":"r"}"#,
            r#"{"access_token":"a","expires_in":"3600","refresh_token":"r"}"#,
            r#"{"access_token":"a","access_token":"b","expires_in":3600,"refresh_token":"r"}"#,
            r#"[1,2,3]"#,
        ] {
            let o = answer(200, body);
            assert!(is_ambiguous(&o), "{body:?} -> {o:?}");
        }
    }

    /// Found by the interleaving property tests: a same-pair replay near the end of the refresh
    /// token's life carries `refresh_token_expires_in: 0`. It is a real pair, not garbage.
    #[test]
    fn zero_lifetimes_are_real_answers() {
        let o = answer(200, r#"{"access_token":"a","expires_in":0,"refresh_token":"r","refresh_token_expires_in":0}"#);
        let Outcome::Success { tokens, .. } = o else { panic!("{o:?}") };
        assert_eq!(tokens.access_expires_at, NOW);
        assert_eq!(tokens.refresh_expires_at, Some(NOW));
    }

    #[test]
    fn server_errors_are_ambiguous_never_dead() {
        for (status, body) in
            [(520, "error code: 520"), (500, "Internal error"), (503, "{}"), (502, ""), (504, "<html/>")]
        {
            assert_eq!(
                answer(status, body),
                Outcome::Ambiguous {
                    reason: AmbiguityReason::ServerError { status },
                    request_id: Some("rid-1".into())
                }
            );
        }
    }

    #[test]
    fn shopify_dead_refresh_token_is_rejected() {
        let o = answer(
            401,
            r#"{"error":"invalid_request","error_description":"This request requires an active refresh_token"}"#,
        );
        assert!(matches!(o, Outcome::Rejected { status: 401, ref error, .. } if error == "invalid_request"), "{o:?}");
        let o =
            answer(400, r#"{"error":"invalid_grant","error_description":"The refresh token is invalid or expired"}"#);
        assert!(matches!(o, Outcome::Rejected { status: 400, .. }), "{o:?}");
        assert!(matches!(answer(400, r#"{"error":"invalid_subject_token"}"#), Outcome::Rejected { .. }));
    }

    #[test]
    fn invalid_client_is_about_the_app() {
        for status in [400, 401, 403] {
            let o =
                answer(status, r#"{"error":"invalid_client","error_description":"Client credentials are invalid"}"#);
            assert!(matches!(o, Outcome::BadCredentials { .. }), "{o:?}");
        }
    }

    #[test]
    fn unrecognised_4xx_and_other_statuses_are_ambiguous() {
        for (status, body) in [
            (400, r#"{"error":"invalid_request","error_description":"Missing field"}"#),
            (403, "Forbidden"),
            (404, "{}"),
            (401, "<html>login</html>"),
            (302, ""),
            (100, ""),
            (600, ""),
            (0, ""),
        ] {
            assert!(is_ambiguous(&answer(status, body)), "{status} {body}");
        }
    }

    #[test]
    fn throttling_honours_retry_after_seconds() {
        let a =
            HttpAnswer { status: 429, request_id: None, retry_after: Some(" 7 "), body: b"", body_truncated: false };
        let o = classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, NOW);
        assert_eq!(o, Outcome::Throttled { retry_after: Some(Duration::from_secs(7)), request_id: None });
        let a = HttpAnswer { retry_after: Some("Wed, 21 Oct 2026 07:28:00 GMT"), ..a };
        let o = classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, NOW);
        assert_eq!(o, Outcome::Throttled { retry_after: None, request_id: None });
    }

    #[test]
    fn transport_failures_split_by_whether_anything_was_sent() {
        let f = TransportFailure::NotSent { detail: "connection refused".into() };
        assert!(matches!(classify(Exchange::Failed(&f), &ResponseRules::SHOPIFY, None, NOW), Outcome::NotSent(_)));
        for f in [TransportFailure::Timeout, TransportFailure::ConnectionLost] {
            assert!(is_ambiguous(&classify(Exchange::Failed(&f), &ResponseRules::SHOPIFY, None, NOW)));
        }
    }

    #[test]
    fn oversized_bodies_are_ambiguous() {
        let big = vec![b' '; MAX_BODY + 1];
        let a = HttpAnswer { status: 200, request_id: None, retry_after: None, body: &big, body_truncated: false };
        assert!(is_ambiguous(&classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, NOW)));
        let a = HttpAnswer { body: b"{}", body_truncated: true, ..a };
        assert!(is_ambiguous(&classify(Exchange::Answer(a), &ResponseRules::SHOPIFY, None, NOW)));
    }

    #[test]
    fn generic_rules_keep_the_presented_refresh_token() {
        let rules = ResponseRules {
            require_refresh_token: false,
            require_expires_in: false,
            default_access_lifetime: Duration::from_secs(60),
            rejected_on_400_401: false,
        };
        let old = RefreshToken::new("old");
        let a = HttpAnswer {
            status: 200,
            request_id: None,
            retry_after: None,
            body: br#"{"access_token":"a"}"#,
            body_truncated: false,
        };
        let Outcome::Success { tokens, .. } = classify(Exchange::Answer(a), &rules, Some(&old), NOW) else { panic!() };
        assert_eq!(tokens.refresh_token, old);
        assert_eq!(tokens.access_expires_at, UnixMillis(1_060_000));
    }

    #[test]
    fn acquisitions_treat_a_refused_subject_token_as_definitive() {
        let a = |body: &'static str| HttpAnswer {
            status: 400,
            request_id: None,
            retry_after: None,
            body: body.as_bytes(),
            body_truncated: false,
        };
        let subject = a(r#"{"error":"invalid_request","error_description":"Invalid subject token"}"#);
        for kind in [AttemptKind::Migration, AttemptKind::TokenExchange] {
            let o = classify_attempt(kind, Exchange::Answer(subject), &ResponseRules::SHOPIFY, None, NOW);
            assert!(matches!(o, Outcome::Rejected { status: 400, .. }), "{o:?}");
            let other = a(r#"{"error":"invalid_request","error_description":"Missing field"}"#);
            let o = classify_attempt(kind, Exchange::Answer(other), &ResponseRules::SHOPIFY, None, NOW);
            assert!(is_ambiguous(&o), "{o:?}");
        }
        // A refresh never reads a description.
        let o = classify_attempt(AttemptKind::Refresh, Exchange::Answer(subject), &ResponseRules::SHOPIFY, None, NOW);
        assert!(is_ambiguous(&o), "{o:?}");
    }

    /// The Customer Account API's contract: a refresh answered 400 or 401 means "log in again",
    /// whatever the body; the app's own credentials, a 5xx, a timeout, a 403 stay what they were.
    #[test]
    fn rejected_on_400_401_is_definitive_for_refreshes_only() {
        let rules = ResponseRules { rejected_on_400_401: true, ..ResponseRules::OAUTH2 };
        let a = |status: u16, body: &'static str| HttpAnswer {
            status,
            request_id: Some("rid"),
            retry_after: None,
            body: body.as_bytes(),
            body_truncated: false,
        };
        let refresh = |x: HttpAnswer<'_>, rules: &ResponseRules| {
            classify_attempt(AttemptKind::Refresh, Exchange::Answer(x), rules, None, NOW)
        };
        for (status, body) in [(400, ""), (400, "not json"), (401, r#"{"error":"invalid_token"}"#), (400, "{}")] {
            let o = refresh(a(status, body), &rules);
            assert!(matches!(o, Outcome::Rejected { status: s, .. } if s == status), "{status} {body}: {o:?}");
            // Without the rule the same answers are ambiguous.
            assert!(is_ambiguous(&refresh(a(status, body), &ResponseRules::OAUTH2)), "{status} {body}");
        }
        let Outcome::Rejected { error, request_id, .. } = refresh(a(401, r#"{"error":"invalid_token"}"#), &rules)
        else {
            panic!()
        };
        assert_eq!((error.as_str(), request_id.as_deref()), ("invalid_token", Some("rid")));
        let o = refresh(a(401, r#"{"error":"invalid_client"}"#), &rules);
        assert!(matches!(o, Outcome::BadCredentials { .. }), "{o:?}");
        for status in [403, 404, 409, 500, 502, 520] {
            assert!(is_ambiguous(&refresh(a(status, "{}"), &rules)), "{status}");
        }
        for f in [TransportFailure::Timeout, TransportFailure::ConnectionLost] {
            let o = classify_attempt(AttemptKind::Refresh, Exchange::Failed(&f), &rules, None, NOW);
            assert!(is_ambiguous(&o), "{f:?}");
        }
        let o = classify_attempt(AttemptKind::TokenExchange, Exchange::Answer(a(400, "{}")), &rules, None, NOW);
        assert!(is_ambiguous(&o), "acquisitions are not affected: {o:?}");
    }

    #[test]
    fn hostile_text_is_sanitised() {
        let o = answer(401, "{\"error\":\"invalid_request\",\"error_description\":\"a\\u001b[31mb\\nc\"}");
        let Outcome::Rejected { description, .. } = o else { panic!() };
        assert_eq!(description.as_deref(), Some("a[31mbc"));
    }
}
