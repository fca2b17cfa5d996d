//! A loopback test endpoint is never reached through a proxy from the environment: the client
//! secret goes to the loopback server itself. `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` point at
//! a trap listener that must see zero connections.
//!
//! One test in this binary: it sets process environment variables before anything else runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokenwal::core::{AccessToken, ClientSecret, RefreshToken, ShopDomain, TokenSet, UnixMillis};
use tokenwal::{Config, Engine, StoreLocation};
use tokenwal_sim::{serve, SimConfig};

#[test]
fn loopback_endpoints_bypass_environment_proxies() {
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let trap_url = format!("http://127.0.0.1:{}", trap.local_addr().unwrap().port());
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        // No other thread exists yet.
        std::env::set_var(k, &trap_url);
    }
    for k in ["NO_PROXY", "no_proxy"] {
        std::env::remove_var(k);
    }
    let hits = Arc::new(AtomicUsize::new(0));
    trap.set_nonblocking(true).unwrap();
    let counter = Arc::clone(&hits);
    std::thread::spawn(move || loop {
        if trap.accept().is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(5));
    });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let shop = ShopDomain::parse("proxy-check.myshopify.com").unwrap();
        let t = sim.seed_shop(shop.as_str());
        let mut c = Config::shopify(StoreLocation::InMemory, "sim-client-id", ClientSecret::new("sim-client-secret"))
            .with_insecure_test_endpoint(url::Url::parse(&sim.base_url()).unwrap());
        c.proactive = false;
        c.timeouts.total = Duration::from_secs(3);
        let (engine, _) = Engine::open(c).await.unwrap();
        let now = UnixMillis::from_system_time(std::time::SystemTime::now());
        let tokens = TokenSet {
            access_token: AccessToken::new(t.access_token.as_str()),
            access_expires_at: now,
            refresh_token: RefreshToken::new(t.refresh_token.as_str()),
            refresh_expires_at: None,
            scope: None,
        };
        engine.install(&shop, tokens).await.unwrap();
        let fresh = engine.access_token(&shop).await.expect("refreshed directly at the loopback server");
        assert_ne!(fresh.expose_secret(), t.access_token.as_str());
        assert_eq!(sim.counters().shop(shop.as_str()).token_requests, 1);
        engine.shutdown().await;
    });
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the proxy saw a connection");
}
