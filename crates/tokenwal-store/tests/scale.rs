//! Opening reads only the open-attempt index: with a million grants it stays fast.
//!
//! Ignored by default (it writes about 400 MB): `cargo test -p tokenwal-store --release --test scale
//! -- --ignored --nocapture`. `TOKENWAL_SCALE_GRANTS` sets the number of grants (default 1 000 000).

use std::time::{Duration, Instant};
use tokenwal_core::*;
use tokenwal_store::{layout, Store, StoreConfig};

const T0: u64 = 1_800_000_000_000;

fn key(i: usize) -> GrantKey {
    GrantKey::shopify(&ShopDomain::parse(&format!("scale-{i}.myshopify.com")).unwrap())
}

#[test]
#[ignore = "writes about 400 MB; run explicitly"]
fn open_is_fast_with_a_million_grants() {
    let n: usize = std::env::var("TOKENWAL_SCALE_GRANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let every_open = 1000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let fingerprint = Store::open(&path, &tokenwal_store::KeyRing::insecure_test_ring(), StoreConfig::default())
        .unwrap()
        .0
        .fingerprint_key();
    let m = Machine::shopify(fingerprint);
    let now = UnixMillis(T0);
    let tokens = TokenSet {
        access_token: AccessToken::new("shpat_0123456789abcdef0123456789abcdef"),
        access_expires_at: now,
        refresh_token: RefreshToken::new("shprt_0123456789abcdef0123456789abcdef"),
        refresh_expires_at: Some(UnixMillis(T0 + 90 * 86_400_000)),
        scope: Some("read_orders,write_products".into()),
    };
    let b = m.install(None, key(0), tokens, InstallSource::Import, now).transition().write_batch().unwrap();
    let healthy = codec::decode_state(&b.state).unwrap();
    let refreshing =
        codec::decode_state(&m.plan_attempt(&healthy, now).unwrap().transition().write_batch().unwrap().state).unwrap();

    // Fill the trees directly (the layout is public): far faster than a million group commits.
    let fill = Instant::now();
    {
        // The dropped store's sled lets go of its lock from background threads: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let db = loop {
            match sled::open(&path) {
                Ok(db) => break db,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("{e}"),
            }
        };
        let grants = db.open_tree(layout::GRANTS).unwrap();
        let open = db.open_tree(layout::OPEN).unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
            let (mut g, mut o) = (sled::Batch::default(), sled::Batch::default());
            for &i in chunk {
                let k = key(i);
                let template = if i % every_open == 0 { &refreshing } else { &healthy };
                let s = GrantState { grant: k.clone(), ..template.clone() };
                let ring = tokenwal_store::KeyRing::insecure_test_ring();
                g.insert(
                    k.to_bytes(),
                    tokenwal_store::seal_state_frame(&ring, &k, s.version, &codec::encode_state(&s).unwrap()),
                );
                if i % every_open == 0 {
                    o.insert(k.to_bytes(), &[]);
                }
            }
            grants.apply_batch(g).unwrap();
            open.apply_batch(o).unwrap();
        }
        db.open_tree(layout::META).unwrap().insert(layout::META_GRANT_COUNT, &(n as u64).to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    eprintln!("filled {n} grants in {:?}", fill.elapsed());

    let (store, report) =
        Store::open(&path, &tokenwal_store::KeyRing::insecure_test_ring(), StoreConfig::default()).unwrap();
    eprintln!("open: {:?} ({} grants, {} open attempts)", report.elapsed, report.grants, report.open_attempts);
    assert_eq!(report.grants, n);
    assert_eq!(report.open_attempts, n.div_ceil(every_open));
    assert!(report.corrupt.is_empty());
    assert!(report.elapsed < Duration::from_secs(5), "open took {:?}", report.elapsed);

    let t = Instant::now();
    let open = store.open_grants().unwrap();
    eprintln!("open_grants: {} in {:?}", open.len(), t.elapsed());
    assert_eq!(open.len(), n.div_ceil(every_open));
    let t = Instant::now();
    let (c, _) = (store.grant_count(), ());
    eprintln!("grant_count: {c} in {:?}", t.elapsed());
    let t = Instant::now();
    let mut seen = 0;
    let scan = store.for_each_grant(|_| seen += 1).unwrap();
    eprintln!("full scan: {seen} grants in {:?}", t.elapsed());
    assert_eq!((seen, scan.grants), (n, n));
}
