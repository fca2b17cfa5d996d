//! Events the sink gave up on: listing them, and delivering them again.
//!
//! After `max_attempts` failed attempts the sink writes the event to the store as a dead letter
//! ([`tokenwal_store::dead_letter`]: the exact body it POSTed, the attempt count, the last error) and
//! only then moves its cursor past it, so later events keep flowing. [`replay`] sends a letter again
//! (one attempt, signed afresh under the current secret): delivered, it is removed; refused, it
//! stays with its attempt count and last error updated. A letter holds no secret: events carry
//! none.

use super::delivery;
use super::WebhookConfig;
use serde::Serialize;
use tokenwal_core::{CodecError, UnixMillis};
use tokenwal_store::{Store, StoreError};

/// Why listing or replaying dead letters failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterError {
    /// The store failed, or this letter failed its checks ([`StoreError::Corrupt`] names it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No dead letter has this id.
    #[error("no dead letter {id}")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The id is neither an event id (`{store id}-{lsn}`) nor an LSN.
    #[error("not a dead-letter id: {id:?} (expected an event id such as 3f9c0a1b2c3d4e5f-1042, or its lsn)")]
    BadId {
        /// The id given.
        id: String,
    },
    /// The webhook configuration is unusable.
    #[error("webhook configuration: {0}")]
    Config(String),
}

/// One dead letter, as listed (no secret: the event body is the one the receiver would get).
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct DeadLetter {
    /// The event id (`{store id}-{lsn}`), as in the body and the `X-Tokenwal-Event-Id` header.
    pub id: String,
    /// The journal record's LSN.
    pub lsn: u64,
    /// The event's `kind`.
    pub kind: String,
    /// The event's `shop`.
    pub shop: String,
    /// Delivery attempts so far (the sink's, then every replay's).
    pub attempts: u32,
    /// When the sink gave up (unix ms).
    pub first_failed_ms: u64,
    /// When the last attempt was made (unix ms).
    pub last_attempt_ms: u64,
    /// Why the last attempt failed: `status {code}`, `timeout`, `connect failed` or `request failed`.
    pub last_error: String,
    #[serde(skip)]
    body: Vec<u8>,
}

impl DeadLetter {
    /// The event's JSON body, byte for byte as it is delivered.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    fn from_stored(cursor: &str, l: tokenwal_store::DeadLetter) -> Result<DeadLetter, DeadLetterError> {
        let v: serde_json::Value = serde_json::from_slice(&l.payload).map_err(|e| StoreError::Corrupt {
            what: format!("meta/dead_letter/{cursor}/{}", l.lsn),
            source: CodecError::Payload(format!("not a webhook event: {e}")),
        })?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
        Ok(DeadLetter {
            id: field("id"),
            lsn: l.lsn,
            kind: field("kind"),
            shop: field("shop"),
            attempts: l.attempts,
            first_failed_ms: l.first_failed_at.0,
            last_attempt_ms: l.last_attempt_at.0,
            last_error: l.last_error,
            body: l.payload,
        })
    }
}

/// Every dead letter of the sink whose cursor is `cursor` (`WebhookConfig::cursor`, default
/// `webhook`), in journal order. A letter that fails its checks is an `Err` naming it, in its
/// place; the others are listed. Blocking (a store read).
pub fn dead_letters(store: &Store, cursor: &str) -> Result<Vec<Result<DeadLetter, DeadLetterError>>, DeadLetterError> {
    Ok(store
        .dead_letters(cursor)?
        .into_iter()
        .map(|l| l.map_err(DeadLetterError::from).and_then(|l| DeadLetter::from_stored(cursor, l)))
        .collect())
}

/// Which letters [`replay`] sends.
#[derive(Clone, Debug)]
pub enum Replay {
    /// The letter with this event id (`{store id}-{lsn}`) or LSN.
    One(String),
    /// Every letter that passes its checks, in journal order.
    All,
}

/// What [`replay`] did.
#[derive(Clone, Default, Debug, Serialize)]
pub struct ReplayReport {
    /// Ids delivered (their letters are removed).
    pub delivered: Vec<String>,
    /// Ids refused again (their letters stay, attempts updated), with why.
    pub failed: Vec<(String, String)>,
    /// Letters that failed their checks (`--all` only; not sent), with the error.
    pub corrupt: Vec<String>,
}

/// The LSN an id names: the number after the last `-` of an event id, or the whole id.
fn lsn_of(id: &str) -> Option<u64> {
    id.rsplit('-').next().and_then(|n| n.parse().ok())
}

async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, DeadLetterError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DeadLetterError::Store(StoreError::Backend(format!("store task failed: {e}"))))?
        .map_err(DeadLetterError::from)
}

/// Sends dead letters of `config.cursor`'s sink to `config.url` again, one attempt each, signed
/// under `config.secret`: a delivered letter is removed, a refused one stays with `attempts + 1`.
/// For the CLI, `tokenwal webhooks replay`; an app may call it with its engine's store while the
/// engine runs.
pub async fn replay(store: &Store, config: &WebhookConfig, which: Replay) -> Result<ReplayReport, DeadLetterError> {
    config.validate().map_err(DeadLetterError::Config)?;
    let client = delivery::client(config).map_err(|e| DeadLetterError::Config(e.to_string()))?;
    let cursor = config.cursor.clone();
    let mut report = ReplayReport::default();
    let letters = match which {
        Replay::One(id) => {
            let lsn = lsn_of(&id).ok_or_else(|| DeadLetterError::BadId { id: id.clone() })?;
            let (s, c) = (store.clone(), cursor.clone());
            let found = off_thread(move || s.dead_letter(&c, lsn)).await?;
            let letter = found.ok_or_else(|| DeadLetterError::NotFound { id: id.clone() })?;
            let letter = DeadLetter::from_stored(&cursor, letter)?;
            if id.contains('-') && letter.id != id {
                return Err(DeadLetterError::NotFound { id });
            }
            vec![letter]
        }
        Replay::All => {
            let (s, c) = (store.clone(), cursor.clone());
            let all = off_thread(move || Ok(dead_letters(&s, &c))).await?;
            let mut ok = Vec::new();
            for l in all? {
                match l {
                    Ok(l) => ok.push(l),
                    Err(e) => report.corrupt.push(e.to_string()),
                }
            }
            ok
        }
    };
    for l in letters {
        match delivery::attempt(&client, config, &l.id, &l.body).await {
            Ok(()) => {
                let (s, c, lsn) = (store.clone(), cursor.clone(), l.lsn);
                off_thread(move || s.delete_dead_letter(&c, lsn)).await?;
                tracing::info!(id = %l.id, "dead letter delivered and removed");
                report.delivered.push(l.id);
            }
            Err(why) => {
                let stored = tokenwal_store::DeadLetter {
                    lsn: l.lsn,
                    attempts: l.attempts.saturating_add(1),
                    first_failed_at: UnixMillis(l.first_failed_ms),
                    last_attempt_at: UnixMillis::from_system_time(std::time::SystemTime::now()),
                    last_error: why.clone(),
                    payload: l.body,
                };
                let (s, c) = (store.clone(), cursor.clone());
                off_thread(move || s.put_dead_letter(&c, &stored)).await?;
                tracing::warn!(id = %l.id, error = %why, "dead letter refused again; kept");
                report.failed.push((l.id, why));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_lsn() {
        assert_eq!(lsn_of("3f9c0a1b2c3d4e5f-1042"), Some(1042));
        assert_eq!(lsn_of("1042"), Some(1042));
        assert_eq!(lsn_of("3f9c-x"), None);
        assert_eq!(lsn_of(""), None);
    }
}
