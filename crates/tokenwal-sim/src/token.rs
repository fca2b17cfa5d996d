//! Token strings and the token-set response body.
//!
//! Token strings are test fixtures, not real credentials, but they still flow through the
//! engine under test, so their `Debug` output is redacted to a short fingerprint: a log line
//! that prints a simulator type should look like one that prints a real one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Number of trailing characters [`SimToken`]'s `Debug` keeps, enough to tell tokens apart in
/// test output.
const FINGERPRINT_CHARS: usize = 4;

/// An opaque token string minted or seeded by the simulator (`shpat_…`, `shprt_…`).
///
/// `Debug` shows only the prefix and the last few characters; there is no `Display`. Use
/// [`SimToken::as_str`] to get the value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SimToken(String);

impl SimToken {
    /// Wraps a token string.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The token string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Unwraps the token string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for SimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fingerprint(&self.0))
    }
}

/// `shprt_…abcd`: the prefix up to and including the first `_`, then the last few characters.
pub(crate) fn fingerprint(token: &str) -> String {
    let prefix = token.find('_').map_or("", |i| &token[..=i]);
    let tail: String = {
        let chars: Vec<char> = token.chars().collect();
        let start = chars.len().saturating_sub(FINGERPRINT_CHARS);
        chars[start..].iter().collect()
    };
    format!("{prefix}…{tail}")
}

/// An app's client secret. `Debug` prints `ClientSecret(<redacted>)`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientSecret(String);

impl ClientSecret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret string.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(<redacted>)")
    }
}

/// A successful expiring-token response, serialised exactly as Shopify's body:
/// `{"access_token","expires_in","refresh_token","refresh_token_expires_in","scope"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSet {
    /// The access token (`shpat_…`).
    pub access_token: SimToken,
    /// Seconds until the access token expires, from the time of the answer.
    pub expires_in: u64,
    /// The refresh token (`shprt_…`).
    pub refresh_token: SimToken,
    /// Seconds until the refresh token expires, from the time of the answer.
    pub refresh_token_expires_in: u64,
    /// Comma-separated granted scopes.
    pub scope: String,
    /// Shopify session id, present only with
    /// [`ModelConfig::include_session_field`](crate::ModelConfig::include_session_field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// A non-expiring offline token response: `{"access_token","scope"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonExpiringToken {
    /// The non-expiring access token.
    pub access_token: SimToken,
    /// Comma-separated granted scopes.
    pub scope: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let t = SimToken::new("shprt_0123456789abcdef");
        assert_eq!(format!("{t:?}"), "shprt_…cdef");
        let s = ClientSecret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        let set = TokenSet {
            access_token: SimToken::new("shpat_secretaccessvalue"),
            expires_in: 1,
            refresh_token: SimToken::new("shprt_secretrefreshvalue"),
            refresh_token_expires_in: 2,
            scope: "read_orders".into(),
            session: None,
        };
        let dbg = format!("{set:?}");
        assert!(!dbg.contains("secretaccess") && !dbg.contains("secretrefresh"), "{dbg}");
    }

    #[test]
    fn token_set_serialises_as_shopify_body() {
        let set = TokenSet {
            access_token: SimToken::new("shpat_a"),
            expires_in: 3600,
            refresh_token: SimToken::new("shprt_r"),
            refresh_token_expires_in: 7_776_000,
            scope: "write_products".into(),
            session: None,
        };
        assert_eq!(
            serde_json::to_value(&set).unwrap(),
            serde_json::json!({
                "access_token": "shpat_a",
                "expires_in": 3600,
                "refresh_token": "shprt_r",
                "refresh_token_expires_in": 7_776_000,
                "scope": "write_products"
            })
        );
    }

    #[test]
    fn fingerprint_handles_short_and_unprefixed() {
        assert_eq!(fingerprint("ab"), "…ab");
        assert_eq!(fingerprint("x_é"), "x_…x_é");
    }
}
