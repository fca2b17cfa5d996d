//! The in-memory backend: a live image that writes go to, and a durable image that only a sync
//! updates. A crash image is a copy of the durable one.

use super::{delete_expired, write_group, BatchResult, DurableBackend, Expired, Kv};
use crate::error::StoreError;
use crate::keys::KeyRing;
use crate::layout::Tree;
use crate::lock::lock;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::Bound;
use std::sync::Mutex;
use tokenwal_core::WriteBatch;

/// Entries handed out per lock acquisition while scanning.
const SCAN_CHUNK: usize = 512;

/// The six trees.
#[derive(Clone, Default)]
pub(crate) struct Image {
    trees: [BTreeMap<Vec<u8>, Vec<u8>>; 6],
}

impl Image {
    fn tree(&self, t: Tree) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        &self.trees[t as usize]
    }

    fn write(&mut self, (t, k, v): Write) {
        match v {
            Some(v) => self.trees[t as usize].insert(k, v),
            None => self.trees[t as usize].remove(&k),
        };
    }

    /// Sets a key outside any transaction (store creation, test corruption).
    pub(crate) fn put(&mut self, t: Tree, k: &[u8], v: &[u8]) {
        self.trees[t as usize].insert(k.to_vec(), v.to_vec());
    }
}

type Write = (Tree, Vec<u8>, Option<Vec<u8>>);

struct Inner {
    live: Image,
    durable: Image,
    /// Writes applied to `live` since the last sync, in order.
    unsynced: Vec<Write>,
}

pub(crate) struct MemBackend {
    inner: Mutex<Inner>,
}

/// A transaction over the live image: writes are staged, then applied together.
struct MemTxn<'a> {
    img: &'a Image,
    writes: RefCell<Vec<Write>>,
}

impl Kv for MemTxn<'_> {
    type Err = Infallible;

    fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, Infallible> {
        let staged = self.writes.borrow().iter().rev().find(|(wt, wk, _)| *wt == t && wk == k).map(|w| w.2.clone());
        Ok(staged.unwrap_or_else(|| self.img.tree(t).get(k).cloned()))
    }

    fn put(&self, t: Tree, k: &[u8], v: &[u8]) -> Result<(), Infallible> {
        self.writes.borrow_mut().push((t, k.to_vec(), Some(v.to_vec())));
        Ok(())
    }

    fn del(&self, t: Tree, k: &[u8]) -> Result<(), Infallible> {
        self.writes.borrow_mut().push((t, k.to_vec(), None));
        Ok(())
    }
}

impl MemBackend {
    /// A backend whose live and durable images are both `img`.
    pub(crate) fn from_image(img: Image) -> MemBackend {
        MemBackend { inner: Mutex::new(Inner { live: img.clone(), durable: img, unsynced: Vec::new() }) }
    }

    /// A copy of what is durable.
    #[cfg(any(test, feature = "test-hooks"))]
    pub(crate) fn durable_image(&self) -> Image {
        lock(&self.inner).durable.clone()
    }

    fn mem_get(&self, t: Tree, k: &[u8]) -> Option<Vec<u8>> {
        lock(&self.inner).live.tree(t).get(k).cloned()
    }

    fn mem_last_key(&self, t: Tree) -> Option<Vec<u8>> {
        lock(&self.inner).live.tree(t).keys().next_back().cloned()
    }

    fn mem_scan(&self, t: Tree, prefix: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) {
        self.scan_chunks(f, |g, after| {
            let from = after.map_or(Bound::Included(prefix.to_vec()), Bound::Excluded);
            g.live
                .tree(t)
                .range((from, Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(SCAN_CHUNK)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
    }

    fn mem_scan_rev(&self, t: Tree, prefix: &[u8], below: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) {
        if below <= prefix {
            return;
        }
        self.scan_chunks(f, |g, after| {
            let to = Bound::Excluded(after.unwrap_or_else(|| below.to_vec()));
            g.live
                .tree(t)
                .range((Bound::Included(prefix.to_vec()), to))
                .rev()
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(SCAN_CHUNK)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
    }

    /// Calls `f` over the entries `chunk` copies out under the lock, `SCAN_CHUNK` at a time, so that
    /// no lock is held while `f` runs. `chunk(g, after)` returns the entries that follow the key
    /// `after` in scan order (`None`: from the start).
    fn scan_chunks(
        &self,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        mut chunk: impl FnMut(&Inner, Option<Vec<u8>>) -> Vec<(Vec<u8>, Vec<u8>)>,
    ) {
        let mut after = None;
        loop {
            let entries = chunk(&lock(&self.inner), after.take());
            let full = entries.len() == SCAN_CHUNK;
            for (k, v) in &entries {
                if !f(k, v) {
                    return;
                }
            }
            match entries.into_iter().last() {
                Some((k, _)) if full => after = Some(k),
                _ => return,
            }
        }
    }

    fn commit_writes(g: &mut Inner, writes: Vec<Write>) {
        for w in writes {
            g.live.write(w.clone());
            g.unsynced.push(w);
        }
    }

    fn mem_apply_group(&self, keys: &KeyRing, batches: &[&WriteBatch], first_lsn: u64) -> Vec<BatchResult> {
        let mut g = lock(&self.inner);
        let txn = MemTxn { img: &g.live, writes: RefCell::new(Vec::new()) };
        let Ok(results) = write_group(&txn, keys, batches, first_lsn);
        let writes = txn.writes.into_inner();
        Self::commit_writes(&mut g, writes);
        results
    }

    fn mem_delete_expired(&self, entries: &[Expired]) {
        let mut g = lock(&self.inner);
        let txn = MemTxn { img: &g.live, writes: RefCell::new(Vec::new()) };
        let Ok(()) = delete_expired(&txn, entries);
        let writes = txn.writes.into_inner();
        Self::commit_writes(&mut g, writes);
    }

    fn mem_sync(&self) {
        let mut g = lock(&self.inner);
        let writes = std::mem::take(&mut g.unsynced);
        for w in writes {
            g.durable.write(w);
        }
    }

    /// Removes a key from both images (a retired cursor).
    pub(crate) fn del_durable(&self, t: Tree, k: &[u8]) {
        let mut g = lock(&self.inner);
        g.live.write((t, k.to_vec(), None));
        g.durable.write((t, k.to_vec(), None));
    }

    /// Sets a key in both images (store creation, test corruption).
    pub(crate) fn put_durable(&self, t: Tree, k: &[u8], v: &[u8]) {
        let mut g = lock(&self.inner);
        g.live.put(t, k, v);
        g.durable.put(t, k, v);
    }
}

impl DurableBackend for MemBackend {
    fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.mem_get(t, k))
    }

    fn scan(&self, t: Tree, prefix: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), StoreError> {
        self.mem_scan(t, prefix, f);
        Ok(())
    }

    fn scan_rev(
        &self,
        t: Tree,
        prefix: &[u8],
        below: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.mem_scan_rev(t, prefix, below, f);
        Ok(())
    }

    fn last_key(&self, t: Tree) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.mem_last_key(t))
    }

    fn apply_group(
        &self,
        keys: &KeyRing,
        batches: &[&WriteBatch],
        first_lsn: u64,
    ) -> Result<Vec<BatchResult>, StoreError> {
        Ok(self.mem_apply_group(keys, batches, first_lsn))
    }

    fn delete_expired(&self, entries: &[Expired]) -> Result<(), StoreError> {
        self.mem_delete_expired(entries);
        Ok(())
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.mem_sync();
        Ok(())
    }

    // A sync would make the committer's unsynced group durable in the crash image: the entry goes
    // to both images directly instead.
    fn put_meta(&self, k: &[u8], v: Option<&[u8]>) -> Result<(), StoreError> {
        match v {
            Some(v) => self.put_durable(Tree::Meta, k, v),
            None => self.del_durable(Tree::Meta, k),
        }
        Ok(())
    }

    fn init_meta(&self, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        for (k, v) in entries {
            self.put_durable(Tree::Meta, k, v);
        }
        Ok(())
    }
}
