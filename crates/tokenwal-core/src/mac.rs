//! HMAC-SHA256, set up in one place for every use: credential fingerprints, store key ids, the
//! webhook sink's signatures, and the verification of Shopify webhooks and session tokens.

use hmac::{Hmac, Mac};
use sha2::Sha256;

fn keyed(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("hmac accepts any key length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// HMAC-SHA256 under `key` of the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    keyed(key, parts).finalize().into_bytes().into()
}

/// Whether `tag` is the HMAC-SHA256 under `key` of the concatenation of `parts`, compared in
/// constant time (a wrong length is `false`).
pub fn verify_hmac_sha256(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    keyed(key, parts).verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_concatenated_and_tags_verify() {
        // RFC 4231 test case 2.
        let tag = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert!(verify_hmac_sha256(b"Jefe", &[b"what do ya want for nothing?"], &tag));
        assert!(!verify_hmac_sha256(b"jefe", &[b"what do ya want for nothing?"], &tag));
        assert!(!verify_hmac_sha256(b"Jefe", &[b"what do ya want for nothing?"], &tag[..31]));
    }
}
