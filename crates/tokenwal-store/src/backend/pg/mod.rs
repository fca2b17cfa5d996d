//! The PostgreSQL backend: the six trees as tables of `(k bytea PRIMARY KEY, v bytea)`, one writer at
//! a time, fenced by an ownership lease on the database's clock.
//!
//! * **Group commit.** The committer's first write of a group opens a transaction on the writer's
//!   connection and checks the fence; every batch of the group is written in it (reads inside see
//!   the group's own writes); [`DurableBackend::sync`] is the `COMMIT` (with `synchronous_commit`
//!   on: durable once it returns). One database commit per group, however many refreshes it holds.
//! * **Readers** use other connections and so see only committed, i.e. durable, data.
//! * **Ownership and fencing.** Opening takes the `owner` row's lease (its expiry is `now()` on the
//!   database) and a new epoch; a thread renews it every sixth of the lease. Every group transaction
//!   share-locks the owner row and is refused unless the epoch is still ours **and** more than half
//!   the lease remains: a process frozen past its lease (SIGSTOP, a long GC pause, a partition) finds
//!   its epoch taken over and never commits again — the store fail-stops. Another process takes over
//!   only once the lease has run out on the database's clock, or its holder released it, or its
//!   holder is a dead process on the same host.
//! * **Failure.** A lost connection or a failed statement fails the group (the store poisons: the
//!   outcome of a `COMMIT` whose answer was lost is unknown, so nothing written by that group is
//!   presented before a reopen re-reads it).

mod conn;
pub(crate) mod location;
pub(crate) mod schema;

use super::{delete_expired, write_group, BatchResult, DurableBackend, Expired, Kv};
use crate::error::StoreError;
use crate::keys::KeyRing;
use crate::layout::Tree;
use crate::lock::lock;
use conn::{Pool, Session, Worker};
use location::{scrub, PgLocation};
use postgres::types::ToSql;
use schema::Sql;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokenwal_core::WriteBatch;

/// Rows fetched per scan round trip.
const SCAN_CHUNK: i64 = 512;
/// Reader connections per store.
const READERS: usize = 4;

/// A driver error as a store error: an operation and the server's message (which never holds a
/// password or a token: parameters are bound, values are ciphertext).
pub(crate) fn db_err(op: &'static str) -> impl Fn(postgres::Error) -> StoreError {
    move |e| {
        let message = match e.as_db_error() {
            Some(d) => format!("{}: {}", d.code().code(), d.message()),
            None => e.to_string(),
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
    /// The owner row's connection: acquires, renews, releases the lease.
    owner: Arc<Worker>,
    epoch: i64,
    /// Set when the lease could not be renewed (or was taken over): the store must fail-stop.
    lost: Arc<AtomicBool>,
    renewer: Mutex<Renewer>,
}

/// What an open found.
pub(crate) struct Opened {
    pub backend: PgBackend,
    /// The schema version found before this open migrated it (0: created now).
    pub schema_was: i32,
}

impl PgBackend {
    /// Connects, migrates the schema if needed, takes the ownership lease (waiting up to
    /// `wait_for_lease` for a live holder's lease to run out) and starts renewing it. `on_lost` is
    /// called (once, from the renewer's thread) if the lease is lost.
    pub(crate) fn open(
        location: &PgLocation,
        wait_for_lease: Duration,
        on_lost: Box<dyn Fn(String) + Send>,
    ) -> Result<Opened, StoreError> {
        let config = location.driver_config().clone();
        let scrubbed = |e| scrub_password(e, &config);
        let sql = Arc::new(Sql::new(location.schema()));
        let owner = Arc::new(Worker::spawn("tokenwal-pg-owner", config.clone())?);
        let schema_was = migrate_on(&owner, location.schema()).map_err(&scrubbed)?;
        let epoch = acquire(&owner, &sql, location, wait_for_lease).map_err(&scrubbed)?;
        let readers = Pool::new(READERS, &config)?;
        let writer = Worker::spawn("tokenwal-pg-write", config)?;
        let lost = Arc::new(AtomicBool::new(false));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (owner, sql, lost, stop) = (Arc::clone(&owner), Arc::clone(&sql), Arc::clone(&lost), Arc::clone(&stop));
            let lease = location.lease();
            std::thread::Builder::new()
                .name("tokenwal-pg-lease".into())
                .spawn(move || renew_loop(&owner, &sql, epoch, lease, &lost, &stop, on_lost))
                .map_err(|source| StoreError::Io { op: "spawn lease renewer", source })?
        };
        tracing::info!(location = %location, epoch, "PostgreSQL store owned");
        Ok(Opened {
            backend: PgBackend {
                location: location.clone(),
                sql,
                readers,
                writer,
                owner,
                epoch,
                lost,
                renewer: Mutex::new(Renewer { stop, thread: Some(thread) }),
            },
            schema_was,
        })
    }

    /// Creates or migrates the schema only (`tokenwal migrate-schema`). Returns the version found.
    pub(crate) fn migrate_only(location: &PgLocation) -> Result<i32, StoreError> {
        let config = location.driver_config().clone();
        let worker = Worker::spawn("tokenwal-pg-migrate", config)?;
        migrate_on(&worker, location.schema()).map_err(|e| scrub_password(e, location.driver_config()))
    }

    fn fence_margin(&self) -> f64 {
        self.location.lease().as_secs_f64() / 2.0
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
        self.read(move |s, sql| {
            s.client()?.batch_execute("BEGIN").map_err(db_err("begin"))?;
            s.in_txn = true;
            let result = {
                let txn = PgTxn::new(s, sql);
                f(&txn).and_then(|()| txn.flush())
            };
            let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
            let ended = s.client().and_then(|c| c.batch_execute(end).map_err(db_err("commit")));
            s.in_txn = false;
            result.and(ended)
        })
    }

    fn close(&self) {
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
            let (sql, epoch) = (Arc::clone(&self.sql), self.epoch);
            let _ = self.owner.call(move |s| {
                let stmt = s.statement(&sql.release)?;
                s.client()?.execute(&stmt, &[&epoch]).map_err(db_err("release the lease"))
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

/// Takes the lease, waiting for a live holder's to run out (up to `wait`).
fn acquire(owner: &Worker, sql: &Arc<Sql>, location: &PgLocation, wait: Duration) -> Result<i64, StoreError> {
    let deadline = std::time::Instant::now() + wait;
    let me = holder_id();
    let lease = location.lease().as_secs_f64();
    loop {
        let (sql2, me2) = (Arc::clone(sql), me.clone());
        let got = owner.call(move |s| {
            let read = s.statement(&sql2.holder)?;
            let row = s.client()?.query_one(&read, &[]).map_err(db_err("read the lease"))?;
            let (holder, left): (Option<String>, f64) = (row.get(0), row.get(1));
            let dead = holder.as_deref().filter(|h| holder_is_dead_here(h)).map(str::to_string);
            let take = s.statement(&sql2.acquire)?;
            let rows = s.client()?.query(&take, &[&me2, &lease, &dead]).map_err(db_err("take the lease"))?;
            Ok(match rows.first() {
                Some(r) => Ok(r.get::<_, i64>(0)),
                None => Err((holder.unwrap_or_default(), left)),
            })
        })?;
        match got {
            Ok(epoch) => return Ok(epoch),
            Err((holder, left)) => {
                let now = std::time::Instant::now();
                if now >= deadline {
                    return Err(StoreError::HeldElsewhere {
                        holder: holder.chars().filter(|c| !c.is_control()).take(200).collect(),
                        lease_left: Duration::from_secs_f64(left.max(0.0)),
                    });
                }
                tracing::info!(holder = %holder, lease_left_s = left, "the store's lease is held by another process: waiting");
                std::thread::sleep(Duration::from_secs_f64(left.clamp(0.05, 1.0)).min(deadline - now));
            }
        }
    }
}

fn renew_loop(
    owner: &Worker,
    sql: &Arc<Sql>,
    epoch: i64,
    lease: Duration,
    lost: &AtomicBool,
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
        let renewed = owner.call(move |s| {
            let stmt = s.statement(&sql2.renew)?;
            let rows = s.client()?.query(&stmt, &[&epoch, &secs]).map_err(db_err("renew the lease"))?;
            Ok(!rows.is_empty())
        });
        let why = match renewed {
            Ok(true) => continue,
            Ok(false) => "the store's lease was taken over by another process".to_string(),
            // A transient failure: the lease still has five sixths left; retry on the next tick, but
            // give up once the commit fence would refuse anyway.
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the store's lease; retrying");
                continue;
            }
        };
        lost.store(true, Ordering::Release);
        tracing::error!(epoch, "{why}: fail-stop");
        on_lost(why);
        return;
    }
}

/// Writes staged in a transaction: `(tree index, key)` → the value (`None`: delete).
type Staged = BTreeMap<(usize, Vec<u8>), Option<Vec<u8>>>;

/// A transaction's view: reads go to the connection (seeing the writes staged before them), writes
/// are staged and sent together by [`PgTxn::flush`], at most two statements per table.
struct PgTxn<'a> {
    session: RefCell<&'a mut Session>,
    sql: &'a Sql,
    staged: RefCell<Staged>,
    /// Values read ahead in one round trip (`None`: absent), consulted after `staged`.
    prefetched: RefCell<Staged>,
}

impl PgTxn<'_> {
    fn new<'a>(session: &'a mut Session, sql: &'a Sql) -> PgTxn<'a> {
        PgTxn {
            session: RefCell::new(session),
            sql,
            staged: RefCell::new(BTreeMap::new()),
            prefetched: RefCell::new(BTreeMap::new()),
        }
    }

    /// Reads `keys` of `t` in one round trip, for the `get`s that follow.
    fn prefetch(&self, t: Tree, keys: Vec<Vec<u8>>) -> Result<(), StoreError> {
        let mut s = self.session.borrow_mut();
        let stmt = s.statement(&self.sql.get_many[t as usize])?;
        let rows = s.client()?.query(&stmt, &[&keys]).map_err(db_err("read"))?;
        let mut found: BTreeMap<Vec<u8>, Vec<u8>> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut p = self.prefetched.borrow_mut();
        for k in keys {
            let v = found.remove(&k);
            p.insert((t as usize, k), v);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let staged = std::mem::take(&mut *self.staged.borrow_mut());
        let mut s = self.session.borrow_mut();
        for t in Tree::ALL {
            let i = t as usize;
            let (mut keys, mut vals, mut dels) = (Vec::new(), Vec::new(), Vec::new());
            for ((_, k), v) in staged.range((i, Vec::new())..(i + 1, Vec::new())) {
                match v {
                    Some(v) => {
                        keys.push(k.clone());
                        vals.push(v.clone());
                    }
                    None => dels.push(k.clone()),
                }
            }
            if !dels.is_empty() {
                let stmt = s.statement(&self.sql.delete[i])?;
                s.client()?.execute(&stmt, &[&dels]).map_err(db_err("delete"))?;
            }
            if !keys.is_empty() {
                let stmt = s.statement(&self.sql.upsert[i])?;
                s.client()?.execute(&stmt, &[&keys, &vals]).map_err(db_err("write"))?;
            }
        }
        Ok(())
    }
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
}

/// One `apply_group` on the writer's connection: opens the group's transaction (checking the fence)
/// if this is the group's first write, then writes the batches in it.
fn group_in_txn(
    s: &mut Session,
    sql: &Sql,
    keys: &KeyRing,
    batches: &[WriteBatch],
    first_lsn: u64,
    epoch: i64,
    margin: f64,
) -> Result<Vec<BatchResult>, StoreError> {
    if !s.in_txn {
        s.client()?.batch_execute("BEGIN").map_err(db_err("begin"))?;
        s.in_txn = true;
        let fence = s.statement(&sql.fence)?;
        let row = s.client()?.query_one(&fence, &[&margin]).map_err(db_err("check the lease"))?;
        let (found, fresh): (i64, bool) = (row.get(0), row.get(1));
        if found != epoch {
            return Err(StoreError::LeaseLost { epoch });
        }
        if !fresh {
            return Err(StoreError::LeaseExpiring { epoch });
        }
    }
    let refs: Vec<&WriteBatch> = batches.iter().collect();
    let txn = PgTxn::new(s, sql);
    // Every batch's compare-and-swap reads its grant's state: one round trip for the group.
    let mut grants: Vec<Vec<u8>> = batches.iter().map(|b| b.grant.clone()).collect();
    grants.sort();
    grants.dedup();
    txn.prefetch(Tree::Grants, grants)?;
    let results = write_group(&txn, keys, &refs, first_lsn)?;
    txn.flush()?;
    Ok(results)
}

fn get_on(s: &mut Session, sql: &Sql, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let stmt = s.statement(&sql.get[t as usize])?;
    let row = s.client()?.query_opt(&stmt, &[&k]).map_err(db_err("read"))?;
    Ok(row.map(|r| r.get(0)))
}

type Rows = Vec<(Vec<u8>, Vec<u8>)>;

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
        first_lsn: u64,
    ) -> Result<Vec<BatchResult>, StoreError> {
        if self.lost.load(Ordering::Acquire) {
            return Err(StoreError::LeaseLost { epoch: self.epoch });
        }
        let (keys, batches): (KeyRing, Vec<WriteBatch>) =
            (keys.clone(), batches.iter().map(|b| (*b).clone()).collect());
        let (sql, epoch, margin) = (Arc::clone(&self.sql), self.epoch, self.fence_margin());
        self.writer.call(move |s| {
            let result = group_in_txn(s, &sql, &keys, &batches, first_lsn, epoch, margin);
            if result.is_err() && s.in_txn {
                // The store fail-stops on this error; leave the connection clean anyway.
                s.in_txn = false;
                if let Ok(c) = s.client() {
                    let _ = c.batch_execute("ROLLBACK");
                }
            }
            result
        })
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
