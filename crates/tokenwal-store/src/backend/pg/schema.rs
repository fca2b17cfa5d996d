//! The schema: versioned migrations carried in the binary, the checks an open makes, and the SQL
//! every connection runs (built once per store, for its schema).

use super::db_err;
use crate::error::StoreError;
use crate::layout::Tree;
use postgres::error::SqlState;
use postgres::Transaction;

/// Migrations, in order: `(version, name, statements)`. `{s}` is the quoted schema. A release adds
/// one at the end; it never edits one that has shipped.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "key-value trees and the ownership lease",
    r#"
CREATE TABLE {s}."grants"  (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE {s}."open"    (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE {s}."journal" (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE {s}."history" (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE {s}."expiry"  (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE {s}."meta"    (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE {s}."owner" (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch       bigint NOT NULL
);
CREATE TABLE {s}."lease" (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch       bigint NOT NULL,
    holder      text,
    lease_until timestamptz NOT NULL
);
INSERT INTO {s}."owner" (epoch) VALUES (0);
INSERT INTO {s}."lease" (epoch, holder, lease_until) VALUES (0, NULL, to_timestamp(0));
"#,
)];

/// The newest schema version this build knows.
pub(crate) const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The table recording applied migrations; its presence marks a schema as tokenwal's.
const MIGRATIONS_TABLE: &str = "tokenwal_migrations";

/// Every table name a migration creates: a schema holding one of them without tokenwal's migration
/// table belongs to someone else and is refused.
const OURS: &[&str] = &["grants", "open", "journal", "history", "expiry", "meta", "owner", "lease"];

/// Advisory lock class serialising migrations of one schema across processes.
const MIGRATION_LOCK: i32 = 0x7477_6d67;

/// Brings `schema` to [`LATEST`] (creating it if needed) in one transaction, serialised with any
/// other process doing the same. Returns the version found before.
pub(crate) fn migrate(tx: &mut Transaction<'_>, schema: &str) -> Result<i32, StoreError> {
    let q = quote(schema);
    tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&MIGRATION_LOCK, &schema])
        .map_err(db_err("lock the schema for migration"))?;
    let exists: bool = tx
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&schema])
        .map_err(db_err("read the catalog"))?
        .get(0);
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {q}")).map_err(ddl_err(schema))?;
    }
    let marked: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
            &[&schema, &MIGRATIONS_TABLE],
        )
        .map_err(db_err("read the catalog"))?
        .get(0);
    let found = if marked {
        let v: Option<i32> = tx
            .query_one(&format!("SELECT max(version) FROM {q}.{MIGRATIONS_TABLE}"), &[])
            .map_err(db_err("read the schema version"))?
            .get(0);
        v.unwrap_or(0)
    } else {
        let foreign: Vec<String> = tx
            .query(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 AND tablename = ANY($2) ORDER BY 1",
                &[&schema, &OURS],
            )
            .map_err(db_err("read the catalog"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !foreign.is_empty() {
            return Err(StoreError::ForeignSchema { schema: schema.to_string(), tables: foreign });
        }
        tx.batch_execute(&format!(
            "CREATE TABLE {q}.{MIGRATIONS_TABLE} (version integer PRIMARY KEY, name text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .map_err(ddl_err(schema))?;
        0
    };
    if found > LATEST {
        return Err(StoreError::SchemaTooNew { schema: schema.to_string(), found, supported: LATEST });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > found) {
        tx.batch_execute(&sql.replace("{s}", &q)).map_err(ddl_err(schema))?;
        tx.execute(&format!("INSERT INTO {q}.{MIGRATIONS_TABLE} (version, name) VALUES ($1, $2)"), &[version, name])
            .map_err(ddl_err(schema))?;
        tracing::info!(schema, version, name, "schema migrated");
    }
    Ok(found)
}

/// A DDL failure: a role without the right gets told how to migrate.
fn ddl_err(schema: &str) -> impl Fn(postgres::Error) -> StoreError + '_ {
    move |e| {
        if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            StoreError::MigrationNeeded {
                schema: schema.to_string(),
                reason: e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()),
            }
        } else {
            db_err("migrate the schema")(e)
        }
    }
}

/// `"schema"` (the name is checked to be a plain identifier: no quote can occur in it).
pub(crate) fn quote(schema: &str) -> String {
    format!("\"{schema}\"")
}

/// The statements of one store, for its schema.
pub(crate) struct Sql {
    pub get: [String; 6],
    pub get_many: [String; 6],
    pub upsert: [String; 6],
    pub delete: [String; 6],
    pub scan_from: [String; 6],
    pub scan_after: [String; 6],
    pub scan_rev: [String; 6],
    pub last: [String; 6],
    /// Fencing: the epoch and whether the lease has more than `$1` seconds left, on the database's
    /// clock, with the owner row share-locked until the transaction ends.
    pub fence: String,
    pub acquire: String,
    pub renew: String,
    pub release: String,
    pub holder: String,
}

impl Sql {
    pub fn new(schema: &str) -> Sql {
        let q = quote(schema);
        let per = |f: &dyn Fn(String) -> String| Tree::ALL.map(|t| f(format!("{q}.\"{}\"", t.name())));
        Sql {
            get: per(&|t| format!("SELECT v FROM {t} WHERE k = $1")),
            get_many: per(&|t| format!("SELECT k, v FROM {t} WHERE k = ANY($1::bytea[])")),
            upsert: per(&|t| {
                format!(
                    "INSERT INTO {t} (k, v) SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                     ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
                )
            }),
            delete: per(&|t| format!("DELETE FROM {t} WHERE k = ANY($1::bytea[])")),
            scan_from: per(&|t| format!("SELECT k, v FROM {t} WHERE k >= $1 ORDER BY k LIMIT $2")),
            scan_after: per(&|t| format!("SELECT k, v FROM {t} WHERE k > $1 ORDER BY k LIMIT $2")),
            scan_rev: per(&|t| format!("SELECT k, v FROM {t} WHERE k >= $1 AND k < $2 ORDER BY k DESC LIMIT $3")),
            last: per(&|t| format!("SELECT k FROM {t} ORDER BY k DESC LIMIT 1")),
            // The owner row (the epoch) is share-locked by every group transaction, so a takeover
            // (which writes it) waits for the group in flight and the group after it sees the new
            // epoch. The lease lives in another row so that renewing it never waits for a group.
            fence: format!(
                "SELECT o.epoch, l.lease_until > now() + make_interval(secs => $1) \
                 FROM {q}.\"owner\" o, {q}.\"lease\" l FOR SHARE OF o"
            ),
            // Takes the store if its lease has run out (or its holder released it, or is `$3`, a dead
            // process of this host); returns the new epoch, or nothing if someone else holds it.
            acquire: format!(
                "WITH l AS (UPDATE {q}.\"lease\" SET epoch = epoch + 1, holder = $1, \
                 lease_until = now() + make_interval(secs => $2) \
                 WHERE lease_until <= now() OR holder IS NULL OR holder = $3 RETURNING epoch) \
                 UPDATE {q}.\"owner\" o SET epoch = l.epoch FROM l RETURNING o.epoch"
            ),
            renew: format!(
                "UPDATE {q}.\"lease\" SET lease_until = now() + make_interval(secs => $2) \
                 WHERE epoch = $1 RETURNING epoch"
            ),
            release: format!("UPDATE {q}.\"lease\" SET holder = NULL, lease_until = to_timestamp(0) WHERE epoch = $1"),
            holder: format!(
                "SELECT holder, GREATEST(0, EXTRACT(EPOCH FROM lease_until - now()))::float8 FROM {q}.\"lease\""
            ),
        }
    }
}
