//! End-to-end tests of re-acquisition over real loopback sockets against the simulator: token
//! exchange (the way back for a dead grant), local refusal of bad session tokens, lost answers,
//! migration of legacy tokens (lost answers, a crash mid-migration), uninstall (also during an
//! in-flight refresh), scopes updates.

use std::time::Duration;
use tokenwal::core::{AttemptKind, Event, GrantKey, LegacyToken, Phase, Record, SessionToken, UnixMillis};
use tokenwal::store::Store;
use tokenwal::{
    Config, Engine, Error, ExchangeError, MigrateError, MigrateOutcome, MigrationState, SessionTokenProblem,
    StoreLocation,
};
use tokenwal_sim::{mint_session_token, Fault, SimHandle, TokenStatus};
use tokenwal_testkit::{accepted, drain, history, now, requests, seed, shop, sim, state, CLIENT_ID, SECRET};

/// The shared engine configuration with the default app's secret.
fn config(base: &str, store: StoreLocation) -> Config {
    tokenwal_testkit::engine_config(base, store, SECRET)
}

fn session(sim: &SimHandle, name: &str) -> SessionToken {
    SessionToken::new(sim.session_token(&shop(name).to_string()))
}

/// Kills tokenwal's grant at the server: an acquisition elsewhere retires its refresh token.
fn kill_grant(sim: &SimHandle, name: &str) {
    sim.seed_shop(&shop(name).to_string());
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in time");
}

#[tokio::test]
async fn a_dead_grant_comes_back_through_token_exchange() {
    let sim = sim().await;
    let tokens = seed(&sim, "dead");
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    engine.install(&shop("dead"), tokens).await.unwrap();
    kill_grant(&sim, "dead");
    let err = engine.access_token(&shop("dead")).await.unwrap_err();
    assert!(matches!(err, Error::NeedsReauth { .. }), "{err}");
    assert!(matches!(state(&engine, "dead").unwrap().phase, Phase::NeedsReauth { .. }));

    let mut events = engine.subscribe();
    let before = state(&engine, "dead").unwrap().generation;
    let generation = engine.exchange_session_token(&shop("dead"), session(&sim, "dead")).await.unwrap();
    assert_eq!(generation, before.next());
    let s = state(&engine, "dead").unwrap();
    assert_eq!(s.phase, Phase::Healthy);
    assert!(s.acquisition.is_none(), "the session token is not kept once the pair is durable");
    let token = engine.access_token(&shop("dead")).await.unwrap();
    assert!(accepted(&sim, "dead", &token), "the exchanged token works at the Admin API");
    let events = drain(&mut events);
    assert!(events.iter().any(|e| matches!(e, Event::Recovered { generation: g, .. } if *g == generation)));
    assert!(events.iter().any(
        |e| matches!(e, Event::Acquired { kind: AttemptKind::TokenExchange, generation: g, .. } if *g == generation)
    ));
    let kinds: Vec<_> = history(&engine, "dead").iter().map(Record::kind_name).collect();
    assert!(kinds.ends_with(&["intent", "committed"]), "{kinds:?}");
    // The refresh token from the exchange rotates normally afterwards.
    engine.on_unauthorized(&shop("dead"), &token).await.unwrap();
    assert_eq!(state(&engine, "dead").unwrap().phase, Phase::Healthy);
}

#[tokio::test]
async fn a_first_install_through_token_exchange() {
    let sim = sim().await;
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    let generation = engine.exchange_session_token(&shop("fresh"), session(&sim, "fresh")).await.unwrap();
    let token = engine.access_token(&shop("fresh")).await.unwrap();
    assert!(accepted(&sim, "fresh", &token));
    assert_eq!(state(&engine, "fresh").unwrap().generation, generation);
}

#[tokio::test]
async fn bad_session_tokens_are_refused_locally_with_nothing_sent() {
    let sim = sim().await;
    let tokens = seed(&sim, "local");
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    engine.install(&shop("local"), tokens).await.unwrap();
    let before = state(&engine, "local").unwrap();
    let s = shop("local").to_string();
    let t = sim.now_ms();
    let cases = [
        (mint_session_token(&s, CLIENT_ID, "not-the-secret", t, 60_000), SessionTokenProblem::BadSignature),
        (mint_session_token(&s, CLIENT_ID, SECRET, t - 180_000, 60_000), SessionTokenProblem::Expired),
        (mint_session_token("other.myshopify.com", CLIENT_ID, SECRET, t, 60_000), SessionTokenProblem::WrongShop),
        (mint_session_token(&s, "another-app", SECRET, t, 60_000), SessionTokenProblem::WrongAudience),
        (mint_session_token(&s, CLIENT_ID, SECRET, t + 120_000, 60_000), SessionTokenProblem::NotYetValid),
        ("not.a-jwt".to_string(), SessionTokenProblem::Malformed),
    ];
    for (raw, want) in cases {
        let err = engine.exchange_session_token(&shop("local"), SessionToken::new(raw.clone())).await.unwrap_err();
        match &err {
            ExchangeError::InvalidSessionToken { problem, .. } => assert_eq!(*problem, want),
            other => panic!("{want:?}: {other}"),
        }
        assert!(!err.is_retryable());
        let text = format!("{err} {err:?}");
        assert!(!text.contains(&raw), "the error contains the session token: {text}");
        let payload = raw.split('.').nth(1).unwrap_or("x");
        assert!(!text.contains(payload));
    }
    assert_eq!(requests(&sim, "local"), 0, "nothing was sent");
    assert_eq!(requests(&sim, "other"), 0);
    assert_eq!(state(&engine, "local").unwrap(), before, "nothing was stored");
    // An unknown shop stays unknown.
    let bad = SessionToken::new(mint_session_token("nobody.myshopify.com", CLIENT_ID, "x", t, 60_000));
    assert!(engine.exchange_session_token(&shop("nobody"), bad).await.is_err());
    assert!(state(&engine, "nobody").is_none());
}

#[tokio::test]
async fn a_session_token_the_server_refuses_is_a_caller_error_not_a_dead_grant() {
    let sim = sim().await;
    let tokens = seed(&sim, "refused");
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    engine.install(&shop("refused"), tokens).await.unwrap();
    let before = state(&engine, "refused").unwrap();
    // Expired 2 s ago: inside tokenwal's 5 s clock-skew leeway, so it is sent; the simulator has no
    // leeway and answers 400 invalid_subject_token.
    let t = sim.now_ms();
    let raw = mint_session_token(&shop("refused").to_string(), CLIENT_ID, SECRET, t - 62_000, 60_000);
    let err = engine.exchange_session_token(&shop("refused"), SessionToken::new(raw)).await.unwrap_err();
    assert!(
        matches!(&err, ExchangeError::Rejected { status: 400, error, .. } if error == "invalid_subject_token"),
        "{err}"
    );
    assert_eq!(requests(&sim, "refused"), 1);
    let after = state(&engine, "refused").unwrap();
    assert_eq!(after.phase, Phase::Healthy, "a refused session token is not a dead grant");
    assert_eq!((after.tokens, after.generation), (before.tokens, before.generation));
    assert!(after.acquisition.is_none());
    let token = engine.access_token(&shop("refused")).await.unwrap();
    assert!(accepted(&sim, "refused", &token));
}

#[tokio::test]
async fn a_lost_exchange_answer_is_retried_with_the_same_session_token() {
    let sim = sim().await;
    let tokens = seed(&sim, "lostx");
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    engine.install(&shop("lostx"), tokens).await.unwrap();
    kill_grant(&sim, "lostx");
    let _ = engine.access_token(&shop("lostx")).await.unwrap_err();
    sim.push_faults(&shop("lostx").to_string(), [Fault::RotateThenDrop, Fault::RotateThenReset]).unwrap();
    let generation = engine.exchange_session_token(&shop("lostx"), session(&sim, "lostx")).await.unwrap();
    let c = sim.counters().shop(&shop("lostx").to_string());
    assert_eq!(c.token_requests, 1 + 2 + 1, "a refresh, then two lost exchanges and the retry that got through");
    let token = engine.access_token(&shop("lostx")).await.unwrap();
    assert!(accepted(&sim, "lostx", &token));
    assert!(sim.grant_alive(&shop("lostx").to_string()));
    assert_eq!(state(&engine, "lostx").unwrap().generation, generation);
    let h = history(&engine, "lostx");
    assert_eq!(h.iter().filter(|r| matches!(r, Record::Ambiguous { .. })).count(), 2);
    assert!(h.iter().any(|r| matches!(r, Record::Resolved { .. })));
}

/// The documented rule when the session token expires before a lost exchange is resolved: the grant
/// falls back to its previous pair, whose probe tells (here the exchange was processed, so the old
/// refresh token is dead: needs-reauth, awaiting the merchant's next session token).
#[tokio::test]
async fn a_lost_exchange_whose_session_token_expires_falls_back() {
    let sim = sim().await;
    let tokens = seed(&sim, "expiry");
    let mut c = config(&sim.base_url(), StoreLocation::InMemory);
    c.max_wait = Duration::from_millis(300);
    let (engine, _) = Engine::open(c).await.unwrap();
    engine.install(&shop("expiry"), tokens).await.unwrap();
    let name = shop("expiry").to_string();
    sim.push_faults(&name, std::iter::repeat_n(Fault::RotateThenDrop, 40)).unwrap();
    let t = sim.now_ms();
    let raw = mint_session_token(&name, CLIENT_ID, SECRET, t, 1_000);
    // Presented until `exp` plus tokenwal's clock-skew leeway.
    let usable_until = UnixMillis((t + 1_000) / 1000 * 1000 + tokenwal::SESSION_TOKEN_LEEWAY.as_millis() as u64);
    let err = engine.exchange_session_token(&shop("expiry"), SessionToken::new(raw)).await.unwrap_err();
    assert!(matches!(err, ExchangeError::Ambiguous { .. }), "{err}");
    assert!(err.is_retryable());
    let s = state(&engine, "expiry").unwrap();
    assert!(matches!(s.phase, Phase::Ambiguous(_)) && s.acquisition.is_some(), "{:?}", s.phase);
    sim.with_model(|m| m.clear_faults(&name));
    tokio::time::sleep(usable_until.since(now()) + Duration::from_millis(100)).await;
    // The next use falls back (nothing sent with the expired token) and probes the old pair.
    let sent = requests(&sim, "expiry");
    let err = engine.access_token(&shop("expiry")).await.unwrap_err();
    assert!(matches!(err, Error::NeedsReauth { .. }), "{err}");
    assert_eq!(requests(&sim, "expiry"), sent + 1, "one probe of the old refresh token, no exchange retry");
    let s = state(&engine, "expiry").unwrap();
    assert!(s.acquisition.is_none(), "the expired session token was dropped");
    assert!(matches!(s.phase, Phase::NeedsReauth { .. }));
    // The merchant's next session token brings it back.
    engine.exchange_session_token(&shop("expiry"), session(&sim, "expiry")).await.unwrap();
    let token = engine.access_token(&shop("expiry")).await.unwrap();
    assert!(accepted(&sim, "expiry", &token));
}

#[tokio::test]
async fn an_install_by_the_front_end_wins_over_an_exchange_in_flight() {
    let sim = sim().await;
    let tokens = seed(&sim, "race");
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    engine.install(&shop("race"), tokens).await.unwrap();
    let name = shop("race").to_string();
    sim.hold(&name);
    let e = engine.clone();
    let tok = session(&sim, "race");
    let exchange = tokio::spawn(async move { e.exchange_session_token(&shop("race"), tok).await });
    // The exchange is processed by the server (then held); the front end acquires after it.
    assert!(sim.wait_held(&name, Duration::from_secs(10)).await);
    assert!(sim.counters().shop(&name).acquisitions >= 2);
    let newer = seed(&sim, "race");
    let installed = engine.install(&shop("race"), newer.clone()).await.unwrap();
    assert!(sim.release(&name));
    let got = exchange.await.unwrap().unwrap();
    assert_eq!(got, installed, "the newer install's generation is reported");
    let s = state(&engine, "race").unwrap();
    assert_eq!(s.tokens.as_ref().unwrap().refresh_token, newer.refresh_token, "the older exchange result was dropped");
    assert!(history(&engine, "race").iter().any(|r| matches!(r, Record::StaleOutcome { .. })));
}

#[tokio::test]
async fn migration_with_a_lost_answer_then_retry_gives_exactly_one_pair() {
    let sim = sim().await;
    let name = shop("legacy").to_string();
    let legacy = sim.with_model(|m| m.seed_legacy_token(&name, None, None)).unwrap();
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    assert_eq!(engine.migration_state(&shop("legacy")).unwrap(), MigrationState::NotMigrated);
    sim.push_faults(&name, [Fault::RotateThenDrop]).unwrap();
    let lt = || LegacyToken::new(legacy.as_str());
    let err = engine.migrate(&shop("legacy"), lt()).await.unwrap_err();
    let MigrateError::Ambiguous { retry_at, .. } = &err else { panic!("{err}") };
    assert!(err.is_retryable());
    assert!(!format!("{err} {err:?}").contains(legacy.as_str()));
    // The legacy token is already revoked at the server, and durable only in tokenwal's state.
    let st = sim.shop_state(&name);
    assert_eq!(st.legacy_tokens[0].status, TokenStatus::Revoked);
    let s = state(&engine, "legacy").unwrap();
    assert!(matches!(s.phase, Phase::Ambiguous(_)) && s.tokens.is_none());
    assert!(matches!(engine.migration_state(&shop("legacy")).unwrap(), MigrationState::Unresolved { tries: 1, .. }));
    tokio::time::sleep(retry_at.since(now())).await;

    // The resume presents the *durable* legacy token (the one the server may have processed), even if
    // a re-run passes another one.
    let out = engine.migrate(&shop("legacy"), LegacyToken::new("shpat_some_other_token")).await.unwrap();
    let MigrateOutcome::Resumed { generation } = out else { panic!("{out:?}") };
    let c = sim.counters().shop(&name);
    assert_eq!((c.migrations, c.migration_replays), (1, 1), "{c:?}");
    let token = engine.access_token(&shop("legacy")).await.unwrap();
    assert!(accepted(&sim, "legacy", &token));
    let s = state(&engine, "legacy").unwrap();
    assert_eq!((s.phase.clone(), s.generation), (Phase::Healthy, generation));
    assert!(s.acquisition.is_none(), "the legacy token is dropped once the pair is durable");

    // A re-run skips the shop without sending.
    let sent = requests(&sim, "legacy");
    assert_eq!(engine.migrate(&shop("legacy"), lt()).await.unwrap(), MigrateOutcome::AlreadyMigrated { generation });
    assert_eq!(requests(&sim, "legacy"), sent);
    assert_eq!(engine.migration_state(&shop("legacy")).unwrap(), MigrationState::Migrated { generation });
}

#[tokio::test]
async fn migration_outcomes_are_typed_per_shop() {
    let sim = sim().await;
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    let seed_legacy = |n: &str| sim.with_model(|m| m.seed_legacy_token(&shop(n).to_string(), None, None)).unwrap();

    // Plain success.
    let ok = seed_legacy("ok");
    let out = engine.migrate(&shop("ok"), LegacyToken::new(ok.as_str())).await.unwrap();
    assert!(matches!(out, MigrateOutcome::Migrated { .. }));
    assert_eq!(sim.counters().shop(&shop("ok").to_string()).migrations, 1);

    // Throttled: nothing processed, nothing of the legacy token kept.
    let th = seed_legacy("throttled");
    sim.push_faults(&shop("throttled").to_string(), [Fault::Throttle { retry_after_secs: 7 }]).unwrap();
    let err = engine.migrate(&shop("throttled"), LegacyToken::new(th.as_str())).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
        "{err}"
    );
    assert!(err.is_retryable());
    let s = state(&engine, "throttled").unwrap();
    assert!(matches!(s.phase, Phase::NotInstalled { .. }) && s.acquisition.is_none(), "{:?}", s.phase);
    assert!(matches!(
        engine.migrate(&shop("throttled"), LegacyToken::new(th.as_str())).await,
        Ok(MigrateOutcome::Migrated { .. })
    ));

    // A token the server does not know: rejected, reported, the shop needs re-auth.
    let err = engine.migrate(&shop("unknown"), LegacyToken::new("shpat_nope")).await.unwrap_err();
    assert!(matches!(&err, MigrateError::Rejected { status: 400, .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(matches!(state(&engine, "unknown").unwrap().phase, Phase::NeedsReauth { .. }));

    // Refused locally.
    for bad in ["", "has space", "tab\t"] {
        let err = engine.migrate(&shop("bad"), LegacyToken::new(bad)).await.unwrap_err();
        assert!(matches!(err, MigrateError::InvalidLegacyToken { .. }), "{err}");
    }
    assert_eq!(requests(&sim, "bad"), 0);
    assert!(state(&engine, "bad").is_none());

    // Uninstalled: refused without sending.
    let un = seed_legacy("gone");
    engine.migrate(&shop("gone"), LegacyToken::new(un.as_str())).await.unwrap();
    engine.uninstalled(&shop("gone")).await.unwrap();
    let sent = requests(&sim, "gone");
    let err = engine.migrate(&shop("gone"), LegacyToken::new(un.as_str())).await.unwrap_err();
    assert!(matches!(err, MigrateError::Uninstalled { .. }), "{err}");
    assert_eq!(requests(&sim, "gone"), sent);
}

#[tokio::test]
async fn a_crash_during_migration_is_resumed_by_recovery() {
    let sim = sim().await;
    let name = shop("crashy").to_string();
    let legacy = sim.with_model(|m| m.seed_legacy_token(&name, None, None)).unwrap();
    let store = Store::in_memory();
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::Open(store.clone()))).await.unwrap();
    // The server processes the migration and holds its answer; the process "dies" meanwhile.
    sim.hold(&name);
    let e = engine.clone();
    let lt = LegacyToken::new(legacy.as_str());
    let task = tokio::spawn(async move { e.migrate(&shop("crashy"), lt).await });
    assert!(sim.wait_held(&name, Duration::from_secs(10)).await);
    assert_eq!(sim.counters().shop(&name).migrations, 1);
    let image = store.crash_image();
    task.abort();
    drop(engine);
    let s = image.get(&GrantKey::shopify(&shop("crashy"))).unwrap().unwrap();
    assert!(matches!(s.phase, Phase::Refreshing { kind: AttemptKind::Migration, .. }), "{:?}", s.phase);
    assert!(s.tokens.is_none());

    let (engine, report) = Engine::open(config(&sim.base_url(), StoreLocation::Open(image))).await.unwrap();
    assert_eq!((report.open, report.interrupted, report.resolved), (1, 1, 1), "{report:?}");
    let c = sim.counters().shop(&name);
    assert_eq!((c.migrations, c.migration_replays), (1, 1), "recovery retried with the durable legacy token");
    let token = engine.access_token(&shop("crashy")).await.unwrap();
    assert!(accepted(&sim, "crashy", &token));
    let out = engine.migrate(&shop("crashy"), LegacyToken::new(legacy.as_str())).await.unwrap();
    assert!(matches!(out, MigrateOutcome::AlreadyMigrated { .. }), "{out:?}");
    assert!(state(&engine, "crashy").unwrap().acquisition.is_none());
}

#[tokio::test]
async fn an_uninstall_during_an_in_flight_refresh_stores_nothing() {
    let sim = sim().await;
    let tokens = seed(&sim, "bye");
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    engine.install(&shop("bye"), tokens).await.unwrap();
    let name = shop("bye").to_string();
    sim.hold(&name);
    let e = engine.clone();
    let refresh = tokio::spawn(async move { e.access_token(&shop("bye")).await });
    assert!(sim.wait_held(&name, Duration::from_secs(10)).await);
    assert_eq!(sim.counters().shop(&name).rotations, 1);
    assert!(matches!(state(&engine, "bye").unwrap().phase, Phase::Refreshing { .. }));
    engine.uninstalled(&shop("bye")).await.unwrap();
    assert!(sim.release(&name));
    let err = refresh.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Uninstalled { .. }), "{err}");

    let s = state(&engine, "bye").unwrap();
    assert!(matches!(s.phase, Phase::Uninstalled { .. }));
    assert!(s.tokens.is_none() && s.acquisition.is_none(), "no secret left in the state");
    let h = history(&engine, "bye");
    assert!(h.iter().any(|r| matches!(r, Record::StaleOutcome { .. })), "the late answer was journaled as stale");
    assert!(h.iter().any(|r| matches!(r, Record::Uninstalled { .. })), "the audit trail is kept");

    // No error loop, no later attempts.
    let sent = requests(&sim, "bye");
    assert_eq!(engine.refresh_due().await.unwrap(), 0);
    assert!(matches!(engine.access_token(&shop("bye")).await, Err(Error::Uninstalled { .. })));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(requests(&sim, "bye"), sent);

    // A late duplicate is a no-op.
    let n = history(&engine, "bye").len();
    let version = state(&engine, "bye").unwrap().version;
    engine.uninstalled(&shop("bye")).await.unwrap();
    assert_eq!(history(&engine, "bye").len(), n);
    assert_eq!(state(&engine, "bye").unwrap().version, version);

    // A later install revives the shop.
    let mut events = engine.subscribe();
    let again = seed(&sim, "bye");
    let generation = engine.install(&shop("bye"), again).await.unwrap();
    assert!(drain(&mut events).iter().any(|e| matches!(e, Event::Recovered { generation: g, .. } if *g == generation)));
    let token = engine.access_token(&shop("bye")).await.unwrap();
    assert!(accepted(&sim, "bye", &token));
    // An uninstall webhook triggered before that reinstall is ignored.
    assert!(!engine.uninstalled_as_of(&shop("bye"), UnixMillis(now().0 - 60_000)).await.unwrap());
    assert_eq!(state(&engine, "bye").unwrap().phase, Phase::Healthy);
    assert!(engine.uninstalled_as_of(&shop("bye"), now()).await.unwrap());
}

#[tokio::test]
async fn scopes_updates_are_journaled() {
    let sim = sim().await;
    let tokens = seed(&sim, "scopes");
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::InMemory)).await.unwrap();
    engine.install(&shop("scopes"), tokens).await.unwrap();
    engine.scopes_updated(&shop("scopes"), ["read_orders", "write_products"]).await.unwrap();
    let s = state(&engine, "scopes").unwrap();
    assert_eq!(s.tokens.unwrap().scope.as_deref(), Some("read_orders,write_products"));
    assert!(history(&engine, "scopes")
        .iter()
        .any(|r| matches!(r, Record::ScopesUpdated { scope, .. } if scope == "read_orders,write_products")));
    assert!(matches!(engine.scopes_updated(&shop("unknown"), ["x"]).await, Err(Error::NotInstalled { .. })));
}

/// A bulk migration of many shops with lost answers, 429s, 5xx and slow answers, a crash in the middle
/// (the crash image of an in-memory store), then re-runs on the recovered store: every shop ends migrated
/// exactly once (one migrated pair per shop at the server), with a working token and its legacy token
/// revoked; none is locked out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_migration_with_faults_and_a_crash_migrates_every_shop_exactly_once() {
    let sim = sim().await;
    let names: Vec<String> = (0..60).map(|i| format!("bulk-{i}")).collect();
    let mut legacy = std::collections::HashMap::new();
    for (i, n) in names.iter().enumerate() {
        let s = shop(n).to_string();
        let t = sim.with_model(|m| m.seed_legacy_token(&s, None, None)).unwrap();
        legacy.insert(n.clone(), t.as_str().to_owned());
        let faults: Vec<Fault> = match i % 6 {
            0 => vec![],
            1 => vec![Fault::RotateThenDrop],
            2 => vec![Fault::Throttle { retry_after_secs: 0 }, Fault::RotateThenReset],
            3 => vec![Fault::FailBeforeProcessing { status: 503, json: false }],
            4 => vec![Fault::Slow { delay_ms: 400 }],
            _ => vec![Fault::Truncated, Fault::RotateThenDrop],
        };
        sim.push_faults(&s, faults).unwrap();
    }
    let store = Store::in_memory();
    let (engine, _) = Engine::open(config(&sim.base_url(), StoreLocation::Open(store.clone()))).await.unwrap();
    let mut run = tokio::task::JoinSet::new();
    for n in &names {
        let (e, n, t) = (engine.clone(), n.clone(), legacy[n].clone());
        run.spawn(async move { e.migrate(&shop(&n), LegacyToken::new(t)).await });
    }
    // Crash once about half of the migrations were processed by the server.
    wait_for(|| sim.counters().total.migrations >= 30).await;
    // Shops the server migrated before the crash: their intents were durable before they were sent.
    let processed: Vec<String> =
        names.iter().filter(|n| sim.counters().shop(&shop(n).to_string()).migrations == 1).cloned().collect();
    let image = store.crash_image();
    run.abort_all();
    while run.join_next().await.is_some() {}
    drop(engine);

    let (engine, report) = Engine::open(config(&sim.base_url(), StoreLocation::Open(image))).await.unwrap();
    assert_eq!(report.needs_reauth, 0, "{report:?}");
    // A migration the server processed is never forgotten: it is migrated or resumable with its
    // durable legacy token.
    for n in &processed {
        let m = engine.migration_state(&shop(n)).unwrap();
        assert!(matches!(m, MigrationState::Migrated { .. } | MigrationState::Unresolved { .. }), "{n}: {m:?}");
    }
    let mut outcomes = std::collections::HashMap::new();
    for _pass in 0..20 {
        let pending: Vec<&String> = names.iter().filter(|n| !outcomes.contains_key(*n)).collect();
        if pending.is_empty() {
            break;
        }
        for n in pending {
            match engine.migrate(&shop(n), LegacyToken::new(legacy[n].clone())).await {
                Ok(o) => {
                    outcomes.insert(n.clone(), o);
                }
                Err(e) if e.is_retryable() => {}
                Err(e) => panic!("{n}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(outcomes.len(), names.len(), "every shop ends migrated: {outcomes:?}");
    for n in &names {
        let s = shop(n).to_string();
        let c = sim.counters().shop(&s);
        assert_eq!(c.migrations, 1, "{n}: exactly one migrated pair: {c:?}");
        assert_eq!(sim.shop_state(&s).legacy_tokens[0].status, TokenStatus::Revoked, "{n}");
        let token = engine.access_token(&shop(n)).await.unwrap();
        assert!(accepted(&sim, n, &token), "{n}: not locked out");
        assert!(state(&engine, n).unwrap().acquisition.is_none());
    }
    let resumed = outcomes.values().filter(|o| matches!(o, MigrateOutcome::Resumed { .. })).count();
    let already = outcomes.values().filter(|o| matches!(o, MigrateOutcome::AlreadyMigrated { .. })).count();
    eprintln!("bulk: {report:?}; resumed {resumed}, already migrated {already}, total {}", outcomes.len());
}
