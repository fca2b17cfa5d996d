//! Opening a store: the sled and in-memory constructors, the `meta` tree, the committer.

use super::read::decode_grant;
use super::{Inner, Store};
use crate::backend::disk::SledBackend;
use crate::backend::mem::{Image, MemBackend};
use crate::backend::pg::location::PgLocation;
use crate::backend::pg::{schema, PgBackend};
use crate::backend::Backend;
use crate::commit;
use crate::config::{OpenReport, StoreConfig};
use crate::error::StoreError;
use crate::keys::KeyRing;
use crate::layout::{self, Tree};
use crate::seal::{self, OpenError, Slot};
use crate::shared::Shared;
use rand::RngCore;
use std::path::Path;
use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::time::Instant;
use tokenwal_core::{CodecError, FingerprintKey};
use zeroize::Zeroizing;

pub(super) fn sanitize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().filter(|c| !c.is_control()).take(64).collect()
}

/// Reads (or, for an empty store, writes) the meta tree. Returns the fingerprint key and whether the
/// store was created. A fingerprint key sealed under an older key of the ring is re-sealed under the
/// active key (one atomic, synced write: either envelope opens with the ring).
fn prepare(backend: &Backend, keys: &KeyRing, dir: Option<&Path>) -> Result<(FingerprintKey, bool), StoreError> {
    let created = match backend.get(Tree::Meta, layout::META_FORMAT)? {
        Some(f) if f == layout::FORMAT.as_bytes() => false,
        Some(f) if f == layout::FORMAT_1.as_bytes() => {
            return Err(StoreError::PlaintextFormat { path: dir.map(Path::to_path_buf).unwrap_or_default() })
        }
        Some(f) => return Err(StoreError::UnsupportedFormat { found: sanitize(&f), expected: layout::FORMAT }),
        None => {
            let has_data = backend.last_key(Tree::Grants)?.is_some() || backend.last_key(Tree::Journal)?.is_some();
            if has_data {
                return Err(StoreError::UnsupportedFormat { found: "(missing)".into(), expected: layout::FORMAT });
            }
            let mut key = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(key.as_mut());
            let sealed = seal::seal(keys, Slot::FingerprintKey, 0, key.as_ref());
            // The format marker goes last: a store whose creation was interrupted has none, holds no
            // data, and is created afresh by the next open.
            backend.init_meta(&[
                (layout::META_FINGERPRINT_KEY, &sealed),
                (layout::META_GRANT_COUNT, &0u64.to_be_bytes()),
                (layout::META_LSN_FLOOR, &0u64.to_be_bytes()),
                (layout::META_FORMAT, layout::FORMAT.as_bytes()),
            ])?;
            true
        }
    };
    let what = || String::from_utf8_lossy(layout::META_FINGERPRINT_KEY).into_owned();
    let sealed = backend.get(Tree::Meta, layout::META_FINGERPRINT_KEY)?.unwrap_or_default();
    let (header, key) = match seal::open(keys, Slot::FingerprintKey, &sealed) {
        Ok(opened) => opened,
        Err(OpenError::UnknownKey(key_id)) => {
            return Err(StoreError::KeyUnavailable { what: format!("meta/{}", what()), key_id, ring: keys.ids() })
        }
        Err(OpenError::Corrupt(source)) => {
            return Err(StoreError::Corrupt { what: format!("meta/{}", what()), source })
        }
    };
    let key: [u8; 32] = key.as_slice().try_into().map_err(|_| StoreError::Corrupt {
        what: format!("meta/{}", what()),
        source: CodecError::Truncated { len: key.len() },
    })?;
    if header.key_id != keys.active_id() {
        let resealed = seal::seal(keys, Slot::FingerprintKey, 0, &key);
        backend.init_meta(&[(layout::META_FINGERPRINT_KEY, &resealed)])?;
        tracing::info!(from = %header.key_id, to = %keys.active_id(), "fingerprint key re-sealed under the active store key");
    }
    Ok((FingerprintKey::from_bytes(key), created))
}

impl Store {
    /// Opens (or creates, with mode 0700 on unix) the sled-backed store in directory `path`.
    ///
    /// Opening reads only the open-attempt index, never every grant, so it stays fast with a
    /// million grants. Entries of that index that fail their checks are reported in
    /// [`OpenReport::corrupt`], not fatal. A directory holding another store format is refused with
    /// [`StoreError::UnsupportedFormat`]; one open by another process or handle with
    /// [`StoreError::Locked`].
    ///
    /// Every grant state and the fingerprint key are sealed under `keys` (the active key seals, any
    /// key of the ring opens). A store sealed under a key the ring lacks fails with
    /// [`StoreError::KeyUnavailable`] naming the key id it needs; a format-1 (unencrypted) store with
    /// [`StoreError::PlaintextFormat`].
    pub fn open(
        path: impl AsRef<Path>,
        keys: &KeyRing,
        config: StoreConfig,
    ) -> Result<(Store, OpenReport), StoreError> {
        let started = Instant::now();
        let backend = Backend::Sled(SledBackend::open(path.as_ref(), &config)?);
        Store::start(backend, keys.clone(), config, started, Some(path.as_ref()))
    }

    /// Opens (or creates) the PostgreSQL store at `location`: connects, creates or migrates its schema
    /// (refusing a schema a newer tokenwal migrated, or one holding another application's tables),
    /// and joins the store as one of its writers. Any number of processes, on any number of hosts,
    /// may have one store open: per-grant compare-and-swap under the database's locks keeps every
    /// write current, an attempt in flight belongs to the process that committed its intent while
    /// that process's membership lease lives ([`StoreError::Busy`] for the others), and a process
    /// that loses its lease fail-stops (see `docs/journal.md`, "PostgreSQL"). Sealing is the same
    /// as on disk: the database holds ciphertext only.
    pub fn open_postgres(
        location: &PgLocation,
        keys: &KeyRing,
        config: StoreConfig,
    ) -> Result<(Store, OpenReport), StoreError> {
        let started = Instant::now();
        let slot: Arc<OnceLock<Weak<Shared>>> = Arc::new(OnceLock::new());
        let on_lost = {
            let slot = Arc::clone(&slot);
            Box::new(move |why: String| {
                if let Some(shared) = slot.get().and_then(Weak::upgrade) {
                    shared.poison(&why);
                }
            })
        };
        let opened = PgBackend::open(location, on_lost)?;
        if opened.schema_was < schema::LATEST {
            tracing::info!(location = %location, from = opened.schema_was, to = schema::LATEST, "schema created or migrated");
        }
        let (store, report) =
            Store::start(Backend::Postgres(Box::new(opened.backend)), keys.clone(), config, started, None)?;
        let _ = slot.set(Arc::downgrade(&store.inner.shared));
        Ok((store, report))
    }

    /// Creates or migrates the PostgreSQL schema at `location` and returns the version found before
    /// (0: it did not exist), without taking the store (`tokenwal migrate-schema`: run it as the
    /// schema's owner when the application's role may not run DDL).
    pub fn migrate_postgres_schema(location: &PgLocation) -> Result<(i32, i32), StoreError> {
        let found = PgBackend::migrate_only(location)?;
        Ok((found, schema::LATEST))
    }

    /// An in-memory store with the default configuration: the same semantics as the sled store
    /// (compare-and-swap, index, history, compaction, stats, group commit, sealing under an
    /// ephemeral key), plus crash images with the `test-hooks` feature.
    pub fn in_memory() -> Store {
        Store::in_memory_with(StoreConfig::default())
    }

    /// An in-memory store with `config`, sealed under an ephemeral key ([`KeyRing::ephemeral`]).
    pub fn in_memory_with(config: StoreConfig) -> Store {
        let backend = Backend::Memory(MemBackend::from_image(Image::default()));
        Store::start(backend, KeyRing::ephemeral(), config, Instant::now(), None)
            .expect("an empty in-memory store always opens")
            .0
    }

    pub(super) fn start(
        backend: Backend,
        keys: KeyRing,
        config: StoreConfig,
        started: Instant,
        dir: Option<&Path>,
    ) -> Result<(Store, OpenReport), StoreError> {
        let (fingerprint, created) = prepare(&backend, &keys, dir)?;
        let meta_u64 = |k: &[u8]| -> Result<u64, StoreError> {
            Ok(backend.get(Tree::Meta, k)?.as_deref().and_then(layout::be_u64).unwrap_or(0))
        };
        let grants = meta_u64(layout::META_GRANT_COUNT)?;
        let floor = meta_u64(layout::META_LSN_FLOOR)?;
        let last = backend.last_key(Tree::Journal)?.as_deref().and_then(layout::be_u64);
        let next_lsn = last.map_or(0, |l| l + 1).max(floor).max(1);

        let mut open_keys = Vec::new();
        backend.scan(Tree::Open, &[], &mut |k, _| {
            open_keys.push(k.to_vec());
            true
        })?;
        let mut corrupt = Vec::new();
        let mut open_attempts = 0;
        for k in &open_keys {
            match backend.get(Tree::Grants, k)?.map(|f| decode_grant(&keys, k, &f)) {
                Some(Ok(s)) if s.phase.is_open() => open_attempts += 1,
                Some(Ok(_)) => corrupt.push(layout::key_name(layout::OPEN, k)),
                Some(Err(e)) => {
                    let what = layout::key_name(layout::GRANTS, k);
                    tracing::error!(what = %what, error = %e, "unreadable grant state in the open index: quarantined");
                    corrupt.push(what);
                }
                None => corrupt.push(layout::key_name(layout::GRANTS, k)),
            }
        }

        let shared = Arc::new(Shared::new(backend, config, fingerprint, keys, grants));
        let (tx, rx) = mpsc::channel();
        let worker = Arc::clone(&shared);
        let committer = std::thread::Builder::new()
            .name("tokenwal-commit".into())
            .spawn(move || commit::run(worker, rx, next_lsn))
            .map_err(|source| StoreError::Io { op: "spawn committer", source })?;
        let store = Store { inner: Arc::new(Inner { shared, tx: Some(tx), committer: Some(committer) }) };
        let report = OpenReport {
            grants: grants as usize,
            open_attempts,
            corrupt,
            elapsed: started.elapsed(),
            created,
            next_lsn,
        };
        tracing::info!(
            grants = report.grants,
            open_attempts = report.open_attempts,
            corrupt = report.corrupt.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "store opened"
        );
        Ok((store, report))
    }
}
