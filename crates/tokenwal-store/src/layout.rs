//! The on-disk layout: tree names and key encodings (format `tokenwal-store/2`).
//!
//! ```text
//! tree      key                                  value
//! grants    grant                                sealed envelope ("TE", see `seal`) of the GrantState frame ("TS")
//! open      grant                                empty: the grant's state is open (Phase::is_open)
//! journal   lsn (u64 BE)                         Record frame ("TR")
//! history   grant ++ 0x00 ++ lsn (u64 BE)        empty: one grant's records, in LSN order
//! expiry    at (u64 BE ms) ++ lsn (u64 BE)       grant: records in time order, for retention
//! meta      "format"                             FORMAT (refused if unknown)
//!           "fingerprint_key"                    sealed envelope of 32 random bytes
//!           "grant_count"                        u64 BE: entries of `grants`
//!           "lsn_floor"                          u64 BE: every LSN ever used is below it, or in `journal`
//!           "cursor/{name}"                      u64 BE: a journal consumer's position (`cursor`)
//! ```
//!
//! `grant` is [`tokenwal_core::GrantKey::to_bytes`] (`provider/account`, never containing `0x00`), so
//! `grant ++ 0x00` is a prefix that matches exactly one grant's history. One write batch updates
//! `grants`, `open`, `journal`, `history`, `expiry` (and `meta` for a new grant) in one transaction.
//! Compaction deletes `journal`, `history` and `expiry` entries together and raises `lsn_floor`, so
//! LSNs stay monotonic even after every record was compacted away.

/// The format marker this build writes and reads: format 2 seals every secret (see `seal`).
pub const FORMAT: &str = "tokenwal-store/2";
/// The marker of format 1 (grant states and the fingerprint key in the clear), which
/// [`crate::Store::upgrade_format1`] converts.
pub const FORMAT_1: &str = "tokenwal-store/1";

/// Tree of grant states.
pub const GRANTS: &str = "grants";
/// Tree indexing the grants whose state is open.
pub const OPEN: &str = "open";
/// Tree of journal records by LSN.
pub const JOURNAL: &str = "journal";
/// Tree indexing each grant's records.
pub const HISTORY: &str = "history";
/// Tree indexing records by timestamp, for retention.
pub const EXPIRY: &str = "expiry";
/// Tree of store metadata.
pub const META: &str = "meta";

/// Meta key of the format marker.
pub const META_FORMAT: &[u8] = b"format";
/// Meta key of the fingerprint key.
pub const META_FINGERPRINT_KEY: &[u8] = b"fingerprint_key";
/// Meta key of the grant count.
pub const META_GRANT_COUNT: &[u8] = b"grant_count";
/// Meta key of the LSN floor.
pub const META_LSN_FLOOR: &[u8] = b"lsn_floor";

/// The advisory lock file inside the store directory.
pub const LOCK_FILE: &str = "tokenwal.lock";

/// The trees, in the order the backends index them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Tree {
    Grants = 0,
    Open = 1,
    Journal = 2,
    History = 3,
    Expiry = 4,
    Meta = 5,
}

impl Tree {
    pub(crate) const ALL: [Tree; 6] =
        [Tree::Grants, Tree::Open, Tree::Journal, Tree::History, Tree::Expiry, Tree::Meta];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Tree::Grants => GRANTS,
            Tree::Open => OPEN,
            Tree::Journal => JOURNAL,
            Tree::History => HISTORY,
            Tree::Expiry => EXPIRY,
            Tree::Meta => META,
        }
    }
}

/// The `journal` key of `lsn`.
pub fn journal_key(lsn: u64) -> [u8; 8] {
    lsn.to_be_bytes()
}

/// The `history` key of `grant`'s record at `lsn`.
pub fn history_key(grant: &[u8], lsn: u64) -> Vec<u8> {
    let mut k = history_prefix(grant);
    k.extend_from_slice(&lsn.to_be_bytes());
    k
}

/// The prefix of every `history` key of `grant`.
pub fn history_prefix(grant: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(grant.len() + 9);
    k.extend_from_slice(grant);
    k.push(0);
    k
}

/// The `expiry` key of a record written at `at_ms` under `lsn`.
pub fn expiry_key(at_ms: u64, lsn: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&at_ms.to_be_bytes());
    k[8..].copy_from_slice(&lsn.to_be_bytes());
    k
}

/// Reads a big-endian u64 from exactly 8 bytes.
pub(crate) fn be_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes)
}

/// The LSN at the end of a `history` or `expiry` key.
pub(crate) fn trailing_lsn(key: &[u8]) -> Option<u64> {
    key.len().checked_sub(8).and_then(|n| be_u64(&key[n..]))
}

/// A printable name for a key in reports: lossy UTF-8, control characters dropped, bounded length.
/// Keys hold grant ids and LSNs, never secrets.
pub(crate) fn key_name(tree: &str, key: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(key).chars().filter(|c| !c.is_control()).take(300).collect();
    format!("{tree}/{text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_prefix_matches_one_grant_only() {
        let a = history_key(b"shopify/a.myshopify.com", 5);
        assert!(a.starts_with(&history_prefix(b"shopify/a.myshopify.com")));
        assert!(!a.starts_with(&history_prefix(b"shopify/a.myshopify.co")));
        assert_eq!(trailing_lsn(&a), Some(5));
    }

    #[test]
    fn keys_sort_by_lsn_and_time() {
        assert!(history_key(b"g", 255) < history_key(b"g", 256));
        assert!(expiry_key(1, 9) < expiry_key(2, 0));
        assert!(journal_key(255) < journal_key(256));
        assert_eq!(trailing_lsn(&expiry_key(7, 42)), Some(42));
    }
}
