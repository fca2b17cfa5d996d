//! The webhook sink: `needs_reauth`, `recovered` and `app_credentials_rejected` events POSTed to an
//! operator's URL, signed with HMAC-SHA256, delivered **at least once** across restarts.
//!
//! Events are derived from the journal, not from the in-process broadcast: a journal record is
//! durable before anything else happens, so reading the journal from a durable cursor (a journal
//! LSN kept in the store's `meta` tree, see `tokenwal_store::cursor`) and moving that cursor only
//! after the receiver answered 2xx, or after the event was durably kept as a dead letter, loses
//! nothing to a crash, a restart or a receiver that is down.
//! A crash after a delivery and before the cursor moved delivers that event again: receivers
//! deduplicate by the event id (unique per journal record). The write path is unchanged.
//!
//! | journal record | event |
//! |---|---|
//! | `NeedsReauth` | `needs_reauth` |
//! | `Installed` / `Committed` while the grant was in needs-reauth | `recovered` |
//! | `Refused{AppCredentials}` (`invalid_client`) | `app_credentials_rejected` |
//!
//! Delivery is in journal order; an event is attempted at most `max_attempts` times (exponential
//! backoff with jitter, capped) and then written to the store as a **dead letter** before the
//! cursor moves past it, so one refused event never holds back the ones after it
//! ([`dead_letters`], [`replay`]). Redirects are not followed (a 3xx is a failed attempt); both
//! timeouts are explicit. The signing secret is never logged. The wire format and how to verify
//! it: `docs/webhooks.md`.
//!
//! * `sign` — the one HMAC construction ([`signature`], [`verify`]).
//! * `delivery` — one event's bounded, backed-off attempts.
//! * `dead_letters` — listing and replaying what the sink gave up on.

mod dead_letters;
mod delivery;
mod sign;

pub use dead_letters::{dead_letters, replay, DeadLetter, DeadLetterError, Replay, ReplayReport};
pub use sign::{signature, verify};

use crate::net::{is_loopback, Timeouts};
use delivery::Delivery;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;
use tokenwal_core::{ClientSecret, Event, GrantKey, Record, RefusalReason, UnixMillis};
use tokenwal_store::{Store, StoreError};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};
use url::Url;

/// Header carrying the base64 HMAC-SHA256 of `{timestamp}.{body}` under the shared secret.
pub const SIGNATURE_HEADER: &str = "X-Tokenwal-Hmac-Sha256";
/// Header carrying the unix time (seconds) the request was signed at.
pub const TIMESTAMP_HEADER: &str = "X-Tokenwal-Timestamp";
/// Header carrying the event id (also in the body).
pub const EVENT_ID_HEADER: &str = "X-Tokenwal-Event-Id";

/// The default of [`WebhookConfig::max_attempts`]: with the default backoff, about 8.5 minutes of
/// retries before an event becomes a dead letter.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// The most [`WebhookConfig::max_attempts`] accepted.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;

/// Where and how to deliver webhook events.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The receiver. `https`, or `http` on a loopback address.
    pub url: Url,
    /// The shared signing secret (redacted in `Debug`, zeroized on drop, never logged).
    pub secret: ClientSecret,
    /// The app's handle in the Shopify admin, for the `deep_link` field (omitted when `None`).
    pub app_handle: Option<String>,
    /// The re-login link of grants that are not Admin API shops (a Customer Account API customer,
    /// another provider's account), for the `deep_link` field: a URL template where `{account}`,
    /// `{shop_id}` and `{customer_id}` are replaced ([`login_link`]). `None`: no link.
    pub login_url: Option<String>,
    /// Connect and whole-request timeouts of each delivery attempt (default 5 s and 10 s).
    pub timeouts: Timeouts,
    /// Attempts per event before it becomes a dead letter (default 10, at least 1).
    pub max_attempts: u32,
    /// First retry delay after a failed attempt (default 1 s); doubled per failure.
    pub min_backoff: Duration,
    /// Longest retry delay (default 5 minutes).
    pub max_backoff: Duration,
    /// How often the journal is polled when no engine event wakes the sink (default 1 s).
    pub poll_interval: Duration,
    /// The store cursor's name (default `webhook`): one per receiver.
    pub cursor: String,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url.as_str())
            .field("secret", &self.secret)
            .field("app_handle", &self.app_handle)
            .field("login_url", &self.login_url)
            .field("timeouts", &self.timeouts)
            .field("max_attempts", &self.max_attempts)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl WebhookConfig {
    /// A sink for `url` signed with `secret`, with defaults.
    pub fn new(url: Url, secret: ClientSecret) -> WebhookConfig {
        WebhookConfig {
            url,
            secret,
            app_handle: None,
            login_url: None,
            timeouts: Timeouts { connect: Duration::from_secs(5), total: Duration::from_secs(10) },
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            cursor: "webhook".into(),
        }
    }

    /// Checks the settings (the engine does at open; `replay` too): the URL's scheme and host, a
    /// secret, the app handle, `1 <= max_attempts <= 1000`, `0 < min_backoff <= max_backoff`.
    pub fn validate(&self) -> Result<(), String> {
        match self.url.scheme() {
            "https" => {}
            "http" if is_loopback(&self.url) => {}
            _ => return Err("webhook url must be https (or http on loopback)".into()),
        }
        if !self.url.username().is_empty() || self.url.password().is_some() {
            return Err("webhook url must not carry credentials".into());
        }
        if self.secret.is_empty() {
            return Err("webhook secret must not be empty".into());
        }
        if let Some(h) = &self.app_handle {
            if !valid_handle(h) {
                return Err("app handle must match [a-z0-9-]{1,100}".into());
            }
        }
        if let Some(t) = &self.login_url {
            check_login_url(t)?;
        }
        if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            return Err("webhook backoff must satisfy 0 < min_backoff <= max_backoff".into());
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(format!("webhook max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}"));
        }
        Ok(())
    }
}

/// Whether `h` is a plausible app handle (it becomes a URL path segment).
pub fn valid_handle(h: &str) -> bool {
    !h.is_empty() && h.len() <= 100 && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The Shopify admin link that makes the merchant's next app open run token exchange:
/// `https://admin.shopify.com/store/{shop-handle}/apps/{app-handle}`. `None` for non-Shopify grants.
pub fn deep_link(grant: &GrantKey, app_handle: &str) -> Option<String> {
    let shop = grant.shop()?;
    Some(format!("https://admin.shopify.com/store/{}/apps/{app_handle}", shop.handle()))
}

/// The re-login link of `grant` from `template`: `{account}` is the grant's account, `{shop_id}` and
/// `{customer_id}` the two halves of a Customer Account API account (`shop_id:customer_id`; empty
/// for other accounts), each percent-encoded. `None` for an Admin API shop (its link is
/// [`deep_link`]).
pub fn login_link(grant: &GrantKey, template: &str) -> Option<String> {
    if grant.shop().is_some() {
        return None;
    }
    let account = grant.account();
    let (shop_id, customer_id) = account.split_once(':').unwrap_or(("", ""));
    let enc = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    Some(
        template
            .replace("{account}", &enc(account))
            .replace("{shop_id}", &enc(shop_id))
            .replace("{customer_id}", &enc(customer_id)),
    )
}

/// The re-auth link of `grant`: an Admin API shop's admin link (with an app handle), another
/// grant's re-login link (with a login URL template).
pub fn reauth_link(grant: &GrantKey, app_handle: Option<&str>, login_url: Option<&str>) -> Option<String> {
    match grant.shop() {
        Some(_) => app_handle.and_then(|h| deep_link(grant, h)),
        None => login_url.and_then(|t| login_link(grant, t)),
    }
}

/// Checks a login URL template: once expanded it is an `https` URL (or `http` on loopback) without
/// credentials.
pub fn check_login_url(template: &str) -> Result<(), String> {
    let sample = template.replace("{account}", "1:2").replace("{shop_id}", "1").replace("{customer_id}", "2");
    let url = Url::parse(&sample).map_err(|e| format!("login_url is not a URL template ({e})"))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        _ => return Err("login_url must be https (or http on loopback)".into()),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("login_url must not carry credentials".into());
    }
    Ok(())
}

/// What happened (the payload's `kind`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookKind {
    /// The grant is dead: the merchant must open the app (token exchange).
    NeedsReauth,
    /// A grant that needed re-auth has a new token set (token exchange or install).
    Recovered,
    /// The app's client credentials were refused (`invalid_client`): fleet-wide, page someone.
    AppCredentialsRejected,
}

/// The JSON body of a delivery. Field names are stable (see `docs/webhooks.md`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct WebhookEvent {
    /// Unique per journal record and store: `{store id}-{lsn}`. Deduplicate on it.
    pub id: String,
    /// What happened.
    pub kind: WebhookKind,
    /// The grant's provider (`shopify`).
    pub provider: String,
    /// The shop (`{handle}.myshopify.com`), or the account of another provider's grant.
    pub shop: String,
    /// Why (no secret material).
    pub reason: String,
    /// When the journal record was written (RFC 3339 UTC).
    pub since: String,
    /// The same instant in unix milliseconds.
    pub since_ms: u64,
    /// The new generation (`recovered` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The admin deep link (Shopify grants, when an app handle is configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deep_link: Option<String>,
    /// The journal record's LSN.
    pub lsn: u64,
}

/// Turns journal records into events. Remembers, per grant, whether it is in needs-reauth as of the
/// records seen (looked up, the first time a grant matters, in its history read backwards from the
/// record until the previous phase-changing record).
pub(crate) struct Deriver {
    store: Store,
    store_id: String,
    app_handle: Option<String>,
    login_url: Option<String>,
    in_reauth: HashMap<GrantKey, bool>,
}

impl Deriver {
    pub(crate) fn new(store: Store, app_handle: Option<String>, login_url: Option<String>) -> Deriver {
        let fp = store.fingerprint_key().fingerprint("webhook-store-id", "");
        let store_id = fp.0[..8].iter().map(|b| format!("{b:02x}")).collect();
        Deriver { store, store_id, app_handle, login_url, in_reauth: HashMap::new() }
    }

    /// Whether `grant` was in needs-reauth just before `lsn`: its last phase-changing record before
    /// `lsn`, read backwards from `lsn` (never the grant's whole history).
    fn was_in_reauth(&mut self, grant: &GrantKey, lsn: u64) -> Result<bool, StoreError> {
        if let Some(b) = self.in_reauth.get(grant) {
            return Ok(*b);
        }
        let last = self.store.find_before(grant, lsn, |r| match r {
            Record::NeedsReauth { .. } => Some(true),
            Record::Installed { .. } | Record::Committed { .. } | Record::Uninstalled { .. } => Some(false),
            _ => None,
        })?;
        Ok(last.unwrap_or(false))
    }

    /// The event of the record at `lsn`, if it is one.
    pub(crate) fn derive(&mut self, lsn: u64, r: &Record) -> Result<Option<WebhookEvent>, StoreError> {
        let grant = r.grant().clone();
        let (kind, reason, generation) = match r {
            Record::NeedsReauth { reason, .. } => {
                self.in_reauth.insert(grant.clone(), true);
                (WebhookKind::NeedsReauth, reason.to_string(), None)
            }
            Record::Installed { generation, source, .. } => {
                let was = self.was_in_reauth(&grant, lsn)?;
                self.in_reauth.insert(grant.clone(), false);
                if !was {
                    return Ok(None);
                }
                (WebhookKind::Recovered, format!("new token set installed ({source:?})"), Some(generation.0))
            }
            Record::Committed { generation, .. } => {
                let was = self.was_in_reauth(&grant, lsn)?;
                self.in_reauth.insert(grant.clone(), false);
                if !was {
                    return Ok(None);
                }
                (WebhookKind::Recovered, "new token set acquired".to_string(), Some(generation.0))
            }
            Record::Uninstalled { .. } => {
                self.in_reauth.insert(grant, false);
                return Ok(None);
            }
            Record::Refused { why: RefusalReason::AppCredentials { status, error }, .. } => {
                (WebhookKind::AppCredentialsRejected, format!("app credentials rejected ({status} {error})"), None)
            }
            _ => return Ok(None),
        };
        let at = r.at();
        Ok(Some(WebhookEvent {
            id: format!("{}-{lsn}", self.store_id),
            kind,
            provider: grant.provider().to_owned(),
            shop: grant.account().to_owned(),
            reason,
            since: at.to_string(),
            since_ms: at.0,
            generation,
            deep_link: reauth_link(&grant, self.app_handle.as_deref(), self.login_url.as_deref()),
            lsn,
        }))
    }
}

/// Reads the cursor, or starts it at the journal's end (a new sink delivers events from now on).
pub(crate) fn init_cursor(store: &Store, name: &str) -> Result<u64, StoreError> {
    match store.cursor(name)? {
        Some(c) => Ok(c),
        None => {
            let end = store.journal_end()?;
            store.set_cursor(name, end)?;
            info!(cursor = name, lsn = end, "webhook cursor created at the journal's end");
            Ok(end)
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            warn!(error = %e, "webhook sink: store error");
            None
        }
        Err(e) => {
            warn!(error = %e, "webhook sink: task failed");
            None
        }
    }
}

/// The sink's task. Stops when `shutdown` turns true.
pub(crate) async fn run(
    config: WebhookConfig,
    store: Store,
    mut events: broadcast::Receiver<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = match delivery::client(&config) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "webhook sink: cannot build the HTTP client; no events will be delivered");
            return;
        }
    };
    let name = config.cursor.clone();
    let Some(mut cursor) = blocking({
        let (s, n) = (store.clone(), name.clone());
        move || init_cursor(&s, &n)
    })
    .await
    else {
        return;
    };
    let mut persisted = cursor;
    let mut deriver = Deriver::new(store.clone(), config.app_handle.clone(), config.login_url.clone());
    info!(url = %config.url.as_str(), cursor = cursor, "webhook sink started");
    loop {
        if *shutdown.borrow() {
            return;
        }
        let records = blocking({
            let s = store.clone();
            move || s.journal_from(cursor, 256)
        })
        .await
        .unwrap_or_default();
        let mut idle = records.is_empty();
        for (lsn, record) in records {
            let event = match deriver.derive(lsn, &record) {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, lsn, "webhook sink: cannot derive an event; retrying later");
                    idle = true;
                    break;
                }
            };
            let delivered = event.is_some();
            if let Some(event) = event {
                match handle(&client, &config, &store, &event, &mut shutdown).await {
                    Handled::Done => {}
                    // Shutting down: the cursor stays before this event.
                    Handled::Shutdown => return,
                    Handled::StoreFailed => {
                        idle = true;
                        break;
                    }
                }
            }
            cursor = lsn + 1;
            if delivered || cursor - persisted >= 1024 {
                let (s, n, c) = (store.clone(), name.clone(), cursor);
                if blocking(move || s.set_cursor(&n, c)).await.is_some() {
                    persisted = cursor;
                }
            }
        }
        if cursor != persisted {
            let (s, n, c) = (store.clone(), name.clone(), cursor);
            if blocking(move || s.set_cursor(&n, c)).await.is_some() {
                persisted = cursor;
            }
        }
        if idle {
            tokio::select! {
                _ = events.recv() => {}
                _ = tokio::time::sleep(config.poll_interval) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// What became of one event.
enum Handled {
    /// Delivered, or durably a dead letter: the cursor may move past it.
    Done,
    /// Shutdown came first.
    Shutdown,
    /// The store failed (logged): the cursor stays on the event.
    StoreFailed,
}

/// Delivers `event`, or, once its attempts are spent, writes it as a dead letter (durable before
/// this returns, so before the caller moves the cursor).
async fn handle(
    client: &reqwest::Client,
    config: &WebhookConfig,
    store: &Store,
    event: &WebhookEvent,
    shutdown: &mut watch::Receiver<bool>,
) -> Handled {
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, id = %event.id, "webhook sink: cannot encode an event; skipped");
            return Handled::Done;
        }
    };
    // A letter for this LSN already exists: the sink gave up on the event and stopped (a crash, a
    // restart) before its cursor moved. It is not sent again (replay does that) nor written twice.
    let (s, n, lsn) = (store.clone(), config.cursor.clone(), event.lsn);
    match tokio::task::spawn_blocking(move || s.dead_letter(&n, lsn)).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(_))) | Ok(Err(StoreError::Corrupt { .. })) => {
            info!(id = %event.id, "webhook event already a dead letter; moving on");
            return Handled::Done;
        }
        Ok(Err(e)) => {
            warn!(error = %e, "webhook sink: store error");
            return Handled::StoreFailed;
        }
        Err(e) => {
            warn!(error = %e, "webhook sink: task failed");
            return Handled::StoreFailed;
        }
    }
    match delivery::deliver(client, config, &event.id, &body, shutdown).await {
        Delivery::Delivered => Handled::Done,
        Delivery::Shutdown => Handled::Shutdown,
        Delivery::GaveUp { attempts, last_error } => {
            let now = UnixMillis::from_system_time(std::time::SystemTime::now());
            let letter = tokenwal_store::DeadLetter {
                lsn,
                attempts,
                first_failed_at: now,
                last_attempt_at: now,
                last_error,
                payload: body,
            };
            let (s, n) = (store.clone(), config.cursor.clone());
            if blocking(move || s.put_dead_letter(&n, &letter)).await.is_none() {
                return Handled::StoreFailed;
            }
            warn!(
                id = %event.id,
                attempts,
                "webhook event given up and kept as a dead letter (`tokenwal webhooks dead-letters`); later events continue"
            );
            Handled::Done
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_links_use_the_shop_handle() {
        let g = GrantKey::shopify(&tokenwal_core::ShopDomain::parse("cool-shop.myshopify.com").unwrap());
        assert_eq!(deep_link(&g, "my-app").unwrap(), "https://admin.shopify.com/store/cool-shop/apps/my-app");
        assert!(valid_handle("my-app-2"));
        assert!(!valid_handle("My App"));
        assert!(!valid_handle("a/b"));
    }

    #[test]
    fn a_customer_gets_the_login_link_and_a_shop_the_admin_link() {
        let customer = GrantKey::new("shopify-customer-account", "68000000016:7000000123456").unwrap();
        let template = "https://store.example/account/login?shop={shop_id}&customer={customer_id}&a={account}";
        assert_eq!(
            reauth_link(&customer, Some("my-app"), Some(template)).unwrap(),
            "https://store.example/account/login?shop=68000000016&customer=7000000123456&a=68000000016%3A7000000123456"
        );
        assert_eq!(reauth_link(&customer, Some("my-app"), None), None);
        let shop = GrantKey::shopify(&tokenwal_core::ShopDomain::parse("cool-shop.myshopify.com").unwrap());
        assert_eq!(
            reauth_link(&shop, Some("my-app"), Some(template)).unwrap(),
            "https://admin.shopify.com/store/cool-shop/apps/my-app"
        );
        assert!(check_login_url(template).is_ok());
        for (bad, says) in [
            ("http://store.example/login", "https"),
            ("not a url {account}", "not a URL"),
            ("https://u:p@store.example/", "credentials"),
        ] {
            assert!(check_login_url(bad).unwrap_err().contains(says), "{bad}");
        }
    }
}
