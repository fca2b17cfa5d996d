//! A power cut, not a process kill: every write the store acknowledged must survive losing what
//! never left the operating system's page cache.
//!
//! The SIGKILL crash suites (`tests/crash.rs` here and at the workspace root) cannot catch a
//! missing fsync: when only the process dies, the kernel keeps its page cache and writes it out
//! later. Deleting the `sync_all` of `<dir>/db` in `backend/disk.rs` leaves them green. This test
//! is the one that goes red.
//!
//! How it works:
//!
//! 1. A 64 MiB file (on `/dev/shm` when there is one, so the outer fsyncs are free) is formatted
//!    ext4 and mounted through a loop device, with `commit=600` (no timed journal commit during the
//!    test) and `noauto_da_alloc`. Data written to that filesystem reaches the loop device — and so
//!    the backing file — only when something forces it out: an fsync, or writeback of pages dirty
//!    for 30 s (the test is far shorter), or a `sync(2)` of the whole machine.
//! 2. A child process (this test binary re-executed, as in `tests/crash.rs`) opens a store on that
//!    filesystem and commits forever, printing `ack <grant> <version>` after each `apply_blocking`
//!    returns `Ok`.
//! 3. After `ACKS` acknowledgements the parent kills the child (SIGKILL) and at once copies the
//!    backing file: the copy holds what the device received, and nothing of what was still only in
//!    the ext4 page cache. That copy is the disk after a power cut at this instant.
//! 4. The original is unmounted, the copy is attached to a new loop device and mounted (ext4
//!    replays its journal as after a crash), the store is reopened on it, and every acknowledged
//!    version must be there, with a consistent open index and history.
//!
//! What it proves: `apply` answers only after the data and the metadata sled needs are on the
//! device. With the `sync_all` removed, sled's `flush()` only starts writeback
//! (`sync_file_range`) and commits no file-size or extent change, so the acknowledged commits
//! since sled's last background fsync (every 500 ms) are missing and the test fails. The copy is a
//! kinder crash than a real one (a device may also lose writes it received but was not told to
//! flush), so it checks the fsync the store issues, not the device's honesty
//! (docs/journal.md §7).
//!
//! Prerequisites: root, a kernel with loop devices and ext4, and `losetup`, `mkfs.ext4`,
//! `mount`, `umount` (Debian/Ubuntu packages `mount` and `e2fsprogs`). Without them the test
//! prints a loud SKIP and passes, unless `TOKENWAL_REQUIRE_SYNC_TEST=1`, which makes a missing
//! prerequisite a failure (CI sets it). The loop-device setup is `tests/support/loopfs.rs`, shared
//! with `crates/tokenwal/tests/full_disk.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokenwal_core::*;
use tokenwal_store::{KeyRing, Store, StoreConfig};

#[path = "support/loopfs.rs"]
mod loopfs;
use loopfs::Mounted;

const CHILD_ENV: &str = "TOKENWAL_POWER_CUT_STORE";
const GRANTS: usize = 8;
/// Acknowledged commits before the power cut.
const ACKS: usize = 1500;
const IMAGE_BYTES: u64 = 64 << 20;
const T0: u64 = 1_800_000_000_000;

fn key(i: usize) -> GrantKey {
    GrantKey::shopify(&ShopDomain::parse(&format!("power-cut-{i}.myshopify.com")).unwrap())
}

fn tokens(tag: u64) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("shpat_pc_{tag}")),
        access_expires_at: UnixMillis(T0 + tag + 3_600_000),
        refresh_token: RefreshToken::new(format!("shprt_pc_{tag}")),
        refresh_expires_at: None,
        scope: None,
    }
}

/// The child's body (a no-op in a normal run): commits forever, round-robin over the grants, each
/// grant alternating an install (closed) and a refresh intent (open), and prints every
/// acknowledged version.
#[test]
fn power_cut_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let (store, _) = Store::open(dir, &KeyRing::insecure_test_ring(), StoreConfig::default()).unwrap();
    let m = Machine::shopify(store.fingerprint_key());
    let mut tag = 0u64;
    loop {
        for i in 0..GRANTS {
            tag += 1;
            let now = UnixMillis(T0 + tag);
            let g = key(i);
            let current = store.get(&g).unwrap();
            let batch = match &current {
                Some(s) if !s.phase.is_open() => m.plan_attempt(s, now).unwrap().transition().write_batch(),
                _ => m
                    .install(current.as_ref(), g.clone(), tokens(tag), InstallSource::Import, now)
                    .transition()
                    .write_batch(),
            }
            .unwrap();
            let version = batch.new_version;
            store.apply_blocking(batch).unwrap();
            // One `println!` is one locked write of a whole line (stdout is line-buffered).
            println!("ack {i} {version}");
        }
    }
}

/// A missing prerequisite: SKIP (pass), or fail when the environment requires the test.
fn missing(reason: &str) {
    loopfs::missing("power_cut::acknowledged_commits_survive_a_power_cut", "The missing-fsync test", reason);
}

#[test]
fn acknowledged_commits_survive_a_power_cut() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let started = Instant::now();
    let tools = match loopfs::prerequisites() {
        Ok(t) => t,
        Err(reason) => return missing(&reason),
    };
    let tmp = loopfs::image_dir();
    let image = tmp.path().join("disk.img");
    let snapshot = tmp.path().join("after-power-cut.img");
    if let Err(reason) = tools.mkfs(&image, IMAGE_BYTES, &[]) {
        return missing(&reason);
    }

    // The run: a child commits on the loop-mounted filesystem until the power cut.
    let mut acked: BTreeMap<usize, u64> = BTreeMap::new();
    let total = {
        let mnt = tmp.path().join("mnt");
        let mut disk = match Mounted::new(&tools, &image, &mnt, "commit=600,noauto_da_alloc") {
            Ok(d) => d,
            Err(reason) => return missing(&reason),
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["power_cut_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mnt.join("store"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ack ") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        while lines.len() < ACKS {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => lines.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!("the child stopped acknowledging after {} commits", lines.len());
                }
            }
        }
        // The power cut: the writer dies, and the disk is what the device has received.
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::copy(&image, &snapshot).unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter()); // acknowledged before the kill as well
        for line in &lines {
            let mut parts = line.split(' ').skip(1);
            let i: usize = parts.next().unwrap().parse().unwrap();
            let v: u64 = parts.next().unwrap().parse().unwrap();
            let e = acked.entry(i).or_default();
            *e = (*e).max(v);
        }
        disk.unmount();
        lines.len()
    };

    // After the power cut: mount the copy (ext4 replays its journal) and reopen the store.
    let mnt = tmp.path().join("mnt-after");
    let disk = Mounted::new(&tools, &snapshot, &mnt, "noauto_da_alloc").expect("mount the copy of the disk");
    {
        let (store, report) = Store::open(mnt.join("store"), &KeyRing::insecure_test_ring(), StoreConfig::default())
            .expect("the store reopens after the power cut");
        assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
        let mut lost = Vec::new();
        for (&i, &v) in &acked {
            let found = store.get(&key(i)).unwrap().map(|s| s.version);
            if found.is_none_or(|f| f < v) {
                lost.push(format!("{}: acknowledged v{v}, found {found:?}", key(i)));
            }
        }
        assert!(
            lost.is_empty(),
            "acknowledged commits lost in the power cut ({} of {} grants):\n{}",
            lost.len(),
            acked.len(),
            lost.join("\n")
        );
        let mut states = Vec::new();
        assert!(store.for_each_grant(|s| states.push(s)).unwrap().corrupt.is_empty());
        let open_scan: BTreeSet<_> = states.iter().filter(|s| s.phase.is_open()).map(|s| s.grant.clone()).collect();
        let open_index: BTreeSet<_> = store.open_grants().unwrap().into_iter().map(|s| s.grant).collect();
        assert_eq!(open_scan, open_index, "the open index disagrees with the states");
        for s in &states {
            let h = store.history(&s.grant).unwrap();
            // Every write appends at least one record, atomically with its state.
            assert!(h.len() as u64 >= s.version, "{} v{} has {} records", s.grant, s.version, h.len());
        }
    }
    drop(disk);
    eprintln!("{total} acknowledged commits over {GRANTS} grants survived the power cut ({:?})", started.elapsed());
    assert!(total >= ACKS);
}
