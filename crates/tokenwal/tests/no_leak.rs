//! Secrets never leak: the engine runs real flows against the simulator (refreshes, every fault the
//! transport can see, rejections, restarts, uninstall) with `tracing` at TRACE for *every* crate
//! (hyper, reqwest and rustls included) writing into a buffer. Every error's `Display` and `Debug`,
//! every state's and event's `Debug` go into the same buffer. Then no token the simulator ever issued,
//! and not the client secret, may appear in it.
//!
//! One test per binary: the subscriber is process-global.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenwal::core::{
    AccessToken, ClientSecret, GrantKey, LegacyToken, RefreshToken, SessionToken, ShopDomain, TokenSet,
};
use tokenwal::{Config, Engine, StoreLocation};
use tokenwal_sim::{serve, Fault, SimConfig};
use tokenwal_testkit::{now, SECRET};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_errors_or_debug_output() {
    let buf = Buffer::default();
    let writer = buf.clone();
    tracing_subscriber::fmt().with_env_filter("trace").with_writer(move || writer.clone()).with_ansi(false).init();
    let mut out = buf.clone();

    let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let make_config = |secret: &str, max_wait: Duration| {
        let mut c = Config::shopify(StoreLocation::Path(path.clone()), "sim-client-id", ClientSecret::new(secret))
            .with_insecure_test_endpoint(url::Url::parse(&sim.base_url()).unwrap())
            .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
        c.proactive = true;
        c.max_wait = max_wait;
        c.timeouts.total = Duration::from_millis(800);
        c.policy.backoff.base = Duration::from_millis(20);
        c.policy.backoff.cap = Duration::from_millis(100);
        c.refresh_margin = Duration::from_millis(200);
        c
    };
    let names = ["leak-a", "leak-b", "leak-c", "leak-d", "leak-e"];
    let mut session_tokens: Vec<String> = Vec::new();
    let shop = |n: &str| ShopDomain::parse(&format!("{n}.myshopify.com")).unwrap();
    let faults: [&[Fault]; 5] = [
        &[Fault::RotateThenDrop, Fault::Truncated, Fault::Malformed],
        &[Fault::RotateThenReset, Fault::MissingExpiresIn],
        &[Fault::RotateThenHang, Fault::FailBeforeProcessing { status: 520, json: false }],
        &[Fault::Throttle { retry_after_secs: 0 }, Fault::FailBeforeProcessing { status: 500, json: true }],
        &[],
    ];
    {
        let (engine, report) = Engine::open(make_config(SECRET, Duration::from_secs(5))).await.unwrap();
        writeln!(out, "{report:?}").unwrap();
        for (n, f) in names.iter().zip(faults) {
            let t = sim.seed_shop(&shop(n).to_string());
            sim.push_faults(&shop(n).to_string(), f.iter().copied()).unwrap();
            let tokens = TokenSet {
                access_token: AccessToken::new(t.access_token.as_str()),
                access_expires_at: now(),
                refresh_token: RefreshToken::new(t.refresh_token.as_str()),
                refresh_expires_at: None,
                scope: Some(t.scope.clone()),
            };
            writeln!(out, "{tokens:?}").unwrap();
            engine.install(&shop(n), tokens).await.unwrap();
        }
        let mut events = engine.subscribe();
        for n in names {
            match engine.access_token(&shop(n)).await {
                Ok(t) => writeln!(out, "{t:?}").unwrap(),
                Err(e) => writeln!(out, "{e} {e:?}").unwrap(),
            }
        }
        // A shop whose grant the server killed.
        sim.with_model(|m| m.uninstall(&shop("leak-e").to_string()));
        let rejected = engine.access_token(&shop("leak-e")).await.unwrap();
        let e = engine.on_unauthorized(&shop("leak-e"), &rejected).await;
        writeln!(out, "{e:?}").unwrap();
        for n in names {
            let s = engine.state(&GrantKey::shopify(&shop(n))).unwrap();
            writeln!(out, "{s:?}").unwrap();
            for r in engine.store().history(&GrantKey::shopify(&shop(n))).unwrap() {
                writeln!(out, "{r:?}").unwrap();
            }
        }
        while let Ok(e) = events.try_recv() {
            writeln!(out, "{e:?}").unwrap();
        }
        // Re-acquisition: token exchanges (good, lost answers, refused locally and by the server) and
        // migrations (lost answer then resume, rejection).
        let sx = shop("leak-x").to_string();
        sim.push_faults(&sx, [Fault::RotateThenDrop, Fault::Truncated]).unwrap();
        let good = sim.session_token(&sx);
        let bad_sig = tokenwal_sim::mint_session_token(&sx, "sim-client-id", "nope", sim.now_ms(), 60_000);
        let refused = tokenwal_sim::mint_session_token(&sx, "sim-client-id", SECRET, sim.now_ms() - 62_000, 60_000);
        for raw in [&good, &bad_sig, &refused] {
            let e = engine.exchange_session_token(&shop("leak-x"), SessionToken::new(raw.clone())).await;
            writeln!(out, "{e:?}").unwrap();
            if let Err(e) = e {
                writeln!(out, "{e}").unwrap();
            }
            session_tokens.push(raw.clone());
        }
        let sm = shop("leak-m").to_string();
        let legacy = sim.with_model(|m| m.seed_legacy_token(&sm, None, None)).unwrap();
        sim.push_faults(&sm, [Fault::RotateThenDrop]).unwrap();
        for _ in 0..3 {
            let e = engine.migrate(&shop("leak-m"), LegacyToken::new(legacy.as_str())).await;
            writeln!(out, "{e:?}").unwrap();
            if let Err(e) = &e {
                writeln!(out, "{e}").unwrap();
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let e = engine.migrate(&shop("leak-n"), LegacyToken::new("shpat_never_issued_legacy")).await;
        writeln!(out, "{e:?}").unwrap();
        session_tokens.push(legacy.as_str().to_owned());
        session_tokens.push("shpat_never_issued_legacy".to_owned());
        for n in ["leak-x", "leak-m", "leak-n"] {
            let s = engine.state(&GrantKey::shopify(&shop(n))).unwrap();
            writeln!(out, "{s:?}").unwrap();
            for r in engine.store().history(&GrantKey::shopify(&shop(n))).unwrap() {
                writeln!(out, "{r:?}").unwrap();
            }
        }
        while let Ok(e) = events.try_recv() {
            writeln!(out, "{e:?}").unwrap();
        }
        engine.uninstalled(&shop("leak-a")).await.unwrap();
        engine.shutdown().await;
    }
    {
        // Wrong app credentials: the error paths of invalid_client.
        let (engine, report) = Engine::open(make_config("wrong-secret-value", Duration::ZERO)).await.unwrap();
        writeln!(out, "{report:?}").unwrap();
        let e = engine.access_token(&shop("leak-b")).await;
        writeln!(out, "{e:?}").unwrap();
        engine.shutdown().await;
    }

    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(text.len() > 10_000, "the trace should be substantial, got {} bytes", text.len());
    let mut secrets = vec![SECRET.to_owned(), "wrong-secret-value".to_owned()];
    for t in &session_tokens {
        secrets.push(t.clone());
        // Any JWT signature segment alone is a leak too.
        if let Some(sig) = t.split('.').nth(2) {
            secrets.push(sig.to_owned());
        }
    }
    for n in names.iter().chain(&["leak-x", "leak-m", "leak-n"]) {
        let state = sim.shop_state(&shop(n).to_string());
        for g in &state.grants {
            secrets.extend(g.refresh_tokens.iter().map(|t| t.token.as_str().to_owned()));
            secrets.extend(g.access_tokens.iter().map(|t| t.token.as_str().to_owned()));
        }
    }
    assert!(secrets.len() > 12, "the simulator issued tokens: {}", secrets.len());
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret leaked into the output (length {})", s.len());
    }
}
