//! Test hook: a PostgreSQL schema of its own for one test, dropped afterwards.
//!
//! The database comes from `TOKENWAL_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, the project machines' local server with trust auth).
//! Without a reachable server the suites skip with a loud message, unless `TOKENWAL_REQUIRE_PG=1`
//! (CI), where they fail.

use crate::{PgLocation, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};

/// The test database's URL.
pub fn test_pg_url() -> String {
    std::env::var("TOKENWAL_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether the PostgreSQL suites must run (CI): then a missing server fails them.
pub fn pg_required() -> bool {
    std::env::var("TOKENWAL_REQUIRE_PG").is_ok_and(|v| v == "1")
}

/// A fresh schema in the test database, dropped (with everything in it) when this is dropped.
pub struct PgScratch {
    location: PgLocation,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Runs `f` with a client of the test database on a thread of its own (the blocking client must
/// not run on a tokio worker).
fn admin<T: Send + 'static>(
    f: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send + 'static,
) -> Result<T, String> {
    let url = test_pg_url();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).map_err(|e| e.to_string())?;
        f(&mut c).map_err(|e| e.to_string())
    })
    .join()
    .unwrap_or_else(|_| Err("panicked".into()))
}

impl PgScratch {
    /// A new schema, or `None` (after a loud message) when no server answers and
    /// `TOKENWAL_REQUIRE_PG` is not `1`. `what` names the suite in the message.
    pub fn new(what: &str) -> Option<PgScratch> {
        let schema = format!(
            "tw_test_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        match admin(|_| Ok(())) {
            Ok(()) => {}
            Err(e) if pg_required() => {
                panic!("TOKENWAL_REQUIRE_PG=1 but PostgreSQL at {} is not reachable: {e}", redact(&test_pg_url()))
            }
            Err(e) => {
                eprintln!(
                    "\n*** SKIPPED ({what}): PostgreSQL at {} is not reachable ({e}); start it or set \
                     TOKENWAL_TEST_PG_URL (CI sets TOKENWAL_REQUIRE_PG=1 and fails instead) ***\n",
                    redact(&test_pg_url())
                );
                return None;
            }
        }
        let location = PgLocation::parse(&test_pg_url())
            .and_then(|l| l.with_schema(&schema))
            .expect("TOKENWAL_TEST_PG_URL is a valid postgres:// URL");
        Some(PgScratch { location })
    }

    /// The store location: the test database, this scratch schema.
    pub fn location(&self) -> PgLocation {
        self.location.clone()
    }

    /// The store's URL (the test database's, with `schema=` this scratch schema), for `--db`.
    pub fn url(&self) -> String {
        let base = test_pg_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}schema={}", self.location.schema())
    }

    /// Runs SQL in the test database as the admin (test corruption, foreign tables, raw reads).
    pub fn execute(&self, sql: &str) -> Result<(), String> {
        let sql = sql.to_string();
        admin(move |c| c.batch_execute(&sql))
    }

    /// The rows of a one-column `bytea` query (raw reads of what the database holds).
    pub fn query_bytes(&self, sql: &str) -> Result<Vec<Vec<u8>>, String> {
        let sql = sql.to_string();
        admin(move |c| Ok(c.query(&sql, &[])?.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect()))
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        self.location.schema()
    }

    /// Ends (`pg_terminate_backend`) every session of the test database that is idle inside a
    /// transaction holding a lock on a table of this schema (a writer with its group written and not
    /// committed): what the server does with the open transaction of a process that died (it is
    /// rolled back). Returns how many it ended, each gone when this returns (PostgreSQL 14 or later:
    /// the terminate waits up to 5 s).
    pub fn end_sessions_in_transaction(&self) -> usize {
        let schema = self.location.schema().to_string();
        let ended = admin(move |c| {
            let row = c.query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid, 5000)) FROM pg_stat_activity a \
                 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
                 AND a.state LIKE 'idle in transaction%' AND EXISTS (SELECT 1 FROM pg_locks l \
                 JOIN pg_class t ON t.oid = l.relation JOIN pg_namespace n ON n.oid = t.relnamespace \
                 WHERE l.pid = a.pid AND n.nspname = $1)",
                &[&schema],
            )?;
            Ok(row.get::<_, i64>(0))
        })
        .unwrap_or_else(|e| panic!("end the sessions of {}: {e}", self.location.schema()));
        usize::try_from(ended).unwrap_or(0)
    }
}

impl Drop for PgScratch {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.location.schema());
        if let Err(e) = admin(move |c| c.batch_execute(&sql)) {
            eprintln!("could not drop test schema {}: {e}", self.location.schema());
        }
    }
}

fn redact(url: &str) -> String {
    PgLocation::parse(url).map(|l| l.redacted().to_string()).unwrap_or_else(|e: StoreError| e.to_string())
}
