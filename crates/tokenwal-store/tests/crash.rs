//! Kills a real writer process (SIGKILL) at random moments and checks, after each reopen, that every
//! acknowledged write survived and that the open index, the journal and the states agree.
//!
//! The test binary re-executes itself as the child (as sled's own crash tests do): with
//! `TOKENWAL_STORE_CRASH_DIR` set, `crash_child` opens the store there and writes forever, printing
//! `ack <grant> <version>` after each write is acknowledged. A process kill cannot reveal a missing
//! fsync (the page cache survives); the in-memory crash images cover that.

use rand::Rng;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};
use tokenwal_core::*;
use tokenwal_store::{Store, StoreConfig};

const CHILD_ENV: &str = "TOKENWAL_STORE_CRASH_DIR";
const WRITERS: usize = 12;

fn key(i: usize) -> GrantKey {
    GrantKey::shopify(&ShopDomain::parse(&format!("crash-{i}.myshopify.com")).unwrap())
}

fn tokens(now: UnixMillis, tag: u64) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("shpat_{tag}")),
        access_expires_at: now.saturating_add(Duration::from_secs(3600)),
        refresh_token: RefreshToken::new(format!("shprt_{tag}")),
        refresh_expires_at: None,
        scope: None,
    }
}

fn ack(g: &GrantKey, version: u64) {
    // One `println!` is one locked, line-buffered write: lines never interleave.
    println!("ack {g} {version}");
}

/// One writer: install, then refresh forever (intent, then success), superseding an open attempt
/// left by a previous kill.
async fn writer(store: Store, m: Arc<Machine>, g: GrantKey) {
    let mut tag = 0u64;
    loop {
        tag += 1;
        let now = UnixMillis::from_system_time(SystemTime::now());
        let current = store.get(&g).unwrap();
        match current {
            Some(s) if !s.phase.is_open() => {
                let permit = m.plan_attempt(&s, now).unwrap().make_durable(&store).await.unwrap();
                ack(&g, permit.state().version);
                let outcome = Outcome::Success { tokens: tokens(now, tag), request_id: None };
                let done = m.on_outcome(permit.state(), &permit, outcome, now, tag).make_durable(&store).await.unwrap();
                ack(&g, done.state().version);
            }
            other => {
                let pending = m.install(other.as_ref(), g.clone(), tokens(now, tag), InstallSource::Import, now);
                let done = pending.make_durable(&store).await.unwrap();
                ack(&g, done.state().version);
            }
        }
    }
}

/// The child's body; a no-op in a normal test run.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let (store, _) = Store::open(dir, &tokenwal_store::KeyRing::insecure_test_ring(), StoreConfig::default()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let m = Arc::new(Machine::shopify(store.fingerprint_key()));
        let tasks: Vec<_> = (0..WRITERS).map(|i| tokio::spawn(writer(store.clone(), Arc::clone(&m), key(i)))).collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let exe = std::env::current_exe().unwrap();
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut rng = rand::thread_rng();
    let mut total_acks = 0;
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
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
        let mut lines = vec![rx.recv_timeout(Duration::from_secs(60)).expect("the child acknowledged nothing")];
        std::thread::sleep(Duration::from_millis(rng.gen_range(10..300)));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        total_acks += lines.len();
        for line in &lines {
            let mut parts = line.split(' ').skip(1);
            let (g, v) = (parts.next().unwrap(), parts.next().unwrap().parse::<u64>().unwrap());
            let e = acked.entry(g.to_owned()).or_default();
            *e = (*e).max(v);
        }

        let (store, report) =
            Store::open(&path, &tokenwal_store::KeyRing::insecure_test_ring(), StoreConfig::default()).unwrap();
        assert!(report.corrupt.is_empty(), "round {round}: {:?}", report.corrupt);
        for (g, v) in &acked {
            let grant = GrantKey::new("shopify", g.strip_prefix("shopify/").unwrap()).unwrap();
            let s = store.get(&grant).unwrap().unwrap_or_else(|| panic!("round {round}: {g} lost"));
            assert!(s.version >= *v, "round {round}: {g} acknowledged at v{v}, found v{}", s.version);
        }
        let mut states = Vec::new();
        let scan = store.for_each_grant(|s| states.push(s)).unwrap();
        assert!(scan.corrupt.is_empty());
        assert_eq!(store.grant_count(), states.len());
        let open_scan: BTreeSet<_> = states.iter().filter(|s| s.phase.is_open()).map(|s| s.grant.clone()).collect();
        let open_index: BTreeSet<_> = store.open_grants().unwrap().into_iter().map(|s| s.grant).collect();
        assert_eq!(open_scan, open_index, "round {round}: open index disagrees with the states");
        assert_eq!(report.open_attempts, open_index.len());
        for s in &states {
            // Every write appends at least one record, atomically with its state.
            let h = store.history(&s.grant).unwrap();
            assert!(h.len() as u64 >= s.version, "round {round}: {} v{} has {} records", s.grant, s.version, h.len());
            assert!(h.windows(2).all(|w| w[0].0 < w[1].0));
            assert!(h.iter().all(|(_, r)| r.grant() == &s.grant));
            assert!(h.last().unwrap().0 < report.next_lsn);
        }
    }
    eprintln!("{total_acks} acknowledged writes checked across 6 kills");
    assert!(total_acks > 6, "too few acknowledged writes to mean anything: {total_acks}");
}
