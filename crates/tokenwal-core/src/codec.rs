//! The on-disk frame of journal records and grant states.
//!
//! ```text
//! offset  size  field
//! 0       2     magic: b"TR" (journal record) or b"TS" (grant state)
//! 2       1     format version of the payload
//! 3       4     payload length, u32 little-endian (at most MAX_PAYLOAD)
//! 7       n     payload: bincode 2.0.1, serde mode, `standard()` config (varint, little-endian)
//! 7+n     4     crc32 (IEEE) of bytes 0..7+n, u32 little-endian
//! ```
//!
//! A torn or corrupt frame reads as a bad magic, a bad length or a bad checksum: never as a different
//! value. Golden-byte tests in this module pin the exact bytes of versions 1 and 2.
//!
//! # Versions
//!
//! * 1 — initial format.
//! * 2 — [`Record::ScopesUpdated`], [`crate::record::Phase::NotInstalled`] (appended variants: every
//!   version-1 record payload decodes unchanged), and the grant state's `acquisition` and
//!   `acquired_at` fields (a version-1 state decodes through its own shape, with both `None`).

use crate::record::{GrantState, GrantStateV1, Record};
use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::{de::DeserializeOwned, Serialize};

/// Magic of a journal record frame.
pub const RECORD_MAGIC: [u8; 2] = *b"TR";
/// Magic of a grant state frame.
pub const STATE_MAGIC: [u8; 2] = *b"TS";
/// Current payload version of [`Record`].
pub const RECORD_VERSION: u8 = 2;
/// Current payload version of [`GrantState`].
pub const STATE_VERSION: u8 = 2;
/// The largest payload accepted, in bytes. Token sets are a few hundred bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;
const HEADER: usize = 7;
const TRAILER: usize = 4;

/// The one bincode configuration used for every encode and decode.
const CONFIG: Configuration<LittleEndian, Varint, Limit<MAX_PAYLOAD>> =
    bincode::config::standard().with_limit::<MAX_PAYLOAD>();

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Fewer bytes than a frame's header and trailer.
    #[error("frame truncated: {len} bytes")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// The magic is not the expected one.
    #[error("bad frame magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 2],
    },
    /// A version this build cannot read (written by a newer tokenwal?).
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    /// The declared length disagrees with the bytes present.
    #[error("frame length mismatch: declared {declared} payload bytes, {actual} present")]
    LengthMismatch {
        /// Declared payload length.
        declared: usize,
        /// Payload bytes present.
        actual: usize,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The checksum does not match: the frame is corrupt.
    #[error("frame checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        /// Stored crc32.
        stored: u32,
        /// Computed crc32.
        computed: u32,
    },
    /// The checksum matched but the payload does not decode (a bug or a format mix-up).
    #[error("frame payload does not decode: {0}")]
    Payload(String),
    /// Encoding failed (a value over the size limit).
    #[error("value does not encode: {0}")]
    Encode(String),
}

fn encode_frame<T: Serialize>(magic: [u8; 2], version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(value, CONFIG).map_err(|e| CodecError::Encode(e.to_string()))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(CodecError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(&magic);
    out.push(version);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks a frame and returns (version, payload).
fn open_frame(magic: [u8; 2], bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    if bytes.len() < HEADER + TRAILER {
        return Err(CodecError::Truncated { len: bytes.len() });
    }
    let found = [bytes[0], bytes[1]];
    if found != magic {
        return Err(CodecError::BadMagic { found });
    }
    let version = bytes[2];
    let declared = u32::from_le_bytes([bytes[3], bytes[4], bytes[5], bytes[6]]) as usize;
    if declared > MAX_PAYLOAD {
        return Err(CodecError::TooLarge(declared));
    }
    let actual = bytes.len() - HEADER - TRAILER;
    if declared != actual {
        return Err(CodecError::LengthMismatch { declared, actual });
    }
    let body_end = HEADER + declared;
    let stored = u32::from_le_bytes([bytes[body_end], bytes[body_end + 1], bytes[body_end + 2], bytes[body_end + 3]]);
    let computed = crc32fast::hash(&bytes[..body_end]);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok((version, &bytes[HEADER..body_end]))
}

fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(payload, CONFIG).map_err(|e| CodecError::Payload(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Payload(format!("{} trailing bytes", payload.len() - used)));
    }
    Ok(value)
}

/// Encodes a journal record as a frame.
pub fn encode_record(r: &Record) -> Result<Vec<u8>, CodecError> {
    encode_frame(RECORD_MAGIC, RECORD_VERSION, r)
}

/// Decodes a journal record frame. Never panics, whatever the bytes.
pub fn decode_record(bytes: &[u8]) -> Result<Record, CodecError> {
    match open_frame(RECORD_MAGIC, bytes)? {
        // Version 2 only appended variants: a version-1 payload is a valid version-2 payload.
        (1 | 2, payload) => decode_payload(payload),
        (v, _) => Err(CodecError::UnsupportedVersion(v)),
    }
}

/// Encodes a grant state as a frame.
pub fn encode_state(s: &GrantState) -> Result<Vec<u8>, CodecError> {
    encode_frame(STATE_MAGIC, STATE_VERSION, s)
}

/// Decodes a grant state frame. Never panics, whatever the bytes.
pub fn decode_state(bytes: &[u8]) -> Result<GrantState, CodecError> {
    match open_frame(STATE_MAGIC, bytes)? {
        (1, payload) => decode_payload::<GrantStateV1>(payload).map(GrantState::from),
        (2, payload) => decode_payload(payload),
        (v, _) => Err(CodecError::UnsupportedVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AttemptId, Fingerprint, Generation, GrantKey, ShopDomain, TokenSet};
    use crate::record::{Acquisition, AmbiguityReason, AttemptKind, Phase, Subject};
    use crate::secret::{AccessToken, LegacyToken, RefreshToken};
    use crate::time::UnixMillis;

    fn grant() -> GrantKey {
        GrantKey::shopify(&ShopDomain::parse("a.myshopify.com").unwrap())
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn intent() -> Record {
        Record::Intent {
            grant: grant(),
            at: UnixMillis(1_800_000_000_000),
            attempt: AttemptId(7),
            generation: Generation(3),
            kind: AttemptKind::Refresh,
            presented: Fingerprint([0xab; 16]),
        }
    }

    /// Pins version 2 of the record frame. If this fails, the on-disk format changed: bump the
    /// version, keep the old decoder, and record the change in docs/journal.md.
    #[test]
    fn golden_intent_record() {
        let r = intent();
        let bytes = encode_record(&r).unwrap();
        assert_eq!(hex(&bytes), GOLDEN_INTENT_V2);
        assert_eq!(decode_record(&bytes).unwrap(), r);
    }

    const GOLDEN_INTENT_V2: &str =
        "54520235000000010773686f706966790f612e6d7973686f706966792e636f6dfd00505c18a3010000070300abababababababababababababababab1cae8c5c";

    /// Version-1 frames written by earlier releases stay readable.
    #[test]
    fn version_1_records_still_decode() {
        let v1 = unhex(
            "54520135000000010773686f706966790f612e6d7973686f706966792e636f6dfd00505c18a3010000070300ababababababababababababababababa9bec583",
        );
        assert_eq!(decode_record(&v1).unwrap(), intent());
        let v1 =
            unhex("54520126000000050773686f706966790f612e6d7973686f706966792e636f6d010100fb080201057265712d31fe160f8f");
        assert_eq!(decode_record(&v1).unwrap(), ambiguous());
    }

    fn ambiguous() -> Record {
        Record::Ambiguous {
            grant: grant(),
            at: UnixMillis(1),
            attempt: AttemptId(1),
            why: AmbiguityReason::ServerError { status: 520 },
            request_id: Some("req-1".into()),
        }
    }

    #[test]
    fn golden_ambiguous_record() {
        let bytes = encode_record(&ambiguous()).unwrap();
        assert_eq!(hex(&bytes), GOLDEN_AMBIGUOUS_V2);
    }

    const GOLDEN_AMBIGUOUS_V2: &str =
        "54520226000000050773686f706966790f612e6d7973686f706966792e636f6d010100fb080201057265712d31f30d3b46";

    #[test]
    fn golden_scopes_updated_record() {
        let r = Record::ScopesUpdated { grant: grant(), at: UnixMillis(5), scope: "read_orders".into() };
        let bytes = encode_record(&r).unwrap();
        assert_eq!(hex(&bytes), GOLDEN_SCOPES_V2);
        assert_eq!(decode_record(&bytes).unwrap(), r);
    }

    const GOLDEN_SCOPES_V2: &str =
        "545202260000000b0773686f706966790f612e6d7973686f706966792e636f6d050b726561645f6f7264657273cf0b8b03";

    fn state() -> GrantState {
        GrantState {
            grant: grant(),
            version: 2,
            generation: Generation(1),
            tokens: Some(TokenSet {
                access_token: AccessToken::new("shpat_a"),
                access_expires_at: UnixMillis(3_600_000),
                refresh_token: RefreshToken::new("shprt_r"),
                refresh_expires_at: Some(UnixMillis(7_776_000_000)),
                scope: Some("read_orders".into()),
            }),
            phase: Phase::Healthy,
            next_attempt: 1,
            credential_first_presented_at: None,
            consecutive_failures: 0,
            not_before: None,
            updated_at: UnixMillis(0),
            acquisition: None,
            acquired_at: None,
        }
    }

    #[test]
    fn golden_state() {
        let s = state();
        let bytes = encode_state(&s).unwrap();
        assert_eq!(&bytes[..3], b"TS\x02");
        assert_eq!(decode_state(&bytes).unwrap(), s);
        assert_eq!(hex(&bytes), GOLDEN_STATE_V2);
    }

    const GOLDEN_STATE_V2: &str =
        "5453024f0000000773686f706966790f612e6d7973686f706966792e636f6d0201010773687061745f61fc80ee36000773687072745f7201fd00587ccf01000000010b726561645f6f72646572730001000000000000d4f6e742";

    /// A migration in flight: the legacy token is durable in the state (and only there).
    #[test]
    fn golden_state_with_acquisition() {
        let s = GrantState {
            tokens: None,
            generation: Generation(0),
            phase: Phase::Refreshing {
                attempt: AttemptId(1),
                kind: AttemptKind::Migration,
                presented: Fingerprint([0xcd; 16]),
                started_at: UnixMillis(9),
                resolving: None,
            },
            acquisition: Some(Acquisition {
                subject: Subject::LegacyToken { token: LegacyToken::new("shpat_legacy") },
                prior: Phase::NotInstalled { since: UnixMillis(9) },
            }),
            acquired_at: Some(UnixMillis(8)),
            ..state()
        };
        let bytes = encode_state(&s).unwrap();
        assert_eq!(decode_state(&bytes).unwrap(), s);
        assert_eq!(hex(&bytes), GOLDEN_STATE_ACQ_V2);
    }

    const GOLDEN_STATE_ACQ_V2: &str =
        "545302480000000773686f706966790f612e6d7973686f706966792e636f6d020000010102cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd0900010000000001010c73687061745f6c65676163790509010836479d30";

    /// Version-1 states written by earlier releases decode, with no acquisition and an unknown
    /// acquisition time.
    #[test]
    fn version_1_states_still_decode() {
        let v1 = unhex(
            "5453014d0000000773686f706966790f612e6d7973686f706966792e636f6d0201010773687061745f61fc80ee3600\
             0773687072745f7201fd00587ccf01000000010b726561645f6f7264657273000100000000b0c72d55",
        );
        assert_eq!(decode_state(&v1).unwrap(), state());
        // A version-2 payload under a version-1 header is not silently misread.
        let mut v2 = encode_state(&state()).unwrap();
        v2[2] = 1;
        let n = v2.len() - 4;
        let crc = crc32fast::hash(&v2[..n]).to_le_bytes();
        v2[n..].copy_from_slice(&crc);
        assert!(decode_state(&v2).is_err());
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let r = Record::Uninstalled { grant: grant(), at: UnixMillis(99) };
        let bytes = encode_record(&r).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode_record(&b).is_err(), "flip of bit {i} went undetected");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let r = Record::Uninstalled { grant: grant(), at: UnixMillis(99) };
        let bytes = encode_record(&r).unwrap();
        for n in 0..bytes.len() {
            assert!(decode_record(&bytes[..n]).is_err(), "truncation to {n} bytes went undetected");
        }
    }

    #[test]
    fn kinds_are_not_interchangeable() {
        let r = Record::Uninstalled { grant: grant(), at: UnixMillis(99) };
        let bytes = encode_record(&r).unwrap();
        assert!(matches!(decode_state(&bytes), Err(CodecError::BadMagic { .. })));
    }

    #[test]
    fn future_versions_are_refused() {
        let r = Record::Uninstalled { grant: grant(), at: UnixMillis(99) };
        let mut bytes = encode_record(&r).unwrap();
        bytes[2] = 3;
        let n = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..n]).to_le_bytes();
        bytes[n..].copy_from_slice(&crc);
        assert_eq!(decode_record(&bytes), Err(CodecError::UnsupportedVersion(3)));
    }
}
