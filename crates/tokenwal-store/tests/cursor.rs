//! Journal reads by LSN, named cursors, and compaction's respect for them.

use std::time::Duration;
use tokenwal_core::*;
use tokenwal_store::{KeyRing, Store, StoreConfig};

fn tokens(now: UnixMillis, n: u32) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("shpat_{n}")),
        access_expires_at: now,
        refresh_token: RefreshToken::new(format!("shprt_{n}")),
        refresh_expires_at: None,
        scope: None,
    }
}

/// Installs `shop` `times` times at `at`, returning the LSNs written.
fn install(store: &Store, shop: &str, times: u32, at: UnixMillis) {
    let machine = Machine::shopify(store.fingerprint_key());
    let grant = GrantKey::shopify(&ShopDomain::parse(shop).unwrap());
    for n in 0..times {
        let current = store.get(&grant).unwrap();
        let t = machine.install(current.as_ref(), grant.clone(), tokens(at, n), InstallSource::Import, at);
        store.apply_blocking(t.transition().write_batch().unwrap()).unwrap();
    }
}

#[test]
fn journal_from_reads_durable_records_in_lsn_order() {
    let store = Store::in_memory();
    assert_eq!(store.journal_end().unwrap(), 1, "LSNs start at 1");
    let now = UnixMillis(1_800_000_000_000);
    install(&store, "a.myshopify.com", 2, now);
    install(&store, "b.myshopify.com", 1, now);
    let end = store.journal_end().unwrap();
    assert!(end >= 3);
    let all = store.journal_from(0, 100).unwrap();
    assert_eq!(all.iter().map(|(l, _)| *l).collect::<Vec<_>>(), (1..end).collect::<Vec<_>>());
    assert_eq!(all.last().unwrap().1.grant().account(), "b.myshopify.com");
    assert_eq!(store.journal_from(0, 1).unwrap()[0].0, 1);
    assert_eq!(store.journal_from(2, 1).unwrap()[0].0, 2);
    assert!(store.journal_from(end, 100).unwrap().is_empty());

    // A write that is applied but not durable yet is not returned.
    let hold = store.hold_acks();
    let s2 = store.clone();
    let writer = std::thread::spawn(move || install(&s2, "c.myshopify.com", 1, now));
    assert!(hold.wait_parked(Duration::from_secs(5)));
    assert_eq!(store.journal_end().unwrap(), end, "the parked group's LSN is not durable");
    assert!(store.journal_from(end, 100).unwrap().is_empty());
    hold.release();
    writer.join().unwrap();
    assert_eq!(store.journal_from(end, 100).unwrap()[0].1.grant().account(), "c.myshopify.com");
}

#[test]
fn cursors_are_durable_and_hold_compaction_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::default().with_retention(Duration::from_secs(60));
    let old = UnixMillis(1_800_000_000_000);
    let later = old.saturating_add(Duration::from_secs(3600));
    {
        let (store, _) = Store::open(dir.path(), &KeyRing::insecure_test_ring(), config.clone()).unwrap();
        install(&store, "a.myshopify.com", 5, old);
        assert_eq!(store.cursor("webhook").unwrap(), None);
        store.set_cursor("webhook", 2).unwrap();
        assert!(store.set_cursor("Bad Name", 1).is_err());
    }
    let (store, _) = Store::open(dir.path(), &KeyRing::insecure_test_ring(), config).unwrap();
    let end = store.journal_end().unwrap();
    assert!(end > 4);
    assert_eq!(store.cursor("webhook").unwrap(), Some(2), "durable across a reopen");
    assert_eq!(store.lowest_cursor().unwrap(), Some(2));
    // Every record is past retention, but the cursor's consumer has not seen 2 and later.
    while store.compact(later).unwrap().more {}
    let left: Vec<u64> = store.journal_from(0, 100).unwrap().iter().map(|(l, _)| *l).collect();
    assert_eq!(left, (2..end).collect::<Vec<_>>());
    store.set_cursor("webhook", end).unwrap();
    while store.compact(later).unwrap().more {}
    assert!(store.journal_from(0, 100).unwrap().is_empty());
    assert_eq!(store.journal_end().unwrap(), end, "LSNs never go back after compaction");
    store.delete_cursor("webhook").unwrap();
    assert_eq!(store.cursor("webhook").unwrap(), None);
    assert_eq!(store.lowest_cursor().unwrap(), None);
}
