//! A store written by an earlier release still opens (issue 15): `tests/fixtures/store-format2/` is a
//! sled store of on-disk format `tokenwal-store/2`, written by [`generate_format2_fixture`] (run by
//! hand, see the fixture's README) with the public test key committed beside it. Today's code opens
//! a copy of it, recovers its open intents and its ambiguity against the simulator over real
//! loopback sockets, and loses no grant: every grant is there, in the phase it was left in (or
//! Healthy on a pair the simulator issued, if it was open), with its tokens and its history.
//!
//! When a later format lands, these tests must keep passing **unchanged against the same committed
//! fixture**: then they prove the upgrade. Do not regenerate the fixture with a newer format (the
//! tests check its marker is format 2); add a new fixture beside it instead.
//!
//! The fixture is never opened in place (opening writes): every test opens a copy in a temporary
//! directory. Every timestamp in it is fixed (`T0` plus whole minutes) and every token expires in
//! 2100, so it does not age; the ciphertexts differ from one generation to the next (random nonces
//! and fingerprint key).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokenwal::core::{
    AccessToken, AmbiguityReason, GrantKey, GrantState, InstallSource, Machine, Outcome, Phase, Record, RefreshToken,
    TokenSet, UnixMillis,
};
use tokenwal::store::{KeyRing, Store, StoreConfig};
use tokenwal::{Config, Engine, Error, KeySource, StoreLocation};
use tokenwal_sim::SimHandle;
use tokenwal_testkit::{engine_config, requests, shop, sim, CLIENT_ID, SECRET};

/// The committed fixture: `store/` (the sled directory) and `test-key.txt` (its key file).
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store-format2");
/// The format the fixture was written in. Fixed: it is what the fixture *is*, not what today's
/// code writes.
const FIXTURE_FORMAT: &str = "tokenwal-store/2";
/// 2026-12-07T00:00:00Z. The generator's clock starts here and moves one minute per step.
const T0: u64 = 1_796_601_600_000;
/// 2100-01-01T00:00:00Z: the expiry of every token in the fixture.
const FAR: UnixMillis = UnixMillis(4_102_444_800_000);
const MINUTE: u64 = 60_000;

/// What the generator does to a grant after installing its first pair.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A refresh that commits the grant's next pair (from Healthy a rotation; from Ambiguous the
    /// retry of the old credential, which resolves the ambiguity).
    Rotate,
    /// A refresh whose answer was lost (a timeout): the grant is left Ambiguous on its pair.
    LoseAnswer,
    /// A refresh the server rejected (400 `invalid_grant`): the grant needs re-auth.
    Reject,
    /// The application installs the grant's next pair over it.
    Reinstall,
    /// `app/scopes_update`.
    Scopes,
    /// The app is uninstalled.
    Uninstall,
    /// A refresh whose intent is durable and nothing else: the process stopped before sending it.
    /// The grant is left `Refreshing`, an open intent for recovery; the server never saw it.
    StopMidAttempt,
}

/// One grant of the fixture: how it was written, and what a reader must find.
struct Grant {
    /// Its shop is `{name}.myshopify.com`.
    name: &'static str,
    steps: &'static [Step],
    /// Its phase as written.
    phase: &'static str,
    /// Its history as written, oldest first (record kinds).
    records: &'static [&'static str],
}

const INSTALLED: &str = "installed";
const INTENT: &str = "intent";
const COMMITTED: &str = "committed";

/// The fixture's grants, in the order they were written.
const GRANTS: &[Grant] = {
    use Step::*;
    &[
        Grant { name: "fx-fresh", steps: &[], phase: "healthy", records: &[INSTALLED] },
        Grant { name: "fx-rotated-once", steps: &[Rotate], phase: "healthy", records: &[INSTALLED, INTENT, COMMITTED] },
        Grant {
            name: "fx-rotated-thrice",
            steps: &[Rotate, Rotate, Rotate],
            phase: "healthy",
            records: &[INSTALLED, INTENT, COMMITTED, INTENT, COMMITTED, INTENT, COMMITTED],
        },
        Grant {
            name: "fx-scopes",
            steps: &[Rotate, Scopes, Rotate],
            phase: "healthy",
            records: &[INSTALLED, INTENT, COMMITTED, "scopes-updated", INTENT, COMMITTED],
        },
        Grant {
            name: "fx-resolved",
            steps: &[LoseAnswer, Rotate],
            phase: "healthy",
            records: &[INSTALLED, INTENT, "ambiguous", INTENT, COMMITTED, "resolved"],
        },
        Grant {
            name: "fx-reinstalled",
            steps: &[Rotate, Reinstall],
            phase: "healthy",
            records: &[INSTALLED, INTENT, COMMITTED, INSTALLED],
        },
        Grant { name: "fx-open-fresh", steps: &[StopMidAttempt], phase: "refreshing", records: &[INSTALLED, INTENT] },
        Grant {
            name: "fx-open-rotated",
            steps: &[Rotate, Rotate, StopMidAttempt],
            phase: "refreshing",
            records: &[INSTALLED, INTENT, COMMITTED, INTENT, COMMITTED, INTENT],
        },
        Grant {
            name: "fx-open-retry",
            steps: &[LoseAnswer, StopMidAttempt],
            phase: "refreshing",
            records: &[INSTALLED, INTENT, "ambiguous", INTENT],
        },
        Grant {
            name: "fx-ambiguous",
            steps: &[Rotate, LoseAnswer],
            phase: "ambiguous",
            records: &[INSTALLED, INTENT, COMMITTED, INTENT, "ambiguous"],
        },
        Grant {
            name: "fx-needs-reauth",
            steps: &[Rotate, Reject],
            phase: "needs-reauth",
            records: &[INSTALLED, INTENT, COMMITTED, INTENT, "rejected", "needs-reauth"],
        },
        Grant {
            name: "fx-uninstalled",
            steps: &[Rotate, Uninstall],
            phase: "uninstalled",
            records: &[INSTALLED, INTENT, COMMITTED, "uninstalled"],
        },
    ]
};

impl Grant {
    fn key(&self) -> GrantKey {
        GrantKey::shopify(&shop(self.name))
    }

    /// How many pairs the grant was given (its first install is pair 1).
    fn pairs(&self) -> u32 {
        1 + self.steps.iter().filter(|s| matches!(s, Step::Rotate | Step::Reinstall)).count() as u32
    }

    /// The pair it holds as written (none once uninstalled).
    fn held(&self) -> Option<TokenSet> {
        (self.phase != "uninstalled").then(|| tokens(self.name, self.pairs()))
    }

    /// Whether recovery must resolve it (an open intent or an ambiguity).
    fn is_open(&self) -> bool {
        matches!(self.phase, "refreshing" | "ambiguous")
    }
}

/// Pair `n` of grant `name`: fixed strings, fixed expiries (2100), fixed scope.
fn tokens(name: &str, n: u32) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("shpat_fixture_{name}_{n}")),
        access_expires_at: FAR,
        refresh_token: RefreshToken::new(format!("shprt_fixture_{name}_{n}")),
        refresh_expires_at: Some(FAR),
        scope: Some("read_products,write_orders".into()),
    }
}

fn kinds(records: &[(u64, Record)]) -> Vec<&'static str> {
    records.iter().map(|(_, r)| r.kind_name()).collect()
}

/// Whether two token sets are the same pair (compared here so that no assertion prints a token).
fn same_pair(a: &TokenSet, b: &TokenSet) -> bool {
    a.access_token.expose_secret() == b.access_token.expose_secret()
        && a.refresh_token.expose_secret() == b.refresh_token.expose_secret()
        && a.access_expires_at == b.access_expires_at
        && a.refresh_expires_at == b.refresh_expires_at
        && a.scope == b.scope
}

// ------------------------------------------------------------------------------------ the fixture

/// Copies the committed fixture into `into`: the store to `into/store`, the key file to
/// `into/test-key.txt`. Returns both paths.
fn copy_fixture(into: &Path) -> (PathBuf, PathBuf) {
    let store = into.join("store");
    copy_dir(&Path::new(FIXTURE).join("store"), &store);
    (store, copy_key(into))
}

/// Copies the fixture's key file into `into`, made 0600 as the key loader demands (git does not
/// keep modes).
fn copy_key(into: &Path) -> PathBuf {
    let key = into.join("test-key.txt");
    std::fs::copy(Path::new(FIXTURE).join("test-key.txt"), &key).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    key
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Whether any file under `dir` contains `needle` (the format marker is stored as is in sled's
/// files: neither sealed nor compressed).
fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().any(|entry| {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_contain(&path, needle)
        } else {
            std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle)
        }
    })
}

/// The fixture is what it says it is: a format-2 store (no newer marker in it), never opened in
/// place, with no token in the clear.
#[test]
fn the_committed_fixture_is_a_format_2_store() {
    let store = Path::new(FIXTURE).join("store");
    assert!(files_contain(&store, FIXTURE_FORMAT.as_bytes()), "{}: no {FIXTURE_FORMAT} marker", store.display());
    for newer in 3..10 {
        let marker = format!("tokenwal-store/{newer}");
        assert!(!files_contain(&store, marker.as_bytes()), "the fixture must stay format 2, found {marker}");
    }
    assert!(!store.join(tokenwal::store::layout::LOCK_FILE).exists(), "the fixture was opened in place");
    for token in ["shpat_fixture_", "shprt_fixture_"] {
        assert!(!files_contain(&store, token.as_bytes()), "a token is in the clear");
    }
}

// ------------------------------------------------------------------------------------ reading it

/// Today's store API opens a copy and reads every grant as written, without recovering anything:
/// the count, the open index, each phase, each pair, each history.
#[test]
fn the_store_reads_every_grant_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = copy_fixture(dir.path());
    let ring = KeyRing::from_file(&key).unwrap();
    let (store, report) = Store::open(&path, &ring, StoreConfig::default()).unwrap();
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(store.grant_count(), GRANTS.len());

    let mut found = BTreeSet::new();
    let scan = store
        .for_each_grant(|s| {
            found.insert(s.grant.account().to_owned());
        })
        .unwrap();
    assert!(scan.corrupt.is_empty(), "{scan:?}");
    let expected: BTreeSet<String> = GRANTS.iter().map(|g| shop(g.name).to_string()).collect();
    assert_eq!(found, expected);

    let open: BTreeSet<String> = store.open_keys().unwrap().iter().map(|k| k.account().to_owned()).collect();
    let expected_open: BTreeSet<String> =
        GRANTS.iter().filter(|g| g.is_open()).map(|g| shop(g.name).to_string()).collect();
    assert_eq!(open, expected_open);

    for g in GRANTS {
        let s = store.get(&g.key()).unwrap().unwrap_or_else(|| panic!("{}: missing", g.name));
        check_as_written(g, &s);
        assert_eq!(kinds(&store.history(&g.key()).unwrap()), g.records, "{}", g.name);
    }
}

/// `s` is `g` as the generator left it.
fn check_as_written(g: &Grant, s: &GrantState) {
    assert_eq!(s.phase.name(), g.phase, "{}", g.name);
    match (g.held(), &s.tokens) {
        (Some(held), Some(t)) => assert!(same_pair(&held, t), "{}: not the pair written", g.name),
        (None, None) => {}
        (held, t) => panic!("{}: tokens written: {}, read: {}", g.name, held.is_some(), t.is_some()),
    }
    assert!(s.updated_at.0 > T0 && s.updated_at.0 < T0 + 1000 * MINUTE, "{}: {:?}", g.name, s.updated_at);
}

// ------------------------------------------------------------------------------------ recovering it

fn config(sim: &SimHandle, path: &Path, key: &Path) -> Config {
    let mut c = engine_config(&sim.base_url(), StoreLocation::Path(path.to_path_buf()), SECRET)
        .with_store_keys(KeySource::File(key.to_path_buf()));
    // Recovery ends before open returns, so the report counts every resolution.
    c.recovery_budget = Duration::from_secs(60);
    // The fixture's records are older than any retention: they must stay to be checked.
    c.compaction = None;
    c
}

/// Tells the simulator every grant the fixture holds a live pair for, with that pair as its
/// current one: the open intents were never sent and the lost answer was never processed, so the
/// server still expects each grant's stored refresh token. (A grant needing re-auth is dead on the
/// server too; an uninstalled one holds no tokens.)
fn seed_fixture(sim: &SimHandle) {
    for g in GRANTS.iter().filter(|g| g.phase != "needs-reauth") {
        if let Some(t) = g.held() {
            sim.seed_shop_with_tokens(
                &shop(g.name).to_string(),
                t.access_token.expose_secret(),
                t.refresh_token.expose_secret(),
            );
        }
    }
}

/// Today's engine opens a copy of the fixture, recovers its three open intents and its ambiguity
/// against the simulator (one probe each, answered with a new pair), and loses no grant: the others
/// keep their phase, pair and history; every history still holds what the generator wrote.
#[tokio::test]
async fn the_engine_opens_the_fixture_recovers_its_intents_and_loses_no_grant() {
    let sim = sim().await;
    seed_fixture(&sim);
    let dir = tempfile::tempdir().unwrap();
    let (path, key) = copy_fixture(dir.path());
    let open = GRANTS.iter().filter(|g| g.is_open()).count();
    let interrupted = GRANTS.iter().filter(|g| g.phase == "refreshing").count();

    let (engine, report) = Engine::open(config(&sim, &path, &key)).await.unwrap();
    assert_eq!(
        (report.grants, report.open, report.interrupted, report.resolved),
        (GRANTS.len(), open, interrupted, open),
        "{report:?}"
    );
    assert_eq!((report.still_ambiguous, report.needs_reauth, report.pending), (0, 0, 0), "{report:?}");
    assert!(report.corrupt.is_empty(), "{report:?}");
    assert_eq!(engine.recovering(), 0);
    assert!(engine.store().open_keys().unwrap().is_empty(), "no grant is left open");
    let mut found = 0;
    engine.store().for_each_grant(|_| found += 1).unwrap();
    assert_eq!(found, GRANTS.len());

    for g in GRANTS {
        let s = engine.state(&g.key()).unwrap().unwrap_or_else(|| panic!("{}: lost", g.name));
        let history = engine.store().history(&g.key()).unwrap();
        let kinds = kinds(&history);
        let name = shop(g.name);
        if g.is_open() {
            // Recovered: one probe with the stored refresh token, answered with a new pair.
            assert!(matches!(s.phase, Phase::Healthy), "{}: {:?}", g.name, s.phase.name());
            let held = g.held().unwrap();
            let t = s.tokens.as_ref().unwrap();
            assert!(t.refresh_token.expose_secret() != held.refresh_token.expose_secret(), "{}: not rotated", g.name);
            assert_eq!(requests(&sim, g.name), 1, "{}: one probe", g.name);
            let now = sim.now_ms();
            let issued = sim.with_model(|m| {
                m.refresh_token_accepted(CLIENT_ID, &name.to_string(), t.refresh_token.expose_secret(), now)
                    && m.access_token_valid(&name.to_string(), t.access_token.expose_secret(), now)
            });
            assert!(issued, "{}: the new pair is the simulator's", g.name);
            let a = engine.access_token(&name).await.unwrap();
            assert!(a.expose_secret() == t.access_token.expose_secret(), "{}: serves the new pair", g.name);
            assert_eq!(&kinds[..g.records.len()], g.records, "{}: the records written come first", g.name);
            assert!(kinds[g.records.len()..].contains(&COMMITTED), "{}: {kinds:?}", g.name);
            if g.phase == "refreshing" {
                let interrupted = history
                    .iter()
                    .any(|(_, r)| matches!(r, Record::Ambiguous { why: AmbiguityReason::Interrupted, .. }));
                assert!(interrupted, "{}: the interruption is journaled: {kinds:?}", g.name);
            }
            continue;
        }
        check_as_written(g, &s);
        assert_eq!(kinds, g.records, "{}", g.name);
        match g.phase {
            "healthy" => {
                // The access token written in 2026 is served as is (it expires in 2100), and the
                // simulator, told the pair, accepts it.
                let a = engine.access_token(&name).await.unwrap();
                let held = g.held().unwrap();
                assert!(a.expose_secret() == held.access_token.expose_secret(), "{}: not the token written", g.name);
                let now = sim.now_ms();
                assert!(sim.with_model(|m| m.access_token_valid(&name.to_string(), a.expose_secret(), now)));
            }
            "needs-reauth" => {
                // Its last access token is served until its own expiry (2100), never refreshed.
                let a = engine.access_token(&name).await.unwrap();
                let held = g.held().unwrap();
                assert!(a.expose_secret() == held.access_token.expose_secret(), "{}: not the token written", g.name);
                let err = engine.on_unauthorized(&name, &a).await.unwrap_err();
                assert!(matches!(err, Error::NeedsReauth { .. }), "{}: {err}", g.name);
            }
            "uninstalled" => {
                let err = engine.access_token(&name).await.unwrap_err();
                assert!(matches!(err, Error::Uninstalled { .. }), "{}: {err}", g.name);
            }
            other => unreachable!("{other}"),
        }
        assert_eq!(requests(&sim, g.name), 0, "{}: nothing sent", g.name);
    }
    engine.shutdown().await;
    drop(engine);

    // What recovery wrote is durable: the next open finds nothing open and every grant in place.
    let (engine, report) = Engine::open(config(&sim, &path, &key)).await.unwrap();
    assert_eq!((report.grants, report.open), (GRANTS.len(), 0), "{report:?}");
    for g in GRANTS {
        let s = engine.state(&g.key()).unwrap().unwrap();
        let phase = if g.is_open() { "healthy" } else { g.phase };
        assert_eq!(s.phase.name(), phase, "{}", g.name);
    }
    engine.shutdown().await;
    drop(engine);
    // Whatever a later format does on open, the copy now carries today's marker.
    assert!(files_contain(&path, tokenwal::store::layout::FORMAT.as_bytes()));
}

// ------------------------------------------------------------------------------------ writing it

/// Writes the fixture with today's code: `TOKENWAL_FIXTURE_OUT=<new dir>` gets `store/` (the sled
/// directory, its lock file removed) sealed under the committed `test-key.txt`. Run by hand only
/// (see the fixture's README); the committed fixture must stay format 2.
#[tokio::test]
#[ignore = "writes the fixture; run by hand with TOKENWAL_FIXTURE_OUT"]
async fn generate_format2_fixture() {
    let out = PathBuf::from(std::env::var_os("TOKENWAL_FIXTURE_OUT").expect("set TOKENWAL_FIXTURE_OUT to a new dir"));
    let path = out.join("store");
    assert!(!path.exists(), "{} exists: give a new directory", path.display());
    assert_eq!(tokenwal::store::layout::FORMAT, FIXTURE_FORMAT, "today's code no longer writes format 2");
    std::fs::create_dir_all(&out).unwrap();
    let ring = KeyRing::from_file(&copy_key(&out)).unwrap();
    let (store, _) = Store::open(&path, &ring, StoreConfig::default()).unwrap();
    write_grants(&store).await;
    // Every write was synced when `apply` answered; dropping the last handle stops the committer
    // and closes sled.
    drop(store);
    std::fs::remove_file(path.join(tokenwal::store::layout::LOCK_FILE)).unwrap();
}

/// Writes [`GRANTS`] with the core machine, as the engine would have, on a clock that starts at
/// `T0` and moves one minute per step (an attempt's answer comes a second after its intent).
async fn write_grants(store: &Store) {
    let machine = Machine::shopify(store.fingerprint_key());
    let mut clock = T0;
    let mut tick = || {
        clock += MINUTE;
        UnixMillis(clock)
    };
    for g in GRANTS {
        let install = machine.install(None, g.key(), tokens(g.name, 1), InstallSource::Import, tick());
        let mut s = install.make_durable(store).await.unwrap().state().clone();
        let mut pair = 1;
        for step in g.steps {
            let now = tick();
            s = match step {
                Step::Rotate => {
                    pair += 1;
                    let tokens = tokens(g.name, pair);
                    attempt(&machine, store, &s, now, Outcome::Success { tokens, request_id: None }).await
                }
                Step::LoseAnswer => {
                    let outcome = Outcome::Ambiguous { reason: AmbiguityReason::Timeout, request_id: None };
                    attempt(&machine, store, &s, now, outcome).await
                }
                Step::Reject => {
                    let outcome = Outcome::Rejected {
                        status: 400,
                        error: "invalid_grant".into(),
                        description: Some("The refresh token is invalid or expired".into()),
                        request_id: Some("fixture-request".into()),
                    };
                    attempt(&machine, store, &s, now, outcome).await
                }
                Step::Reinstall => {
                    pair += 1;
                    let t = machine.install(Some(&s), g.key(), tokens(g.name, pair), InstallSource::Application, now);
                    t.make_durable(store).await.unwrap().state().clone()
                }
                Step::Scopes => {
                    let t = machine.scopes_updated(&s, "read_products,write_orders", now);
                    durable(store, t).await
                }
                Step::Uninstall => durable(store, machine.uninstall(&s, now).unwrap()).await,
                Step::StopMidAttempt => {
                    let plan = machine.plan_attempt(&s, now).unwrap();
                    plan.make_durable(store).await.unwrap().state().clone()
                }
            };
        }
        assert_eq!(s.phase.name(), g.phase, "{}", g.name);
        assert_eq!(pair, g.pairs(), "{}", g.name);
        assert_eq!(kinds(&store.history(&g.key()).unwrap()), g.records, "{}", g.name);
    }
}

/// One attempt from `s`: its intent, then `outcome` a second later. The grant's state after both.
async fn attempt(machine: &Machine, store: &Store, s: &GrantState, now: UnixMillis, outcome: Outcome) -> GrantState {
    let plan = machine.plan_attempt(s, now).unwrap_or_else(|e| panic!("{}: {e}", s.grant));
    let sent = plan.make_durable(store).await.unwrap();
    let later = UnixMillis(now.0 + 1_000);
    let settled = machine.on_outcome(sent.state(), &sent, outcome, later, 0);
    settled.make_durable(store).await.unwrap().state().clone()
}

async fn durable(store: &Store, t: tokenwal::core::Transition) -> GrantState {
    tokenwal::core::Pending::from_transition(t).make_durable(store).await.unwrap().state().clone()
}
