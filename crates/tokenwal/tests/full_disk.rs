//! A real full disk (ENOSPC from the kernel, not an injected fault), at the engine level, against
//! the simulator over real sockets.
//!
//! How it works:
//!
//! 1. A 32 MiB file (on `/dev/shm` when there is one) is formatted ext4 with no blocks reserved for
//!    root (`-m 0`) and mounted through a loop device (`crates/tokenwal-store/tests/support/loopfs.rs`,
//!    shared with the store's `power_cut.rs`). The engine's sled store is created on it and
//!    `SHOPS` shops seeded in the simulator are installed.
//! 2. The disk is filled: a `HEADROOM` file is written and synced, then a filler file until the
//!    kernel answers ENOSPC; deleting the headroom file leaves exactly that little room.
//! 3. One task per shop refreshes its shop (`on_unauthorized`, a forced refresh) in a loop until a
//!    call fails: intents and commits fill the room until a write or sync fails.
//! 4. The engine is shut down, the filler deleted (space freed on the same filesystem), the store
//!    opened directly to read what is durable, then the engine reopened on it (recovery).
//!
//! What it proves, on a real full disk:
//!
//! * **a clear error**: the first failure is the store's `Io` error naming the operation, with the
//!   kernel's ENOSPC (`StorageFull`) as its source; every other failure is `Poisoned`;
//! * **fail-stop**: after it nothing is served — not even a cached, unexpired access token — and
//!   nothing is sent: `access_token` of every shop and `state` fail with `Poisoned` and the
//!   simulator sees no further request;
//! * **no request without a durable intent**: for every shop, the token requests the simulator
//!   received up to the failure are at most the `Intent` records durable after the reopen (and
//!   after recovery, requests ≤ intents again);
//! * **nothing acknowledged is lost**: every shop's stored generation after the reopen is at least
//!   its last acknowledged one, and at that generation the stored access token is the one handed
//!   out (a higher one is a commit answered `Io` that was "already durable", which is allowed);
//! * **every grant recovers** once space is freed: the reopened engine's recovery turns the open
//!   intents into ambiguities and resolves them against the simulator (the old refresh token is
//!   retried; Shopify's retention answers it with the pair), every shop ends `Healthy`, its new
//!   access token is accepted by the simulator's Admin API and its grant is alive there.
//!
//! Mutation checked: a store that answers a failed group `Ok` instead of `Io` (commit.rs) makes
//! this test fail.
//!
//! Prerequisites as for `power_cut.rs`: root, loop devices, ext4, `losetup`, `mkfs.ext4`, `mount`,
//! `umount` (packages `mount`, `e2fsprogs`). Without them: a loud SKIP and a pass, unless
//! `TOKENWAL_REQUIRE_SYNC_TEST=1` (CI), which makes a missing prerequisite a failure. An
//! EIO-returning device (device-mapper `error`/`flakey`) is not tested: needs the kernel's
//! device-mapper, which the build machines here do not have.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use tokenwal::core::{AccessToken, GrantKey, Phase, Record};
use tokenwal::store::{Store, StoreConfig, StoreError};
use tokenwal::{Engine, Error, KeyRing, StoreLocation};
use tokenwal_testkit::{accepted, engine_config, requests, seed, shop, sim, SECRET};

#[path = "../../tokenwal-store/tests/support/loopfs.rs"]
mod loopfs;

const SHOPS: usize = 6;
const IMAGE_BYTES: u64 = 32 << 20;
/// The room left on the filesystem when the load starts.
const HEADROOM: usize = 256 << 10;
/// The load must hit the full disk well within this.
const LOAD_LIMIT: Duration = Duration::from_secs(15);

fn name(i: usize) -> String {
    format!("full-disk-{i}")
}

fn grant(i: usize) -> GrantKey {
    GrantKey::shopify(&shop(&name(i)))
}

/// Writes `path` until the filesystem is full (ENOSPC), then syncs it. Returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    let mut chunk = 1 << 20;
    let buf = vec![0xA5u8; chunk];
    while chunk >= 512 {
        match f.write(&buf[..chunk]) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => chunk /= 2,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    f.sync_all().unwrap();
    written
}

/// A store error's outline, without the source's text (which holds no secret anyway).
fn is_enospc(e: &Error) -> Option<&'static str> {
    match e {
        Error::Store(StoreError::Io { op, source })
            if source.kind() == std::io::ErrorKind::StorageFull || source.raw_os_error() == Some(28) =>
        {
            Some(op)
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_full_disk_is_fail_stop_and_every_grant_recovers() {
    let started = Instant::now();
    let test = "full_disk::a_real_full_disk_is_fail_stop_and_every_grant_recovers";
    let what = "The real full-disk (ENOSPC) test";
    let tools = match loopfs::prerequisites() {
        Ok(t) => t,
        Err(reason) => return loopfs::missing(test, what, &reason),
    };
    let tmp = loopfs::image_dir();
    let image = tmp.path().join("disk.img");
    if let Err(reason) = tools.mkfs(&image, IMAGE_BYTES, &["-m", "0"]) {
        return loopfs::missing(test, what, &reason);
    }
    let disk = match loopfs::Mounted::new(&tools, &image, &tmp.path().join("mnt"), "rw") {
        Ok(d) => d,
        Err(reason) => return loopfs::missing(test, what, &reason),
    };
    let dir = disk.path().join("store");
    let filler = disk.path().join("filler");

    let sim = sim().await;
    let config = || engine_config(&sim.base_url(), StoreLocation::Path(dir.clone()), SECRET);
    let (engine, _) = Engine::open(config()).await.unwrap();
    let mut installed = Vec::new();
    for i in 0..SHOPS {
        installed.push(engine.install(&shop(&name(i)), seed(&sim, &name(i))).await.unwrap());
    }

    // Leave only HEADROOM free.
    let headroom = disk.path().join("headroom");
    {
        let mut f = std::fs::File::create(&headroom).unwrap();
        f.write_all(&vec![0x5Au8; HEADROOM]).unwrap();
        f.sync_all().unwrap();
    }
    let filled = fill(&filler);
    std::fs::remove_file(&headroom).unwrap();
    std::fs::File::open(disk.path()).unwrap().sync_all().unwrap();

    // The load: every shop refreshes until its call fails.
    let before_load: Vec<u64> = (0..SHOPS).map(|i| requests(&sim, &name(i))).collect();
    let mut tasks = Vec::new();
    for i in 0..SHOPS {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let shop = shop(&name(i));
            let mut acked: Vec<AccessToken> = Vec::new();
            let mut current = engine.access_token(&shop).await;
            let deadline = Instant::now() + LOAD_LIMIT;
            loop {
                match current {
                    Ok(token) => {
                        if Instant::now() > deadline {
                            panic!("{shop}: the disk never filled in {LOAD_LIMIT:?} ({} refreshes)", acked.len());
                        }
                        current = engine.on_unauthorized(&shop, &token).await;
                        acked.push(token);
                    }
                    Err(e) => return (acked, e),
                }
            }
        }));
    }
    let mut acked = BTreeMap::new();
    let mut enospc = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (tokens, err) = t.await.unwrap();
        let shown = format!("{err} | {err:?}");
        eprintln!("{}: {} acknowledged, then: {err}", name(i), tokens.len());
        for tok in &tokens {
            assert!(!shown.contains(tok.expose_secret()), "a token in the error: {shown}");
        }
        match is_enospc(&err) {
            Some(op) => enospc.push(op),
            None => assert!(matches!(err, Error::Store(StoreError::Poisoned)), "neither ENOSPC nor poisoned: {err:?}"),
        }
        acked.insert(i, tokens);
    }
    // The clear error: Io naming the operation, ENOSPC underneath.
    assert!(!enospc.is_empty(), "no call failed with the store's Io error carrying ENOSPC");
    for op in &enospc {
        assert!(!op.is_empty(), "the Io error names no operation");
    }
    eprintln!("full disk after {:?}: Io during {enospc:?} (filler {filled} bytes)", started.elapsed());
    let refreshes: usize = acked.values().map(Vec::len).sum();
    assert!(refreshes > 0, "no refresh succeeded before the disk was full: the headroom was not used");

    // Fail-stop: nothing is served (not even a cached token), nothing is sent.
    let at_failure: Vec<u64> = (0..SHOPS).map(|i| requests(&sim, &name(i))).collect();
    for i in 0..SHOPS {
        let served = engine.access_token(&shop(&name(i))).await;
        assert!(matches!(served, Err(Error::Store(StoreError::Poisoned))), "{}: {served:?}", name(i));
        let forced = engine.on_unauthorized(&shop(&name(i)), &AccessToken::new("stale")).await;
        assert!(matches!(forced, Err(Error::Store(StoreError::Poisoned))), "{}: {forced:?}", name(i));
        assert!(matches!(engine.state(&grant(i)), Err(Error::Store(StoreError::Poisoned))));
    }
    assert_eq!((0..SHOPS).map(|i| requests(&sim, &name(i))).collect::<Vec<_>>(), at_failure, "sent while poisoned");
    engine.shutdown().await;
    drop(engine);

    // Free the space on the same filesystem, then look at what is durable.
    std::fs::remove_file(&filler).unwrap();
    {
        let (store, _) = Store::open(&dir, &KeyRing::insecure_test_ring(), StoreConfig::default())
            .expect("the store reopens once space is freed");
        for i in 0..SHOPS {
            let history = store.history(&grant(i)).unwrap();
            let intents = history.iter().filter(|(_, r)| matches!(r, Record::Intent { .. })).count() as u64;
            let sent = at_failure[i] - before_load[i];
            assert!(
                at_failure[i] <= intents,
                "{}: {} token requests (load: {sent}) but only {intents} durable intents",
                name(i),
                at_failure[i]
            );
            // Nothing acknowledged is lost. Every token handed out came from a refresh (the
            // installed access tokens were expired), each one generation up.
            let s = store.get(&grant(i)).unwrap().expect("the grant is there");
            let tokens = &acked[&i];
            let stored = s.tokens.as_ref().expect("tokens are there");
            let acked_generation = installed[i].0 + tokens.len() as u64;
            assert!(
                s.generation.0 >= acked_generation,
                "{}: acknowledged generation {acked_generation} lost: stored {:?}",
                name(i),
                s.generation
            );
            if let (true, Some(last)) = (s.generation.0 == acked_generation, tokens.last()) {
                assert!(stored.access_token.expose_secret() == last.expose_secret(), "{}: acknowledged token lost", name(i));
            }
        }
    }

    // Reopen the engine: recovery resolves the open intents against the simulator.
    let (engine, report) = Engine::open(config()).await.expect("the engine reopens once space is freed");
    eprintln!("recovery after the full disk: {report:?}");
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!((report.still_ambiguous, report.needs_reauth), (0, 0), "{report:?}");
    assert_eq!(report.resolved, report.open, "every open intent resolved at once: {report:?}");
    for i in 0..SHOPS {
        let token = engine.access_token(&shop(&name(i))).await.expect("every grant recovers");
        assert!(accepted(&sim, &name(i), &token), "{}: the recovered token is not accepted", name(i));
        let s = engine.state(&grant(i)).unwrap().unwrap();
        assert_eq!(s.phase, Phase::Healthy, "{}", name(i));
        assert!(sim.grant_alive(&shop(&name(i)).to_string()), "{}: grant dead at the server", name(i));
        let intents = engine
            .store()
            .history(&grant(i))
            .unwrap()
            .iter()
            .filter(|(_, r)| matches!(r, Record::Intent { .. }))
            .count() as u64;
        assert!(requests(&sim, &name(i)) <= intents, "{}: a request without a durable intent", name(i));
    }
    engine.shutdown().await;
    drop(engine);
    drop(disk);
    eprintln!("full disk: {refreshes} refreshes, fail-stop, all {SHOPS} grants recovered ({:?})", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20), "too slow: {:?}", started.elapsed());
}
