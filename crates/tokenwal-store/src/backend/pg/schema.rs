//! The schema: versioned migrations carried in the binary, the checks an open makes, and the SQL
//! every connection runs (built once per store, for its schema).

use super::db_err;
use crate::error::StoreError;
use crate::layout::Tree;
use postgres::error::SqlState;
use postgres::Transaction;

/// Migrations, in order: `(version, name, statements)`. `{s}` is the quoted schema. A release adds
/// one at the end; it never edits one that has shipped.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
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
    ),
    (
        2,
        "fleet: writer membership leases, commit-ordered LSNs",
        r#"
DROP TABLE {s}."owner";
DROP TABLE {s}."lease";
CREATE SEQUENCE {s}."member_ids";
CREATE TABLE {s}."members" (
    id      bigint PRIMARY KEY,
    holder  text NOT NULL,
    joined  timestamptz NOT NULL DEFAULT now(),
    expires timestamptz NOT NULL
);
CREATE TABLE {s}."lsn" (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    next bigint NOT NULL
);
INSERT INTO {s}."lsn" (next) SELECT GREATEST(
    1,
    COALESCE((SELECT ('x' || encode(k, 'hex'))::bit(64)::bigint + 1 FROM {s}."journal" ORDER BY k DESC LIMIT 1), 1),
    COALESCE((SELECT ('x' || encode(v, 'hex'))::bit(64)::bigint FROM {s}."meta" WHERE k = 'lsn_floor'::bytea), 1)
);
"#,
    ),
];

/// The newest schema version this build knows.
pub(crate) const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The table recording applied migrations; its presence marks a schema as tokenwal's.
const MIGRATIONS_TABLE: &str = "tokenwal_migrations";

/// Every table name a migration creates: a schema holding one of them without tokenwal's migration
/// table belongs to someone else and is refused.
const OURS: &[&str] = &["grants", "open", "journal", "history", "expiry", "meta", "owner", "lease", "members", "lsn"];

/// Advisory lock class of grants: every group transaction takes `(GRANT_LOCK, hash of the grant)`
/// for each grant it writes, in ascending hash order, before reading their states.
pub(crate) const GRANT_LOCK: i32 = 0x7477_6772;

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
    pub scan_from: [String; 6],
    pub scan_after: [String; 6],
    pub scan_rev: [String; 6],
    pub last: [String; 6],
    /// The membership fence: whether member `$1` has more than `$2` seconds left on the database's
    /// clock, and the ids of every live member (none if `$1` is gone).
    pub fence: String,
    /// A group's first statement: the membership fence (as [`Sql::fence`]), then, if `$1` is a
    /// member, the advisory locks of `$4` (grant hashes, ascending) in class `$3`. No row: `$1` is
    /// gone (and nothing was locked).
    pub fence_and_lock: String,
    /// The `grants` (tag 0) and `open` (tag 1) rows of the keys `$1`, in one round trip: `(tag, k,
    /// v)`. A statement of its own after [`Sql::fence_and_lock`]: its snapshot is taken once the
    /// locks are held, so it sees the latest committed versions of the locked grants.
    pub group_read: String,
    /// The quoted schema (for [`write_sql`]).
    pub quoted: String,
    /// [`write_sql`]'s statements, by shape (a handful in practice: an intent group, an outcome
    /// group, a mixed one, an install, a side transaction).
    pub writes: std::sync::Mutex<std::collections::HashMap<WriteShape, std::sync::Arc<str>>>,
    pub join: String,
    pub renew: String,
    pub release: String,
    /// Members whose lease has not run out: `(id, holder)`.
    pub members: String,
    /// Ends the lease of member `$1` (a dead process of this host).
    pub expire: String,
    /// Forgets members whose lease ran out more than a day ago.
    pub forget: String,
    /// Claims up to `$2` orphaned attempts for member `$1` (8-byte big-endian id): `open` rows whose
    /// member's lease has run out (or that name no member), row-locked with `SKIP LOCKED` so that
    /// processes claiming at once get disjoint sets, and marked as `$1`'s. Returns the claimed keys.
    /// (The marking finds the claimed rows by key through the primary key's index: as a join, the
    /// planner hashed the whole `open` table for every claim, 10 000 rows after a fleet crash.)
    pub claim: String,
    /// The store's notification channel (`LISTEN`): a name derived from the schema's (channel
    /// names are identifiers of at most 63 bytes).
    pub channel: String,
}

impl Sql {
    pub fn new(schema: &str) -> Sql {
        let q = quote(schema);
        let per = |f: &dyn Fn(String) -> String| Tree::ALL.map(|t| f(format!("{q}.\"{}\"", t.name())));
        let channel = format!("tokenwal_{:016x}", {
            // FNV-1a 64 of the schema name: stable across processes and releases.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in schema.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h
        });
        // The fence's columns: whether member `$1` has more than `$2` seconds left, and every live
        // member's id.
        let fence_cols = format!(
            "expires > now() + make_interval(secs => $2), ARRAY(SELECT id FROM {q}.\"members\" WHERE expires > now())"
        );
        Sql {
            get: per(&|t| format!("SELECT v FROM {t} WHERE k = $1")),
            get_many: per(&|t| format!("SELECT k, v FROM {t} WHERE k = ANY($1::bytea[])")),
            scan_from: per(&|t| format!("SELECT k, v FROM {t} WHERE k >= $1 ORDER BY k LIMIT $2")),
            scan_after: per(&|t| format!("SELECT k, v FROM {t} WHERE k > $1 ORDER BY k LIMIT $2")),
            scan_rev: per(&|t| format!("SELECT k, v FROM {t} WHERE k >= $1 AND k < $2 ORDER BY k DESC LIMIT $3")),
            last: per(&|t| format!("SELECT k FROM {t} ORDER BY k DESC LIMIT 1")),
            fence: format!("SELECT {fence_cols} FROM {q}.\"members\" WHERE id = $1"),
            // The locks are a scalar subquery of the fence's one row: taken (ascending, in the
            // array's order) only when the member exists, in the same round trip.
            fence_and_lock: format!(
                "SELECT {fence_cols}, \
                 (SELECT count(*) FROM (SELECT pg_advisory_xact_lock($3, h) FROM unnest($4::int4[]) AS u(h)) l) \
                 FROM {q}.\"members\" WHERE id = $1"
            ),
            group_read: format!(
                "SELECT 0::int2, k, v FROM {q}.\"grants\" WHERE k = ANY($1::bytea[]) \
                 UNION ALL SELECT 1::int2, k, v FROM {q}.\"open\" WHERE k = ANY($1::bytea[])"
            ),
            quoted: q.clone(),
            writes: Default::default(),
            join: format!(
                "INSERT INTO {q}.\"members\" (id, holder, expires) \
                 VALUES (nextval('{q}.\"member_ids\"'), $1, now() + make_interval(secs => $2)) RETURNING id"
            ),
            renew: format!(
                "UPDATE {q}.\"members\" SET expires = now() + make_interval(secs => $2) \
                 WHERE id = $1 AND expires > now() RETURNING id"
            ),
            release: format!("UPDATE {q}.\"members\" SET expires = to_timestamp(0) WHERE id = $1"),
            members: format!("SELECT id, holder FROM {q}.\"members\" WHERE expires > now() ORDER BY id"),
            expire: format!("UPDATE {q}.\"members\" SET expires = to_timestamp(0) WHERE id = $1 AND holder = $2"),
            forget: format!("DELETE FROM {q}.\"members\" WHERE expires < now() - interval '1 day'"),
            claim: format!(
                "WITH orphans AS (\
                   SELECT o.k FROM {q}.\"open\" o \
                   WHERE length(o.v) <> 8 OR NOT EXISTS (\
                     SELECT 1 FROM {q}.\"members\" m \
                     WHERE m.id = ('x' || encode(o.v, 'hex'))::bit(64)::bigint AND m.expires > now()) \
                   ORDER BY o.k LIMIT $2 FOR UPDATE OF o SKIP LOCKED) \
                 UPDATE {q}.\"open\" o SET v = $1 WHERE o.k = ANY(ARRAY(SELECT k FROM orphans)) RETURNING o.k"
            ),
            channel,
        }
    }
}

/// Whether the keys of `t` end with a journal LSN (a group stages them from LSN 0 and moves them up
/// by the LSNs it takes when it writes).
pub(crate) fn lsn_keyed(t: Tree) -> bool {
    matches!(t, Tree::Journal | Tree::History | Tree::Expiry)
}

/// What one transaction writes, as far as the shape of its write statement goes: which parts of
/// [`write_sql`] it needs (a part with nothing to do is left out of the statement, not run empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct WriteShape {
    /// Takes LSNs from the `lsn` row.
    pub lsns: bool,
    /// Sends notifications.
    pub notify: bool,
    /// Adds to the grant count.
    pub count: bool,
    /// Per table ([`Tree::ALL`] order): deletes, upserts.
    pub tables: [(bool, bool); 6],
}

impl WriteShape {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        !self.lsns && !self.notify && !self.count && self.tables.iter().all(|(d, u)| !d && !u)
    }
}

/// The statement writing a whole transaction's staged rows in one round trip: data-modifying
/// `WITH` clauses, each run exactly once whatever the final `SELECT` reads (PostgreSQL's rule), all
/// on one snapshot — so they must not touch one row twice, which the caller ensures (a staged key
/// is either written or deleted, and the grant count's row is not also written directly). Only the
/// parts `shape` names are in it; their parameters, in this order:
///
/// * `lsns`: the LSNs to take (`int8`); the `lsn` row stays locked until the transaction ends, so
///   LSNs are taken in commit order across the fleet;
/// * `notify`: the channel (`text`) and the payloads (`text[]`, delivered at `COMMIT` only);
/// * `count`: the grant count's `meta` key (`bytea`) and the grants to add (`int8`);
/// * per table, in [`Tree::ALL`] order: the keys to delete (`bytea[]`); then the upserts' keys
///   (`bytea[]`) and values (`bytea[]`) — for an LSN-keyed table ([`lsn_keyed`]) the keys without
///   their last 8 bytes, then those 8 bytes' LSN (`int8[]`, NULL: a key used as it is), moved up by
///   the first LSN taken (by nothing without `lsns`), then the values.
pub(crate) fn write_sql(q: &str, shape: &WriteShape) -> String {
    let mut n = 0;
    let mut param = || {
        n += 1;
        format!("${n}")
    };
    let mut ctes = Vec::new();
    let base = if shape.lsns {
        let take = param();
        ctes.push(format!(
            "b AS (UPDATE {q}.\"lsn\" SET next = next + {take}::int8 RETURNING next - {take}::int8 AS base)"
        ));
        "(SELECT base FROM b)"
    } else {
        "0"
    };
    if shape.notify {
        let (channel, payloads) = (param(), param());
        ctes.push(format!("n AS (SELECT pg_notify({channel}::text, p) FROM unnest({payloads}::text[]) AS u(p))"));
    }
    if shape.count {
        let (key, add) = (param(), param());
        ctes.push(format!(
            "c AS (INSERT INTO {q}.\"meta\" AS m (k, v) VALUES ({key}::bytea, int8send({add}::int8)) \
             ON CONFLICT (k) DO UPDATE SET v = int8send(('x' || encode(m.v, 'hex'))::bit(64)::bigint + {add}::int8))"
        ));
    }
    for (i, t) in Tree::ALL.into_iter().enumerate() {
        let table = format!("{q}.\"{}\"", t.name());
        let (dels, ups) = shape.tables[i];
        if dels {
            let keys = param();
            ctes.push(format!("d{i} AS (DELETE FROM {table} WHERE k = ANY({keys}::bytea[]))"));
        }
        if ups {
            let rows = if lsn_keyed(t) {
                let (p, o, v) = (param(), param(), param());
                format!(
                    "SELECT CASE WHEN o IS NULL THEN p ELSE p || int8send(o + {base}) END, v \
                     FROM unnest({p}::bytea[], {o}::int8[], {v}::bytea[]) AS u(p, o, v)"
                )
            } else {
                let (k, v) = (param(), param());
                format!("SELECT k, v FROM unnest({k}::bytea[], {v}::bytea[]) AS u(k, v)")
            };
            ctes.push(format!(
                "u{i} AS (INSERT INTO {table} (k, v) {rows} ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v)"
            ));
        }
    }
    // A `SELECT` clause runs only if read: the notifications are.
    let last = if shape.notify { "SELECT (SELECT count(*) FROM n)" } else { "SELECT 1" };
    format!("WITH {} {last}", ctes.join(", "))
}
