//! Two engines on one PostgreSQL store — two members of a fleet, in one test process — against the
//! simulator over loopback: what one caches learns of the other's rotations (issue 13, item 4).
//!
//! Needs PostgreSQL (`TOKENWAL_TEST_PG_URL`, default the local test database); skips loudly without
//! it unless `TOKENWAL_REQUIRE_PG=1` (CI).

use std::time::{Duration, Instant};
use tokenwal::core::AccessToken;
use tokenwal::store::PgScratch;
use tokenwal::{Engine, StoreLocation};
use tokenwal_testkit::{accepted, engine_config as config, seed, shop, sim, SECRET};

async fn open(base: &str, pg: &PgScratch) -> Engine {
    Engine::open(config(base, StoreLocation::Postgres(Box::new(pg.location())), SECRET)).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_processs_rotation_reaches_this_ones_cache_without_a_refresh() {
    let Some(pg) = PgScratch::new("engine fleet coherence") else { return };
    let sim = sim().await;
    let s = shop("coherent");
    let tokens = seed(&sim, "coherent");
    let (a, b) = (open(&sim.base_url(), &pg).await, open(&sim.base_url(), &pg).await);
    let rotations = || sim.counters().shop(&s.to_string()).rotations;
    a.install(&s, tokens).await.unwrap();
    // The seeded access token is expired: the first call refreshes, and caches the new token in `a`.
    let t1 = a.access_token(&s).await.unwrap();
    assert_eq!(b.access_token(&s).await.unwrap(), t1, "b reads the durable state");
    assert_eq!(rotations(), 1);

    // `b` is told its token was rejected and rotates the grant.
    let t2 = b.on_unauthorized(&s, &t1).await.unwrap();
    assert_ne!(t2, t1);
    assert_eq!(rotations(), 2);

    // `a` still caches t1, valid for most of an hour: without hearing of b's commit it would serve
    // t1 until its own refresh margin. It hears of it (LISTEN/NOTIFY) and serves t2, with no refresh.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = a.access_token(&s).await.unwrap();
        if t == t2 {
            break;
        }
        assert_eq!(t, t1, "only t1 or t2 can be served");
        assert!(Instant::now() < deadline, "a still serves the superseded token 10 s after b's rotation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rotations(), 2, "a learned of the rotation without refreshing");
    assert!(accepted(&sim, "coherent", &t2));

    // `on_unauthorized` across processes: a 401 seen in `a` with a token `b` already replaced gets
    // `b`'s newer token, not another rotation.
    let t3 = b.on_unauthorized(&s, &t2).await.unwrap();
    assert_eq!(rotations(), 3);
    let got: AccessToken = a.on_unauthorized(&s, &t2).await.unwrap();
    assert_eq!(got, t3);
    assert_eq!(rotations(), 3, "no second rotation for one rejected token");
    a.shutdown().await;
    b.shutdown().await;
}
