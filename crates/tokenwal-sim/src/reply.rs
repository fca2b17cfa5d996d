//! What the model decides to answer, before any socket is involved.

use std::fmt;

use serde::Serialize;

use crate::faults::Fault;
use crate::token::{NonExpiringToken, TokenSet};

/// `Content-Type` of JSON answers.
pub const CONTENT_TYPE_JSON: &str = "application/json; charset=utf-8";
/// `Content-Type` of plain-text answers (edge errors).
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";

/// An HTTP answer: status, content type, extra headers and body. `x-request-id` is added by
/// the front end from [`TokenReply::request_id`].
///
/// `Debug` shows the body length, not the body (it may hold tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// `Content-Type` header value.
    pub content_type: &'static str,
    /// Other headers (e.g. `Retry-After`).
    pub headers: Vec<(&'static str, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl fmt::Debug for HttpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpReply")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl HttpReply {
    /// A JSON answer.
    pub fn json(status: u16, value: &impl Serialize) -> Self {
        Self {
            status,
            content_type: CONTENT_TYPE_JSON,
            headers: Vec::new(),
            body: serde_json::to_vec(value).expect("reply values serialise"),
        }
    }

    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self { status, content_type: CONTENT_TYPE_TEXT, headers: Vec::new(), body: body.into().into_bytes() }
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json_body(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// How the front end must deliver the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Send `reply` after waiting `delay_ms` (real time; 0 = at once).
    Respond {
        /// The answer.
        reply: HttpReply,
        /// Delay before sending, milliseconds.
        delay_ms: u64,
    },
    /// Send nothing and hold the connection open until the client gives up.
    Hang,
    /// Close the connection without sending an HTTP response.
    Reset,
}

impl Delivery {
    /// The reply, if one is to be sent.
    pub fn reply(&self) -> Option<&HttpReply> {
        match self {
            Delivery::Respond { reply, .. } => Some(reply),
            Delivery::Hang | Delivery::Reset => None,
        }
    }
}

/// An OAuth error answer: status and `{"error", "error_description"?}` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OAuthError {
    /// HTTP status.
    #[serde(skip)]
    pub status: u16,
    /// OAuth `error` code, e.g. `invalid_request`.
    pub error: String,
    /// `error_description`, when Shopify sends one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

impl OAuthError {
    /// Builds an error with a description.
    pub fn new(status: u16, error: &str, description: &str) -> Self {
        Self { status, error: error.to_owned(), error_description: Some(description.to_owned()) }
    }

    /// Builds an error without a description.
    pub fn bare(status: u16, error: &str) -> Self {
        Self { status, error: error.to_owned(), error_description: None }
    }

    /// 400 `invalid_request` with `description`.
    pub fn invalid_request(description: &str) -> Self {
        Self::new(400, "invalid_request", description)
    }

    /// The JSON answer.
    pub fn to_reply(&self) -> HttpReply {
        HttpReply::json(self.status, self)
    }
}

/// How a successful answer came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum IssueKind {
    /// First use of a refresh token: a new pair was minted.
    Rotation,
    /// Retry of a used refresh token answered from retention with the same pair.
    ReplaySamePair,
    /// Retry of a used refresh token answered with a freshly minted pair.
    ReplayNewPair,
    /// Token exchange of a session token: a new acquisition.
    Acquisition,
    /// First migration of a non-expiring token.
    Migration,
    /// Retry of a migration answered with the same pair.
    MigrationReplay,
}

/// The logical result of a token request, independent of how (or whether) it was delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenOutcome {
    /// An expiring token set was issued (and committed).
    Issued {
        /// The token set as answered.
        tokens: TokenSet,
        /// How it came about.
        kind: IssueKind,
    },
    /// A non-expiring offline token was issued (token exchange with `expiring=0`).
    IssuedNonExpiring(NonExpiringToken),
    /// The request was answered with an OAuth error.
    Rejected(OAuthError),
    /// A fault answered before the request was processed; no state changed.
    NotProcessed,
}

impl TokenOutcome {
    /// The issued token set, if any.
    pub fn tokens(&self) -> Option<&TokenSet> {
        match self {
            TokenOutcome::Issued { tokens, .. } => Some(tokens),
            _ => None,
        }
    }

    /// The OAuth error, if rejected.
    pub fn error(&self) -> Option<&OAuthError> {
        match self {
            TokenOutcome::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

/// The model's answer to one token request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenReply {
    /// Unique `x-request-id`.
    pub request_id: String,
    /// What happened to server state.
    pub outcome: TokenOutcome,
    /// The fault applied, if any.
    pub fault: Option<Fault>,
    /// What to put on the wire.
    pub delivery: Delivery,
    /// The grant the request was counted under (and its fault drawn for, and its hold taken
    /// from): the shop domain for the Admin API, `{shop_id}:{customer_id}` for a customer (the
    /// path's `{shop_id}` when the refresh token is not one of that shop's).
    pub grant: String,
}

/// The model's answer to one Admin API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminReply {
    /// Unique `x-request-id`.
    pub request_id: String,
    /// Whether the access token was accepted.
    pub authorized: bool,
    /// The answer.
    pub reply: HttpReply,
}
