//! The envelope that seals a secret-bearing value at rest (format `tokenwal-store/2`).
//!
//! ```text
//! offset  size  field
//! 0       2     magic "TE"
//! 2       1     envelope version (1)
//! 3       1     slot kind: 1 grant state, 2 fingerprint key
//! 4       8     key id of the sealing key (clear)
//! 12      8     state version, u64 big-endian (clear; 0 for the fingerprint key)
//! 20      24    XChaCha20 nonce (random, OS generator)
//! 44      n+16  XChaCha20-Poly1305 ciphertext and tag of the plaintext (the grant's state frame)
//! 60+n    4     crc32 (IEEE) of bytes 0..60+n, little-endian
//! ```
//!
//! The associated data is a domain label, the slot (its kind label and, for a grant state, the grant
//! key) and bytes 0..44, so a ciphertext moved to another grant or slot, or a header edited (key id,
//! version), does not open. The CRC separates plain corruption from authentication failures and
//! lets the committer read the version for its compare-and-swap without the key.

use crate::keys::{KeyId, KeyRing};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use tokenwal_core::CodecError;
use zeroize::Zeroizing;

const MAGIC: [u8; 2] = *b"TE";
const VERSION: u8 = 1;
const HEADER: usize = 44;
const TAG: usize = 16;
const CRC: usize = 4;
const AAD_LABEL: &[u8] = b"tokenwal-store/2 sealed\0";

/// Which value an envelope holds: part of the associated data.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Slot<'a> {
    /// The state frame of this grant (key bytes).
    State(&'a [u8]),
    /// The fingerprint key in `meta`.
    FingerprintKey,
}

impl Slot<'_> {
    fn kind(self) -> u8 {
        match self {
            Slot::State(_) => 1,
            Slot::FingerprintKey => 2,
        }
    }

    fn aad(self, header: &[u8]) -> Vec<u8> {
        let (label, id): (&[u8], &[u8]) = match self {
            Slot::State(grant) => (b"grants/state", grant),
            Slot::FingerprintKey => (b"meta/fingerprint_key", b""),
        };
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + label.len() + id.len() + 10 + HEADER);
        aad.extend_from_slice(AAD_LABEL);
        aad.extend_from_slice(label);
        aad.push(0);
        aad.extend_from_slice(&(id.len() as u64).to_be_bytes());
        aad.extend_from_slice(id);
        aad.extend_from_slice(header);
        aad
    }
}

/// The clear part of an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: u8,
    pub key_id: KeyId,
    pub version: u64,
}

/// Why an envelope did not open.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The bytes are not an intact envelope, or it fails authentication (tampered, or moved from
    /// another slot).
    Corrupt(CodecError),
    /// Sealed under a key the ring does not hold.
    UnknownKey(KeyId),
}

/// Seals `plaintext` for `slot` under the ring's active key.
pub(crate) fn seal(ring: &KeyRing, slot: Slot<'_>, version: u64, plaintext: &[u8]) -> Vec<u8> {
    let key = ring.active();
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let mut out = Vec::with_capacity(HEADER + plaintext.len() + TAG + CRC);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(slot.kind());
    out.extend_from_slice(&ring.active_id().0);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&nonce);
    let aad = slot.aad(&out[..HEADER]);
    let cipher = XChaCha20Poly1305::new(key.expose_secret().into());
    let ct = cipher
        .encrypt(&nonce, Payload { msg: plaintext, aad: &aad })
        .expect("XChaCha20-Poly1305 encrypts any message below 256 GiB");
    out.extend_from_slice(&ct);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks an envelope's framing and checksum and returns its clear header. Needs no key.
pub(crate) fn header(bytes: &[u8]) -> Result<Header, CodecError> {
    if bytes.len() < HEADER + TAG + CRC {
        return Err(CodecError::Truncated { len: bytes.len() });
    }
    let found = [bytes[0], bytes[1]];
    if found != MAGIC {
        return Err(CodecError::BadMagic { found });
    }
    if bytes[2] != VERSION {
        return Err(CodecError::UnsupportedVersion(bytes[2]));
    }
    let end = bytes.len() - CRC;
    let stored = u32::from_le_bytes(bytes[end..].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok(Header {
        kind: bytes[3],
        key_id: KeyId(bytes[4..12].try_into().expect("8 bytes")),
        version: u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes")),
    })
}

/// Opens an envelope of `slot`: its header and the plaintext (zeroized on drop).
pub(crate) fn open(ring: &KeyRing, slot: Slot<'_>, bytes: &[u8]) -> Result<(Header, Zeroizing<Vec<u8>>), OpenError> {
    let h = header(bytes).map_err(OpenError::Corrupt)?;
    if h.kind != slot.kind() {
        return Err(OpenError::Corrupt(CodecError::Payload(format!(
            "sealed value of kind {} in the wrong slot",
            h.kind
        ))));
    }
    let key = ring.get(h.key_id).ok_or(OpenError::UnknownKey(h.key_id))?;
    let cipher = XChaCha20Poly1305::new(key.expose_secret().into());
    let nonce = XNonce::from_slice(&bytes[20..HEADER]);
    let aad = slot.aad(&bytes[..HEADER]);
    let pt = cipher.decrypt(nonce, Payload { msg: &bytes[HEADER..bytes.len() - CRC], aad: &aad }).map_err(|_| {
        OpenError::Corrupt(CodecError::Payload(
            "sealed value fails authentication (tampered, or moved from another grant or slot)".into(),
        ))
    })?;
    Ok((h, Zeroizing::new(pt)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::StoreKey;

    #[test]
    fn round_trip_and_binding() {
        let ring = KeyRing::ephemeral();
        let sealed = seal(&ring, Slot::State(b"shopify/a.myshopify.com"), 7, b"plaintext frame");
        assert!(!sealed.windows(9).any(|w| w == b"plaintext"));
        let (h, pt) = open(&ring, Slot::State(b"shopify/a.myshopify.com"), &sealed).unwrap();
        assert_eq!((h.version, h.key_id, pt.as_slice()), (7, ring.active_id(), &b"plaintext frame"[..]));
        assert_eq!(header(&sealed).unwrap(), h);

        // Another grant, another slot: refused.
        assert!(matches!(open(&ring, Slot::State(b"shopify/b.myshopify.com"), &sealed), Err(OpenError::Corrupt(_))));
        assert!(matches!(open(&ring, Slot::FingerprintKey, &sealed), Err(OpenError::Corrupt(_))));
        // Another key: named by id.
        let other = KeyRing::new(StoreKey::generate());
        assert!(
            matches!(open(&other, Slot::State(b"shopify/a.myshopify.com"), &sealed), Err(OpenError::UnknownKey(id)) if id == ring.active_id())
        );
        // Any flipped bit: corrupt (CRC), and with the CRC fixed up: corrupt (tag).
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open(&ring, Slot::State(b"shopify/a.myshopify.com"), &bad).is_err(), "byte {i}");
            let end = bad.len() - CRC;
            if i >= end {
                continue; // the checksum itself: fixing it up restores the original
            }
            let crc = crc32fast::hash(&bad[..end]).to_le_bytes();
            bad[end..].copy_from_slice(&crc);
            match open(&ring, Slot::State(b"shopify/a.myshopify.com"), &bad) {
                Err(OpenError::Corrupt(_)) => {}
                Err(OpenError::UnknownKey(_)) if (4..12).contains(&i) => {}
                other => panic!("byte {i}: {other:?}"),
            }
        }
    }

    // "Nothing panics on any byte sequence": opening arbitrary bytes, truncations, extensions and
    // bit flips of valid envelopes (with and without the CRC fixed up) yields a clear error, never
    // a panic and never a plaintext.
    mod hostile {
        use super::*;
        use proptest::prelude::*;

        const GRANT: &[u8] = b"shopify/a.myshopify.com";

        fn slot(state: bool) -> Slot<'static> {
            if state {
                Slot::State(GRANT)
            } else {
                Slot::FingerprintKey
            }
        }

        fn ring() -> &'static KeyRing {
            static RING: std::sync::OnceLock<KeyRing> = std::sync::OnceLock::new();
            RING.get_or_init(KeyRing::insecure_test_ring)
        }

        /// Opening must fail, with an error that names the problem.
        fn refused(bytes: &[u8], slot: Slot<'_>) -> OpenError {
            match open(ring(), slot, bytes) {
                Ok((h, _)) => panic!("altered envelope opened (header {h:?})"),
                Err(e) => {
                    let msg = match &e {
                        OpenError::Corrupt(c) => c.to_string(),
                        OpenError::UnknownKey(id) => format!("key {id}"),
                    };
                    assert!(!msg.is_empty());
                    e
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..200), state: bool) {
                let _ = header(&bytes);
                refused(&bytes, slot(state));
            }

            #[test]
            fn arbitrary_bytes_behind_a_valid_prefix_never_open(
                tail in proptest::collection::vec(any::<u8>(), 0..200),
                state: bool,
                fix_crc: bool,
            ) {
                // A plausible header (magic, version, kind, the ring's key id): the fuzz reaches the AEAD.
                let mut bytes = Vec::from(&MAGIC[..]);
                bytes.push(VERSION);
                bytes.push(slot(state).kind());
                bytes.extend_from_slice(&ring().active_id().0);
                bytes.extend_from_slice(&tail);
                if fix_crc && bytes.len() >= HEADER + TAG + CRC {
                    let end = bytes.len() - CRC;
                    let crc = crc32fast::hash(&bytes[..end]).to_le_bytes();
                    bytes[end..].copy_from_slice(&crc);
                }
                refused(&bytes, slot(state));
            }

            #[test]
            fn truncated_or_extended_envelopes_never_open(
                plain in proptest::collection::vec(any::<u8>(), 0..100),
                state: bool,
                cut in any::<prop::sample::Index>(),
                extra in proptest::collection::vec(any::<u8>(), 1..8),
                fix_crc: bool,
            ) {
                let sealed = seal(ring(), slot(state), 3, &plain);
                let (_, pt) = open(ring(), slot(state), &sealed).unwrap();
                prop_assert_eq!(pt.as_slice(), plain.as_slice());
                let mut short = sealed[..cut.index(sealed.len())].to_vec();
                let mut long = [&sealed[..], &extra[..]].concat();
                for bytes in [&mut short, &mut long] {
                    if fix_crc && bytes.len() >= HEADER + TAG + CRC {
                        let end = bytes.len() - CRC;
                        let crc = crc32fast::hash(&bytes[..end]).to_le_bytes();
                        bytes[end..].copy_from_slice(&crc);
                    }
                    prop_assert!(matches!(refused(bytes, slot(state)), OpenError::Corrupt(_)));
                }
            }

            #[test]
            fn flipped_envelopes_never_open(
                plain in proptest::collection::vec(any::<u8>(), 0..100),
                state: bool,
                at in any::<prop::sample::Index>(),
                bit in 0u8..8,
                fix_crc: bool,
            ) {
                let sealed = seal(ring(), slot(state), 9, &plain);
                let i = at.index(sealed.len());
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                let end = bad.len() - CRC;
                if fix_crc && i < end {
                    let crc = crc32fast::hash(&bad[..end]).to_le_bytes();
                    bad[end..].copy_from_slice(&crc);
                }
                match refused(&bad, slot(state)) {
                    OpenError::Corrupt(_) => {}
                    // A flipped key id (with the CRC fixed up) names a key the ring lacks.
                    OpenError::UnknownKey(_) => prop_assert!(fix_crc && (4..12).contains(&i)),
                }
            }
        }
    }
}
