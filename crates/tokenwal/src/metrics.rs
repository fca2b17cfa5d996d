//! The engine's metrics, for Prometheus (or anything that reads the OpenMetrics text format).
//!
//! [`Metrics::register`] adds them to a caller's [`Registry`] (the broker's `/metrics`, or an
//! embedding worker's own exporter); [`Metrics::encode_openmetrics`] renders them alone. Names follow
//! Prometheus' conventions (`tokenwal_…`, counters end in `_total`, base units), and no label ever
//! carries a shop, a grant or a token: label values are fixed words (outcomes, phases, kinds).
//!
//! | name | type | what |
//! |---|---|---|
//! | `tokenwal_refreshes_total{outcome}` | counter | refresh requests sent, by how the server answered (`success`, `ambiguous`, `rejected`, `throttled`, `bad-credentials`, `not-sent`) |
//! | `tokenwal_acquisitions_total{kind,outcome}` | counter | token exchanges and migrations, likewise |
//! | `tokenwal_refresh_duration_seconds` | histogram | time on the wire of one refresh request |
//! | `tokenwal_journal_sync_duration_seconds` | histogram | one commit group's flush + fsync |
//! | `tokenwal_journal_syncs_total`, `tokenwal_journal_batches_total` | counter | syncs, and transitions they made durable (their ratio is the group-commit factor) |
//! | `tokenwal_journal_conflicts_total` | counter | writes refused by the compare-and-swap (another writer won) |
//! | `tokenwal_grants` | gauge | grants in the store (exact at once) |
//! | `tokenwal_grants_by_phase{phase}` | gauge | grants per phase (`healthy`, `refreshing`, `ambiguous`, `needs-reauth`, `uninstalled`, `not-installed`) |
//! | `tokenwal_grants_needing_reauth` | gauge | grants whose re-acquisition needs the merchant |
//! | `tokenwal_ambiguous_attempts_open` | gauge | rotations whose outcome is still unknown (being retried with the old token) |
//! | `tokenwal_grant_census_complete` | gauge | 1 once the per-phase counts cover every grant (a background scan at open) |
//! | `tokenwal_store_up` | gauge | 1 while the store accepts writes, 0 once it fail-stopped |
//! | `tokenwal_app_credentials_paused` | gauge | 1 while refreshing is paused because the app's credentials were refused |
//!
//! The per-phase counts are exact: a background scan at open counts every grant while every durable
//! transition reports the phase it left and the one it entered ([`tokenwal_core::Prior`]); a move
//! the scan already saw (the scanned version is newer than the move's) is not counted twice.

use crate::clock::now;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokenwal_core::{AttemptKind, GrantKey, GrantState, Outcome, Prior};
use tokenwal_store::{Store, SYNC_LATENCY_BOUNDS};

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The phases, in the order the census counts them ([`tokenwal_core::Phase::name`]).
const PHASES: [&str; 6] = ["healthy", "refreshing", "ambiguous", "needs-reauth", "uninstalled", "not-installed"];

/// The engine's metrics (one set per engine). Cheap to share: every handle sees the same values.
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
}

struct Shared {
    refreshes: Family<Labels1, Counter>,
    acquisitions: Family<Labels2, Counter>,
    refresh_seconds: Histogram,
    census: Census,
    store: Store,
    paused_until: Arc<AtomicU64>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub(crate) fn new(store: Store, paused_until: Arc<AtomicU64>) -> Metrics {
        // 5 ms … ~41 s: a refresh is one HTTPS round trip, bounded by the request timeout.
        let buckets = prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14);
        Metrics {
            shared: Arc::new(Shared {
                refreshes: Family::default(),
                acquisitions: Family::default(),
                refresh_seconds: Histogram::new(buckets),
                census: Census::default(),
                store,
                paused_until,
            }),
        }
    }

    /// Adds the engine's metrics to `registry` (they stay live: later values show in later scrapes).
    /// Register one engine's metrics once per registry; two engines in one registry need
    /// [`Registry::sub_registry_with_label`] to tell them apart.
    pub fn register(&self, registry: &mut Registry) {
        let s = &self.shared;
        registry.register(
            "tokenwal_refreshes",
            "Refresh requests sent, by how the token endpoint answered",
            s.refreshes.clone(),
        );
        registry.register(
            "tokenwal_acquisitions",
            "Token exchanges and migrations sent, by kind and by how the token endpoint answered",
            s.acquisitions.clone(),
        );
        registry.register_with_unit(
            "tokenwal_refresh_duration",
            "Time on the wire of one refresh request",
            Unit::Seconds,
            s.refresh_seconds.clone(),
        );
        registry.register_collector(Box::new(Scrape(Arc::clone(s))));
    }

    /// The engine's metrics alone, in the OpenMetrics text format (ends with `# EOF`).
    pub fn encode_openmetrics(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Counts one request the engine sent and how it was answered.
    pub(crate) fn observe_attempt(&self, kind: AttemptKind, outcome: &Outcome, took: Duration) {
        let label = outcome.label();
        match kind {
            AttemptKind::Refresh => {
                self.shared.refreshes.get_or_create(&[("outcome", label)]).inc();
                self.shared.refresh_seconds.observe(took.as_secs_f64());
            }
            AttemptKind::TokenExchange => {
                self.shared.acquisitions.get_or_create(&[("kind", "token-exchange"), ("outcome", label)]).inc();
            }
            AttemptKind::Migration => {
                self.shared.acquisitions.get_or_create(&[("kind", "migration"), ("outcome", label)]).inc();
            }
        }
    }

    /// The grant census (per-phase counts).
    pub(crate) fn census(&self) -> &Census {
        &self.shared.census
    }
}

/// Per-phase grant counts, kept exact across the initial scan (see the module docs).
#[derive(Default)]
pub(crate) struct Census {
    state: Mutex<CensusState>,
}

#[derive(Default)]
struct CensusState {
    counts: [i64; PHASES.len()],
    stage: Stage,
}

#[derive(Default)]
enum Stage {
    /// No scan has started: moves are not counted (the scan will see their results).
    #[default]
    Idle,
    /// The scan runs: the version it saw of each grant so far (by hash), and the moves of grants it
    /// has not reached yet.
    Scanning { hasher: RandomState, seen: HashMap<u64, u64>, waiting: HashMap<u64, Vec<Move>> },
    /// The counts cover every grant; moves are counted as they come.
    Complete,
    /// The scan failed: the counts are partial for good.
    Failed,
}

struct Move {
    prior: Option<Prior>,
    to: usize,
}

fn phase_index(name: &str) -> usize {
    PHASES.iter().position(|p| *p == name).unwrap_or(0)
}

impl CensusState {
    fn apply(&mut self, m: &Move) {
        if let Some(p) = m.prior {
            self.counts[phase_index(p.phase)] -= 1;
        }
        self.counts[m.to] += 1;
    }
}

/// Whether a move is already reflected in a scanned state of version `seen`: the scan saw its result
/// (or a later state) exactly when the state the move replaced is older than the one scanned.
fn seen_by_scan(m: &Move, seen: u64) -> bool {
    match m.prior {
        None => true,
        Some(p) => p.version < seen,
    }
}

impl Census {
    fn lock(&self) -> std::sync::MutexGuard<'_, CensusState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A durable transition of `grant` replaced `prior` with a state in phase `to`.
    pub(crate) fn moved(&self, grant: &GrantKey, prior: Option<Prior>, to: &str) {
        let m = Move { prior, to: phase_index(to) };
        let mut st = self.lock();
        match &mut st.stage {
            Stage::Idle => {}
            Stage::Scanning { hasher, seen, waiting } => {
                let h = hasher.hash_one(grant);
                match seen.get(&h) {
                    Some(v) if seen_by_scan(&m, *v) => {}
                    Some(_) => st.apply(&m),
                    None => waiting.entry(h).or_default().push(m),
                }
            }
            Stage::Complete | Stage::Failed => st.apply(&m),
        }
    }

    /// The initial scan starts (before it reads anything).
    pub(crate) fn begin(&self) {
        let mut st = self.lock();
        if matches!(st.stage, Stage::Idle) {
            st.stage = Stage::Scanning { hasher: RandomState::new(), seen: HashMap::new(), waiting: HashMap::new() };
        }
    }

    /// The initial scan read `s`.
    pub(crate) fn scanned(&self, s: &GrantState) {
        self.scanned_at(&s.grant, s.version, s.phase.name());
    }

    /// The initial scan read version `version` of `grant`, in phase `phase`.
    fn scanned_at(&self, grant: &GrantKey, version: u64, phase: &str) {
        let mut st = self.lock();
        let CensusState { counts, stage } = &mut *st;
        let Stage::Scanning { hasher, seen, waiting } = stage else { return };
        counts[phase_index(phase)] += 1;
        let h = hasher.hash_one(grant);
        seen.insert(h, version);
        for m in waiting.remove(&h).unwrap_or_default() {
            if !seen_by_scan(&m, version) {
                st.apply(&m);
            }
        }
    }

    /// The initial scan ended (`ok`: it read every grant).
    pub(crate) fn finish(&self, ok: bool) {
        let mut st = self.lock();
        if let Stage::Scanning { waiting, .. } = std::mem::replace(&mut st.stage, Stage::Complete) {
            // Moves of grants the scan never read (created after it passed them): not counted yet.
            for m in waiting.into_values().flatten() {
                st.apply(&m);
            }
        }
        if !ok {
            st.stage = Stage::Failed;
        }
    }

    /// The counts per phase (in [`PHASES`] order) and whether they cover every grant.
    fn snapshot(&self) -> ([i64; PHASES.len()], bool) {
        let st = self.lock();
        (st.counts, matches!(st.stage, Stage::Complete))
    }
}

/// The values read at scrape time: store counters, the census, health.
struct Scrape(Arc<Shared>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tokenwal::metrics::Scrape")
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let stats = s.store.stats();
        let (counts, complete) = s.census.snapshot();
        let at = |phase: &str| counts[phase_index(phase)];
        gauge(&mut e, "tokenwal_grants", "Grants in the store", s.store.grant_count() as i64)?;
        {
            let mut m = e.encode_descriptor(
                "tokenwal_grants_by_phase",
                "Grants per phase (complete once tokenwal_grant_census_complete is 1)",
                None,
                MetricType::Gauge,
            )?;
            for (phase, n) in PHASES.iter().zip(counts) {
                let labels: Labels1 = [("phase", phase)];
                ConstGauge::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "tokenwal_grants_needing_reauth",
            "Grants that need the merchant to open the app (token exchange) or a new install",
            at("needs-reauth"),
        )?;
        gauge(
            &mut e,
            "tokenwal_ambiguous_attempts_open",
            "Rotations whose outcome is unknown, being retried with the old token",
            at("ambiguous"),
        )?;
        gauge(
            &mut e,
            "tokenwal_grant_census_complete",
            "1 once the per-phase grant counts cover every grant",
            i64::from(complete),
        )?;
        gauge(
            &mut e,
            "tokenwal_store_up",
            "1 while the store accepts writes, 0 once it fail-stopped",
            i64::from(!s.store.is_poisoned()),
        )?;
        let paused = now().0 < s.paused_until.load(Ordering::SeqCst);
        gauge(
            &mut e,
            "tokenwal_app_credentials_paused",
            "1 while refreshing is paused because the token endpoint refused the app's credentials",
            i64::from(paused),
        )?;
        counter(&mut e, "tokenwal_journal_syncs", "Journal syncs (flush + fsync of one commit group)", stats.syncs)?;
        counter(
            &mut e,
            "tokenwal_journal_batches",
            "Transitions made durable (one grant's state and records each)",
            stats.batches_applied,
        )?;
        counter(
            &mut e,
            "tokenwal_journal_conflicts",
            "Writes refused by the version compare-and-swap (another writer won)",
            stats.conflicts,
        )?;
        let buckets: Vec<(f64, u64)> =
            SYNC_LATENCY_BOUNDS.iter().copied().chain([f64::INFINITY]).zip(stats.sync_latency).collect();
        let count = stats.sync_latency.iter().sum();
        let mut m = e.encode_descriptor(
            "tokenwal_journal_sync_duration",
            "Time of one commit group's flush and fsync",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        m.encode_histogram::<NoLabelSet>(stats.sync_time.as_secs_f64(), count, &buckets, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenwal_core::{GrantKey, ShopDomain};

    fn grant(n: u32) -> GrantKey {
        GrantKey::shopify(&ShopDomain::parse(&format!("shop-{n}.myshopify.com")).unwrap())
    }

    fn prior(version: u64, phase: &'static str) -> Option<Prior> {
        Some(Prior { version, phase })
    }

    fn counts(c: &Census) -> Vec<(&'static str, i64)> {
        let (n, _) = c.snapshot();
        PHASES.iter().copied().zip(n).filter(|(_, n)| *n != 0).collect()
    }

    #[test]
    fn moves_before_the_scan_are_left_to_it() {
        let c = Census::default();
        c.moved(&grant(1), None, "healthy");
        assert!(counts(&c).is_empty());
    }

    /// Each interleaving of one grant's moves with the scan's read of it counts the grant once, in its
    /// final phase.
    #[test]
    fn a_move_racing_the_scan_is_counted_once() {
        // The grant goes healthy(v1) → refreshing(v2) → healthy(v3). The scan reads version `seen`;
        // the moves' reports arrive `early` of them before the read, the rest after.
        for seen in 1..=3u64 {
            for early in 0..=2usize {
                let c = Census::default();
                let g = grant(1);
                c.begin();
                let moves = [(prior(1, "healthy"), "refreshing"), (prior(2, "refreshing"), "healthy")];
                for (p, to) in &moves[..early] {
                    c.moved(&g, *p, to);
                }
                let phase = if seen == 2 { "refreshing" } else { "healthy" };
                c.scanned_at(&g, seen, phase);
                for (p, to) in &moves[early..] {
                    c.moved(&g, *p, to);
                }
                c.finish(true);
                // Moves whose result the scan saw must not count; the final state is healthy(v3) …
                // unless a move's report arrived before the scan read an older version, which cannot
                // happen (a report follows its durable write): skip those impossible orders.
                let possible = moves[..early].iter().all(|(p, _)| p.unwrap().version < seen);
                if possible {
                    assert_eq!(counts(&c), vec![("healthy", 1)], "seen v{seen}, {early} reports early");
                }
            }
        }
    }

    #[test]
    fn grants_created_during_the_scan_and_after_it_are_counted() {
        let c = Census::default();
        c.begin();
        c.moved(&grant(1), None, "healthy"); // never read by the scan
        c.finish(true);
        c.moved(&grant(2), None, "healthy");
        c.moved(&grant(2), prior(1, "healthy"), "needs-reauth");
        assert_eq!(counts(&c), vec![("healthy", 1), ("needs-reauth", 1)]);
        assert!(c.snapshot().1);
    }

    #[test]
    fn a_failed_scan_is_not_complete() {
        let c = Census::default();
        c.begin();
        c.finish(false);
        assert!(!c.snapshot().1);
    }
}
