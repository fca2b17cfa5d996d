//! Reading: every read sees only durable state (a grant a commit group is writing is read from
//! its pre-image until the group is synced), and checks the fail-stop flag after it reads.

use super::Store;
use crate::config::{History, RecoveryMode, ScanReport};
use crate::error::StoreError;
use crate::keys::KeyRing;
use crate::layout::{self, Tree};
use crate::lock::lock;
use crate::seal::{self, OpenError, Slot};
use std::collections::BTreeMap;
use tokenwal_core::{codec, GrantKey, GrantState, Record};

impl Store {
    /// The grant's durable state (`None` if it does not exist).
    ///
    /// A state whose frame fails its checks is [`StoreError::Corrupt`]; other grants are unaffected.
    pub fn get(&self, grant: &GrantKey) -> Result<Option<GrantState>, StoreError> {
        #[cfg(any(test, feature = "test-hooks"))]
        self.note_read();
        self.check()?;
        let key = grant.to_bytes();
        // Read the live tree first, then the pre-images: a write that became visible before this
        // read has its pre-image registered until it is durable (see `commit`).
        let live = self.shared().backend.get(Tree::Grants, &key)?;
        let frame = match lock(&self.shared().pending).get(&key) {
            Some(pre) => pre.state.clone(),
            None => live,
        };
        // A group that failed after this read started may have cleared its pre-images: the store
        // was poisoned before that, so checking again keeps a non-durable state from escaping.
        self.check()?;
        frame.map(|f| decode_grant(&self.shared().keys, &key, &f)).transpose()
    }

    /// The stored envelope of `grant` as readers see it (pre-image first), with its durable open flag.
    pub(super) fn stored_envelope(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let live = self.shared().backend.get(Tree::Grants, key)?;
        let frame = match lock(&self.shared().pending).get(key) {
            Some(pre) => pre.state.clone(),
            None => live,
        };
        self.check()?;
        Ok(frame)
    }

    /// The durable states of every grant in an open phase (an intent without outcome, or an
    /// ambiguity), in key order: recovery's work list. Reads only the open index, so the cost is
    /// proportional to the open grants, not to all grants or the history.
    ///
    /// Entries that fail their checks are skipped (and logged): they were reported by
    /// [`Store::open`] in [`OpenReport::corrupt`](crate::OpenReport::corrupt), and [`Store::get`] answers `Corrupt` for them.
    pub fn open_grants(&self) -> Result<Vec<GrantState>, StoreError> {
        self.open_grants_where(|entries| Ok(entries.into_iter().map(|(k, _)| k).collect()), true)
    }

    /// Which grants are in an open phase, from the open index's keys alone (no state is read or
    /// decrypted): what recovery will work on, known at the cost of a key scan. The same set as
    /// [`Store::open_grants`] at this moment (a write not yet durable counts as its durable
    /// pre-image), in key order. Keys that are not grant keys are skipped (and logged).
    pub fn open_keys(&self) -> Result<Vec<GrantKey>, StoreError> {
        self.check()?;
        let mut keys = std::collections::BTreeSet::new();
        self.shared().backend.scan(Tree::Open, &[], &mut |k, _| {
            keys.insert(k.to_vec());
            true
        })?;
        for (k, pre) in lock(&self.shared().pending).iter() {
            if pre.open {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        self.check()?; // see `get`
        Ok(keys
            .into_iter()
            .filter_map(|k| match GrantKey::from_bytes(&k) {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::error!(what = %layout::key_name(layout::OPEN, &k), error = %e, "skipping an open index entry that names no grant");
                    None
                }
            })
            .collect())
    }

    /// The durable states of those of `grants` that are in an open phase (pre-images first), in key
    /// order: [`Store::open_grants`] restricted to a set read before, e.g. by [`Store::open_keys`].
    pub fn open_grants_among(&self, grants: &[GrantKey]) -> Result<Vec<GrantState>, StoreError> {
        self.check()?;
        self.open_states(grants.iter().map(GrantKey::to_bytes).collect(), false)
    }

    /// [`Store::open_grants`] without the attempts that a live process of a shared store holds in
    /// flight (this one's included): what recovery may take over. The same as
    /// [`Store::open_grants`] for a store that is not shared.
    pub fn recoverable_grants(&self) -> Result<Vec<GrantState>, StoreError> {
        // The members are read after the open index: a marker seen in the scan names a member that
        // had joined before it, so a live one is in the list (read the other way round, a process
        // that joined and wrote in between would look dead).
        self.open_grants_where(
            |entries| {
                let live: std::collections::HashSet<i64> = self.members()?.into_iter().map(|(id, _)| id).collect();
                Ok(entries
                    .into_iter()
                    .filter(|(_, marker)| crate::backend::pg::member_of(marker).is_none_or(|m| !live.contains(&m)))
                    .map(|(k, _)| k)
                    .collect())
            },
            !self.is_shared(),
        )
    }

    /// Claims up to `limit` attempts that processes which are gone left open in a shared store, for
    /// this process: only it may write those grants from now on (while its own lease lives), and
    /// processes claiming at the same moment get disjoint sets (PostgreSQL `FOR UPDATE SKIP
    /// LOCKED`), so a fleet restarted after a crash recovers different grants in parallel instead of
    /// racing for the same ones. Returns the claimed grants' durable states (open ones only: an
    /// attempt that was resolved in between is dropped). Call it again until it returns nothing.
    ///
    /// A store that is not shared has nothing to claim (one writer: recovery reads
    /// [`Store::open_grants`]) and returns an empty list. If the claim's `COMMIT` fails, the claim may
    /// be durable without this process knowing which grants it holds: the store fail-stops, and the
    /// restart (a new member) finds them orphaned again.
    pub fn claim_orphans(&self, limit: usize) -> Result<Vec<GrantState>, StoreError> {
        self.check()?;
        let crate::backend::Backend::Postgres(pg) = &self.shared().backend else {
            return Ok(Vec::new());
        };
        let keys = match pg.claim_orphans(limit) {
            Ok(keys) => keys,
            Err(e) => {
                if matches!(&e, StoreError::Database { op, .. } if *op == crate::backend::pg::CLAIM_COMMIT) {
                    self.shared().poison(&e);
                }
                return Err(e);
            }
        };
        self.open_states(keys, false)
    }

    /// The open grants among the open index's `(key, marker)` entries that `select` keeps.
    fn open_grants_where(
        &self,
        select: impl FnOnce(Vec<(Vec<u8>, Vec<u8>)>) -> Result<Vec<Vec<u8>>, StoreError>,
        all: bool,
    ) -> Result<Vec<GrantState>, StoreError> {
        self.check()?;
        let backend = &self.shared().backend;
        let mut entries = Vec::new();
        backend.scan(Tree::Open, &[], &mut |k, v| {
            entries.push((k.to_vec(), v.to_vec()));
            true
        })?;
        let keys = select(entries)?;
        self.open_states(keys, all)
    }

    /// The durable states of `keys` that are open (pre-images first), in key order; with `all`
    /// (`keys` is the whole open index as the backend shows it), also the grants whose durable
    /// state is open while a write not yet durable closes them.
    fn open_states(&self, keys: Vec<Vec<u8>>, all: bool) -> Result<Vec<GrantState>, StoreError> {
        let backend = &self.shared().backend;
        let mut frames: BTreeMap<Vec<u8>, Option<Vec<u8>>> = match backend {
            // One round trip for the lot.
            crate::backend::Backend::Postgres(pg) => pg.get_many(Tree::Grants, keys)?.into_iter().collect(),
            _ => keys.into_iter().map(|k| backend.get(Tree::Grants, &k).map(|f| (k, f))).collect::<Result<_, _>>()?,
        };
        for (k, pre) in lock(&self.shared().pending).iter() {
            if !all && !frames.contains_key(k) {
                continue;
            }
            frames.remove(k);
            if pre.open {
                frames.insert(k.clone(), pre.state.clone());
            }
        }
        let mut out = Vec::with_capacity(frames.len());
        for (k, f) in frames {
            let Some(f) = f else {
                tracing::error!(what = %layout::key_name(layout::OPEN, &k), "open index entry without a state");
                continue;
            };
            match decode_grant(&self.shared().keys, &k, &f) {
                Ok(s) if s.phase.is_open() => out.push(s),
                Ok(_) => {
                    tracing::error!(what = %layout::key_name(layout::OPEN, &k), "open index entry of a closed state")
                }
                Err(e) => tracing::error!(error = %e, "skipping a corrupt open grant"),
            }
        }
        self.check()?; // see `get`
        Ok(out)
    }

    /// Calls `f` with the durable state of every grant, in key order (a full scan). States that fail
    /// their checks are skipped and listed in the report.
    pub fn for_each_grant(&self, mut f: impl FnMut(GrantState)) -> Result<ScanReport, StoreError> {
        self.check()?;
        let shared = self.shared();
        let mut report = ScanReport::default();
        shared.backend.scan(Tree::Grants, &[], &mut |k, v| {
            let pre = lock(&shared.pending).get(k).map(|p| p.state.clone());
            let decoded = match &pre {
                // A grant whose first write is not durable yet does not exist.
                Some(None) => return true,
                Some(Some(frame)) => decode_grant(&shared.keys, k, frame),
                None => decode_grant(&shared.keys, k, v),
            };
            match decoded {
                Ok(s) => {
                    report.grants += 1;
                    f(s);
                }
                Err(e) => {
                    let what = layout::key_name(layout::GRANTS, k);
                    tracing::error!(what = %what, error = %e, "unreadable grant state skipped by a scan");
                    report.corrupt.push(what);
                }
            }
            true
        })?;
        self.check()?; // see `get`: a scan that raced a failed group reports the failure
        Ok(report)
    }

    /// The grant's durable journal records, `(lsn, record)` in LSN order (records older than the
    /// retention may have been compacted away).
    ///
    /// A record that fails its checks is [`StoreError::Corrupt`] under [`RecoveryMode::Strict`];
    /// under [`RecoveryMode::SkipCorruptRecords`] it is skipped and logged (see
    /// [`Store::history_report`] for the list).
    pub fn history(&self, grant: &GrantKey) -> Result<Vec<(u64, Record)>, StoreError> {
        Ok(self.history_report(grant)?.records)
    }

    /// The first `Some` that `pick` returns for `grant`'s durable records before `lsn`, read
    /// **newest first**: the cost is the records read until `pick` answers (a bounded reverse scan of
    /// the grant's history index), not the grant's whole history. Compacted records are passed over;
    /// a corrupt one is an error, or skipped under [`RecoveryMode::SkipCorruptRecords`].
    pub fn find_before<T>(
        &self,
        grant: &GrantKey,
        lsn: u64,
        mut pick: impl FnMut(&Record) -> Option<T>,
    ) -> Result<Option<T>, StoreError> {
        self.check()?;
        let shared = self.shared();
        let key = grant.to_bytes();
        // Records of a commit group that is not durable yet are not read (as in `history_report`).
        let below = match lock(&shared.pending).get(&key) {
            Some(pre) => lsn.min(pre.first_lsn),
            None => lsn,
        };
        let (mut found, mut failed) = (None, None);
        let end = layout::history_key(&key, below);
        shared.backend.scan_rev(Tree::History, &layout::history_prefix(&key), &end, &mut |k, _| {
            let Some(l) = layout::trailing_lsn(k) else { return true };
            let frame = match shared.backend.get(Tree::Journal, &layout::journal_key(l)) {
                Ok(Some(frame)) => frame,
                Ok(None) => return true, // compacted since the index was read
                Err(e) => {
                    failed = Some(e);
                    return false;
                }
            };
            match codec::decode_record(&frame) {
                Ok(r) => {
                    found = pick(&r);
                    found.is_none()
                }
                Err(source) => {
                    let what = format!("{}/{l}", layout::JOURNAL);
                    if shared.config.recovery == RecoveryMode::Strict {
                        failed = Some(StoreError::Corrupt { what, source });
                        return false;
                    }
                    tracing::warn!(what = %what, error = %source, "skipping a corrupt journal record");
                    true
                }
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(found),
        }
    }

    /// [`Store::history`], also listing the LSNs of skipped corrupt records.
    pub fn history_report(&self, grant: &GrantKey) -> Result<History, StoreError> {
        self.check()?;
        let shared = self.shared();
        let key = grant.to_bytes();
        let mut lsns = Vec::new();
        shared.backend.scan(Tree::History, &layout::history_prefix(&key), &mut |k, _| {
            lsns.extend(layout::trailing_lsn(k));
            true
        })?;
        if let Some(pre) = lock(&shared.pending).get(&key) {
            lsns.retain(|l| *l < pre.first_lsn);
        }
        let mut out = History::default();
        for lsn in lsns {
            // Absent: compacted since the index was read.
            let Some(frame) = shared.backend.get(Tree::Journal, &layout::journal_key(lsn))? else { continue };
            match codec::decode_record(&frame) {
                Ok(r) => out.records.push((lsn, r)),
                Err(source) => {
                    let what = format!("{}/{lsn}", layout::JOURNAL);
                    if shared.config.recovery == RecoveryMode::Strict {
                        return Err(StoreError::Corrupt { what, source });
                    }
                    tracing::warn!(what = %what, error = %source, "skipping a corrupt journal record");
                    out.skipped.push(lsn);
                }
            }
        }
        Ok(out)
    }
}

pub(super) fn open_error(keys: &KeyRing, key: &[u8], e: OpenError) -> StoreError {
    let what = layout::key_name(layout::GRANTS, key);
    match e {
        OpenError::Corrupt(source) => StoreError::Corrupt { what, source },
        OpenError::UnknownKey(key_id) => StoreError::KeyUnavailable { what, key_id, ring: keys.ids() },
    }
}

/// Opens a stored envelope and decodes the state frame inside. The plaintext is wiped after decoding.
pub(super) fn decode_grant(keys: &KeyRing, key: &[u8], sealed: &[u8]) -> Result<GrantState, StoreError> {
    let (_, plain) = seal::open(keys, Slot::State(key), sealed).map_err(|e| open_error(keys, key, e))?;
    codec::decode_state(&plain)
        .map_err(|source| StoreError::Corrupt { what: layout::key_name(layout::GRANTS, key), source })
}
