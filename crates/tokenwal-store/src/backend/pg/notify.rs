//! Cache coherence across a fleet: every group transaction announces the grants it wrote with
//! `pg_notify` (delivered to listeners only when it commits, never when it rolls back), and a
//! process that asked to hear them keeps one connection in `LISTEN` on the store's channel.
//!
//! A payload is `m<member> <version>:<base64 key>,<version>:<base64 key>,…`, at most
//! [`MAX_PAYLOAD`] bytes (PostgreSQL's limit is 8 000): a group writing many grants sends several.
//! A listener whose connection drops reconnects and then reports [`RemoteWrites::Missed`]: what was
//! committed while it was not listening is unknown, so everything it caches may be stale.

use super::db_err;
use super::tls::Tls;
use crate::error::StoreError;
use base64::Engine as _;
use postgres::fallible_iterator::FallibleIterator;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokenwal_core::GrantKey;

/// The largest payload sent (below PostgreSQL's 8 000 bytes).
const MAX_PAYLOAD: usize = 7_800;
/// How often the listener checks whether it should stop.
const POLL: Duration = Duration::from_millis(200);

/// What other processes of a shared store committed, as this process heard it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteWrites {
    /// These grants were written by another process: each now has at least this state version.
    Grants(Vec<(GrantKey, u64)>),
    /// The listener was not listening for a while (it started, or its connection dropped and came
    /// back): any grant may have been written meanwhile.
    Missed,
}

/// The payloads announcing `written` (`(grant key, new version)`) by `member`.
pub(crate) fn payloads(member: i64, written: &[(&[u8], u64)]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let head = format!("m{member} ");
    let mut out = Vec::new();
    let mut cur = head.clone();
    for (key, version) in written {
        let entry = format!("{version}:{}", b64.encode(key));
        if cur.len() > head.len() && cur.len() + 1 + entry.len() > MAX_PAYLOAD {
            out.push(std::mem::replace(&mut cur, head.clone()));
        }
        if cur.len() > head.len() {
            cur.push(',');
        }
        cur.push_str(&entry);
    }
    if cur.len() > head.len() {
        out.push(cur);
    }
    out
}

/// Parses a payload: the writing member and what it wrote. `None`: not a payload of this format
/// (entries that do not parse are skipped).
pub(crate) fn parse(payload: &str) -> Option<(i64, Vec<(GrantKey, u64)>)> {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let (head, body) = payload.split_once(' ')?;
    let member = head.strip_prefix('m')?.parse().ok()?;
    let grants = body
        .split(',')
        .filter_map(|e| {
            let (v, k) = e.split_once(':')?;
            let key = GrantKey::from_bytes(&b64.decode(k).ok()?).ok()?;
            Some((key, v.parse().ok()?))
        })
        .collect();
    Some((member, grants))
}

/// The listening thread of one store.
pub(crate) struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Starts listening on `channel`; `f` hears every other member's writes (never `member`'s own).
    pub(crate) fn spawn(
        config: postgres::Config,
        tls: Tls,
        channel: String,
        member: i64,
        f: Box<dyn Fn(RemoteWrites) + Send + Sync>,
    ) -> Result<Listener, StoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("tokenwal-pg-listen".into())
                .spawn(move || listen(&config, &tls, &channel, member, &stop, &*f))
                .map_err(|source| StoreError::Io { op: "spawn the change listener", source })?
        };
        Ok(Listener { stop, thread: Some(thread) })
    }

    /// Stops the thread and waits for it (unless called from it: a callback dropping the store).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn listen(
    config: &postgres::Config,
    tls: &Tls,
    channel: &str,
    member: i64,
    stop: &AtomicBool,
    f: &dyn Fn(RemoteWrites),
) {
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Acquire) {
        let connected = tls.connect(config).map_err(db_err("connect the change listener")).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {channel}")).map_err(db_err("listen for changes"))?;
            Ok(c)
        });
        let mut client = match connected {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %super::scrub_password(e, config), "change listener: cannot connect; retrying");
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Listening from now on: whatever was written before may not have been heard.
        f(RemoteWrites::Missed);
        while !stop.load(Ordering::Acquire) {
            let mut notifications = client.notifications();
            let next = notifications.timeout_iter(POLL).next();
            match next {
                Ok(Some(n)) => match parse(n.payload()) {
                    Some((from, _)) if from == member => {}
                    Some((_, grants)) if !grants.is_empty() => f(RemoteWrites::Grants(grants)),
                    Some(_) => {}
                    None => tracing::debug!("change listener: ignoring a notification of another format"),
                },
                Ok(None) => {}
                Err(e) => {
                    let e = db_err("listen for changes")(e);
                    tracing::warn!(error = %super::scrub_password(e, config), "change listener: connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let until = std::time::Instant::now() + total;
    while !stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenwal_core::ShopDomain;

    fn key(i: usize) -> GrantKey {
        GrantKey::shopify(&ShopDomain::parse(&format!("shop-{i}.myshopify.com")).unwrap())
    }

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        let keys: Vec<(Vec<u8>, u64)> = (0..2000).map(|i| (key(i).to_bytes(), i as u64 * 7)).collect();
        let written: Vec<(&[u8], u64)> = keys.iter().map(|(k, v)| (k.as_slice(), *v)).collect();
        let ps = payloads(42, &written);
        assert!(ps.len() > 1, "2000 grants need several payloads");
        let mut back = Vec::new();
        for p in &ps {
            assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
            let (m, grants) = parse(p).unwrap();
            assert_eq!(m, 42);
            back.extend(grants);
        }
        let expect: Vec<(GrantKey, u64)> = (0..2000).map(|i| (key(i), i as u64 * 7)).collect();
        assert_eq!(back, expect);
        assert!(payloads(1, &[]).is_empty());
        assert_eq!(parse("hello"), None);
        assert_eq!(parse("m1 x:y,3:@@"), Some((1, vec![])), "bad entries are skipped");
    }
}
