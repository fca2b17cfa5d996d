//! Delivering one event: signed POSTs, at most `max_attempts` of them, with exponential backoff and
//! jitter in between. Redirects are not followed (a 3xx is a failed attempt); both timeouts are
//! explicit; proxies are not used. Nothing here logs or returns a body, a header or the secret.

use super::{signature, WebhookConfig, EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use std::time::Duration;
use tokenwal_core::UnixMillis;
use tokio::sync::watch;
use tracing::{debug, warn};

/// The sink's HTTP client: no redirects, no proxy, the configured timeouts.
pub(crate) fn client(config: &WebhookConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.timeouts.connect)
        .timeout(config.timeouts.total)
        .no_proxy()
        .user_agent(concat!("tokenwal/", env!("CARGO_PKG_VERSION"), " webhook"))
        .build()
}

/// What became of one event's delivery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed: the event goes to the dead letters.
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Why the last one failed (see [`attempt`]).
        last_error: String,
    },
    /// Shutdown came first: nothing to record, the cursor stays on the event.
    Shutdown,
}

/// One signed POST of `body`. `Err` says why it failed: `status {code}`, `timeout`, `connect
/// failed` or `request failed` (never the body, a header or reqwest's text, which names the URL).
pub(crate) async fn attempt(
    client: &reqwest::Client,
    config: &WebhookConfig,
    id: &str,
    body: &[u8],
) -> Result<(), String> {
    let ts = (UnixMillis::from_system_time(std::time::SystemTime::now()).0 / 1000).to_string();
    let sig = signature(config.secret.expose_secret().as_bytes(), &ts, body);
    let sent = client
        .post(config.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(TIMESTAMP_HEADER, &ts)
        .header(SIGNATURE_HEADER, sig)
        .header(EVENT_ID_HEADER, id)
        .body(body.to_vec())
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("status {}", resp.status().as_u16())),
        Err(e) if e.is_timeout() => Err("timeout".into()),
        Err(e) if e.is_connect() => Err("connect failed".into()),
        Err(_) => Err("request failed".into()),
    }
}

/// The wait after the `failures`-th failed attempt (1-based): `min_backoff` doubled per earlier
/// failure, capped at `max_backoff`, times `jitter` (drawn from 0.8..1.2).
pub(crate) fn backoff(config: &WebhookConfig, failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(32);
    let base = config.min_backoff.saturating_mul(1u32 << doublings.min(31)).min(config.max_backoff);
    base.mul_f64(jitter)
}

/// Delivers one event: up to `config.max_attempts` attempts, waiting [`backoff`] between them.
pub(crate) async fn deliver(
    client: &reqwest::Client,
    config: &WebhookConfig,
    id: &str,
    body: &[u8],
    shutdown: &mut watch::Receiver<bool>,
) -> Delivery {
    let mut last_error = String::new();
    for n in 1..=config.max_attempts {
        match attempt(client, config, id, body).await {
            Ok(()) => {
                debug!(%id, attempt = n, "webhook delivered");
                return Delivery::Delivered;
            }
            Err(why) => {
                warn!(%id, error = %why, attempt = n, max_attempts = config.max_attempts, "webhook attempt failed");
                last_error = why;
            }
        }
        if n == config.max_attempts {
            break;
        }
        let wait = backoff(config, n, 0.8 + rand::random::<f64>() * 0.4);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return Delivery::Shutdown;
        }
    }
    Delivery::GaveUp { attempts: config.max_attempts, last_error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenwal_core::ClientSecret;

    #[test]
    fn backoff_doubles_from_min_to_max() {
        let mut c = WebhookConfig::new("https://example.com/h".parse().unwrap(), ClientSecret::new("s"));
        c.min_backoff = Duration::from_millis(100);
        c.max_backoff = Duration::from_millis(1000);
        let ms = |f| backoff(&c, f, 1.0).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4), ms(5), ms(40), ms(u32::MAX)], [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(backoff(&c, 1, 0.8), Duration::from_millis(80));
        assert_eq!(backoff(&c, 9, 1.2), Duration::from_millis(1200));
    }
}
