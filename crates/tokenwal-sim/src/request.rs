//! Parsing of token-endpoint request bodies, JSON or form-encoded.
//!
//! Shopify's curl examples send `application/x-www-form-urlencoded`; every official library
//! sends JSON. Both are accepted, and JSON scalars are normalised to strings so that
//! `"expiring":1` and `"expiring":"1"` read the same.

use std::collections::BTreeMap;
use std::fmt;

/// `grant_type` of a refresh.
pub const GRANT_REFRESH_TOKEN: &str = "refresh_token";
/// `grant_type` of a token exchange (session token or migration).
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// `grant_type` of the authorization-code grant (not simulated beyond a rejection).
pub const GRANT_AUTHORIZATION_CODE: &str = "authorization_code";
/// `subject_token_type` of an App Bridge session token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// `subject_token_type`/`requested_token_type` of an offline access token.
pub const TOKEN_TYPE_OFFLINE: &str = "urn:shopify:params:oauth:token-type:offline-access-token";
/// `requested_token_type` of an online access token (not simulated).
pub const TOKEN_TYPE_ONLINE: &str = "urn:shopify:params:oauth:token-type:online-access-token";

/// The fields of a token request, by name. Values are strings whatever the encoding.
///
/// `Debug` lists field names only: values include secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenParams {
    fields: BTreeMap<String, String>,
}

impl fmt::Debug for TokenParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.fields.keys()).finish()
    }
}

/// Why a request body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The JSON body did not parse or was not an object.
    #[error("request body is not a JSON object")]
    BadJson,
    /// A JSON field held an array or object.
    #[error("field {0} must be a string or a number")]
    BadField(String),
}

impl TokenParams {
    /// Builds params from name/value pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Self { fields: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// Parses a body. A `Content-Type` containing `json` selects JSON, one containing
    /// `x-www-form-urlencoded` selects the form encoding; without either, a body whose first
    /// non-blank byte is `{` is read as JSON, anything else as a form.
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, BodyError> {
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        let json = if ct.contains("json") {
            true
        } else if ct.contains("x-www-form-urlencoded") {
            false
        } else {
            body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        };
        if json {
            Self::parse_json(body)
        } else {
            Ok(Self::parse_form(body))
        }
    }

    fn parse_json(body: &[u8]) -> Result<Self, BodyError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| BodyError::BadJson)?;
        let serde_json::Value::Object(map) = value else {
            return Err(BodyError::BadJson);
        };
        let mut fields = BTreeMap::new();
        for (k, v) in map {
            let s = match v {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return Err(BodyError::BadField(k)),
            };
            fields.insert(k, s);
        }
        Ok(Self { fields })
    }

    fn parse_form(body: &[u8]) -> Self {
        Self { fields: form_urlencoded::parse(body).into_owned().collect() }
    }

    /// The value of `name`, if present and non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// Encodes as a JSON object of strings (for building requests in tests).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.fields).expect("string map serialises")
    }

    /// Encodes as `application/x-www-form-urlencoded` (for building requests in tests).
    pub fn to_form(&self) -> String {
        form_urlencoded::Serializer::new(String::new()).extend_pairs(self.fields.iter()).finish()
    }

    /// A refresh request.
    pub fn refresh(client_id: &str, client_secret: &str, refresh_token: &str) -> Self {
        Self::from_pairs([
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("grant_type", GRANT_REFRESH_TOKEN),
            ("refresh_token", refresh_token),
        ])
    }

    /// A token exchange of an App Bridge session token for an expiring offline token
    /// (`expiring=1`).
    pub fn exchange(client_id: &str, client_secret: &str, session_token: &str) -> Self {
        Self::from_pairs([
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", session_token),
            ("subject_token_type", TOKEN_TYPE_ID_TOKEN),
            ("requested_token_type", TOKEN_TYPE_OFFLINE),
            ("expiring", "1"),
        ])
    }

    /// A migration of a non-expiring offline token to an expiring one (`expiring=1`).
    pub fn migrate(client_id: &str, client_secret: &str, legacy_token: &str) -> Self {
        Self::from_pairs([
            ("client_id", client_id),
            ("client_secret", client_secret),
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("subject_token", legacy_token),
            ("subject_token_type", TOKEN_TYPE_OFFLINE),
            ("requested_token_type", TOKEN_TYPE_OFFLINE),
            ("expiring", "1"),
        ])
    }

    /// Sets (or replaces) a field.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.fields.insert(name.to_owned(), value.to_owned());
        self
    }

    /// Removes a field.
    pub fn without(mut self, name: &str) -> Self {
        self.fields.remove(name);
        self
    }
}

/// Reads the `expiring` flag: `1`/`0`/`true`/`false`, absent means `0` (Shopify's default).
pub(crate) fn parse_expiring(value: Option<&str>) -> Option<bool> {
    match value {
        None => Some(false),
        Some("1" | "true") => Some(true),
        Some("0" | "false") => Some(false),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_form_read_the_same() {
        let p = TokenParams::refresh("cid", "sec ret&", "shprt_x");
        let from_json = TokenParams::parse(Some("application/json"), p.to_json().as_bytes());
        let from_form = TokenParams::parse(Some("application/x-www-form-urlencoded"), p.to_form().as_bytes());
        assert_eq!(from_json, Ok(p.clone()));
        assert_eq!(from_form, Ok(p.clone()));
        assert_eq!(TokenParams::parse(None, p.to_json().as_bytes()), Ok(p.clone()));
        assert_eq!(TokenParams::parse(None, p.to_form().as_bytes()), Ok(p));
    }

    #[test]
    fn json_scalars_become_strings() {
        let p = TokenParams::parse(
            Some("application/json; charset=utf-8"),
            br#"{"expiring":1,"flag":true,"gone":null,"s":"x"}"#,
        )
        .unwrap();
        assert_eq!(p.get("expiring"), Some("1"));
        assert_eq!(p.get("flag"), Some("true"));
        assert_eq!(p.get("gone"), None);
        assert_eq!(p.get("s"), Some("x"));
    }

    #[test]
    fn bad_json_is_refused() {
        assert_eq!(TokenParams::parse(Some("application/json"), b"{nope"), Err(BodyError::BadJson));
        assert_eq!(TokenParams::parse(Some("application/json"), b"[1]"), Err(BodyError::BadJson));
        assert_eq!(TokenParams::parse(Some("application/json"), br#"{"a":[1]}"#), Err(BodyError::BadField("a".into())));
    }

    #[test]
    fn expiring_values() {
        assert_eq!(parse_expiring(None), Some(false));
        assert_eq!(parse_expiring(Some("1")), Some(true));
        assert_eq!(parse_expiring(Some("0")), Some(false));
        assert_eq!(parse_expiring(Some("true")), Some(true));
        assert_eq!(parse_expiring(Some("2")), None);
    }

    #[test]
    fn debug_hides_values() {
        let p = TokenParams::refresh("cid", "topsecret", "shprt_x");
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("topsecret") && dbg.contains("client_secret"), "{dbg}");
    }
}
