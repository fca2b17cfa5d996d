//! The one place a delivery's HMAC is set up: the sink signs with it, receivers (and the tests)
//! verify with it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokenwal_core::mac::{hmac_sha256, verify_hmac_sha256};

/// The signature of a delivery: base64 (standard, padded) of HMAC-SHA256(secret, `{timestamp}.{body}`).
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    STANDARD.encode(hmac_sha256(secret, &[timestamp.as_bytes(), b".", body]))
}

/// Verifies a delivery in constant time (for receivers written in Rust, and tests). The caller
/// should also reject timestamps too far from its clock (replays).
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], signature_b64: &str) -> bool {
    let Ok(sig) = STANDARD.decode(signature_b64) else { return false };
    verify_hmac_sha256(secret, &[timestamp.as_bytes(), b".", body], &sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_and_binds_the_timestamp() {
        let sig = signature(b"k", "1700000000", b"{}");
        assert!(verify(b"k", "1700000000", b"{}", &sig));
        assert!(!verify(b"k", "1700000001", b"{}", &sig));
        assert!(!verify(b"k2", "1700000000", b"{}", &sig));
        assert!(!verify(b"k", "1700000000", b"{ }", &sig));
        assert!(!verify(b"k", "1700000000", b"{}", "not base64!"));
    }

    /// Pinned: the documented construction (HMAC-SHA256 of `{timestamp}.{body}`, base64),
    /// computed outside Rust.
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        assert_eq!(signature(b"k", "1700000000", b"{}"), "xu9HNAM87iNnQUoJOTheygOXdUqnpZcW2nRjqSmLUUY=");
    }
}
