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
    /// A store location (a PostgreSQL URL, a schema name) is not usable; `reason` says why. Never
    /// holds a password.
    #[error("invalid store location: {reason}")]
    InvalidLocation {
        /// Why.
        reason: String,
    },
    /// A database operation failed (PostgreSQL): the operation and the server's code and message.
    /// Never holds a password or a token (statements bind ciphertext).
    #[error("database error during {op}: {message}")]
    Database {
        /// The operation (`connect`, `write`, `commit`, …).
        op: &'static str,
        /// The server's SQLSTATE and message, or the driver's.
        message: String,
    },
    /// The schema holds tables with tokenwal's names that tokenwal did not create: another
    /// application's. Nothing is touched.
    #[error(
        "schema {schema:?} holds tables named {tables:?} that tokenwal did not create (no tokenwal_migrations \
         table): refusing to touch another application's data; choose another schema with ?schema=NAME"
    )]
    ForeignSchema {
        /// The schema.
        schema: String,
        /// The tables found.
        tables: Vec<String>,
    },
    /// The schema was migrated by a newer tokenwal than this build.
    #[error(
        "schema {schema:?} is at version {found}, newer than this build supports ({supported}): upgrade tokenwal \
         on every process that uses this database"
    )]
    SchemaTooNew {
        /// The schema.
        schema: String,
        /// The version found.
        found: i32,
        /// The newest version this build knows.
        supported: i32,
    },
    /// The schema needs creating or migrating and this database role may not: run the migration
    /// as a role that may (the schema's owner).
    #[error(
        "schema {schema:?} needs a migration this database role may not run ({reason}): run \
         `tokenwal migrate-schema --db URL` as the schema's owner, then start again"
    )]
    MigrationNeeded {
        /// The schema.
        schema: String,
        /// The server's message.
        reason: String,
    },
    /// Another live process of a shared (PostgreSQL) store has an attempt in flight for this grant:
    /// nothing was written. Wait for it to settle (or for its membership lease to run out) and
    /// re-read the grant.
    #[error("grant {grant} has an attempt in flight in another process (member {member}): nothing written")]
    Busy {
        /// The grant key (`provider/account`).
        grant: String,
        /// The member id of the process holding the attempt.
        member: i64,
    },
    /// This process's membership lease of a PostgreSQL store ran out (it was frozen or cut off past
    /// its lease), so other processes may have taken over its attempts: it may not write again.
    /// Fail-stop.
    #[error("lost this process's membership lease of the store (member {member}): no further writes")]
    LeaseLost {
        /// This process's member id.
        member: i64,
    },
    /// Less than half of this process's membership lease remains (its renewals failed): no intent is
    /// committed that its request might outlive. Fail-stop.
    #[error("this process's membership lease of the store (member {member}) is about to run out: refusing to write")]
    LeaseExpiring {
        /// This process's member id.
        member: i64,
    },
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
    /// Whether the write may have happened: `true` for [`StoreError::Io`] and a failed database
    /// operation ([`StoreError::Database`]: a `COMMIT` whose answer was lost may have committed).
    pub fn may_be_durable(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Database { .. })
    }

    /// Whether the store failed under this handle (an I/O or database failure, a lost ownership
    /// lease): the process should fail-stop and let a restart recover.
    pub fn is_fail_stop(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. }
                | StoreError::Database { .. }
                | StoreError::Poisoned
                | StoreError::LeaseLost { .. }
                | StoreError::LeaseExpiring { .. }
        )
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
            StoreError::InvalidLocation { reason } => StoreError::InvalidLocation { reason: reason.clone() },
            StoreError::Database { op, message } => StoreError::Database { op, message: message.clone() },
            StoreError::ForeignSchema { schema, tables } => {
                StoreError::ForeignSchema { schema: schema.clone(), tables: tables.clone() }
            }
            StoreError::SchemaTooNew { schema, found, supported } => {
                StoreError::SchemaTooNew { schema: schema.clone(), found: *found, supported: *supported }
            }
            StoreError::MigrationNeeded { schema, reason } => {
                StoreError::MigrationNeeded { schema: schema.clone(), reason: reason.clone() }
            }
            StoreError::Busy { grant, member } => StoreError::Busy { grant: grant.clone(), member: *member },
            StoreError::LeaseLost { member } => StoreError::LeaseLost { member: *member },
            StoreError::LeaseExpiring { member } => StoreError::LeaseExpiring { member: *member },
        }
    }
}

/// Maps an I/O error of operation `op` to [`StoreError::Io`] (for `map_err`).
pub(crate) fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}
