//! Re-sealing grant states under the active key (`tokenwal rekey`), and which keys seal what.

use super::read::open_error;
use super::Store;
use crate::error::StoreError;
use crate::keys::KeyId;
use crate::layout::{self, Tree};
use crate::seal::{self, Slot};
use std::collections::BTreeMap;
use tokenwal_core::{codec, GrantKey, WriteBatch};

/// What [`Store::reseal_blocking`] did to one grant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Reseal {
    /// The state was already sealed under the active key: nothing written.
    AlreadyActive,
    /// The state was re-sealed under the active key (durably).
    Resealed,
    /// The grant does not exist.
    Missing,
}

/// Which store keys seal what: the answer of [`Store::key_usage`]. Read from the clear headers,
/// without decrypting anything.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct KeyUsage {
    /// Grant states per sealing key id.
    pub grants: BTreeMap<KeyId, usize>,
    /// The key id sealing the fingerprint key.
    pub fingerprint_key: Option<KeyId>,
    /// Grant states whose envelope fails its checksum (`grants/<key>`).
    pub corrupt: Vec<String>,
}

impl KeyUsage {
    /// Values (grant states and the fingerprint key) sealed under a key other than `active`.
    pub fn remaining_under_other_keys(&self, active: KeyId) -> usize {
        let grants: usize = self.grants.iter().filter(|(id, _)| **id != active).map(|(_, n)| n).sum();
        grants + usize::from(self.fingerprint_key.is_some_and(|id| id != active))
    }
}

impl Store {
    /// Re-seals `grant`'s state under the active key if an older key sealed it: a compare-and-swap
    /// on the state's version through the committer, durable when this returns. The state's
    /// content and version are unchanged, so a concurrent writer is unaffected (if it wins, this
    /// answers [`StoreError::Conflict`] and a retry finds its state, sealed under the active key).
    ///
    /// Crash-safe and idempotent: before the sync either envelope is in place, and both open with a
    /// ring holding both keys. `tokenwal rekey` calls this for every grant.
    pub fn reseal_blocking(&self, grant: &GrantKey) -> Result<Reseal, StoreError> {
        self.check()?;
        let key = grant.to_bytes();
        let Some(sealed) = self.stored_envelope(&key)? else { return Ok(Reseal::Missing) };
        let keys = &self.shared().keys;
        let (header, plain) = seal::open(keys, Slot::State(&key), &sealed).map_err(|e| open_error(keys, &key, e))?;
        if header.key_id == keys.active_id() {
            return Ok(Reseal::AlreadyActive);
        }
        let state = codec::decode_state(&plain)
            .map_err(|source| StoreError::Corrupt { what: layout::key_name(layout::GRANTS, &key), source })?;
        let batch = WriteBatch {
            grant: key.clone(),
            expected_version: Some(header.version),
            new_version: header.version,
            state: seal::seal(keys, Slot::State(&key), header.version, &plain),
            open: state.phase.is_open(),
            records: Vec::new(),
        };
        let rx = self.send(batch)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)??;
        Ok(Reseal::Resealed)
    }

    /// Which key ids seal the grant states and the fingerprint key (from the clear headers: no
    /// decryption, a full scan of the grants).
    pub fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        self.check()?;
        let shared = self.shared();
        let mut usage = KeyUsage::default();
        if let Some(fk) = shared.backend.get(Tree::Meta, layout::META_FINGERPRINT_KEY)? {
            usage.fingerprint_key = seal::header(&fk).ok().map(|h| h.key_id);
        }
        shared.backend.scan(Tree::Grants, &[], &mut |k, v| {
            match seal::header(v) {
                Ok(h) => *usage.grants.entry(h.key_id).or_default() += 1,
                Err(_) => usage.corrupt.push(layout::key_name(layout::GRANTS, k)),
            }
            true
        })?;
        self.check()?;
        Ok(usage)
    }

    /// The keys of every grant whose state is sealed under a key other than the active one (from the
    /// clear headers), in key order: `tokenwal rekey`'s work list.
    pub fn grants_under_old_keys(&self) -> Result<Vec<GrantKey>, StoreError> {
        self.check()?;
        let active = self.shared().keys.active_id();
        let mut out = Vec::new();
        self.shared().backend.scan(Tree::Grants, &[], &mut |k, v| {
            if seal::header(v).is_ok_and(|h| h.key_id != active) {
                if let Ok(g) = GrantKey::from_bytes(k) {
                    out.push(g);
                }
            }
            true
        })?;
        Ok(out)
    }
}
