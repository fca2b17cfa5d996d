//! App Bridge session tokens: HS256 JWTs signed with the app's client secret.
//!
//! Shopify's token-exchange grant takes such a token as `subject_token`. The simulator mints
//! them for tests ([`mint_session_token`]) and validates them the way the token endpoint is
//! documented to: signature, audience, destination shop and the time claims.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Makes `jti`/`sid` unique across calls within one process without touching any RNG that
/// drives reproducible token strings.
static MINT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Mints an App Bridge session token for `shop` as Shopify would hand it to an embedded app.
///
/// Claims: `iss=https://{shop}/admin`, `dest=https://{shop}`, `aud=client_id`, `sub`, `iat`,
/// `nbf` (both `now_ms` in seconds), `exp` (`now_ms + lifetime_ms` in seconds), and unique
/// `jti` and `sid`. Signed HS256 with `client_secret`.
///
/// ```
/// let t = tokenwal_sim::mint_session_token("a.myshopify.com", "id", "secret", 1_000_000, 60_000);
/// assert_eq!(t.split('.').count(), 3);
/// ```
pub fn mint_session_token(shop: &str, client_id: &str, client_secret: &str, now_ms: u64, lifetime_ms: u64) -> String {
    let n = MINT_COUNTER.fetch_add(1, Ordering::Relaxed);
    let iat = now_ms / 1000;
    let exp = now_ms.saturating_add(lifetime_ms) / 1000;
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": format!("https://{shop}/admin"),
        "dest": format!("https://{shop}"),
        "aud": client_id,
        "sub": "1",
        "exp": exp,
        "nbf": iat,
        "iat": iat,
        "jti": format!("sim-jti-{now_ms:x}-{n}"),
        "sid": format!("sim-sid-{n}"),
    });
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let sig = sign(client_secret, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn mac(secret: &str) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    HmacSha256::new_from_slice(secret.as_bytes()).expect("hmac accepts any key length")
}

fn sign(secret: &str, input: &[u8]) -> Vec<u8> {
    let mut m = mac(secret);
    m.update(input);
    m.finalize().into_bytes().to_vec()
}

/// Why a session token was refused. The token endpoint answers all of them with
/// 400 `invalid_subject_token`; the variants exist for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionTokenError {
    /// Not three base64url segments of JSON.
    #[error("session token is malformed")]
    Malformed,
    /// The header names an algorithm other than HS256.
    #[error("session token algorithm is not HS256")]
    UnsupportedAlgorithm,
    /// The HMAC does not match the client secret.
    #[error("session token signature is invalid")]
    BadSignature,
    /// `aud` is not the presenting app's client id.
    #[error("session token audience does not match the client")]
    WrongAudience,
    /// `dest` is not `https://{shop}` for the shop the request was sent to.
    #[error("session token destination does not match the shop")]
    WrongDestination,
    /// `exp` has passed.
    #[error("session token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("session token is not yet valid")]
    NotYetValid,
}

/// The claims the simulator checks, as read from a validated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    /// `dest` claim, `https://{shop}`.
    pub dest: String,
    /// `sub` claim (the user id), when present.
    pub sub: Option<String>,
    /// `exp` claim, unix seconds.
    pub exp: u64,
    /// `nbf` claim, unix seconds (0 when absent).
    pub nbf: u64,
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
struct RawClaims {
    aud: Audience,
    dest: String,
    exp: u64,
    #[serde(default)]
    nbf: u64,
    #[serde(default)]
    sub: Option<String>,
}

/// Validates a session token presented to `shop` by `client_id`, at time `now_ms`.
///
/// `leeway_ms` widens both time checks (`exp` and `nbf`). Checks run in the order
/// structure, algorithm, signature, audience, destination, expiry, not-before.
pub fn validate_session_token(
    token: &str,
    shop: &str,
    client_id: &str,
    client_secret: &str,
    now_ms: u64,
    leeway_ms: u64,
) -> Result<SessionClaims, SessionTokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(SessionTokenError::Malformed);
    };
    let decode = |seg: &str| URL_SAFE_NO_PAD.decode(seg).map_err(|_| SessionTokenError::Malformed);
    let header: Header = serde_json::from_slice(&decode(h)?).map_err(|_| SessionTokenError::Malformed)?;
    if header.alg != "HS256" {
        return Err(SessionTokenError::UnsupportedAlgorithm);
    }
    let sig = decode(s)?;
    let mut m = mac(client_secret);
    m.update(h.as_bytes());
    m.update(b".");
    m.update(p.as_bytes());
    m.verify_slice(&sig).map_err(|_| SessionTokenError::BadSignature)?;
    let claims: RawClaims = serde_json::from_slice(&decode(p)?).map_err(|_| SessionTokenError::Malformed)?;
    let aud_ok = match &claims.aud {
        Audience::One(a) => a == client_id,
        Audience::Many(v) => v.iter().any(|a| a == client_id),
    };
    if !aud_ok {
        return Err(SessionTokenError::WrongAudience);
    }
    if claims.dest != format!("https://{shop}") {
        return Err(SessionTokenError::WrongDestination);
    }
    if now_ms >= claims.exp.saturating_mul(1000).saturating_add(leeway_ms) {
        return Err(SessionTokenError::Expired);
    }
    if now_ms.saturating_add(leeway_ms) < claims.nbf.saturating_mul(1000) {
        return Err(SessionTokenError::NotYetValid);
    }
    Ok(SessionClaims { dest: claims.dest, sub: claims.sub, exp: claims.exp, nbf: claims.nbf })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = "demo.myshopify.com";
    const NOW: u64 = 1_800_000_000_000;

    fn check(token: &str, now: u64) -> Result<SessionClaims, SessionTokenError> {
        validate_session_token(token, SHOP, "cid", "secret", now, 0)
    }

    #[test]
    fn minted_token_validates() {
        let t = mint_session_token(SHOP, "cid", "secret", NOW, 60_000);
        let claims = check(&t, NOW).unwrap();
        assert_eq!(claims.dest, "https://demo.myshopify.com");
        assert_eq!(claims.exp, NOW / 1000 + 60);
        assert_eq!(check(&t, NOW + 59_999), Ok(claims));
    }

    #[test]
    fn minted_tokens_are_unique() {
        let a = mint_session_token(SHOP, "cid", "secret", NOW, 60_000);
        let b = mint_session_token(SHOP, "cid", "secret", NOW, 60_000);
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_each_failure() {
        let t = mint_session_token(SHOP, "cid", "secret", NOW, 60_000);
        assert_eq!(validate_session_token(&t, SHOP, "cid", "other", NOW, 0), Err(SessionTokenError::BadSignature));
        let wrong_aud = mint_session_token(SHOP, "other-app", "secret", NOW, 60_000);
        assert_eq!(check(&wrong_aud, NOW), Err(SessionTokenError::WrongAudience));
        let wrong_shop = mint_session_token("x.myshopify.com", "cid", "secret", NOW, 60_000);
        assert_eq!(check(&wrong_shop, NOW), Err(SessionTokenError::WrongDestination));
        assert_eq!(check(&t, NOW + 60_000), Err(SessionTokenError::Expired));
        assert_eq!(check(&t, NOW - 1_000), Err(SessionTokenError::NotYetValid));
        assert!(validate_session_token(&t, SHOP, "cid", "secret", NOW + 60_000, 1_000).is_ok());
        assert_eq!(check("a.b", NOW), Err(SessionTokenError::Malformed));
        assert_eq!(check("a.b.c.d", NOW), Err(SessionTokenError::Malformed));
        assert_eq!(check("!!.??.**", NOW), Err(SessionTokenError::Malformed));
    }

    #[test]
    fn rejects_tampered_claims_and_other_algorithms() {
        let t = mint_session_token(SHOP, "cid", "secret", NOW, 60_000);
        let parts: Vec<&str> = t.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD
            .encode(serde_json::json!({"aud":"cid","dest":format!("https://{SHOP}"),"exp":u64::MAX/2000}).to_string());
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert_eq!(check(&forged, NOW), Err(SessionTokenError::BadSignature));

        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert_eq!(check(&unsigned, NOW), Err(SessionTokenError::UnsupportedAlgorithm));
    }

    #[test]
    fn accepts_audience_arrays() {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"aud":["x","cid"],"dest":format!("https://{SHOP}"),"exp":NOW/1000+10}).to_string(),
        );
        let input = format!("{header}.{claims}");
        let sig = URL_SAFE_NO_PAD.encode(sign("secret", input.as_bytes()));
        assert!(check(&format!("{input}.{sig}"), NOW).is_ok());
    }
}
