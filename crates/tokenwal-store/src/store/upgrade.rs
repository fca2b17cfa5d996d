//! Sealing a format-1 store (states and fingerprint key in the clear) in place.

use super::open::sanitize;
use super::Store;
use crate::backend::disk::SledBackend;
use crate::backend::DurableBackend;
use crate::config::StoreConfig;
use crate::error::StoreError;
use crate::keys::KeyRing;
use crate::layout::{self, Tree};
use crate::seal::{self, Slot};
use std::path::Path;
use tokenwal_core::codec;
use zeroize::Zeroize;

impl Store {
    /// Converts a format-1 store (grant states and the fingerprint key in the clear) in directory
    /// `path` to format 2 in place: every state frame and the fingerprint key are sealed under the
    /// active key of `keys`, synced, and only then is the format marker switched. Crash-safe and
    /// resumable: a re-run skips what is already sealed. Returns the number of values sealed (0 for a
    /// store already in format 2). The store must not be open elsewhere (it is locked).
    ///
    /// The plaintext tokens may survive in the free space of sled's log until sled reuses it: treat
    /// the disk (and older backups) as holding them, see `docs/security.md`.
    pub fn upgrade_format1(path: impl AsRef<Path>, keys: &KeyRing, config: StoreConfig) -> Result<usize, StoreError> {
        let sled = SledBackend::open(path.as_ref(), &config)?;
        match sled.get(Tree::Meta, layout::META_FORMAT)? {
            Some(f) if f == layout::FORMAT.as_bytes() => return Ok(0),
            Some(f) if f == layout::FORMAT_1.as_bytes() => {}
            Some(f) => return Err(StoreError::UnsupportedFormat { found: sanitize(&f), expected: layout::FORMAT_1 }),
            None => {
                return Err(StoreError::UnsupportedFormat { found: "(missing)".into(), expected: layout::FORMAT_1 })
            }
        }
        let mut plain = Vec::new();
        let mut corrupt = None;
        sled.scan(Tree::Grants, &[], &mut |k, v| {
            if v.starts_with(&codec::STATE_MAGIC) {
                match codec::decode_state(v) {
                    Ok(_) => plain.push(k.to_vec()),
                    Err(source) => {
                        corrupt = Some(StoreError::Corrupt { what: layout::key_name(layout::GRANTS, k), source });
                        return false;
                    }
                }
            }
            true
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        let mut sealed = 0;
        for k in &plain {
            let Some(mut frame) = sled.get(Tree::Grants, k)? else { continue };
            let state = codec::decode_state(&frame)
                .map_err(|source| StoreError::Corrupt { what: layout::key_name(layout::GRANTS, k), source })?;
            sled.put_raw(Tree::Grants, k, &seal::seal(keys, Slot::State(k), state.version, &frame))?;
            frame.zeroize();
            sealed += 1;
        }
        if let Some(mut fk) = sled.get(Tree::Meta, layout::META_FINGERPRINT_KEY)? {
            if fk.len() == 32 {
                sled.put_raw(
                    Tree::Meta,
                    layout::META_FINGERPRINT_KEY,
                    &seal::seal(keys, Slot::FingerprintKey, 0, &fk),
                )?;
                sealed += 1;
            }
            fk.zeroize();
        }
        sled.sync_creation()?;
        sled.put_raw(Tree::Meta, layout::META_FORMAT, layout::FORMAT.as_bytes())?;
        sled.sync_creation()?;
        tracing::info!(sealed, "store upgraded to format tokenwal-store/2");
        Ok(sealed)
    }
}
