//! # tokenwal-store
//!
//! The durable journal and token store of tokenwal: it applies the core's [`WriteBatch`](tokenwal_core::WriteBatch)es
//! atomically (compare-and-swap on the grant's version), and answers only once they are on disk.
//!
//! ## Layout
//!
//! * [`store`] — [`Store`], the cheap cloneable handle, one file per subject under `store/`: `open`
//!   (sled) / `in_memory`, `upgrade` (format 1 → 2), `write` (`apply`, group commit), `read`
//!   (durable state only), `rekey`, `compact`, and `hooks` (test hooks, feature `test-hooks`).
//! * `commit` — the one committer thread: drain the queue, one transaction per batch, one
//!   `flush` + one `fsync` per group, answer everyone; fail-stop on the first I/O error.
//! * `backend` — the seam `DurableBackend` (what a backend must guarantee: docs/journal.md §6
//!   "Backend seam") and its two implementations: sled (`flush()` then `sync_all()` of
//!   `<dir>/db`: sled 0.34.7's `flush` does not fsync on Linux; `flush_async` is never called) and
//!   in-memory (a live and a durable image), sharing one implementation of a write over a
//!   transaction's view.
//! * `shared` — state shared by the handles and the committer (pre-images, counters, poison flag);
//!   `lock` — mutex and rwlock locking without poisoning (a leaf module).
//! * [`cursor`] — reading the journal by LSN and named durable cursors into it (at-least-once
//!   consumers such as the webhook sink); compaction keeps what a cursor has not consumed.
//! * [`dead_letter`] — what such a consumer gave up delivering, checked frames in `meta` written
//!   before its cursor moves past them.
//! * [`layout`] — trees and key encodings of the on-disk format (`tokenwal-store/2`).
//! * `seal` — the envelope sealing every grant state and the fingerprint key (XChaCha20-Poly1305,
//!   the grant key and slot as associated data, a clear authenticated header with the key id and
//!   the state version for the compare-and-swap).
//! * [`keys`] — [`StoreKey`], [`KeyRing`] (active key + older read-only keys), [`KeySource`] (env,
//!   key file, or a ring in hand), key files (0600, refused if world-accessible).
//! * [`segment`] — the append-only segment log of the planned format 3 (docs/journal.md §8 "Format 3
//!   (planned): the segment log"), not yet used by the store.
//! * [`config`] — [`StoreConfig`], [`RecoveryMode`] and the reports.
//! * [`error`] — [`StoreError`], typed by what the caller can do.
//!
//! ## Test hooks
//!
//! The cargo feature `test-hooks` (off by default; enable it only from `[dev-dependencies]`, or in
//! benchmark and fuzz crates) adds what exists for tests alone: `Store::crash_image`,
//! `Store::hold_acks`, `Store::inject_fault` with `FaultPoint`, `Store::put_raw_for_test`,
//! `KeyRing::insecure_test_ring` / `StoreKey::insecure_test_key`, and `seal_state_frame` /
//! `open_state_frame`. Without it they are not compiled, so a release binary has none of them.
//!
//! ## Guarantees
//!
//! * `apply` returns `Ok` only after the batch is durable; a [`StoreError::Conflict`] wrote nothing;
//!   a [`StoreError::Io`] **may already be durable** and poisons the store (every later call fails
//!   with [`StoreError::Poisoned`] until it is reopened).
//! * Readers ([`Store::get`], [`Store::open_grants`], [`Store::history`], …) never see a write
//!   before it is durable.
//! * Every frame is checked (magic, length, CRC) by the core codec; a corrupt entry is reported and
//!   quarantined, never guessed at.
//! * No token is on disk in the clear: grant states are sealed with an AEAD under the store key
//!   ([`KeyRing`]); journal records hold no secrets. A value sealed under a key the ring lacks is
//!   [`StoreError::KeyUnavailable`] (naming the key id), never "corrupt" and never overwritten.
//! * Opening reads only the open-attempt index, so it is fast with a million grants.
//!
//! ## Example
//!
//! ```
//! use tokenwal_core::*;
//! use tokenwal_store::Store;
//!
//! let store = Store::in_memory();
//! let machine = Machine::shopify(store.fingerprint_key());
//! let grant = GrantKey::shopify(&ShopDomain::parse("my-shop.myshopify.com").unwrap());
//! let now = UnixMillis(1_800_000_000_000);
//! let tokens = TokenSet {
//!     access_token: AccessToken::new("shpat_a"),
//!     access_expires_at: now,
//!     refresh_token: RefreshToken::new("shprt_r"),
//!     refresh_expires_at: None,
//!     scope: None,
//! };
//! let install = machine.install(None, grant.clone(), tokens, InstallSource::Import, now);
//! store.apply_blocking(install.transition().write_batch().unwrap()).unwrap();
//!
//! let state = store.get(&grant).unwrap().unwrap();
//! assert_eq!(state.version, 1);
//! let plan = machine.plan_attempt(&state, now).unwrap();
//! store.apply_blocking(plan.transition().write_batch().unwrap()).unwrap();
//! assert_eq!(store.open_grants().unwrap().len(), 1); // an intent without outcome
//! assert_eq!(store.history(&grant).unwrap().len(), 2);
//!
//! // A stale writer loses the compare-and-swap and writes nothing.
//! let stale = machine.plan_attempt(&state, now).unwrap();
//! let err = store.apply_blocking(stale.transition().write_batch().unwrap()).unwrap_err();
//! assert!(matches!(err, tokenwal_store::StoreError::Conflict { found: Some(2), .. }));
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
mod commit;
pub mod config;
pub mod cursor;
pub mod dead_letter;
pub mod error;
mod hooks;
pub mod keys;
pub mod layout;
mod lock;
#[cfg(any(test, feature = "test-hooks"))]
mod pg_scratch;
mod seal;
pub mod segment;
mod shared;
pub mod store;

pub use backend::pg::location::{PgLocation, DEFAULT_SCHEMA as DEFAULT_PG_SCHEMA};
pub use backend::pg::notify::RemoteWrites;
pub use config::{
    CompactReport, History, OpenReport, RecoveryMode, ScanReport, StoreConfig, StoreStats, SYNC_LATENCY_BOUNDS,
    SYNC_LATENCY_BUCKETS,
};
pub use dead_letter::DeadLetter;
pub use error::StoreError;
pub use keys::{KeyError, KeyId, KeyRing, KeySource, StoreKey};
pub use shared::FailStop;
pub use store::{KeyUsage, Reseal, Store};

#[cfg(any(test, feature = "test-hooks"))]
pub use hooks::{FaultPoint, SYNC_FAULT_ENV};
#[cfg(any(test, feature = "test-hooks"))]
pub use pg_scratch::{pg_required, test_pg_url, PgScratch};
#[cfg(any(test, feature = "test-hooks"))]
pub use store::{AckHold, ReadCount};

/// Seals a grant state frame as the store does (for tests and tools that fill a store's trees
/// directly, e.g. the million-grant open test). Only with the `test-hooks` feature.
#[cfg(any(test, feature = "test-hooks"))]
pub fn seal_state_frame(keys: &KeyRing, grant: &tokenwal_core::GrantKey, version: u64, frame: &[u8]) -> Vec<u8> {
    seal::seal(keys, seal::Slot::State(&grant.to_bytes()), version, frame)
}

/// Opens what [`seal_state_frame`] sealed (for benchmarks and the fuzz target): the state frame.
/// Only with the `test-hooks` feature.
#[cfg(any(test, feature = "test-hooks"))]
pub fn open_state_frame(
    keys: &KeyRing,
    grant: &tokenwal_core::GrantKey,
    sealed: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
    let key = grant.to_bytes();
    seal::open(keys, seal::Slot::State(&key), sealed).map(|(_, plain)| plain).map_err(|e| match e {
        seal::OpenError::Corrupt(source) => {
            StoreError::Corrupt { what: layout::key_name(layout::GRANTS, &key), source }
        }
        seal::OpenError::UnknownKey(key_id) => {
            StoreError::KeyUnavailable { what: layout::key_name(layout::GRANTS, &key), key_id, ring: keys.ids() }
        }
    })
}

#[cfg(test)]
mod tests;
