//! The broker's Prometheus metrics (prometheus-client): requests by route template and status,
//! request latency by route, readiness. Never a shop or a token as a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs to ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The registry and the broker's own metrics.
pub struct Metrics {
    registry: RwLock<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    ready: Gauge,
    /// The series of a 200 to the token call (the hot path), bound at its first use: the families'
    /// lookup (a lock and a hash of the labels) is skipped for it; what is exposed is the same.
    token_ok: OnceLock<(Counter, Histogram)>,
}

impl Metrics {
    /// A registry with the broker's metrics registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let ready = Gauge::default();
        registry.register(
            "tokenwal_broker_requests",
            "Requests answered by the broker, by route template and HTTP status",
            requests.clone(),
        );
        registry.register(
            "tokenwal_broker_request_duration_seconds",
            "Time from a request's arrival to its answer, by route template",
            duration.clone(),
        );
        registry.register(
            "tokenwal_broker_ready",
            "1 when the broker serves tokens (recovery done, store healthy), else 0",
            ready.clone(),
        );
        Metrics { registry: RwLock::new(registry), requests, duration, ready, token_ok: OnceLock::new() }
    }

    /// Counts one answered request.
    pub fn observe(&self, route: &'static str, code: u16, took: Duration) {
        if code == 200 && route == super::routes::TOKEN {
            let (count, latency) = self.token_ok.get_or_init(|| {
                let labels = RequestLabels { route, code };
                let count = self.requests.get_or_create(&labels).clone();
                (count, self.duration.get_or_create(&RouteLabels { route }).clone())
            });
            count.inc();
            latency.observe(took.as_secs_f64());
            return;
        }
        self.requests.get_or_create(&RequestLabels { route, code }).inc();
        self.duration.get_or_create(&RouteLabels { route }).observe(took.as_secs_f64());
    }

    /// Sets the readiness gauge.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Lets more metrics (the engine's) be registered into the broker's registry.
    pub fn register_with(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.write().unwrap_or_else(|p| p.into_inner()));
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.read().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_follow_the_conventions() {
        let m = Metrics::new();
        m.observe("/v1/shops/{shop}/token", 200, Duration::from_micros(120));
        m.set_ready(true);
        let text = m.render();
        assert!(
            text.contains(r#"tokenwal_broker_requests_total{route="/v1/shops/{shop}/token",code="200"} 1"#),
            "{text}"
        );
        assert!(text.contains("tokenwal_broker_request_duration_seconds_bucket{"), "{text}");
        assert!(text.contains("tokenwal_broker_ready 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn the_bound_token_series_is_the_family_s() {
        let m = Metrics::new();
        let token = crate::serve::routes::TOKEN;
        assert!(!m.render().contains("route=\"/v1/shops/{shop}/token\""), "no series before a request");
        m.observe(token, 200, Duration::from_micros(120));
        m.observe(token, 200, Duration::from_micros(130));
        m.observe(token, 404, Duration::from_micros(90));
        let text = m.render();
        assert!(
            text.contains(r#"tokenwal_broker_requests_total{route="/v1/shops/{shop}/token",code="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tokenwal_broker_requests_total{route="/v1/shops/{shop}/token",code="404"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tokenwal_broker_request_duration_seconds_count{route="/v1/shops/{shop}/token"} 3"#),
            "{text}"
        );
    }
}
