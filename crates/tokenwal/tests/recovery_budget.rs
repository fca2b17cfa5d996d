//! Recovery's transitions share syncs (issue 15, item 3), and its time budget (item 4), over real
//! loopback sockets against the simulator:
//! `Engine::open` returns while the token endpoint holds a recovery probe's answer; the held grant
//! answers `Recovering` (or is waited for, by option) while every other grant is served; the held
//! grant resolves in the background once the endpoint answers; shutdown during background recovery
//! loses nothing.
//!
//! No timing is asserted: "open returned while the answer was still held" is the property (the hold
//! ends only when the test releases it).

use std::path::Path;
use std::time::Duration;
use tokenwal::core::{AccessToken, AmbiguityReason, GrantKey, InstallSource, Machine, Phase, Record};
use tokenwal::store::Store;
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_sim::{Fault, SimHandle};
use tokenwal_testkit::{accepted, engine_config, now, requests, seed, shop, sim, state, SECRET};

fn config(sim: &SimHandle, path: &Path) -> Config {
    let mut c = engine_config(&sim.base_url(), StoreLocation::Path(path.to_path_buf()), SECRET);
    // A held answer is waited for as long as the test holds it.
    c.timeouts.total = Duration::from_secs(60);
    c.recovery_budget = Duration::from_millis(200);
    c
}

/// Installs `names` in a store at `path` and leaves every one of them ambiguous (the server rotated,
/// the answer was lost): the next open must retry each with its old token.
async fn leave_ambiguous(sim: &SimHandle, path: &Path, names: &[&str]) {
    let mut c = engine_config(&sim.base_url(), StoreLocation::Path(path.to_path_buf()), SECRET);
    c.max_wait = Duration::ZERO; // give up at once: the ambiguity stays
    let (engine, report) = Engine::open(c).await.unwrap();
    assert_eq!(report.pending, 0);
    for name in names {
        let tokens = seed(sim, name);
        sim.push_faults(&shop(name).to_string(), [Fault::RotateThenDrop]).unwrap();
        engine.install(&shop(name), tokens).await.unwrap();
        let err = engine.access_token(&shop(name)).await.unwrap_err();
        assert!(matches!(err, Error::Ambiguous { .. }), "{err}");
    }
    engine.shutdown().await;
}

/// Waits (bounded) until the engine has no grant recovering.
/// Installs each of `names` on `store` and leaves an attempt's intent durable for it, as a process
/// stopped right after its intents would (no answer, no commit).
async fn leave_intents_open(sim: &SimHandle, store: &Store, names: &[String]) {
    let machine = Machine::shopify(store.fingerprint_key());
    for n in names {
        let grant = GrantKey::shopify(&shop(n));
        let installed = machine
            .install(None, grant, seed(sim, n), InstallSource::Application, now())
            .make_durable(store)
            .await
            .unwrap();
        machine.plan_attempt(installed.state(), now()).unwrap().make_durable(store).await.unwrap();
    }
}

async fn recovered(engine: &Engine) {
    for _ in 0..400 {
        if engine.recovering() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("recovery did not end: {} grants still recovering", engine.recovering());
}

/// Waits (bounded) until the simulator holds a token request of one of `names`, and returns its index.
async fn held_probe(sim: &SimHandle, names: &[&str]) -> usize {
    for _ in 0..400 {
        if let Some(i) = names.iter().position(|n| sim.hold_status(&shop(n).to_string()).held == 1) {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no probe of {names:?} is held");
}

#[tokio::test]
async fn open_returns_while_the_endpoint_hangs_and_serves_every_other_grant() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    leave_ambiguous(&sim, &path, &["held"]).await;
    let calm = seed(&sim, "calm");
    sim.hold(&shop("held").to_string());

    let (engine, report) = Engine::open(config(&sim, &path)).await.unwrap();
    // Open returned, and the recovery probe's answer is still held by the server.
    assert!(sim.wait_held(&shop("held").to_string(), Duration::from_secs(10)).await);
    assert_eq!((report.open, report.pending, report.resolved), (1, 1, 0), "{report:?}");
    assert_eq!(engine.recovering(), 1);

    let err = engine.access_token(&shop("held")).await.unwrap_err();
    let Error::Recovering { grant, retry_after } = &err else { panic!("{err}") };
    assert_eq!(grant.account(), "held.myshopify.com");
    assert!(*retry_after > Duration::ZERO);
    assert!(err.is_transient());
    assert!(err.to_string().contains("recovering"), "{err}");
    let rejected = AccessToken::new("shpat_whatever");
    let err = engine.on_unauthorized(&shop("held"), &rejected).await.unwrap_err();
    assert!(matches!(err, Error::Recovering { .. }), "{err}");

    // Every other grant is served at once: installed and refreshed while the probe hangs.
    engine.install(&shop("calm"), calm).await.unwrap();
    let t = engine.access_token(&shop("calm")).await.unwrap();
    assert!(accepted(&sim, "calm", &t));
    assert_eq!(sim.hold_status(&shop("held").to_string()).held, 1, "the probe is still held");

    // The endpoint answers: the grant resolves in the background and is served.
    assert!(sim.release(&shop("held").to_string()));
    recovered(&engine).await;
    assert!(matches!(state(&engine, "held").unwrap().phase, Phase::Healthy));
    let t = engine.access_token(&shop("held")).await.unwrap();
    assert!(accepted(&sim, "held", &t));
    assert_eq!(requests(&sim, "held"), 2, "the lost rotation and one recovery probe");
    engine.shutdown().await;
}

#[tokio::test]
async fn by_option_callers_wait_for_a_grant_still_recovering() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    leave_ambiguous(&sim, &path, &["slow"]).await;
    sim.hold(&shop("slow").to_string());
    let mut c = config(&sim, &path);
    c.wait_for_recovery = true;
    c.max_wait = Duration::from_secs(30);
    let (engine, report) = Engine::open(c).await.unwrap();
    assert!(sim.wait_held(&shop("slow").to_string(), Duration::from_secs(10)).await);
    assert_eq!(report.pending, 1, "{report:?}");
    let caller = {
        let e = engine.clone();
        tokio::spawn(async move { e.access_token(&shop("slow")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!caller.is_finished(), "the caller waits while the probe is held");
    assert!(sim.release(&shop("slow").to_string()));
    let t = caller.await.unwrap().unwrap();
    assert!(accepted(&sim, "slow", &t));
    assert_eq!(engine.recovering(), 0);
    engine.shutdown().await;
}

#[tokio::test]
async fn a_wait_that_outlasts_max_wait_answers_recovering() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    leave_ambiguous(&sim, &path, &["stuck"]).await;
    sim.hold(&shop("stuck").to_string());
    let mut c = config(&sim, &path);
    c.wait_for_recovery = true;
    c.max_wait = Duration::from_millis(100);
    let (engine, _) = Engine::open(c).await.unwrap();
    assert!(sim.wait_held(&shop("stuck").to_string(), Duration::from_secs(10)).await);
    let err = engine.access_token(&shop("stuck")).await.unwrap_err();
    assert!(matches!(err, Error::Recovering { .. }), "{err}");
    assert!(sim.release(&shop("stuck").to_string()));
    recovered(&engine).await;
    engine.shutdown().await;
}

/// Three grants to recover, one probe at a time: the first probe hangs (its answer is held past the
/// request timeout), the other two wait for a permit. Shutdown stops recovery: the two never start,
/// the hung one times out and stays ambiguous. Nothing is lost: the next open recovers all three.
#[tokio::test]
async fn shutdown_during_background_recovery_loses_nothing() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let names = ["a1", "a2", "a3"];
    leave_ambiguous(&sim, &path, &names).await;
    for n in names {
        sim.hold(&shop(n).to_string());
    }
    let mut c = config(&sim, &path);
    c.max_concurrent_refreshes = 1;
    c.timeouts.total = Duration::from_secs(2);
    let before: Vec<u64> = names.iter().map(|n| requests(&sim, n)).collect();
    let (engine, report) = Engine::open(c).await.unwrap();
    assert_eq!((report.open, report.pending), (3, 3), "{report:?}");
    // Exactly one probe is on the wire.
    let on_wire = held_probe(&sim, &names).await;
    engine.shutdown().await;
    let after: Vec<u64> = names.iter().map(|n| requests(&sim, n)).collect();
    for (i, n) in names.iter().enumerate() {
        let expected = before[i] + u64::from(i == on_wire);
        assert_eq!(after[i], expected, "{n}: only the held probe was sent");
        let phase = state(&engine, n).unwrap().phase;
        assert!(matches!(phase, Phase::Ambiguous(_)), "{n}: still open after shutdown: {phase:?}");
    }
    drop(engine);
    for n in names {
        sim.cancel(&shop(n).to_string()); // disarms the holds the two unsent probes never met
    }
    let mut c = config(&sim, &path);
    c.recovery_budget = Duration::from_secs(30);
    let (engine, report) = Engine::open(c).await.unwrap();
    assert_eq!((report.open, report.resolved, report.pending), (3, 3, 0), "{report:?}");
    for n in names {
        let t = engine.access_token(&shop(n)).await.unwrap();
        assert!(accepted(&sim, n, &t), "{n}");
    }
    engine.shutdown().await;
}

/// 64 interrupted intents (the process stopped after each intent was durable): recovery issues their
/// 64 `Refreshing` → `Ambiguous` transitions together, so they share the committer's syncs. Made
/// deterministic by holding the first commit group at its sync: batched, every other transition is
/// submitted meanwhile and the next group takes them all; one by one, each waits for its own sync
/// (65 syncs, checked by setting the window to 1). Counted when the first probe is on the wire
/// (probes start only once every transition is durable; one probe at a time, held).
#[tokio::test]
async fn recovery_transitions_share_syncs() {
    const N: usize = 64;
    let sim = sim().await;
    let store = Store::in_memory();
    let names: Vec<String> = (0..N).map(|i| format!("intent-{i}")).collect();
    leave_intents_open(&sim, &store, &names).await;
    for n in &names {
        sim.hold(&shop(n).to_string());
    }
    assert_eq!(store.open_grants().unwrap().len(), N);
    let before = store.stats();
    let hold = store.hold_acks();
    let mut c = engine_config(&sim.base_url(), StoreLocation::Open(store.clone()), SECRET);
    c.recovery_budget = Duration::ZERO;
    c.max_concurrent_refreshes = 1;
    let (engine, report) = Engine::open(c).await.unwrap();
    // With no budget, open returns before the states are read: how many were interrupted is not
    // known yet.
    assert_eq!((report.open, report.pending), (N, N), "{report:?}");
    let parked = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let parked = hold.wait_parked(Duration::from_secs(10));
            // Batched, every transition is handed to the committer while the first group waits.
            for _ in 0..400 {
                if store.stats().submitted - before.submitted >= N as u64 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            hold.release();
            parked
        })
        .await
        .unwrap()
    };
    assert!(parked, "the first recovery transitions reached the sync");
    let mut held = false;
    for _ in 0..400 {
        held = names.iter().any(|n| sim.hold_status(&shop(n).to_string()).held > 0);
        if held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(held, "a probe is on the wire");
    let used = store.stats().syncs - before.syncs;
    let ambiguous = names.iter().filter(|n| matches!(state(&engine, n).unwrap().phase, Phase::Ambiguous(_))).count();
    assert!(ambiguous >= N - 1, "every transition is durable before a probe goes: {ambiguous}");
    assert!(used <= 3, "{N} transitions and one intent took {used} syncs");
    for n in &names {
        sim.cancel(&shop(n).to_string());
    }
    engine.shutdown().await;
}

/// Recovery folds an interrupted attempt into its probe: N intents left open (the process stopped
/// after each was durable) recover with **two** durable writes per grant — the probe's intent,
/// carrying the interruption's record before it, and the probe's commit — where writing the
/// interruption alone first took three. Each grant's history still reads: the interrupted intent,
/// `Ambiguous{Interrupted}` for it, the retry's intent presenting the same credential at the same
/// generation (written together), then the retry's commit.
#[tokio::test]
async fn an_interrupted_attempt_and_its_probe_share_one_write() {
    const N: usize = 16;
    let sim = sim().await;
    let store = Store::in_memory();
    let names: Vec<String> = (0..N).map(|i| format!("fold-{i}")).collect();
    leave_intents_open(&sim, &store, &names).await;
    let before = store.stats();
    let mut c = engine_config(&sim.base_url(), StoreLocation::Open(store.clone()), SECRET);
    c.recovery_budget = Duration::from_secs(60);
    let (engine, report) = Engine::open(c).await.unwrap();
    assert_eq!((report.open, report.interrupted, report.resolved, report.pending), (N, N, N, 0), "{report:?}");
    let writes = store.stats().batches_applied - before.batches_applied;
    assert_eq!(writes, 2 * N as u64, "per grant: the probe's intent with the interruption, then its commit");
    for n in &names {
        let history = store.history(&GrantKey::shopify(&shop(n))).unwrap();
        let records: Vec<&Record> = history.iter().map(|(_, r)| r).collect();
        let first = records.iter().position(|r| matches!(r, Record::Intent { .. })).expect("the interrupted intent");
        let [Record::Intent { attempt: a, generation: g, presented: p, .. }, Record::Ambiguous { attempt: b, why, at: t1, .. }, Record::Intent { attempt: c, generation: h, presented: q, at: t2, .. }, rest @ ..] =
            &records[first..]
        else {
            panic!("{n}: {:?}", records.iter().map(|r| r.kind_name()).collect::<Vec<_>>())
        };
        assert_eq!((b, why), (a, &AmbiguityReason::Interrupted), "{n}: the interrupted attempt is recorded as such");
        assert!(c.0 > a.0, "{n}: the retry is a new attempt");
        assert_eq!((g, p), (h, q), "{n}: the retry presents the same credential");
        assert_eq!(t1, t2, "{n}: the interruption and the retry's intent are one write");
        assert!(rest.iter().any(|r| matches!(r, Record::Committed { .. })), "{n}: the retry committed");
        assert!(matches!(state(&engine, n).unwrap().phase, Phase::Healthy));
        let t = engine.access_token(&shop(n)).await.unwrap();
        assert!(accepted(&sim, n, &t), "{n}");
    }
    engine.shutdown().await;
}

/// A probe decides on the state recovery read for its batch, not on a fresh read (one store read
/// fewer per probe). An install that lands between that reading and the probe must still win: the
/// probe's intent is refused by its compare-and-swap, it decides again on the installed state, and
/// the freshly installed grant is not refreshed (`resolve_only`: recovery drives open attempts only).
/// Made deterministic with one probe at a time: the first probe's answer is held while the other
/// grant, waiting for the permit with its reading in hand, is installed anew.
#[tokio::test]
async fn an_install_after_the_batch_read_is_not_refreshed_by_its_probe() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let names = ["race1", "race2"];
    leave_ambiguous(&sim, &path, &names).await;
    for n in names {
        sim.hold(&shop(n).to_string());
    }
    let mut c = config(&sim, &path);
    c.max_concurrent_refreshes = 1;
    let (engine, report) = Engine::open(c).await.unwrap();
    assert_eq!(report.open, 2, "{report:?}");
    let on_wire = held_probe(&sim, &names).await;
    let (held, waiting) = (names[on_wire], names[1 - on_wire]);
    // The waiting grant is installed anew while its probe waits for the permit.
    let sent_before = requests(&sim, waiting);
    let installed = seed(&sim, waiting);
    engine.install(&shop(waiting), installed.clone()).await.unwrap();
    sim.cancel(&shop(waiting).to_string()); // its hold must not catch a request it should not see
    assert!(sim.release(&shop(held).to_string()));
    recovered(&engine).await;

    assert_eq!(requests(&sim, waiting), sent_before, "{waiting}: the installed grant was not refreshed");
    let s = state(&engine, waiting).unwrap();
    assert_eq!(s.phase, Phase::Healthy, "{waiting}");
    assert_eq!(
        s.tokens.as_ref().map(|t| t.refresh_token.expose_secret()),
        Some(installed.refresh_token.expose_secret()),
        "{waiting}: the install's pair stands"
    );
    assert_eq!(state(&engine, held).unwrap().phase, Phase::Healthy, "{held}: its probe resolved it");
    engine.shutdown().await;
}
