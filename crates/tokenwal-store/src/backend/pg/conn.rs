//! Connections on their own threads.
//!
//! The store seam is synchronous and is called from anywhere, including tokio worker threads, where
//! the blocking `postgres` client must not run (it drives its connection with a runtime of its
//! own). Each connection therefore lives on a thread of its own and runs closures sent to it; the
//! caller blocks on the answer, as it would on a sled read or an fsync.

use super::db_err;
use super::tls::Tls;
use crate::error::StoreError;
use crate::lock::lock;
use postgres::{Client, Statement};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;

/// One connection and the statements prepared on it.
pub(crate) struct Session {
    config: postgres::Config,
    tls: Tls,
    client: Option<Client>,
    statements: HashMap<String, Statement>,
    /// Whether a transaction is open (the writer's group).
    pub in_txn: bool,
}

impl Session {
    /// The connection, (re)connected if it is closed. A writer's lost connection is never silently
    /// replaced inside a transaction: `in_txn` callers fail instead.
    pub fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            if self.in_txn {
                return Err(StoreError::Database {
                    op: "write",
                    message: "the connection was lost inside a transaction (its outcome is unknown)".into(),
                });
            }
            self.statements.clear();
            let mut client = self.tls.connect(&self.config).map_err(db_err("connect"))?;
            // The durability contract: a COMMIT that returned is on disk, whatever the server's default.
            client.batch_execute("SET synchronous_commit TO on").map_err(db_err("connect"))?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// `sql` prepared on this connection (once).
    pub fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client()?.prepare(sql).map_err(db_err("prepare a statement"))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// A thread owning one connection.
pub(crate) struct Worker {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    pub fn spawn(name: &str, config: postgres::Config, tls: Tls) -> Result<Worker, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut session = Session { config, tls, client: None, statements: HashMap::new(), in_txn: false };
                while let Ok(job) = rx.recv() {
                    job(&mut session);
                }
            })
            .map_err(|source| StoreError::Io { op: "spawn database connection thread", source })?;
        Ok(Worker { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)) })
    }

    /// Runs `f` on the connection's thread and waits for its answer.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |s| {
            let _ = rtx.send(f(s));
        });
        match lock(&self.tx).as_ref() {
            Some(tx) => tx.send(job).map_err(|_| StoreError::Closed)?,
            None => return Err(StoreError::Closed),
        }
        rrx.recv().map_err(|_| StoreError::Closed)?
    }

    /// Closes the connection and joins the thread (after the jobs already queued).
    pub fn close(&self) {
        drop(lock(&self.tx).take());
        if let Some(t) = lock(&self.thread).take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connections for reads and side transactions, used in turn.
pub(crate) struct Pool {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(size: usize, config: &postgres::Config, tls: &Tls) -> Result<Pool, StoreError> {
        let workers = (0..size.max(1))
            .map(|i| Worker::spawn(&format!("tokenwal-pg-read-{i}"), config.clone(), tls.clone()))
            .collect::<Result<_, _>>()?;
        Ok(Pool { workers, next: AtomicUsize::new(0) })
    }

    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[i].call(f)
    }

    pub fn close(&self) {
        for w in &self.workers {
            w.close();
        }
    }
}
