//! The PostgreSQL backend: the six trees as tables of `(k bytea PRIMARY KEY, v bytea)`, shared by
//! any number of writer processes (a fleet), each fenced by a membership lease on the database's
//! clock.
//!
//! * **Group commit.** The committer's first write of a group opens a transaction on the writer's
//!   connection and checks this process's membership fence; every batch of the group is written in
//!   it; [`DurableBackend::sync`] is the `COMMIT` (with `synchronous_commit` on: durable once it
//!   returns). One database commit per group, however many refreshes it holds.
//! * **Per-grant exclusion.** A group first takes a transaction-scoped advisory lock per grant it
//!   writes (ascending hash order, so two groups never deadlock), then reads those grants' states:
//!   every compare-and-swap is made against the latest committed version, and two processes
//!   writing one grant are serialised, including a grant that does not exist yet.
//! * **Attempts in flight.** An open intent's `open` row names the member that committed it. Only
//!   that member may write the grant while its lease lives ([`StoreError::Busy`] for everyone
//!   else); once the lease has run out, any member may take the attempt over (recovery). A lease is
//!   renewed every sixth of its length while the process lives; an expired lease is never renewed,
//!   so a process frozen past its lease fail-stops instead of writing again.
//! * **LSNs** come from one `lsn` row, taken just before the group's rows are written and locked
//!   until its `COMMIT`: journal LSNs are unique across the fleet and increase in commit order, so
//!   a journal reader (the webhook sink's cursor) never misses a record committed late.
//! * **Readers** use other connections and so see only committed, i.e. durable, data.
//! * **Failure.** A lost connection or a failed statement fails the group (the store poisons: the
//!   outcome of a `COMMIT` whose answer was lost is unknown, so nothing written by that group is
//!   presented before a reopen re-reads it). A deadlock or serialisation failure (nothing
//!   committed) is retried.

mod conn;
pub(crate) mod location;
pub(crate) mod notify;
pub(crate) mod schema;
pub(crate) mod tls;

use super::{delete_expired, write_group, BatchResult, DurableBackend, Expired, Kv};
use crate::error::StoreError;
use crate::keys::KeyRing;
use crate::layout::{self, Tree};
use crate::lock::lock;
use conn::{Pool, Session, Worker};
use location::{scrub, PgLocation};
use postgres::types::ToSql;
use schema::{Sql, WriteShape};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokenwal_core::WriteBatch;

/// Rows fetched per scan round trip.
const SCAN_CHUNK: i64 = 512;
/// Reader connections per store.
const READERS: usize = 4;
/// The operation of a claim's `COMMIT`: if it fails, the claim may be durable (see
/// `Store::claim_orphans`).
pub(crate) const CLAIM_COMMIT: &str = "commit a claim";

/// A driver error as a store error: an operation and the server's message (which never holds a
/// password or a token: parameters are bound, values are ciphertext).
pub(crate) fn db_err(op: &'static str) -> impl Fn(postgres::Error) -> StoreError {
    move |e| {
        let message = match e.as_db_error() {
            Some(d) => format!("{}: {}", d.code().code(), d.message()),
            // With its causes (a TLS handshake's names the certificate problem); none of them can
            // hold a password or a token.
            None => {
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    message.push_str(&format!(": {s}"));
                    source = s.source();
                }
                message
            }
        };
        StoreError::Database { op, message }
    }
}

/// `e` with the password of `config` removed from a driver message (belt and braces: the driver does
/// not echo passwords).
fn scrub_password(e: StoreError, config: &postgres::Config) -> StoreError {
    match e {
        StoreError::Database { op, message } => {
            let password = config.get_password().map(String::from_utf8_lossy);
            StoreError::Database { op, message: scrub(&message, password.as_deref()) }
        }
        e => e,
    }
}

/// The identity of this process in the owner row: `host pid=N start=T` (the start time tells a
/// reused pid apart).
fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    let pid = std::process::id();
    format!("{host} pid={pid} start={}", start_time(pid).unwrap_or_default())
}

/// A process's start time (clock ticks since boot, /proc/PID/stat field 22), if it is alive.
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19).map(str::to_string)
}

/// Whether `holder` names a process of this host that is no longer running.
fn holder_is_dead_here(holder: &str) -> bool {
    let mine = holder_id();
    let host = |h: &str| h.split(" pid=").next().map(str::to_string);
    if host(holder) != host(&mine) || holder == mine {
        return false;
    }
    let field = |name: &str| holder.split(' ').find_map(|f| f.strip_prefix(name)).map(str::to_string);
    match (field("pid="), field("start=")) {
        (Some(pid), Some(start)) => match pid.parse::<u32>() {
            Ok(pid) => start_time(pid).is_none_or(|now| now != start),
            Err(_) => false,
        },
        _ => false,
    }
}

struct Renewer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

pub(crate) struct PgBackend {
    location: PgLocation,
    sql: Arc<Sql>,
    readers: Pool,
    writer: Worker,
    /// The membership connection: joins, renews, leaves.
    owner: Arc<Worker>,
    /// This process's member id.
    member: i64,
    /// Set when the lease could not be renewed before it ran out: the store must fail-stop.
    lost: Arc<AtomicBool>,
    /// When the last successful renewal was sent (the lease runs at least `lease` from then).
    renewed: Arc<Mutex<Instant>>,
    renewer: Mutex<Renewer>,
    /// The connection settings (for the change listener's own connection).
    config: postgres::Config,
    /// The change listener, once someone asked to hear other processes' writes.
    listener: Mutex<Option<notify::Listener>>,
}

/// What an open found.
pub(crate) struct Opened {
    pub backend: PgBackend,
    /// The schema version found before this open migrated it (0: created now).
    pub schema_was: i32,
}

impl PgBackend {
    /// Connects, migrates the schema if needed, joins the store's members (ending the leases of
    /// dead processes of this host, whose attempts then recover at once) and starts renewing this
    /// process's lease. `on_lost` is called (once, from the renewer's thread) if the lease is lost.
    pub(crate) fn open(location: &PgLocation, on_lost: Box<dyn Fn(String) + Send>) -> Result<Opened, StoreError> {
        let config = with_session_timeouts(location.driver_config().clone(), location.lease());
        let scrubbed = |e| scrub_password(e, &config);
        let sql = Arc::new(Sql::new(location.schema()));
        let tls = location.tls().clone();
        let owner = Arc::new(Worker::spawn("tokenwal-pg-member", config.clone(), tls.clone())?);
        let schema_was = migrate_on(&owner, location.schema()).map_err(&scrubbed)?;
        let sent = Instant::now();
        let member = join(&owner, &sql, location).map_err(&scrubbed)?;
        let readers = Pool::new(READERS, &config, &tls)?;
        let writer = Worker::spawn("tokenwal-pg-write", config.clone(), tls)?;
        let lost = Arc::new(AtomicBool::new(false));
        let renewed = Arc::new(Mutex::new(sent));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (owner, sql, lost, stop, renewed) =
                (Arc::clone(&owner), Arc::clone(&sql), Arc::clone(&lost), Arc::clone(&stop), Arc::clone(&renewed));
            let lease = location.lease();
            std::thread::Builder::new()
                .name("tokenwal-pg-lease".into())
                .spawn(move || renew_loop(&owner, &sql, member, lease, &lost, &renewed, &stop, on_lost))
                .map_err(|source| StoreError::Io { op: "spawn lease renewer", source })?
        };
        tracing::info!(location = %location, member, "joined the PostgreSQL store");
        Ok(Opened {
            backend: PgBackend {
                location: location.clone(),
                sql,
                readers,
                writer,
                owner,
                member,
                lost,
                renewed,
                renewer: Mutex::new(Renewer { stop, thread: Some(thread) }),
                config,
                listener: Mutex::new(None),
            },
            schema_was,
        })
    }

    /// Creates or migrates the schema only (`tokenwal migrate-schema`). Returns the version found.
    pub(crate) fn migrate_only(location: &PgLocation) -> Result<i32, StoreError> {
        let config = location.driver_config().clone();
        let worker = Worker::spawn("tokenwal-pg-migrate", config, location.tls().clone())?;
        migrate_on(&worker, location.schema()).map_err(|e| scrub_password(e, location.driver_config()))
    }

    fn fence_margin(&self) -> f64 {
        self.location.lease().as_secs_f64() / 2.0
    }

    /// What is left of this process's lease by the local monotonic clock, counted from when its last
    /// successful renewal was sent (never more than the database grants). Zero once lost.
    pub(crate) fn lease_left(&self) -> Duration {
        if self.lost.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let since = lock(&self.renewed).elapsed();
        self.location.lease().saturating_sub(since)
    }

    /// The ids of the members whose lease has not run out, with their holders.
    pub(crate) fn live_members(&self) -> Result<Vec<(i64, String)>, StoreError> {
        self.read(move |s, sql| {
            let stmt = s.statement(&sql.members)?;
            let rows = s.client()?.query(&stmt, &[]).map_err(db_err("read the members"))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Claims up to `limit` orphaned attempts (open rows of members that are gone) for this
    /// process, in one transaction on a reader connection: each row is marked as this member's, so
    /// only this process writes that grant until its own lease runs out (the in-flight rule), and
    /// other processes claiming at the same moment skip the rows locked here (`SKIP LOCKED`): a fleet
    /// restarted after a crash recovers disjoint sets of grants in parallel. Returns the claimed
    /// grants' keys. Refused (`LeaseLost`, `LeaseExpiring`) by the same fence as a commit group.
    pub(crate) fn claim_orphans(&self, limit: usize) -> Result<Vec<Vec<u8>>, StoreError> {
        if self.lost.load(Ordering::Acquire) {
            return Err(StoreError::LeaseLost { member: self.member });
        }
        let (member, margin) = (self.member, self.fence_margin());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut claimed = self.reader_txn(CLAIM_COMMIT, move |s, sql| {
            fence(s, sql, member, margin)?;
            let claim = s.statement(&sql.claim)?;
            let marker = member.to_be_bytes().to_vec();
            let rows = s.client()?.query(&claim, &[&marker, &limit]).map_err(db_err("claim orphaned attempts"))?;
            Ok(rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect::<Vec<_>>())
        })?;
        claimed.sort();
        Ok(claimed)
    }

    /// The values of `keys` in `t` (`None`: absent), in one round trip.
    pub(crate) fn get_many(&self, t: Tree, keys: Vec<Vec<u8>>) -> Result<Found, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |s, sql| {
            let mut found = get_many_on(s, sql, t, &keys)?;
            Ok(keys
                .into_iter()
                .map(|k| {
                    let v = found.remove(&k);
                    (k, v)
                })
                .collect())
        })
    }

    /// The bytes the store's schema takes in the database: every table of it with its indexes
    /// and TOAST (`pg_total_relation_size`).
    pub(crate) fn size_bytes(&self) -> Result<u64, StoreError> {
        let schema = self.location.schema().to_string();
        self.read(move |s, _| {
            let row = s
                .client()?
                .query_one(
                    "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'",
                    &[&schema],
                )
                .map_err(db_err("measure the schema"))?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    /// This process's member id.
    pub(crate) fn member(&self) -> i64 {
        self.member
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session, &Sql) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let sql = Arc::clone(&self.sql);
        self.readers.call(move |s| f(s, &sql))
    }

    /// Runs `f` in a transaction of its own on a reader connection, committed before returning.
    fn side_txn(
        &self,
        f: impl FnOnce(&PgTxn<'_>) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        self.reader_txn("commit", move |s, sql| {
            let txn = PgTxn::new(s, sql, 0, HashSet::new());
            f(&txn).and_then(|()| txn.flush(&[]))
        })
    }

    /// Runs `f` in a transaction of its own on a reader connection: committed if `f` succeeds (a
    /// failed `COMMIT` is reported as `commit_op`: it may be durable), rolled back otherwise.
    fn reader_txn<T: Send + 'static>(
        &self,
        commit_op: &'static str,
        f: impl FnOnce(&mut Session, &Sql) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.read(move |s, sql| {
            s.client()?.batch_execute("BEGIN").map_err(db_err("begin"))?;
            s.in_txn = true;
            let result = f(s, sql);
            let ended = match &result {
                Ok(_) => s.client().and_then(|c| c.batch_execute("COMMIT").map_err(db_err(commit_op))),
                Err(_) => s.client().and_then(|c| c.batch_execute("ROLLBACK").map_err(db_err("roll back"))),
            };
            s.in_txn = false;
            result.and_then(|v| ended.map(|()| v))
        })
    }

    /// Starts hearing the grants other processes of the store commit (`f` runs on a thread of
    /// the listener's own; see [`notify`]). A second call replaces the first listener.
    pub(crate) fn listen(&self, f: Box<dyn Fn(notify::RemoteWrites) + Send + Sync>) -> Result<(), StoreError> {
        let listener = notify::Listener::spawn(
            self.config.clone(),
            self.location.tls().clone(),
            self.sql.channel.clone(),
            self.member,
            f,
        )?;
        if let Some(mut old) = lock(&self.listener).replace(listener) {
            old.stop();
        }
        Ok(())
    }

    fn close(&self) {
        if let Some(mut l) = lock(&self.listener).take() {
            l.stop();
        }
        // The writer first: a group left open (the store dropped without a sync) is rolled back
        // with its connection, and nothing it holds can block the renewer being stopped.
        self.writer.close();
        let mut r = lock(&self.renewer);
        {
            let (m, cv) = &*r.stop;
            *lock(m) = true;
            cv.notify_all();
        }
        if let Some(t) = r.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        drop(r);
        self.readers.close();
        if !self.lost.load(Ordering::Acquire) {
            // Leaving: an attempt this process left open (its task died) is recovered by the
            // others at once rather than after the lease.
            let (sql, member) = (Arc::clone(&self.sql), self.member);
            let _ = self.owner.call(move |s| {
                let stmt = s.statement(&sql.release)?;
                s.client()?.execute(&stmt, &[&member]).map_err(db_err("leave the store"))
            });
        }
        self.owner.close();
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.close();
    }
}

/// `config` with the server-side timeouts every connection of a store runs under. A process frozen
/// (SIGSTOP, a debugger, a VM pause) inside a transaction would otherwise hold its grants' locks
/// and the LSN row for as long as it stays frozen, stalling every other process: the server ends a
/// session idle inside a transaction after a quarter of the lease (the frozen process then finds
/// its transaction gone and fail-stops), and any one statement after half the lease (longer than
/// any lock wait the first bound leaves).
fn with_session_timeouts(mut config: postgres::Config, lease: Duration) -> postgres::Config {
    let idle = (lease / 4).max(Duration::from_secs(1)).as_millis();
    let statement = (lease / 2).max(Duration::from_secs(2)).as_millis();
    let ours = format!("-c idle_in_transaction_session_timeout={idle} -c statement_timeout={statement}");
    let options = match config.get_options() {
        Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
        _ => ours,
    };
    config.options(&options);
    config
}

/// Creates or migrates `schema` on `worker`'s connection, in one transaction. Returns the version
/// found before.
fn migrate_on(worker: &Worker, schema: &str) -> Result<i32, StoreError> {
    let schema = schema.to_string();
    worker.call(move |s| {
        let mut tx = s.client()?.transaction().map_err(db_err("begin"))?;
        let was = schema::migrate(&mut tx, &schema)?;
        tx.commit().map_err(db_err("commit the migration"))?;
        Ok(was)
    })
}

/// Joins the store's members: ends the leases of dead processes of this host (their attempts are
/// then recovered at once, not a lease later), forgets long-expired members, and takes a new id.
fn join(owner: &Worker, sql: &Arc<Sql>, location: &PgLocation) -> Result<i64, StoreError> {
    let me = holder_id();
    let lease = location.lease().as_secs_f64();
    let sql = Arc::clone(sql);
    owner.call(move |s| {
        let live = s.statement(&sql.members)?;
        let rows = s.client()?.query(&live, &[]).map_err(db_err("read the members"))?;
        for r in &rows {
            let (id, holder): (i64, String) = (r.get(0), r.get(1));
            if holder_is_dead_here(&holder) {
                tracing::info!(member = id, holder = %holder, "ending the lease of a dead process of this host");
                let expire = s.statement(&sql.expire)?;
                s.client()?.execute(&expire, &[&id, &holder]).map_err(db_err("end a dead member's lease"))?;
            }
        }
        let forget = s.statement(&sql.forget)?;
        s.client()?.execute(&forget, &[]).map_err(db_err("forget old members"))?;
        let join = s.statement(&sql.join)?;
        let row = s.client()?.query_one(&join, &[&me, &lease]).map_err(db_err("join the store"))?;
        Ok(row.get(0))
    })
}

#[allow(clippy::too_many_arguments)]
fn renew_loop(
    owner: &Worker,
    sql: &Arc<Sql>,
    member: i64,
    lease: Duration,
    lost: &AtomicBool,
    renewed: &Mutex<Instant>,
    stop: &(Mutex<bool>, Condvar),
    on_lost: Box<dyn Fn(String) + Send>,
) {
    let every = lease / 6;
    let (m, cv) = stop;
    loop {
        {
            let g = lock(m);
            let (g, _) = cv.wait_timeout_while(g, every, |stopped| !*stopped).unwrap_or_else(|e| e.into_inner());
            if *g {
                return;
            }
        }
        let sql2 = Arc::clone(sql);
        let secs = lease.as_secs_f64();
        let sent = Instant::now();
        let renewed_now = owner.call(move |s| {
            let stmt = s.statement(&sql2.renew)?;
            let rows = s.client()?.query(&stmt, &[&member, &secs]).map_err(db_err("renew the lease"))?;
            Ok(!rows.is_empty())
        });
        let why = match renewed_now {
            Ok(true) => {
                *lock(renewed) = sent;
                continue;
            }
            Ok(false) => "this process's membership lease ran out (it was frozen or cut off)".to_string(),
            // A transient failure: the lease still has five sixths left; retry on the next tick (the
            // commit fence refuses once less than half is left).
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the store's lease; retrying");
                continue;
            }
        };
        lost.store(true, Ordering::Release);
        tracing::error!(member, "{why}: fail-stop");
        on_lost(why);
        return;
    }
}

/// Writes staged in a transaction: `(tree index, key)` → the value (`None`: delete).
type Staged = BTreeMap<(usize, Vec<u8>), Option<Vec<u8>>>;

/// A transaction's view: reads go to the connection (seeing the writes staged before them), writes
/// are staged and sent together by [`PgTxn::flush`], in one statement.
struct PgTxn<'a> {
    session: RefCell<&'a mut Session>,
    sql: &'a Sql,
    staged: RefCell<Staged>,
    /// Values read ahead in one round trip (`None`: absent), consulted after `staged`.
    prefetched: RefCell<Staged>,
    /// This process's member id (0: a side transaction, which writes no grant).
    member: i64,
    /// The members whose lease had not run out when the group's fence was checked.
    live: HashSet<i64>,
    /// Grants created in this transaction.
    grants_added: Cell<u64>,
}

/// The advisory lock key of a grant within [`schema::GRANT_LOCK`] (FNV-1a: stable across processes
/// and releases; a collision only serialises two grants' writes).
fn grant_lock_key(grant: &[u8]) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in grant {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(h.to_ne_bytes())
}

impl PgTxn<'_> {
    fn new<'a>(session: &'a mut Session, sql: &'a Sql, member: i64, live: HashSet<i64>) -> PgTxn<'a> {
        PgTxn {
            session: RefCell::new(session),
            sql,
            staged: RefCell::new(BTreeMap::new()),
            prefetched: RefCell::new(BTreeMap::new()),
            member,
            live,
            grants_added: Cell::new(0),
        }
    }

    /// Reads the `grants` and `open` rows of `grants` in one round trip, for the `get`s that follow.
    fn prefetch_group(&self, grants: Vec<Vec<u8>>) -> Result<(), StoreError> {
        let rows = {
            let mut s = self.session.borrow_mut();
            let stmt = s.statement(&self.sql.group_read)?;
            s.client()?.query(&stmt, &[&grants]).map_err(db_err("read"))?
        };
        let mut p = self.prefetched.borrow_mut();
        for t in [Tree::Grants, Tree::Open] {
            for k in &grants {
                p.insert((t as usize, k.clone()), None);
            }
        }
        for r in &rows {
            let t = if r.get::<_, i16>(0) == 0 { Tree::Grants } else { Tree::Open };
            p.insert((t as usize, r.get(1)), Some(r.get(2)));
        }
        Ok(())
    }

    /// Sends the staged writes in one statement ([`schema::write_sql`]), with `payloads` (change
    /// notifications, delivered only if the transaction commits). In a group (`member` set), the
    /// journal records were staged at LSNs from 0: they take their real LSNs from the `lsn` row in
    /// that statement, which stays locked until the `COMMIT`, so LSNs increase in commit order
    /// across the fleet.
    fn flush(&self, payloads: &[String]) -> Result<(), StoreError> {
        let staged = std::mem::take(&mut *self.staged.borrow_mut());
        let journal = Tree::Journal as usize;
        let records =
            staged.range((journal, Vec::new())..(journal + 1, Vec::new())).filter(|(_, v)| v.is_some()).count();
        let added = i64::try_from(self.grants_added.get()).unwrap_or(i64::MAX);
        let mut count_inline = true;
        let mut tables: [TableWrites; 6] = Default::default();
        for t in Tree::ALL {
            let table = &mut tables[t as usize];
            let i = t as usize;
            for ((_, k), v) in staged.range((i, Vec::new())..(i + 1, Vec::new())) {
                match v {
                    None => table.dels.push(k.clone()),
                    Some(v) => {
                        if t == Tree::Meta && k.as_slice() == layout::META_GRANT_COUNT {
                            // One statement may not touch a row twice: the count goes after it.
                            count_inline = false;
                        }
                        match layout::trailing_lsn(k).filter(|_| schema::lsn_keyed(t)) {
                            Some(lsn) => {
                                table.keys.push(k[..k.len() - 8].to_vec());
                                table.lsns.push(Some(i64::try_from(lsn).unwrap_or(i64::MAX)));
                            }
                            None => {
                                table.keys.push(k.clone());
                                table.lsns.push(None);
                            }
                        }
                        table.vals.push(v.clone());
                    }
                }
            }
        }
        let take = if self.member != 0 { i64::try_from(records).unwrap_or(i64::MAX) } else { 0 };
        let count_key = layout::META_GRANT_COUNT.to_vec();
        let inline_added = if count_inline { added } else { 0 };
        let mut shape = WriteShape {
            lsns: take > 0,
            notify: !payloads.is_empty(),
            count: inline_added != 0,
            tables: [(false, false); 6],
        };
        let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if shape.lsns {
            args.push(&take);
        }
        if shape.notify {
            args.extend([&self.sql.channel as &(dyn ToSql + Sync), &payloads]);
        }
        if shape.count {
            args.extend([&count_key as &(dyn ToSql + Sync), &inline_added]);
        }
        for t in Tree::ALL {
            let table = &tables[t as usize];
            shape.tables[t as usize] = (!table.dels.is_empty(), !table.keys.is_empty());
            if !table.dels.is_empty() {
                args.push(&table.dels);
            }
            if !table.keys.is_empty() {
                args.push(&table.keys);
                if schema::lsn_keyed(t) {
                    args.push(&table.lsns);
                }
                args.push(&table.vals);
            }
        }
        let mut s = self.session.borrow_mut();
        if !shape.is_empty() {
            let stmt = s.statement(&self.write_sql(&shape))?;
            s.client()?.execute(&stmt, &args).map_err(db_err("write"))?;
        }
        if !count_inline && added != 0 {
            // Never in practice (no transaction writes the count directly and adds to it): the
            // direct write is applied first, then the addition, as before.
            let shape = WriteShape { count: true, ..WriteShape::default() };
            let stmt = s.statement(&self.write_sql(&shape))?;
            s.client()?.execute(&stmt, &[&count_key, &added]).map_err(db_err("count grants"))?;
        }
        Ok(())
    }

    /// The write statement of `shape`, built once per store.
    fn write_sql(&self, shape: &WriteShape) -> Arc<str> {
        let mut writes = lock(&self.sql.writes);
        Arc::clone(writes.entry(*shape).or_insert_with(|| schema::write_sql(&self.sql.quoted, shape).into()))
    }
}

/// One table's part of [`schema::write_sql`]'s parameters.
#[derive(Default)]
struct TableWrites {
    dels: Vec<Vec<u8>>,
    keys: Vec<Vec<u8>>,
    /// For an LSN-keyed table: each key's trailing LSN (its key above is without it); `None`: the
    /// key is used as it is.
    lsns: Vec<Option<i64>>,
    vals: Vec<Vec<u8>>,
}

impl Kv for PgTxn<'_> {
    type Err = StoreError;

    fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = (t as usize, k.to_vec());
        if let Some(v) = self.staged.borrow().get(&key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.prefetched.borrow().get(&key) {
            return Ok(v.clone());
        }
        let mut s = self.session.borrow_mut();
        get_on(&mut s, self.sql, t, k)
    }

    fn put(&self, t: Tree, k: &[u8], v: &[u8]) -> Result<(), StoreError> {
        self.staged.borrow_mut().insert((t as usize, k.to_vec()), Some(v.to_vec()));
        Ok(())
    }

    fn del(&self, t: Tree, k: &[u8]) -> Result<(), StoreError> {
        self.staged.borrow_mut().insert((t as usize, k.to_vec()), None);
        Ok(())
    }

    fn open_marker(&self) -> Vec<u8> {
        self.member.to_be_bytes().to_vec()
    }

    fn held_elsewhere(&self, grant: &[u8]) -> Result<Option<i64>, StoreError> {
        let marker = self.get(Tree::Open, grant)?;
        Ok(marker.as_deref().and_then(member_of).filter(|m| *m != self.member && self.live.contains(m)))
    }

    fn add_grant_count(&self, n: u64) -> Result<(), StoreError> {
        self.grants_added.set(self.grants_added.get() + n);
        Ok(())
    }
}

/// The member named by an `open` row (`None`: written by a single-writer store, or unreadable).
pub(crate) fn member_of(marker: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(marker).ok().map(i64::from_be_bytes)
}

/// One `apply_group` on the writer's connection: opens the group's transaction, checks the fence,
/// locks the group's grants, and writes the batches in it.
fn group_in_txn(
    s: &mut Session,
    sql: &Sql,
    keys: &KeyRing,
    batches: &[WriteBatch],
    member: i64,
    margin: f64,
) -> Result<Vec<BatchResult>, StoreError> {
    if !s.in_txn {
        s.client()?.batch_execute("BEGIN").map_err(db_err("begin"))?;
        s.in_txn = true;
    }
    let mut grants: Vec<Vec<u8>> = batches.iter().map(|b| b.grant.clone()).collect();
    grants.sort();
    grants.dedup();
    let mut locks: Vec<i32> = grants.iter().map(|g| grant_lock_key(g)).collect();
    locks.sort_unstable();
    locks.dedup();
    // The fence, then the grants' locks, in one round trip.
    let stmt = s.statement(&sql.fence_and_lock)?;
    let row = s
        .client()?
        .query_opt(&stmt, &[&member, &margin, &schema::GRANT_LOCK, &locks])
        .map_err(db_err("check the lease and lock grants"))?;
    let live = fence_row(row, member)?;
    let refs: Vec<&WriteBatch> = batches.iter().collect();
    let txn = PgTxn::new(s, sql, member, live.into_iter().collect());
    // Every batch's compare-and-swap reads its grant's state and open row: one round trip for the
    // group, made under the grants' locks (a statement after the one that took them, so its
    // snapshot sees the latest committed versions).
    txn.prefetch_group(grants)?;
    let results = write_group(&txn, keys, &refs, 0)?;
    // Announce what this group wrote; listeners hear it only if the group commits.
    let written: Vec<(&[u8], u64)> = batches
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(b, _)| (b.grant.as_slice(), b.new_version))
        .collect();
    txn.flush(&notify::payloads(member, &written))?;
    Ok(results)
}

/// The membership fence, inside the caller's transaction: `member`'s lease must be live with more
/// than `margin` seconds left (`LeaseLost`, `LeaseExpiring`). Returns the ids of every live member.
fn fence(s: &mut Session, sql: &Sql, member: i64, margin: f64) -> Result<Vec<i64>, StoreError> {
    let stmt = s.statement(&sql.fence)?;
    let row = s.client()?.query_opt(&stmt, &[&member, &margin]).map_err(db_err("check the lease"))?;
    fence_row(row, member)
}

/// The fence's verdict from its row (`None`: the member is gone).
fn fence_row(row: Option<postgres::Row>, member: i64) -> Result<Vec<i64>, StoreError> {
    let Some(row) = row else { return Err(StoreError::LeaseLost { member }) };
    let (fresh, live): (bool, Vec<i64>) = (row.get(0), row.get(1));
    if !live.contains(&member) {
        return Err(StoreError::LeaseLost { member });
    }
    if !fresh {
        return Err(StoreError::LeaseExpiring { member });
    }
    Ok(live)
}

/// The rows of `keys` in `t` that exist, in one round trip.
fn get_many_on(
    s: &mut Session,
    sql: &Sql,
    t: Tree,
    keys: &[Vec<u8>],
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StoreError> {
    let stmt = s.statement(&sql.get_many[t as usize])?;
    let rows = s.client()?.query(&stmt, &[&keys]).map_err(db_err("read"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Whether a failed group may simply run again: a deadlock or serialisation failure (SQLSTATE 40P01,
/// 40001) rolled it back whole, so nothing of it was committed.
fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Database { message, .. } if message.starts_with("40P01") || message.starts_with("40001"))
}

fn get_on(s: &mut Session, sql: &Sql, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let stmt = s.statement(&sql.get[t as usize])?;
    let row = s.client()?.query_opt(&stmt, &[&k]).map_err(db_err("read"))?;
    Ok(row.map(|r| r.get(0)))
}

type Rows = Vec<(Vec<u8>, Vec<u8>)>;
/// Keys with their values (`None`: absent).
pub(crate) type Found = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Hands one scan chunk to `f` while its keys have `prefix`. Returns the key to continue after, or
/// `None` when the scan is over (`f` said stop, the prefix ended, or the chunk was the last).
fn feed(chunk: Rows, prefix: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Option<Vec<u8>> {
    let full = chunk.len() as i64 == SCAN_CHUNK;
    for (k, v) in &chunk {
        if !k.starts_with(prefix) || !f(k, v) {
            return None;
        }
    }
    chunk.into_iter().last().filter(|_| full).map(|(k, _)| k)
}

fn rows(s: &mut Session, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Rows, StoreError> {
    let stmt = s.statement(sql)?;
    let rows = s.client()?.query(&stmt, params).map_err(db_err("scan"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

impl DurableBackend for PgBackend {
    fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let k = k.to_vec();
        self.read(move |s, sql| get_on(s, sql, t, &k))
    }

    fn scan(&self, t: Tree, prefix: &[u8], f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> Result<(), StoreError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (from, prefix2) = (after.clone(), prefix.to_vec());
            let chunk = self.read(move |s, sql| match from {
                None => rows(s, &sql.scan_from[t as usize], &[&prefix2, &SCAN_CHUNK]),
                Some(a) => rows(s, &sql.scan_after[t as usize], &[&a, &SCAN_CHUNK]),
            })?;
            match feed(chunk, prefix, f) {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    fn scan_rev(
        &self,
        t: Tree,
        prefix: &[u8],
        below: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        if below <= prefix {
            return Ok(());
        }
        let mut upper = below.to_vec();
        loop {
            let (lo, hi) = (prefix.to_vec(), upper.clone());
            let chunk = self.read(move |s, sql| rows(s, &sql.scan_rev[t as usize], &[&lo, &hi, &SCAN_CHUNK]))?;
            match feed(chunk, prefix, f) {
                Some(k) => upper = k,
                None => return Ok(()),
            }
        }
    }

    fn last_key(&self, t: Tree) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(move |s, sql| {
            let stmt = s.statement(&sql.last[t as usize])?;
            let row = s.client()?.query_opt(&stmt, &[]).map_err(db_err("read"))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn apply_group(
        &self,
        keys: &KeyRing,
        batches: &[&WriteBatch],
        // LSNs are taken from the database in commit order (see the module docs), not from the
        // committer's counter, which knows nothing of the other processes.
        _first_lsn: u64,
    ) -> Result<Vec<BatchResult>, StoreError> {
        if self.lost.load(Ordering::Acquire) {
            return Err(StoreError::LeaseLost { member: self.member });
        }
        let (keys, batches): (KeyRing, Vec<WriteBatch>) =
            (keys.clone(), batches.iter().map(|b| (*b).clone()).collect());
        let (sql, member, margin) = (Arc::clone(&self.sql), self.member, self.fence_margin());
        let result = self.writer.call(move |s| {
            let mut tries = 0;
            loop {
                let result = group_in_txn(s, &sql, &keys, &batches, member, margin);
                if result.is_err() && s.in_txn {
                    // Either retried below or fail-stop; leave the connection clean anyway.
                    s.in_txn = false;
                    if let Ok(c) = s.client() {
                        let _ = c.batch_execute("ROLLBACK");
                    }
                }
                match result {
                    Err(e) if retryable(&e) && tries < 5 => {
                        tries += 1;
                        tracing::debug!(error = %e, tries, "group rolled back by the database: retrying it");
                    }
                    other => return other,
                }
            }
        });
        if matches!(result, Err(StoreError::LeaseLost { .. })) {
            self.lost.store(true, Ordering::Release);
        }
        result
    }

    fn delete_expired(&self, entries: &[Expired]) -> Result<(), StoreError> {
        let entries: Vec<Expired> =
            entries.iter().map(|e| Expired { key: e.key, lsn: e.lsn, grant: e.grant.clone() }).collect();
        self.side_txn(move |txn| delete_expired(txn, &entries))
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.writer.call(|s| {
            if !s.in_txn {
                return Ok(());
            }
            let committed = s.client().and_then(|c| c.batch_execute("COMMIT").map_err(db_err("commit")));
            s.in_txn = false;
            committed
        })
    }

    fn whole_groups(&self) -> bool {
        true
    }

    fn readers_see_only_durable(&self) -> bool {
        true
    }

    fn end_unsynced_group(&self) {
        let _ = self.writer.call(|s| {
            if s.in_txn {
                s.in_txn = false;
                if let Ok(c) = s.client() {
                    let _ = c.batch_execute("ROLLBACK");
                }
            }
            Ok(())
        });
    }

    fn put_meta(&self, k: &[u8], v: Option<&[u8]>) -> Result<(), StoreError> {
        let (k, v) = (k.to_vec(), v.map(<[u8]>::to_vec));
        self.side_txn(move |txn| match v {
            Some(v) => txn.put(Tree::Meta, &k, &v),
            None => txn.del(Tree::Meta, &k),
        })
    }

    fn init_meta(&self, entries: &[(&[u8], &[u8])]) -> Result<(), StoreError> {
        // One transaction: all or nothing, so the marker is never durable before the others.
        let entries: Vec<(Vec<u8>, Vec<u8>)> = entries.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        self.side_txn(move |txn| {
            for (k, v) in &entries {
                txn.put(Tree::Meta, k, v)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PgScratch;

    /// Runs one transaction through [`PgTxn`] on a fresh connection to `pg`'s schema (migrated),
    /// as `member`, committed afterwards.
    fn in_txn(pg: &PgScratch, member: i64, f: impl FnOnce(&PgTxn<'_>) + Send + 'static) {
        let location = pg.location();
        PgBackend::migrate_only(&location).unwrap();
        let worker = Worker::spawn("test", location.driver_config().clone(), location.tls().clone()).unwrap();
        let sql = Sql::new(location.schema());
        worker
            .call(move |s| {
                s.client()?.batch_execute("BEGIN").map_err(db_err("begin"))?;
                let txn = PgTxn::new(s, &sql, member, HashSet::new());
                f(&txn);
                txn.flush(&[])?;
                drop(txn);
                s.client()?.batch_execute("COMMIT").map_err(db_err("commit"))
            })
            .unwrap();
    }

    fn rows(pg: &PgScratch, table: &str) -> Vec<Vec<u8>> {
        pg.query_bytes(&format!("SELECT k FROM \"{}\".\"{table}\" ORDER BY k", pg.schema())).unwrap()
    }

    fn count(pg: &PgScratch) -> u64 {
        let sql = format!("SELECT v FROM \"{}\".meta WHERE k = 'grant_count'::bytea", pg.schema());
        assert_eq!(layout::META_GRANT_COUNT, b"grant_count", "the query above names the count's key");
        pg.query_bytes(&sql).unwrap().first().and_then(|v| layout::be_u64(v)).unwrap_or(0)
    }

    /// The one-statement write: a group's journal, history and expiry keys staged from LSN 0 take
    /// their LSNs from the `lsn` row (each key's trailing 8 bytes moved up by the first LSN taken),
    /// other tables' keys are written as they are, deletes delete, and the grant count is added —
    /// also when the same transaction writes the count's row directly (then the addition follows
    /// the write).
    #[test]
    fn one_statement_writes_relocate_lsns_delete_and_count() {
        let Some(pg) = PgScratch::new("PostgreSQL backend unit tests") else { return };
        // A first group: takes LSNs from the migration's starting point (1).
        in_txn(&pg, 7, |txn| {
            txn.put(Tree::Journal, &layout::journal_key(0), b"r0").unwrap();
            txn.put(Tree::History, &layout::history_key(b"g", 0), b"").unwrap();
            txn.put(Tree::Expiry, &layout::expiry_key(5, 0), b"g").unwrap();
            txn.put(Tree::Grants, b"g", b"state").unwrap();
            txn.put(Tree::Open, b"g", b"marker").unwrap();
            txn.add_grant_count(1).unwrap();
        });
        // A second group: two records at LSNs 0 and 1 of its own, and the open row deleted.
        in_txn(&pg, 7, |txn| {
            for lsn in 0..2 {
                txn.put(Tree::Journal, &layout::journal_key(lsn), b"r").unwrap();
                txn.put(Tree::History, &layout::history_key(b"g", lsn), b"").unwrap();
                txn.put(Tree::Expiry, &layout::expiry_key(6, lsn), b"g").unwrap();
            }
            txn.del(Tree::Open, b"g").unwrap();
            txn.add_grant_count(2).unwrap();
        });
        let lsns = |keys: Vec<Vec<u8>>| keys.iter().map(|k| layout::trailing_lsn(k).unwrap()).collect::<Vec<_>>();
        assert_eq!(lsns(rows(&pg, "journal")), vec![1, 2, 3], "LSNs from the lsn row, in commit order");
        assert_eq!(
            rows(&pg, "history"),
            (1..4).map(|l| layout::history_key(b"g", l)).collect::<Vec<_>>(),
            "history keys keep their grant prefix and take the same LSNs"
        );
        assert_eq!(
            rows(&pg, "expiry"),
            vec![
                layout::expiry_key(5, 1).to_vec(),
                layout::expiry_key(6, 2).to_vec(),
                layout::expiry_key(6, 3).to_vec()
            ]
        );
        assert_eq!(rows(&pg, "grants"), vec![b"g".to_vec()]);
        assert!(rows(&pg, "open").is_empty(), "the delete ran");
        assert_eq!(count(&pg), 3);
        // A side transaction (member 0) takes no LSNs: its keys are written as staged.
        in_txn(&pg, 0, |txn| {
            txn.put(Tree::Journal, &layout::journal_key(100), b"x").unwrap();
            txn.del(Tree::Journal, &layout::journal_key(1)).unwrap();
        });
        assert_eq!(lsns(rows(&pg, "journal")), vec![2, 3, 100]);
        // The count's row written directly and added to in one transaction: the write, then the
        // addition.
        in_txn(&pg, 7, |txn| {
            txn.put(Tree::Meta, layout::META_GRANT_COUNT, &10u64.to_be_bytes()).unwrap();
            txn.add_grant_count(2).unwrap();
        });
        assert_eq!(count(&pg), 12);
        let next = pg.query_bytes(&format!("SELECT int8send(next) FROM \"{}\".lsn", pg.schema())).unwrap();
        assert_eq!(layout::be_u64(&next[0]), Some(4), "three LSNs taken, none by the side transaction");
    }
}
