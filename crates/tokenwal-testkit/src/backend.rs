//! One suite, every durable backend: a [`TestStore`] is a sled store in a temporary directory or a
//! PostgreSQL store in a scratch schema ([`PgScratch`]), and [`on_both_backends!`] writes a test
//! once and runs it on both (the PostgreSQL variant is named with `_pg`).
//!
//! Without a reachable PostgreSQL the `_pg` variants skip with a loud message (and fail under
//! `TOKENWAL_REQUIRE_PG=1`, as in CI): see [`PgScratch::new`].

use std::path::PathBuf;

use tokenwal::store::{Store, StoreConfig};
use tokenwal::{KeyRing, StoreLocation};
use tokenwal_store::{PgLocation, PgScratch};

/// A durable backend of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded sled store (a directory).
    Sled,
    /// The PostgreSQL fleet store (a schema).
    Postgres,
}

impl Backend {
    /// `"sled"` or `"pg"` (for tags and messages).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Postgres => "pg",
        }
    }
}

/// A fresh durable store for one test, removed (directory or schema) when dropped. Not opened: a
/// test opens it ([`TestStore::open`]), hands its location to an engine ([`TestStore::location`]),
/// or to a child process ([`TestStore::address`]), as often as it likes.
pub enum TestStore {
    /// `<dir>/store`.
    Sled(tempfile::TempDir),
    /// The scratch schema.
    Postgres(PgScratch),
}

impl TestStore {
    /// A fresh store on `backend`, or `None` (after a loud message) when it is PostgreSQL and no
    /// server answers (a panic instead under `TOKENWAL_REQUIRE_PG=1`). `what` names the suite.
    pub fn new(backend: Backend, what: &str) -> Option<TestStore> {
        match backend {
            Backend::Sled => Some(TestStore::Sled(tempfile::tempdir().unwrap())),
            Backend::Postgres => PgScratch::new(what).map(TestStore::Postgres),
        }
    }

    /// Which backend it is.
    pub fn backend(&self) -> Backend {
        match self {
            TestStore::Sled(_) => Backend::Sled,
            TestStore::Postgres(_) => Backend::Postgres,
        }
    }

    /// Where an engine finds it.
    pub fn location(&self) -> StoreLocation {
        location_of(&self.address())
    }

    /// Its address as one string, for another process: the sled directory, or the PostgreSQL URL
    /// with `schema=` (the test server has trust auth: no password in it). [`location_of`] reads
    /// it back.
    pub fn address(&self) -> String {
        match self {
            TestStore::Sled(dir) => dir.path().join("store").to_str().expect("a UTF-8 temp dir").to_owned(),
            TestStore::Postgres(pg) => pg.url(),
        }
    }

    /// Opens it under the test key ring with the default configuration.
    pub fn open(&self) -> Store {
        open_at(&self.address(), StoreConfig::default())
    }

    /// The scratch schema, if it is PostgreSQL (raw SQL for the test).
    pub fn pg(&self) -> Option<&PgScratch> {
        match self {
            TestStore::Postgres(pg) => Some(pg),
            TestStore::Sled(_) => None,
        }
    }
}

/// The location of a store named by [`TestStore::address`].
pub fn location_of(address: &str) -> StoreLocation {
    if address.starts_with("postgres://") || address.starts_with("postgresql://") {
        StoreLocation::Postgres(Box::new(PgLocation::parse(address).expect("a valid postgres:// URL")))
    } else {
        StoreLocation::Path(PathBuf::from(address))
    }
}

/// Opens the store named by [`TestStore::address`] under the test key ring with `config`.
pub fn open_at(address: &str, config: StoreConfig) -> Store {
    let ring = KeyRing::insecure_test_ring();
    let opened = match location_of(address) {
        StoreLocation::Postgres(l) => Store::open_postgres(&l, &ring, config),
        StoreLocation::Path(p) => Store::open(p, &ring, config),
        _ => unreachable!("an address is a directory or a URL"),
    };
    let (store, report) = opened.unwrap_or_else(|e| panic!("open the test store: {e}"));
    assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
    store
}

/// Writes a test once for both backends: `fn NAME, NAME_pg(backend) { BODY }` defines `NAME`
/// (with `backend` = [`Backend::Sled`]) and `NAME_pg` ([`Backend::Postgres`]), each with the
/// attributes and doc comment given (`#[test]`, `#[tokio::test]`, …). `async fn` works too. The
/// body gets its store from [`TestStore::new`] and returns early when that is `None`.
///
/// ```ignore
/// on_both_backends! {
///     /// What it checks.
///     #[test]
///     fn recovers_after_a_kill, recovers_after_a_kill_pg(backend) {
///         let Some(store) = TestStore::new(backend, "kill tests") else { return };
///         // …
///     }
/// }
/// ```
#[macro_export]
macro_rules! on_both_backends {
    ($($(#[$attr:meta])* fn $sled:ident, $pg:ident ($b:ident) $body:block)+) => {$(
        $(#[$attr])*
        fn $sled() {
            let $b = $crate::Backend::Sled;
            $body
        }
        $(#[$attr])*
        fn $pg() {
            let $b = $crate::Backend::Postgres;
            $body
        }
    )+};
    ($($(#[$attr:meta])* async fn $sled:ident, $pg:ident ($b:ident) $body:block)+) => {$(
        $(#[$attr])*
        async fn $sled() {
            let $b = $crate::Backend::Sled;
            $body
        }
        $(#[$attr])*
        async fn $pg() {
            let $b = $crate::Backend::Postgres;
            $body
        }
    )+};
}
