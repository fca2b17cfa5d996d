//! One suite, every backend: a [`TestStore`] is a sled store in a temporary directory, a PostgreSQL
//! store in a scratch schema ([`PgScratch`]) or the in-memory store, and [`on_both_backends!`]
//! writes a test once and runs it on sled (or in memory) and on PostgreSQL (the variant named
//! with `_pg`).
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
    /// The in-memory store (nothing survives the engine that opened it).
    Memory,
}

impl Backend {
    /// `"sled"` or `"pg"` (for tags and messages).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Postgres => "pg",
            Backend::Memory => "memory",
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
    Postgres(Box<PgScratch>),
    /// Nothing to keep: every [`TestStore::location`] is a new in-memory store.
    Memory,
}

impl TestStore {
    /// A fresh store on `backend`, or `None` (after a loud message) when it is PostgreSQL and no
    /// server answers (a panic instead under `TOKENWAL_REQUIRE_PG=1`). `what` names the suite.
    pub fn new(backend: Backend, what: &str) -> Option<TestStore> {
        match backend {
            Backend::Sled => Some(TestStore::Sled(tempfile::tempdir().unwrap())),
            Backend::Postgres => PgScratch::new(what).map(|pg| TestStore::Postgres(Box::new(pg))),
            Backend::Memory => Some(TestStore::Memory),
        }
    }

    /// Which backend it is.
    pub fn backend(&self) -> Backend {
        match self {
            TestStore::Sled(_) => Backend::Sled,
            TestStore::Postgres(_) => Backend::Postgres,
            TestStore::Memory => Backend::Memory,
        }
    }

    /// Where an engine finds it.
    pub fn location(&self) -> StoreLocation {
        match self {
            TestStore::Memory => StoreLocation::InMemory,
            _ => location_of(&self.address()),
        }
    }

    /// Its address as one string, for another process: the sled directory, or the PostgreSQL URL
    /// with `schema=` (the test server has trust auth: no password in it). [`location_of`] reads
    /// it back.
    ///
    /// # Panics
    ///
    /// For the in-memory store, which no other process can reach.
    pub fn address(&self) -> String {
        match self {
            TestStore::Sled(dir) => dir.path().join("store").to_str().expect("a UTF-8 temp dir").to_owned(),
            TestStore::Postgres(pg) => pg.url(),
            TestStore::Memory => panic!("an in-memory store has no address"),
        }
    }

    /// Opens it under the test key ring with the default configuration (in memory: a new store).
    pub fn open(&self) -> Store {
        match self {
            TestStore::Memory => Store::in_memory(),
            _ => open_at(&self.address(), StoreConfig::default()),
        }
    }

    /// The scratch schema, if it is PostgreSQL (raw SQL for the test).
    pub fn pg(&self) -> Option<&PgScratch> {
        match self {
            TestStore::Postgres(pg) => Some(pg),
            TestStore::Sled(_) | TestStore::Memory => None,
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

/// Writes a test once for two backends: `fn NAME, NAME_pg(backend) { BODY }` defines `NAME` (with
/// `backend` = [`Backend::Sled`]) and `NAME_pg` ([`Backend::Postgres`]), each with the attributes
/// and doc comment given (`#[test]`, `#[tokio::test]`, …). `(backend = Memory)` makes the first
/// one [`Backend::Memory`] instead; `async fn` works too. The body gets its store from
/// [`TestStore::new`] and returns early when that is `None` (no PostgreSQL server).
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
    ($(#[$attr:meta])* fn $first:ident, $pg:ident ($b:ident) $body:block) => {
        $crate::on_both_backends! { $(#[$attr])* fn $first, $pg ($b = Sled) $body }
    };
    ($(#[$attr:meta])* async fn $first:ident, $pg:ident ($b:ident) $body:block) => {
        $crate::on_both_backends! { $(#[$attr])* async fn $first, $pg ($b = Sled) $body }
    };
    ($(#[$attr:meta])* fn $first:ident, $pg:ident ($b:ident = $kind:ident) $body:block) => {
        $(#[$attr])*
        fn $first() {
            let $b = $crate::Backend::$kind;
            $body
        }
        $(#[$attr])*
        fn $pg() {
            let $b = $crate::Backend::Postgres;
            $body
        }
    };
    ($(#[$attr:meta])* async fn $first:ident, $pg:ident ($b:ident = $kind:ident) $body:block) => {
        $(#[$attr])*
        async fn $first() {
            let $b = $crate::Backend::$kind;
            $body
        }
        $(#[$attr])*
        async fn $pg() {
            let $b = $crate::Backend::Postgres;
            $body
        }
    };
}
