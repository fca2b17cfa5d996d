//! The store's one error type, categorised by what the caller can do.

use crate::keys::{KeyError, KeyId};
use std::path::PathBuf;
use tokenwal_core::CodecError;

fn ids(ring: &[KeyId]) -> String {
    ring.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// Why a store operation failed.
///
/// No variant carries token bytes or state frames: the `Display` and `Debug` output of every error
/// is safe to log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stored state's version is not the one the batch expected: nothing was written. Re-read
    /// the grant and recompute the transition.
    #[error("version conflict on grant {grant}: expected {expected:?}, found {found:?}")]
    Conflict {
        /// The grant key (`provider/account`).
        grant: String,
        /// The version the batch expected (`None`: the grant must not exist).
        expected: Option<u64>,
        /// The version stored (`None`: the grant does not exist).
        found: Option<u64>,
    },
    /// A stored frame failed its checks. That entry is quarantined: it is reported, never guessed
    /// at, and never overwritten by a compare-and-swap. Other grants keep working.
    #[error("corrupt {what}: {source}")]
    Corrupt {
        /// What is corrupt (e.g. `grants/shopify/x.myshopify.com` or `journal/42`).
        what: String,
        /// What the codec found.
        source: CodecError,
    },
    /// An I/O error while writing or syncing. **The write may already be durable**: the caller must
    /// not assume either way. The store is now poisoned; reopening it and running recovery tells.
    #[error("i/o error during {op}: {source}")]
    Io {
        /// The operation (`open`, `transaction`, `flush`, `sync`, …).
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Fail-stop: an earlier write or sync failed, so every later call fails until the store is
    /// reopened (and recovered).
    #[error("store is poisoned by an earlier i/o failure; reopen it")]
    Poisoned,
    /// A value did not encode or decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Any other error of the storage engine.
    #[error("storage engine error: {0}")]
    Backend(String),
    /// The store's committer has stopped (the store is being dropped).
    #[error("store is closed")]
    Closed,
    /// Another process (or another `Store` in this process) has this directory open.
    #[error("store directory {path:?} is locked by another process or handle")]
    Locked {
        /// The store directory.
        path: PathBuf,
    },
    /// The directory holds a store of a format this build does not know (a newer tokenwal?), or data
    /// without a format marker.
    #[error("unsupported store format {found:?} (this build reads {expected:?})")]
    UnsupportedFormat {
        /// The format marker found (sanitised; `(missing)` if there is none).
        found: String,
        /// The format this build reads.
        expected: &'static str,
    },
    /// A value is sealed under a store key the key ring does not hold (the wrong key was supplied,
    /// or an old key was dropped before `tokenwal rekey` finished). Nothing is guessed or
    /// overwritten: supply the key with this id.
    #[error(
        "{what} is sealed under store key id {key_id}, which the key ring (ids: {}) does not hold: supply that key",
        ids(ring)
    )]
    KeyUnavailable {
        /// What could not be opened (`meta/fingerprint_key` or `grants/<key>`).
        what: String,
        /// The id of the key that sealed it.
        key_id: KeyId,
        /// The ids the ring holds, active first.
        ring: Vec<KeyId>,
    },
    /// The store keys could not be loaded (none configured, malformed, unsafe key file).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The directory holds a format-1 store, which kept tokens unencrypted. This build reads only
    /// sealed stores: upgrade it with `tokenwal rekey --upgrade` (or [`crate::Store::upgrade_format1`]).
    #[error(
        "store {path:?} is format tokenwal-store/1 (tokens unencrypted); this build reads tokenwal-store/2: \
         upgrade it once with `tokenwal rekey --upgrade` (seals every state under the active key)"
    )]
    PlaintextFormat {
        /// The store directory.
        path: PathBuf,
    },
    /// The batch is not self-consistent (its state frame names another grant or version, or its
    /// `open` flag disagrees with the state's phase): a caller bug. Nothing was written.
    #[error("invalid write batch: {reason}")]
    InvalidBatch {
        /// What is wrong.
        reason: &'static str,
    },
}

impl StoreError {
    /// Whether the write may have happened: `true` only for [`StoreError::Io`].
    pub fn may_be_durable(&self) -> bool {
        matches!(self, StoreError::Io { .. })
    }

    pub(crate) fn from_sled(op: &'static str, e: sled::Error) -> StoreError {
        match e {
            sled::Error::Io(source) => StoreError::Io { op, source },
            other => StoreError::Backend(format!("{op}: {other}")),
        }
    }

    /// A copy for answering several writers of one failed commit group (`io::Error` is not `Clone`).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io { op, source } => {
                StoreError::Io { op, source: std::io::Error::new(source.kind(), source.to_string()) }
            }
            StoreError::Backend(s) => StoreError::Backend(s.clone()),
            StoreError::Conflict { grant, expected, found } => {
                StoreError::Conflict { grant: grant.clone(), expected: *expected, found: *found }
            }
            StoreError::Corrupt { what, source } => StoreError::Corrupt { what: what.clone(), source: source.clone() },
            StoreError::Codec(e) => StoreError::Codec(e.clone()),
            StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
            StoreError::UnsupportedFormat { found, expected } => {
                StoreError::UnsupportedFormat { found: found.clone(), expected }
            }
            StoreError::InvalidBatch { reason } => StoreError::InvalidBatch { reason },
            StoreError::KeyUnavailable { what, key_id, ring } => {
                StoreError::KeyUnavailable { what: what.clone(), key_id: *key_id, ring: ring.clone() }
            }
            StoreError::Key(e) => StoreError::Backend(e.to_string()),
            StoreError::PlaintextFormat { path } => StoreError::PlaintextFormat { path: path.clone() },
            StoreError::Poisoned => StoreError::Poisoned,
            StoreError::Closed => StoreError::Closed,
        }
    }
}
