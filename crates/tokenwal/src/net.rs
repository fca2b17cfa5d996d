//! Network settings shared by the token transport and the webhook sink: timeouts and the loopback
//! rule for plain-HTTP destinations. Depends on nothing else in the crate, so `config` and
//! `webhook_sink` both use it without importing each other.

use std::net::IpAddr;
use std::time::Duration;
use url::Url;

/// HTTP timeouts. Both are always set.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Establishing the connection (TCP + TLS). A connect timeout means "not sent".
    pub connect: Duration,
    /// The whole request, from send to the last body byte. A timeout after connecting is ambiguous.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: Duration::from_secs(5), total: Duration::from_secs(30) }
    }
}

/// Whether `url` points at a loopback address (for test endpoints and plain-HTTP receivers).
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}
