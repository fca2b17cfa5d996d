//! Local validation of App Bridge session tokens before a token exchange sends one.
//!
//! A session token is an HS256 JWT signed with the app's client secret. What the app can check
//! itself is checked here, so that a bad token is refused with nothing sent: the signature, the
//! audience (`aud` = the client id), the destination (`dest` = `https://{shop}`; `iss`, when present,
//! = `https://{shop}/admin`), and the time claims (`exp`, `nbf`) with a small leeway for clock skew.
//! Errors name the problem only, never the token or a claim's value.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use tokenwal_core::mac::verify_hmac_sha256;
use tokenwal_core::{ClientSecret, SessionToken, ShopDomain, UnixMillis};

/// Clock-skew leeway applied to `exp` and `nbf`.
pub const SESSION_TOKEN_LEEWAY: Duration = Duration::from_secs(5);

/// The longest session token accepted (real ones are well under 1 KiB).
const MAX_LEN: usize = 8 * 1024;

/// Why a session token was refused locally (nothing was sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionTokenProblem {
    /// Not a JWT: three base64url segments of JSON with the required claims (`aud`, `dest`, `exp`).
    Malformed,
    /// The header's `alg` is not HS256.
    UnsupportedAlgorithm,
    /// The signature does not verify with the app's client secret.
    BadSignature,
    /// `aud` is not this app's client id.
    WrongAudience,
    /// `dest` (or `iss`) names another shop.
    WrongShop,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
}

impl fmt::Display for SessionTokenProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionTokenProblem::Malformed => "session token is malformed",
            SessionTokenProblem::UnsupportedAlgorithm => "session token algorithm is not HS256",
            SessionTokenProblem::BadSignature => "session token signature does not verify with the client secret",
            SessionTokenProblem::WrongAudience => "session token audience is not this app's client id",
            SessionTokenProblem::WrongShop => "session token was issued for another shop",
            SessionTokenProblem::Expired => "session token has expired",
            SessionTokenProblem::NotYetValid => "session token is not valid yet",
        })
    }
}

/// What a validated session token tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Validated {
    /// `exp` plus the leeway, in unix milliseconds: the token is presented (first try or retry of a
    /// lost answer) only before this instant; the server's own clock decides within the leeway.
    pub(crate) usable_until: UnixMillis,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    aud: Audience,
    dest: String,
    #[serde(default)]
    iss: Option<String>,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
}

/// Validates `token` for `shop` and the app (`client_id`, `secret`) at `now`.
pub(crate) fn validate(
    token: &SessionToken,
    shop: &ShopDomain,
    client_id: &str,
    secret: &ClientSecret,
    now: UnixMillis,
) -> Result<Validated, SessionTokenProblem> {
    use SessionTokenProblem::*;
    let raw = token.expose_secret();
    if raw.len() > MAX_LEN {
        return Err(Malformed);
    }
    let mut parts = raw.split('.');
    let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Malformed);
    };
    let decode = |seg: &str| URL_SAFE_NO_PAD.decode(seg).map_err(|_| Malformed);
    let header: Header = serde_json::from_slice(&decode(h)?).map_err(|_| Malformed)?;
    if header.alg != "HS256" {
        return Err(UnsupportedAlgorithm);
    }
    let sig = decode(sig)?;
    // Constant-time comparison.
    if !verify_hmac_sha256(secret.expose_secret().as_bytes(), &[h.as_bytes(), b".", p.as_bytes()], &sig) {
        return Err(BadSignature);
    }
    let claims: Claims = serde_json::from_slice(&decode(p)?).map_err(|_| Malformed)?;
    let aud_ok = match &claims.aud {
        Audience::One(a) => a == client_id,
        Audience::Many(v) => v.iter().any(|a| a == client_id),
    };
    if !aud_ok {
        return Err(WrongAudience);
    }
    let expected_dest = format!("https://{}", shop.as_str());
    let dest = claims.dest.trim_end_matches('/');
    if !dest.eq_ignore_ascii_case(&expected_dest) {
        return Err(WrongShop);
    }
    if let Some(iss) = &claims.iss {
        let iss = iss.trim_end_matches('/');
        if !iss.eq_ignore_ascii_case(&format!("{expected_dest}/admin")) {
            return Err(WrongShop);
        }
    }
    let leeway = SESSION_TOKEN_LEEWAY.as_millis() as u64;
    let exp_ms = claims.exp.saturating_mul(1000);
    if now.0 >= exp_ms.saturating_add(leeway) {
        return Err(Expired);
    }
    if let Some(nbf) = claims.nbf {
        if now.0.saturating_add(leeway) < nbf.saturating_mul(1000) {
            return Err(NotYetValid);
        }
    }
    Ok(Validated { usable_until: UnixMillis(exp_ms.saturating_add(leeway)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn shop() -> ShopDomain {
        ShopDomain::parse("demo.myshopify.com").unwrap()
    }

    fn check(t: &str, now: u64) -> Result<Validated, SessionTokenProblem> {
        validate(&SessionToken::new(t), &shop(), "cid", &ClientSecret::new("secret"), UnixMillis(now))
    }

    fn sign(header: &str, claims: serde_json::Value, secret: &str) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let tag = tokenwal_core::mac::hmac_sha256(secret.as_bytes(), &[input.as_bytes()]);
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    fn claims(dest: &str, aud: serde_json::Value, exp: u64) -> serde_json::Value {
        serde_json::json!({"iss": format!("{dest}/admin"), "dest": dest, "aud": aud, "exp": exp, "nbf": NOW / 1000 - 1})
    }

    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    #[test]
    fn accepts_a_good_token_and_reports_its_expiry() {
        let t = sign(HS256, claims("https://demo.myshopify.com", "cid".into(), NOW / 1000 + 60), "secret");
        assert_eq!(check(&t, NOW), Ok(Validated { usable_until: UnixMillis(NOW + 65_000) }));
        let t = sign(
            HS256,
            claims("https://demo.myshopify.com", serde_json::json!(["x", "cid"]), NOW / 1000 + 60),
            "secret",
        );
        assert!(check(&t, NOW).is_ok());
    }

    #[test]
    fn refuses_each_problem() {
        let good = claims("https://demo.myshopify.com", "cid".into(), NOW / 1000 + 60);
        assert_eq!(check(&sign(HS256, good.clone(), "other"), NOW), Err(SessionTokenProblem::BadSignature));
        assert_eq!(
            check(&sign(r#"{"alg":"none"}"#, good.clone(), "secret"), NOW),
            Err(SessionTokenProblem::UnsupportedAlgorithm)
        );
        let aud = claims("https://demo.myshopify.com", "other-app".into(), NOW / 1000 + 60);
        assert_eq!(check(&sign(HS256, aud, "secret"), NOW), Err(SessionTokenProblem::WrongAudience));
        let dest = claims("https://evil.myshopify.com", "cid".into(), NOW / 1000 + 60);
        assert_eq!(check(&sign(HS256, dest, "secret"), NOW), Err(SessionTokenProblem::WrongShop));
        let mut iss = good.clone();
        iss["iss"] = "https://evil.myshopify.com/admin".into();
        assert_eq!(check(&sign(HS256, iss, "secret"), NOW), Err(SessionTokenProblem::WrongShop));
        let t = sign(HS256, good.clone(), "secret");
        assert_eq!(check(&t, NOW + 60_000 + 5_000), Err(SessionTokenProblem::Expired));
        assert!(check(&t, NOW + 60_000 + 4_000).is_ok(), "inside the leeway");
        assert_eq!(check(&t, NOW - 10_000), Err(SessionTokenProblem::NotYetValid));
        for bad in ["", "a.b", "a.b.c.d", "!!.??.**", &"a".repeat(MAX_LEN + 1)] {
            assert_eq!(check(bad, NOW), Err(SessionTokenProblem::Malformed), "{bad:.20}");
        }
        // Tampered claims under the original signature.
        let parts: Vec<&str> = t.split('.').collect();
        let forged =
            URL_SAFE_NO_PAD.encode(claims("https://demo.myshopify.com", "cid".into(), u64::MAX / 2000).to_string());
        assert_eq!(check(&format!("{}.{forged}.{}", parts[0], parts[2]), NOW), Err(SessionTokenProblem::BadSignature));
    }

    #[test]
    fn problems_never_echo_the_token() {
        let t = "eyJhbGciOiJIUzI1NiJ9.eyJzZWNyZXQiOiJ0b3Bfc2VjcmV0In0.c2ln";
        let e = check(t, NOW).unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(!text.contains("eyJ") && !text.contains("c2ln"), "{text}");
    }
}
