//! Dead letters: what an at-least-once journal consumer (the webhook sink) gave up delivering.
//!
//! A consumer that exhausted its attempts on one item writes a [`DeadLetter`] holding everything
//! needed to deliver it again, **then** moves its cursor past the item. Both writes go to the
//! `meta` tree outside the commit groups and are synced before they return, as
//! [`Store::set_cursor`] is, so the cursor is never durable before the letter: a crash between the
//! two leaves the letter with the cursor still on its item, and the consumer, meeting an item that
//! already has a letter, moves on without writing a second one. Nothing is lost, and a letter is
//! never duplicated (one key per consumer and LSN).
//!
//! Keys: `dead_letter/{consumer}/` ‖ LSN (u64 BE), so one consumer's letters scan in LSN order and
//! never mix with another's or with the `cursor/` keys. Value, a self-checking frame:
//!
//! ```text
//! offset  size  field
//! 0       2     magic "TD"
//! 2       1     version (1)
//! 3       4     body length n, u32 little-endian, at most MAX_BODY
//! 7       n     body:
//!                 8  lsn, u64 LE (must equal the key's)
//!                 4  attempts so far, u32 LE
//!                 8  first given up at, unix ms, u64 LE
//!                 8  last attempt at, unix ms, u64 LE
//!                 2  e: last error's length, u16 LE (at most 256)
//!                 e  last error, UTF-8 (a status or an error class: never a body or a secret)
//!                 4  p: payload length, u32 LE
//!                 p  payload: the item as it is delivered (the webhook event's JSON body)
//! 7+n     4     crc32 (IEEE) of bytes 0..7+n, u32 little-endian
//! ```
//!
//! A torn or corrupt letter reads as [`StoreError::Corrupt`] naming it (`meta/dead_letter/{consumer}/{lsn}`),
//! never as another letter, and listing reports it next to the others instead of stopping.

use crate::backend::{Backend, DurableBackend};
use crate::error::StoreError;
use crate::layout::{self, Tree};
use crate::Store;
use tokenwal_core::{CodecError, UnixMillis};

/// The `meta` key prefix of dead letters.
pub const META_DEAD_LETTER_PREFIX: &[u8] = b"dead_letter/";
/// Magic of a dead-letter frame.
pub const DEAD_LETTER_MAGIC: [u8; 2] = *b"TD";
/// Current version of the dead-letter frame.
pub const DEAD_LETTER_VERSION: u8 = 1;
/// The largest body accepted, in bytes (a webhook event is a few hundred).
pub const MAX_BODY: usize = 64 * 1024;
/// The longest `last_error` kept, in bytes.
pub const MAX_ERROR: usize = 256;
const HEADER: usize = 7;
const TRAILER: usize = 4;
const FIXED: usize = 8 + 4 + 8 + 8 + 2 + 4;

/// One item a consumer gave up on, with what it takes to deliver it again.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DeadLetter {
    /// The journal LSN of the record the item came from.
    pub lsn: u64,
    /// Delivery attempts so far (the consumer's, then every replay's).
    pub attempts: u32,
    /// When the consumer first gave up.
    pub first_failed_at: UnixMillis,
    /// When the last attempt was made.
    pub last_attempt_at: UnixMillis,
    /// Why the last attempt failed (a status or an error class; truncated to [`MAX_ERROR`] bytes).
    pub last_error: String,
    /// The item exactly as delivered (for the webhook sink, the event's JSON body: no secret).
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// The frame stored for this letter.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut err = self.last_error.as_str();
        if err.len() > MAX_ERROR {
            let mut end = MAX_ERROR;
            while !err.is_char_boundary(end) {
                end -= 1;
            }
            err = &err[..end];
        }
        let n = FIXED + err.len() + self.payload.len();
        if n > MAX_BODY {
            return Err(CodecError::TooLarge(n));
        }
        let mut out = Vec::with_capacity(HEADER + n + TRAILER);
        out.extend_from_slice(&DEAD_LETTER_MAGIC);
        out.push(DEAD_LETTER_VERSION);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&self.lsn.to_le_bytes());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.first_failed_at.0.to_le_bytes());
        out.extend_from_slice(&self.last_attempt_at.0.to_le_bytes());
        out.extend_from_slice(&(err.len() as u16).to_le_bytes());
        out.extend_from_slice(err.as_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        out.extend_from_slice(&crc32fast::hash(&out).to_le_bytes());
        Ok(out)
    }

    /// Checks and decodes a frame. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<DeadLetter, CodecError> {
        if bytes.len() < HEADER + TRAILER {
            return Err(CodecError::Truncated { len: bytes.len() });
        }
        let found = [bytes[0], bytes[1]];
        if found != DEAD_LETTER_MAGIC {
            return Err(CodecError::BadMagic { found });
        }
        let declared = u32::from_le_bytes(arr(&bytes[3..7])) as usize;
        if declared > MAX_BODY {
            return Err(CodecError::TooLarge(declared));
        }
        let actual = bytes.len() - HEADER - TRAILER;
        if declared != actual {
            return Err(CodecError::LengthMismatch { declared, actual });
        }
        let end = HEADER + declared;
        let stored = u32::from_le_bytes(arr(&bytes[end..]));
        let computed = crc32fast::hash(&bytes[..end]);
        if stored != computed {
            return Err(CodecError::Checksum { stored, computed });
        }
        if bytes[2] != DEAD_LETTER_VERSION {
            return Err(CodecError::UnsupportedVersion(bytes[2]));
        }
        let mut r = Reader(&bytes[HEADER..end]);
        let lsn = u64::from_le_bytes(arr(r.take(8)?));
        let attempts = u32::from_le_bytes(arr(r.take(4)?));
        let first_failed_at = UnixMillis(u64::from_le_bytes(arr(r.take(8)?)));
        let last_attempt_at = UnixMillis(u64::from_le_bytes(arr(r.take(8)?)));
        let e = u16::from_le_bytes(arr(r.take(2)?)) as usize;
        if e > MAX_ERROR {
            return Err(CodecError::Payload(format!("last error of {e} bytes")));
        }
        let last_error = String::from_utf8(r.take(e)?.to_vec())
            .map_err(|_| CodecError::Payload("last error is not UTF-8".into()))?;
        let p = u32::from_le_bytes(arr(r.take(4)?)) as usize;
        let payload = r.take(p)?.to_vec();
        if !r.0.is_empty() {
            return Err(CodecError::Payload(format!("{} trailing bytes", r.0.len())));
        }
        Ok(DeadLetter { lsn, attempts, first_failed_at, last_attempt_at, last_error, payload })
    }
}

/// A fixed-size array from a slice of exactly that size (callers slice exactly).
fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Payload(format!("body ends {} bytes early", n - self.0.len())));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

/// Consumer names are cursor names: `[a-z0-9_-]{1,64}` (so `/` ends the name in a key).
fn prefix(consumer: &str) -> Result<Vec<u8>, StoreError> {
    let ok = !consumer.is_empty()
        && consumer.len() <= 64
        && consumer.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        return Err(StoreError::InvalidBatch { reason: "a consumer name must match [a-z0-9_-]{1,64}" });
    }
    let mut k = META_DEAD_LETTER_PREFIX.to_vec();
    k.extend_from_slice(consumer.as_bytes());
    k.push(b'/');
    Ok(k)
}

/// The `meta` key of `consumer`'s dead letter for `lsn` (for tools and tests that inspect or damage
/// one directly).
pub fn dead_letter_key(consumer: &str, lsn: u64) -> Result<Vec<u8>, StoreError> {
    let mut k = prefix(consumer)?;
    k.extend_from_slice(&lsn.to_be_bytes());
    Ok(k)
}

/// The name of a letter in errors: `meta/dead_letter/{consumer}/{lsn}`.
fn what(consumer: &str, lsn: Option<u64>) -> String {
    match lsn {
        Some(l) => format!("{}/dead_letter/{consumer}/{l}", layout::META),
        None => format!("{}/dead_letter/{consumer}/(bad key)", layout::META),
    }
}

fn decode_at(consumer: &str, lsn: Option<u64>, v: &[u8]) -> Result<DeadLetter, StoreError> {
    let corrupt = |source| StoreError::Corrupt { what: what(consumer, lsn), source };
    let letter = DeadLetter::decode(v).map_err(corrupt)?;
    match lsn {
        Some(l) if l == letter.lsn => Ok(letter),
        _ => Err(corrupt(CodecError::Payload(format!("letter of lsn {} under another key", letter.lsn)))),
    }
}

impl Store {
    /// Writes (or replaces) `consumer`'s dead letter for `letter.lsn` and returns once it is
    /// durable. Blocking: from async code call it inside `spawn_blocking`. Written like a cursor
    /// (outside the commit groups, then synced); a failed write or sync poisons the store.
    pub fn put_dead_letter(&self, consumer: &str, letter: &DeadLetter) -> Result<(), StoreError> {
        self.check()?;
        let k = dead_letter_key(consumer, letter.lsn)?;
        let v = letter.encode()?;
        self.meta_put_durable(&k, Some(&v))
    }

    /// Removes `consumer`'s dead letter for `lsn` (delivered at last), durable on return. Removing
    /// one that does not exist is not an error.
    pub fn delete_dead_letter(&self, consumer: &str, lsn: u64) -> Result<(), StoreError> {
        self.check()?;
        let k = dead_letter_key(consumer, lsn)?;
        self.meta_put_durable(&k, None)
    }

    /// `consumer`'s dead letter for `lsn`, if any; [`StoreError::Corrupt`] if it fails its checks.
    pub fn dead_letter(&self, consumer: &str, lsn: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.check()?;
        let k = dead_letter_key(consumer, lsn)?;
        let v = self.shared().backend.get(Tree::Meta, &k)?;
        self.check()?;
        v.map(|v| decode_at(consumer, Some(lsn), &v)).transpose()
    }

    /// Every dead letter of `consumer`, in LSN order. A letter that fails its checks is an `Err`
    /// naming it in its place: the others are still listed.
    pub fn dead_letters(&self, consumer: &str) -> Result<Vec<Result<DeadLetter, StoreError>>, StoreError> {
        self.check()?;
        let p = prefix(consumer)?;
        let mut out = Vec::new();
        self.shared().backend.scan(Tree::Meta, &p, &mut |k, v| {
            let lsn = layout::be_u64(&k[p.len()..]);
            out.push(decode_at(consumer, lsn, v));
            true
        })?;
        self.check()?;
        Ok(out)
    }

    fn meta_put_durable(&self, k: &[u8], v: Option<&[u8]>) -> Result<(), StoreError> {
        let shared = self.shared();
        match &shared.backend {
            Backend::Sled(s) => {
                let r = match v {
                    Some(v) => s.put_raw(Tree::Meta, k, v),
                    None => s.del_raw(Tree::Meta, k),
                };
                if let Err(e) = r.and_then(|()| shared.backend.sync()) {
                    shared.poison(&e);
                    tracing::error!(error = %e, "store poisoned: a dead-letter write failed; reopen it to recover");
                    return Err(e);
                }
            }
            // As `set_cursor`: the memory backend's sync would also make the committer's unsynced
            // group durable in the crash image, so write both images directly.
            Backend::Memory(m) => match v {
                Some(v) => m.put_durable(Tree::Meta, k, v),
                None => m.del_durable(Tree::Meta, k),
            },
            // Its own committed transaction, beside the committer's group.
            Backend::Postgres(p) => {
                if let Err(e) = p.put_meta(k, v) {
                    shared.poison(&e);
                    tracing::error!(error = %e, "store poisoned: a dead-letter write failed; reopen it to recover");
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(lsn: u64) -> DeadLetter {
        DeadLetter {
            lsn,
            attempts: 10,
            first_failed_at: UnixMillis(1_800_000_000_000),
            last_attempt_at: UnixMillis(1_800_000_000_500),
            last_error: "status 503".into(),
            payload: br#"{"id":"ab-7","kind":"needs_reauth"}"#.to_vec(),
        }
    }

    #[test]
    fn frames_round_trip_and_pin_their_layout() {
        let l = letter(7);
        let f = l.encode().unwrap();
        assert_eq!(&f[..3], b"TD\x01");
        assert_eq!(u32::from_le_bytes(arr(&f[3..7])) as usize, f.len() - 11);
        assert_eq!(&f[7..15], &7u64.to_le_bytes());
        assert_eq!(&f[15..19], &10u32.to_le_bytes());
        assert_eq!(DeadLetter::decode(&f).unwrap(), l);
        let long = DeadLetter { last_error: "é".repeat(200), ..letter(1) };
        let back = DeadLetter::decode(&long.encode().unwrap()).unwrap();
        assert_eq!(back.last_error.len(), 256, "truncated on a char boundary");
        let huge = DeadLetter { payload: vec![b'x'; MAX_BODY], ..letter(1) };
        assert!(matches!(huge.encode(), Err(CodecError::TooLarge(_))));
    }

    #[test]
    fn every_damage_is_named_never_misread() {
        let f = letter(7).encode().unwrap();
        for cut in 0..f.len() {
            assert!(DeadLetter::decode(&f[..cut]).is_err(), "truncated at {cut}");
        }
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x40;
            assert!(DeadLetter::decode(&g).is_err(), "bit flip at {i}");
        }
        let mut v2 = f.clone();
        v2[2] = 2;
        let n = v2.len() - 4;
        let crc = crc32fast::hash(&v2[..n]).to_le_bytes();
        v2[n..].copy_from_slice(&crc);
        assert_eq!(DeadLetter::decode(&v2), Err(CodecError::UnsupportedVersion(2)));
        assert!(matches!(DeadLetter::decode(&f[..f.len() - 1]), Err(CodecError::LengthMismatch { .. })));
    }

    #[test]
    fn letters_are_per_consumer_in_lsn_order_and_a_corrupt_one_does_not_hide_the_others() {
        let store = Store::in_memory();
        for lsn in [300, 5, 256] {
            store.put_dead_letter("webhook", &letter(lsn)).unwrap();
        }
        store.put_dead_letter("other", &letter(9)).unwrap();
        store.set_cursor("webhook", 301).unwrap();
        let lsns = |s: &Store| -> Vec<u64> {
            s.dead_letters("webhook").unwrap().into_iter().map(|l| l.unwrap().lsn).collect()
        };
        assert_eq!(lsns(&store), [5, 256, 300]);
        assert_eq!(store.lowest_cursor().unwrap(), Some(301), "letters are not cursors");

        // Replace (a replay's new attempt count), delete, survive a crash image.
        let again = DeadLetter { attempts: 11, ..letter(256) };
        store.put_dead_letter("webhook", &again).unwrap();
        assert_eq!(store.dead_letter("webhook", 256).unwrap().unwrap().attempts, 11);
        store.delete_dead_letter("webhook", 300).unwrap();
        assert_eq!(store.dead_letter("webhook", 300).unwrap(), None);
        let reopened = store.crash_image();
        assert_eq!(lsns(&reopened), [5, 256]);

        // A torn letter: named, and the others still listed.
        let mut torn = letter(5).encode().unwrap();
        torn.truncate(torn.len() - 3);
        assert!(reopened.put_raw_for_test(layout::META, &dead_letter_key("webhook", 5).unwrap(), &torn));
        let all = reopened.dead_letters("webhook").unwrap();
        assert_eq!(all.len(), 2);
        let err = all[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("meta/dead_letter/webhook/5"), "{err}");
        assert_eq!(all[1].as_ref().unwrap().lsn, 256);
        assert!(matches!(reopened.dead_letter("webhook", 5), Err(StoreError::Corrupt { .. })));
        // A letter moved under another LSN's key is corrupt too.
        assert!(reopened.put_raw_for_test(
            layout::META,
            &dead_letter_key("webhook", 6).unwrap(),
            &letter(256).encode().unwrap()
        ));
        assert!(matches!(reopened.dead_letter("webhook", 6), Err(StoreError::Corrupt { .. })));
        assert!(store.put_dead_letter("Bad/Name", &letter(1)).is_err());
    }
}
