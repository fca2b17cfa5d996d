//! The JSON-lines format of `import` and `export`.
//!
//! One JSON object per line (blank lines are skipped):
//!
//! | key | required | meaning |
//! |---|---|---|
//! | `shop` | yes | `{handle}.myshopify.com`, exactly (never normalised: `Shop.myshopify.com` is refused) |
//! | `access_token` | yes | the current access token |
//! | `refresh_token` | yes | the current refresh token |
//! | `expires_at` / `expires_in` | one of them | access-token expiry: unix seconds or RFC 3339 / seconds from now (> 0) |
//! | `refresh_token_expires_at` / `refresh_token_expires_in` | optional (at most one) | refresh-token expiry, same forms; must be in the future |
//! | `scope` | optional | granted scopes, comma-separated |
//!
//! With a non-Admin provider profile (`provider` in the config), a line names its grant by
//! `account` instead of `shop`: the account at that provider (for `shopify-customer-account`,
//! `{shop_id}:{customer_id}`), validated as the profile's grant key.
//!
//! Other keys are ignored. An access token that has already expired is accepted (it is refreshed
//! at once); a refresh token that has already expired is refused (that grant is dead).
//!
//! Parsing goes through [`serde_json::Value`] and every message is written here, so no error
//! message can quote a value from the line (a token pasted into the wrong field stays unprinted).

use serde_json::{Map, Value};
use std::time::Duration;
use tokenwal::core::{AccessToken, GrantKey, RefreshToken, ShopDomain, TokenSet, UnixMillis, SHOPIFY_PROVIDER};

use crate::timefmt;

/// The longest line accepted (a token set is a few hundred bytes).
pub const MAX_LINE: usize = 64 * 1024;

/// Values above this many "seconds" are taken for milliseconds by mistake (year 5138).
const MAX_UNIX_SECONDS: f64 = 1e11;

/// Parses one line into a shop and its token set, with `now` for relative lifetimes.
pub fn parse_line(line: &str, now: UnixMillis) -> Result<(ShopDomain, TokenSet), String> {
    let (obj, tokens) = parse_tokens(line, now, "shop")?;
    let shop = match obj.get("shop") {
        None | Some(Value::Null) => return Err("missing field `shop`".into()),
        Some(Value::String(s)) => ShopDomain::parse(s).map_err(|e| format!("invalid shop domain: {e}"))?,
        Some(_) => return Err("`shop` must be a string".into()),
    };
    Ok((shop, tokens))
}

/// Parses one line into a grant of `provider` and its token set: [`parse_line`] for `shopify`;
/// otherwise the grant is named by `account`, validated as that provider's grant key.
pub fn parse_grant_line(line: &str, now: UnixMillis, provider: &str) -> Result<(GrantKey, TokenSet), String> {
    if provider == SHOPIFY_PROVIDER {
        return parse_line(line, now).map(|(shop, tokens)| (GrantKey::shopify(&shop), tokens));
    }
    let (obj, tokens) = parse_tokens(line, now, "account")?;
    let grant = match obj.get("account") {
        None | Some(Value::Null) => return Err(format!("missing field `account` (a `{provider}` account)")),
        Some(Value::String(s)) => {
            GrantKey::new(provider, s).map_err(|e| format!("invalid `{provider}` account: {e}"))?
        }
        Some(_) => return Err("`account` must be a string".into()),
    };
    Ok((grant, tokens))
}

/// The token set of a line and its object; `who` (`shop` or `account`) is checked first, so a
/// line without it reports that before anything else.
fn parse_tokens(line: &str, now: UnixMillis, who: &str) -> Result<(Map<String, Value>, TokenSet), String> {
    if line.len() > MAX_LINE {
        return Err(format!("line longer than {MAX_LINE} bytes"));
    }
    let value: Value = serde_json::from_str(line).map_err(|e| {
        // serde_json's syntax errors name a position, never the content.
        format!("not valid JSON ({})", e.to_string().split(" at line").next().unwrap_or("syntax error"))
    })?;
    let Value::Object(obj) = value else {
        return Err("not a JSON object".into());
    };
    if matches!(obj.get(who), None | Some(Value::Null)) {
        return Err(format!("missing field `{who}`"));
    }
    let access_token = secret(&obj, "access_token")?;
    let refresh_token = secret(&obj, "refresh_token")?;
    let access_expires_at = match expiry(&obj, "expires_at", "expires_in", now)? {
        Some(at) => at,
        None => return Err("missing field `expires_at` or `expires_in`".into()),
    };
    let refresh_expires_at = expiry(&obj, "refresh_token_expires_at", "refresh_token_expires_in", now)?;
    if let Some(at) = refresh_expires_at {
        if at <= now {
            return Err(format!("refresh token already expired at {at}: this grant is dead, re-acquire it"));
        }
    }
    let scope = match obj.get("scope") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`scope` must be a string".into()),
    };
    let tokens = TokenSet {
        access_token: AccessToken::new(access_token),
        access_expires_at,
        refresh_token: RefreshToken::new(refresh_token),
        refresh_expires_at,
        scope,
    };
    Ok((obj, tokens))
}

fn secret(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("missing field `{key}`")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("`{key}` is empty")),
        Some(Value::String(s)) if s.trim() != s || s.chars().any(char::is_control) => {
            Err(format!("`{key}` has surrounding whitespace or control characters"))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

/// Reads `{at_key}` (unix seconds or RFC 3339) or `{in_key}` (seconds from now, > 0).
fn expiry(obj: &Map<String, Value>, at_key: &str, in_key: &str, now: UnixMillis) -> Result<Option<UnixMillis>, String> {
    let at = obj.get(at_key).filter(|v| !v.is_null());
    let within = obj.get(in_key).filter(|v| !v.is_null());
    match (at, within) {
        (Some(_), Some(_)) => Err(format!("give `{at_key}` or `{in_key}`, not both")),
        (None, None) => Ok(None),
        (Some(Value::String(s)), None) => match timefmt::parse_rfc3339(s) {
            Ok(t) => Ok(Some(t)),
            Err(e) => Err(format!("`{at_key}`: {e}")),
        },
        (Some(Value::Number(n)), None) => {
            let secs = n.as_f64().filter(|s| s.is_finite()).ok_or_else(|| format!("`{at_key}` is not a number"))?;
            if secs <= 0.0 {
                return Err(format!("`{at_key}` must be positive unix seconds"));
            }
            if secs > MAX_UNIX_SECONDS {
                return Err(format!("`{at_key}` is too large: unix seconds expected (milliseconds given?)"));
            }
            Ok(Some(UnixMillis((secs * 1000.0) as u64)))
        }
        (Some(_), None) => Err(format!("`{at_key}` must be unix seconds or an RFC 3339 string")),
        (None, Some(Value::Number(n))) => {
            let secs = n.as_f64().filter(|s| s.is_finite()).ok_or_else(|| format!("`{in_key}` is not a number"))?;
            if secs <= 0.0 {
                return Err(format!("`{in_key}` must be a positive number of seconds"));
            }
            if secs > MAX_UNIX_SECONDS {
                return Err(format!("`{in_key}` is too large"));
            }
            Ok(Some(now.saturating_add(Duration::from_secs_f64(secs))))
        }
        (None, Some(_)) => Err(format!("`{in_key}` must be a number of seconds")),
    }
}

/// One exported line: the same shape `import` reads, with absolute RFC 3339 expiries.
pub fn export_line(shop: &str, t: &TokenSet) -> String {
    let mut obj = Map::new();
    obj.insert("shop".into(), Value::String(shop.to_owned()));
    obj.insert("access_token".into(), Value::String(t.access_token.expose_secret().to_owned()));
    obj.insert("refresh_token".into(), Value::String(t.refresh_token.expose_secret().to_owned()));
    obj.insert("expires_at".into(), Value::String(t.access_expires_at.to_string()));
    if let Some(r) = t.refresh_expires_at {
        obj.insert("refresh_token_expires_at".into(), Value::String(r.to_string()));
    }
    if let Some(s) = &t.scope {
        obj.insert("scope".into(), Value::String(s.clone()));
    }
    Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = UnixMillis(1_800_000_000_000);

    #[test]
    fn good_lines() {
        let (shop, t) = parse_line(
            r#"{"shop":"a.myshopify.com","access_token":"shpat_1","refresh_token":"shprt_1","expires_in":3600,"refresh_token_expires_at":"2027-06-01T00:00:00Z","scope":"read_orders"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(shop.as_str(), "a.myshopify.com");
        assert_eq!(t.access_expires_at, UnixMillis(NOW.0 + 3_600_000));
        assert_eq!(t.refresh_expires_at, Some(UnixMillis(1_811_808_000_000)));
        let (_, t) = parse_line(
            r#"{"shop":"b.myshopify.com","access_token":"x","refresh_token":"y","expires_at":1700000000,"refresh_token_expires_in":86400}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(t.access_expires_at, UnixMillis(1_700_000_000_000), "an expired access token is fine");
        assert_eq!(t.refresh_expires_at, Some(UnixMillis(NOW.0 + 86_400_000)));
        assert_eq!(t.scope, None);
    }

    #[test]
    fn grant_lines_per_provider() {
        let line = r#"{"account":"55555:7","access_token":"a","refresh_token":"r","expires_in":60}"#;
        let (grant, t) = parse_grant_line(line, NOW, "shopify-customer-account").unwrap();
        assert_eq!(grant.to_string(), "shopify-customer-account/55555:7");
        assert_eq!(t.access_expires_at, UnixMillis(NOW.0 + 60_000));
        let (grant, _) = parse_grant_line(&line.replace("55555:7", "user-1"), NOW, "idp").unwrap();
        assert_eq!(grant.to_string(), "idp/user-1");
        for (bad, want) in [
            (line.replace("55555:7", "55555:07"), "invalid `shopify-customer-account` account"),
            (line.replace("55555:7", "a.myshopify.com"), "invalid `shopify-customer-account` account"),
            (line.replace("\"account\"", "\"shop\""), "missing field `account`"),
        ] {
            let e = parse_grant_line(&bad, NOW, "shopify-customer-account").unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
            assert!(!e.contains("\"a\"") && !e.contains("\"r\""), "no token in {e}");
        }
        // The Admin API still reads `shop`.
        let admin = r#"{"shop":"a.myshopify.com","access_token":"a","refresh_token":"r","expires_in":60}"#;
        assert_eq!(parse_grant_line(admin, NOW, "shopify").unwrap().0.to_string(), "shopify/a.myshopify.com");
        assert!(parse_grant_line(line, NOW, "shopify").is_err());
    }

    #[test]
    fn exported_lines_import_back() {
        let (shop, t) = parse_line(
            r#"{"shop":"a.myshopify.com","access_token":"shpat_1","refresh_token":"shprt_1","expires_at":"2027-01-01T00:00:00.250Z","refresh_token_expires_in":60}"#,
            NOW,
        )
        .unwrap();
        let (shop2, t2) = parse_line(&export_line(shop.as_str(), &t), NOW).unwrap();
        assert_eq!((shop, t), (shop2, t2));
    }

    #[test]
    fn bad_lines_say_why_without_echoing_values() {
        let base = r#""access_token":"SECRET_A","refresh_token":"SECRET_R","expires_in":60"#;
        let cases = [
            ("{\"shop\":\"a.myshopify.com\",".to_owned(), "not valid JSON"),
            ("[1,2]".to_owned(), "not a JSON object"),
            (format!(r#"{{{base}}}"#), "missing field `shop`"),
            (format!(r#"{{"shop":"Shop.myshopify.com",{base}}}"#), "invalid shop domain"),
            (format!(r#"{{"shop":"evil.com",{base}}}"#), "invalid shop domain"),
            (r#"{"shop":"a.myshopify.com","access_token":"SECRET_A","expires_in":60}"#.into(), "`refresh_token`"),
            (
                r#"{"shop":"a.myshopify.com","access_token":"SECRET_A","refresh_token":"SECRET_R"}"#.into(),
                "`expires_at` or `expires_in`",
            ),
            (
                r#"{"shop":"a.myshopify.com","access_token":"SECRET_A","refresh_token":"SECRET_R","expires_in":0}"#
                    .into(),
                "positive",
            ),
            (
                r#"{"shop":"a.myshopify.com","access_token":"SECRET_A","refresh_token":"SECRET_R","expires_in":-5}"#
                    .into(),
                "positive",
            ),
            (
                format!(r#"{{"shop":"a.myshopify.com",{base},"refresh_token_expires_in":0}}"#),
                "positive",
            ),
            (
                format!(r#"{{"shop":"a.myshopify.com",{base},"refresh_token_expires_at":"2020-01-01T00:00:00Z"}}"#),
                "already expired",
            ),
            (
                r#"{"shop":"a.myshopify.com","access_token":"SECRET_A","refresh_token":"SECRET_R","expires_at":"SECRET_X"}"#
                    .into(),
                "RFC 3339",
            ),
            (
                r#"{"shop":"a.myshopify.com","access_token":"SECRET_A","refresh_token":"SECRET_R","expires_at":1800000000000}"#
                    .into(),
                "milliseconds",
            ),
            (
                r#"{"shop":"a.myshopify.com","access_token":"SECRET_A","refresh_token":["SECRET_R"],"expires_in":5}"#
                    .into(),
                "must be a string",
            ),
            (format!(r#"{{"shop":"a.myshopify.com",{base},"expires_at":5}}"#), "not both"),
            (
                r#"{"shop":"a.myshopify.com","access_token":"","refresh_token":"SECRET_R","expires_in":5}"#.into(),
                "empty",
            ),
        ];
        for (line, want) in cases {
            let err = parse_line(&line, NOW).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
            assert!(!err.contains("SECRET"), "{err}");
        }
    }
}
