//! End-to-end tests of the engine over real loopback sockets, against the simulator (and, for the
//! ordering check, a hand-written server that inspects the store from inside its handler).
//!
//! Each runs twice (`on_both_backends!`): on the store it was written for (in memory, or sled where
//! it restarts the engine or reads the store from outside) and, as `NAME_pg`, on a PostgreSQL
//! store in a scratch schema (skipped loudly without a server, failed under
//! `TOKENWAL_REQUIRE_PG=1`). The loopback-endpoint check opens no store and runs once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokenwal::core::{AccessToken, Event, GrantKey, Phase, Record, RefreshToken, Resolution, ShopDomain, TokenSet};
use tokenwal::store::Store;
use tokenwal::{Engine, Error, StoreLocation};
use tokenwal_sim::{serve, Fault, SimConfig};
use tokenwal_testkit::{
    accepted, engine_config as config, history, now, on_both_backends, seed, shop, sim, TestStore, SECRET,
};

on_both_backends! {
    #[tokio::test]
    async fn intent_is_durable_before_the_request_leaves, intent_is_durable_before_the_request_leaves_pg(backend) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        // A token endpoint that, while handling the request, reads the engine's store: the intent must
        // already be there (the store serves only durable state to readers).
        let store_slot: Arc<OnceLock<Store>> = Arc::new(OnceLock::new());
        let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
        let app = {
            let store_slot = Arc::clone(&store_slot);
            let seen = Arc::clone(&seen);
            axum::Router::new().route(
                "/shops/{shop}/admin/oauth/access_token",
                axum::routing::post(move |axum::extract::Path(s): axum::extract::Path<String>| {
                    let store_slot = Arc::clone(&store_slot);
                    let seen = Arc::clone(&seen);
                    async move {
                        let store = store_slot.get().expect("store published before any request");
                        let grant = GrantKey::shopify(&ShopDomain::parse(&s).unwrap());
                        let state = store.get(&grant).unwrap().unwrap();
                        let intent_logged =
                            store.history(&grant).unwrap().iter().any(|(_, r)| matches!(r, Record::Intent { .. }));
                        seen.lock().unwrap().push(format!("{}:{}", state.phase.name(), intent_logged));
                        axum::Json(serde_json::json!({
                            "access_token": "shpat_new", "expires_in": 3600,
                            "refresh_token": "shprt_new", "refresh_token_expires_in": 7776000, "scope": "read_orders"
                        }))
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let (engine, _) = Engine::open(config(&base, store.location(), SECRET)).await.unwrap();
        store_slot.set(engine.store().clone()).ok().unwrap();
        let s = shop("ordered");
        let tokens = TokenSet {
            access_token: AccessToken::new("shpat_old"),
            access_expires_at: now(),
            refresh_token: RefreshToken::new("shprt_old"),
            refresh_expires_at: None,
            scope: None,
        };
        engine.install(&s, tokens).await.unwrap();
        let t = engine.access_token(&s).await.unwrap();
        assert_eq!(t.expose_secret(), "shpat_new");
        assert_eq!(*seen.lock().unwrap(), vec!["refreshing:true".to_string()]);
        let kinds: Vec<_> = history(&engine, "ordered").iter().map(Record::kind_name).collect();
        assert_eq!(kinds, ["installed", "intent", "committed"]);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_lost_response_is_recovered_by_retrying_the_old_token, a_lost_response_is_recovered_by_retrying_the_old_token_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let tokens = seed(&sim, "lost");
        sim.push_faults(&shop("lost").to_string(), [Fault::RotateThenDrop]).unwrap();
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        let mut events = engine.subscribe();
        engine.install(&shop("lost"), tokens).await.unwrap();

        let token = engine.access_token(&shop("lost")).await.unwrap();
        assert!(accepted(&sim, "lost", &token), "the recovered token works at the Admin API");
        let c = sim.counters().shop(&shop("lost").to_string());
        assert_eq!((c.rotations, c.replays), (1, 1), "{c:?}");
        let h = history(&engine, "lost");
        assert!(h.iter().any(|r| matches!(r, Record::Ambiguous { .. })));
        assert!(h.iter().any(|r| matches!(r, Record::Resolved { how: Resolution::Succeeded { .. }, .. })));
        let mut names = Vec::new();
        while let Ok(e) = events.try_recv() {
            names.push(match e {
                Event::Ambiguous { .. } => "ambiguous",
                Event::Resolved { .. } => "resolved",
                Event::Refreshed { .. } => "refreshed",
                _ => "other",
            });
        }
        assert!(names.contains(&"ambiguous") && names.contains(&"resolved"), "{names:?}");
    }
}

on_both_backends! {
    #[tokio::test]
    async fn recovery_on_restart_resolves_an_ambiguous_rotation, recovery_on_restart_resolves_an_ambiguous_rotation_pg(backend) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let tokens = seed(&sim, "restart");
        sim.push_faults(&shop("restart").to_string(), [Fault::RotateThenDrop]).unwrap();
        {
            let mut c = config(&sim.base_url(), store.location(), SECRET);
            c.max_wait = Duration::ZERO; // give up at once: the caller sees the ambiguity
            let (engine, _) = Engine::open(c).await.unwrap();
            engine.install(&shop("restart"), tokens).await.unwrap();
            let err = engine.access_token(&shop("restart")).await.unwrap_err();
            assert!(matches!(err, Error::Ambiguous { .. }), "{err}");
            assert!(err.is_transient());
            engine.shutdown().await;
        }
        let (engine, report) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        assert_eq!((report.open, report.resolved, report.needs_reauth), (1, 1, 0), "{report:?}");
        let token = engine.access_token(&shop("restart")).await.unwrap();
        assert!(accepted(&sim, "restart", &token));
        assert_eq!(sim.counters().shop(&shop("restart").to_string()).replays, 1);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn concurrent_callers_share_one_refresh, concurrent_callers_share_one_refresh_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let tokens = seed(&sim, "busy");
        let other = seed(&sim, "calm");
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        engine.install(&shop("busy"), tokens).await.unwrap();
        engine.install(&shop("calm"), other).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let e = engine.clone();
            tasks.spawn(async move { e.access_token(&shop("busy")).await.unwrap() });
        }
        // Another shop is never blocked by that refresh.
        let calm = engine.access_token(&shop("calm")).await.unwrap();
        assert!(accepted(&sim, "calm", &calm));
        let mut distinct = std::collections::HashSet::new();
        while let Some(t) = tasks.join_next().await {
            distinct.insert(t.unwrap().expose_secret().to_owned());
        }
        assert_eq!(distinct.len(), 1);
        assert_eq!(sim.counters().shop(&shop("busy").to_string()).token_requests, 1);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn invalid_client_marks_no_shop_and_pauses_the_fleet, invalid_client_marks_no_shop_and_pauses_the_fleet_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let a = seed(&sim, "first");
        let b = seed(&sim, "second");
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), "wrong-secret")).await.unwrap();
        let mut events = engine.subscribe();
        engine.install(&shop("first"), a).await.unwrap();
        engine.install(&shop("second"), b).await.unwrap();
        let err = engine.access_token(&shop("first")).await.unwrap_err();
        assert!(matches!(err, Error::AppCredentialsRejected { .. }), "{err}");
        // The fleet is paused: the second shop is not even tried.
        let err = engine.access_token(&shop("second")).await.unwrap_err();
        assert!(matches!(err, Error::AppCredentialsRejected { .. }), "{err}");
        assert_eq!(sim.counters().total.invalid_client, 1);
        for name in ["first", "second"] {
            let s = engine.state(&GrantKey::shopify(&shop(name))).unwrap().unwrap();
            assert_eq!(s.phase, Phase::Healthy, "{name} must not be marked");
        }
        let mut alarm = false;
        while let Ok(e) = events.try_recv() {
            alarm |= matches!(e, Event::AppCredentialsRejected { .. });
            assert!(!matches!(e, Event::NeedsReauth { .. }));
        }
        assert!(alarm);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn an_install_beats_a_slow_refresh, an_install_beats_a_slow_refresh_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let name = "raced";
        let tokens = seed(&sim, name);
        // The refresh is rotated by the server and its answer held until the install is durable.
        sim.hold(&shop(name).to_string());
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        engine.install(&shop(name), tokens).await.unwrap();
        let slow = {
            let e = engine.clone();
            tokio::spawn(async move { e.access_token(&shop(name)).await })
        };
        assert!(sim.wait_held(&shop(name).to_string(), Duration::from_secs(10)).await, "the refresh is on the wire");
        // The merchant opened the app; its front end did token exchange and installs the result.
        let fresh = sim.seed_shop(&shop(name).to_string());
        let installed = TokenSet {
            access_token: AccessToken::new(fresh.access_token.as_str()),
            access_expires_at: now().saturating_add(Duration::from_secs(fresh.expires_in)),
            refresh_token: RefreshToken::new(fresh.refresh_token.as_str()),
            refresh_expires_at: None,
            scope: None,
        };
        let generation = engine.install(&shop(name), installed).await.unwrap();
        assert!(sim.release(&shop(name).to_string()));
        let got = slow.await.unwrap().unwrap();
        assert_eq!(got.expose_secret(), fresh.access_token.as_str(), "the newer install wins");
        let s = engine.state(&GrantKey::shopify(&shop(name))).unwrap().unwrap();
        assert_eq!(s.generation, generation);
        assert_eq!(s.tokens.unwrap().refresh_token.expose_secret(), fresh.refresh_token.as_str());
        assert!(history(&engine, name).iter().any(|r| matches!(r, Record::StaleOutcome { .. })));
    }
}

on_both_backends! {
    #[tokio::test]
    async fn garbled_and_plain_text_answers_are_retried_not_trusted, garbled_and_plain_text_answers_are_retried_not_trusted_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let name = "garbled";
        let tokens = seed(&sim, name);
        sim.push_faults(
            &shop(name).to_string(),
            [
                Fault::FailBeforeProcessing { status: 503, json: false },
                Fault::Truncated,
                Fault::MissingExpiresIn,
                Fault::Malformed,
            ],
        )
        .unwrap();
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        engine.install(&shop(name), tokens).await.unwrap();
        let token = engine.access_token(&shop(name)).await.unwrap();
        assert!(accepted(&sim, name, &token));
        let s = engine.state(&GrantKey::shopify(&shop(name))).unwrap().unwrap();
        assert_eq!(s.phase, Phase::Healthy);
        let c = sim.counters().shop(&shop(name).to_string());
        assert_eq!(c.rotations, 1, "one real rotation, recovered through replays: {c:?}");
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_dead_grant_needs_reauth_and_says_why, a_dead_grant_needs_reauth_and_says_why_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let name = "gone";
        let tokens = seed(&sim, name);
        sim.with_model(|m| m.uninstall(&shop(name).to_string()));
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        engine.install(&shop(name), tokens).await.unwrap();
        let err = engine.access_token(&shop(name)).await.unwrap_err();
        assert!(matches!(err, Error::NeedsReauth { .. }), "{err}");
        assert!(!err.is_transient());
        assert!(err.to_string().contains("gone.myshopify.com"), "{err}");
    }
}

on_both_backends! {
    #[tokio::test]
    async fn on_unauthorized_refreshes_once_then_returns_the_newer_token, on_unauthorized_refreshes_once_then_returns_the_newer_token_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let name = "unauth";
        let mut tokens = seed(&sim, name);
        tokens.access_expires_at = now().saturating_add(Duration::from_secs(3000));
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        engine.install(&shop(name), tokens.clone()).await.unwrap();
        let cached = engine.access_token(&shop(name)).await.unwrap();
        assert_eq!(cached, tokens.access_token, "a valid cached token is served without a refresh");
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let (e, c, rejected) = (engine.clone(), Arc::clone(&calls), cached.clone());
            tasks.spawn(async move {
                c.fetch_add(1, Ordering::SeqCst);
                e.on_unauthorized(&shop(name), &rejected).await.unwrap()
            });
        }
        let mut got = std::collections::HashSet::new();
        while let Some(t) = tasks.join_next().await {
            got.insert(t.unwrap().expose_secret().to_owned());
        }
        assert_eq!(got.len(), 1);
        assert!(!got.contains(cached.expose_secret()));
        assert_eq!(sim.counters().shop(&shop(name).to_string()).token_requests, 1);
    }
}

on_both_backends! {
    #[tokio::test]
    async fn uninstall_drops_secrets_and_is_idempotent, uninstall_drops_secrets_and_is_idempotent_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let name = "bye";
        let tokens = seed(&sim, name);
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        engine.install(&shop(name), tokens.clone()).await.unwrap();
        engine.uninstalled(&shop(name)).await.unwrap();
        let grant = GrantKey::shopify(&shop(name));
        let first = engine.state(&grant).unwrap().unwrap();
        let records = history(&engine, name).len();
        let journal_end = engine.store().journal_end().unwrap();
        engine.uninstalled(&shop(name)).await.unwrap();
        // The duplicate wrote nothing: same state version, no record, the journal did not grow.
        let s = engine.state(&grant).unwrap().unwrap();
        assert_eq!(s.version, first.version, "a duplicate uninstall rewrites no state");
        assert_eq!(history(&engine, name).len(), records, "a duplicate uninstall journals nothing");
        assert_eq!(engine.store().journal_end().unwrap(), journal_end);
        assert!(s.tokens.is_none());
        assert!(matches!(engine.access_token(&shop(name)).await.unwrap_err(), Error::Uninstalled { .. }));
        // Re-installing the pair it held before the uninstall (a replayed install) is refused: that
        // pair's access token had expired by the uninstall, so it was issued before it.
        assert!(matches!(engine.install(&shop(name), tokens).await, Err(Error::OlderPair { .. })));
        // A later install (a new pair) revives it, and the token it serves works.
        let mut fresh = seed(&sim, name);
        fresh.access_expires_at = now().saturating_add(Duration::from_secs(3600));
        engine.install(&shop(name), fresh.clone()).await.unwrap();
        let revived = engine.access_token(&shop(name)).await.unwrap();
        assert_eq!(revived, fresh.access_token);
        assert!(accepted(&sim, name, &revived));
    }
}

#[tokio::test]
async fn the_test_endpoint_must_be_loopback() {
    let c = config("http://10.1.2.3:8080", StoreLocation::InMemory, SECRET);
    assert!(matches!(Engine::open(c).await.err().unwrap(), Error::Config(_)));
    let c = config("http://user:pw@127.0.0.1:8080", StoreLocation::InMemory, SECRET);
    assert!(matches!(Engine::open(c).await.err().unwrap(), Error::Config(_)));
}

on_both_backends! {
    #[tokio::test]
    async fn the_scheduler_keeps_shops_fresh_without_callers, the_scheduler_keeps_shops_fresh_without_callers_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sc = SimConfig { access_ttl: "2s".parse().unwrap(), ..SimConfig::default() };
        let sim = serve(sc, "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let names = ["sched-a", "sched-b", "sched-c"];
        let mut c = config(&sim.base_url(), store.location(), SECRET);
        c.proactive = true;
        c.refresh_margin = Duration::from_millis(800);
        let (engine, _) = Engine::open(c).await.unwrap();
        for n in names {
            let mut t = seed(&sim, n);
            t.access_expires_at = now().saturating_add(Duration::from_secs(2));
            engine.install(&shop(n), t).await.unwrap();
        }
        // Two scheduler rounds per shop, each seen on the wire and let through (the next round's
        // hold is armed before the release, so no round slips by unheld); then the commits of the
        // second. No caller asks for anything.
        let mut events = engine.subscribe();
        for n in names {
            sim.hold(&shop(n).to_string());
        }
        for round in 0..2 {
            for n in names {
                assert!(sim.wait_held(&shop(n).to_string(), Duration::from_secs(10)).await, "{n}: round {round}");
                if round == 0 {
                    sim.hold(&shop(n).to_string());
                }
                assert!(sim.release(&shop(n).to_string()));
            }
        }
        let mut refreshed = std::collections::HashMap::<String, usize>::new();
        while names.iter().any(|n| refreshed.get(&shop(n).to_string()).copied().unwrap_or(0) < 2) {
            let e = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
            if let Event::Refreshed { grant, .. } = e {
                *refreshed.entry(grant.account().to_owned()).or_default() += 1;
            }
        }
        for n in names {
            let c = sim.counters().shop(&shop(n).to_string());
            assert!(c.rotations >= 2, "{n}: {c:?}");
            // What the engine holds right now works, without a caller having asked for anything.
            let s = engine.state(&GrantKey::shopify(&shop(n))).unwrap().unwrap();
            assert_eq!(s.phase, Phase::Healthy);
            assert!(accepted(&sim, n, &s.tokens.unwrap().access_token), "{n}");
        }
        engine.shutdown().await;
    }
}

on_both_backends! {
    #[tokio::test]
    async fn a_valid_token_is_served_while_a_slow_refresh_is_in_flight, a_valid_token_is_served_while_a_slow_refresh_is_in_flight_pg(backend = Memory) {
        let Some(store) = TestStore::new(backend, "e2e") else { return };
        let sim = sim().await;
        let name = "patient";
        let mut tokens = seed(&sim, name);
        // Valid for 4 s: due at half its remaining life (the refresh margin is longer than that).
        tokens.access_expires_at = now().saturating_add(Duration::from_secs(4));
        sim.hold(&shop(name).to_string());
        let (engine, _) = Engine::open(config(&sim.base_url(), store.location(), SECRET)).await.unwrap();
        engine.install(&shop(name), tokens.clone()).await.unwrap();
        assert_eq!(engine.access_token(&shop(name)).await.unwrap(), tokens.access_token, "not due yet: no refresh");
        assert_eq!(sim.counters().shop(&shop(name).to_string()).token_requests, 0);
        tokio::time::sleep(Duration::from_millis(2100)).await; // now due, still valid for ~1.9 s
        let refreshing = {
            let e = engine.clone();
            tokio::spawn(async move { e.access_token(&shop(name)).await.unwrap() })
        };
        // The refresh is on the wire (its intent is durable) and its answer is held.
        assert!(sim.wait_held(&shop(name).to_string(), Duration::from_secs(10)).await);
        assert!(matches!(engine.state(&GrantKey::shopify(&shop(name))).unwrap().unwrap().phase, Phase::Refreshing { .. }));
        let meanwhile = engine.access_token(&shop(name)).await.unwrap();
        assert_eq!(meanwhile, tokens.access_token, "the still-valid token is served, not queued behind the refresh");
        assert!(sim.release(&shop(name).to_string()));
        let refreshed = refreshing.await.unwrap();
        assert_ne!(refreshed, tokens.access_token);
        assert!(accepted(&sim, name, &refreshed));
    }
}
