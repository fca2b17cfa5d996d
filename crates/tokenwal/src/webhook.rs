//! Helpers for apps that forward Shopify webhooks (`app/uninstalled`, `app/scopes_update`) to tokenwal.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokenwal_core::mac::verify_hmac_sha256;
use tokenwal_core::ClientSecret;

/// Whether `header_b64` (the `X-Shopify-Hmac-Sha256` header: base64 of HMAC-SHA256 of the raw request
/// body under the app's client secret) authenticates `body`. Compares in constant time. Verify the
/// **raw** body bytes, before any JSON parsing. A missing, malformed or wrong header is `false`.
pub fn verify_shopify_hmac(secret: &ClientSecret, body: &[u8], header_b64: &str) -> bool {
    let Ok(expected) = STANDARD.decode(header_b64.trim()) else { return false };
    verify_hmac_sha256(secret.expose_secret().as_bytes(), &[body], &expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, body: &[u8]) -> String {
        STANDARD.encode(tokenwal_core::mac::hmac_sha256(secret.as_bytes(), &[body]))
    }

    #[test]
    fn verifies_and_refuses() {
        let secret = ClientSecret::new("hush");
        let body = br#"{"id":1,"domain":"demo.myshopify.com"}"#;
        let header = sign("hush", body);
        assert!(verify_shopify_hmac(&secret, body, &header));
        assert!(verify_shopify_hmac(&secret, body, &format!(" {header}\n")));
        assert!(!verify_shopify_hmac(&secret, b"{\"id\":2}", &header), "another body");
        assert!(!verify_shopify_hmac(&ClientSecret::new("other"), body, &header), "another secret");
        assert!(!verify_shopify_hmac(&secret, body, ""), "no header");
        assert!(!verify_shopify_hmac(&secret, body, "not base64!"), "garbage");
        assert!(!verify_shopify_hmac(&secret, body, &header[..header.len() - 4]), "truncated");
        let mut flipped = STANDARD.decode(&header).unwrap();
        flipped[0] ^= 1;
        assert!(!verify_shopify_hmac(&secret, body, &STANDARD.encode(flipped)), "one bit off");
    }
}
