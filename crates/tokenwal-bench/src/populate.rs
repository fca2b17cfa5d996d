//! Filling stores through the real store API: every grant is a `Machine::install` made durable by
//! `Store::apply`, many writers at once so that group commit shares the syncs. Nothing bypasses the
//! store (no raw sled writes), so what is on disk is exactly what an app's installs would leave.

use crate::util::{kind, now, scale_key, scale_tokens, Kind, Table};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{GrantState, InstallSource, Machine, TokenSet, UnixMillis};
use tokenwal::store::{Store, StoreConfig};

/// How many tasks write at once while populating.
pub const WRITERS: usize = 512;

/// Installs grants `0..n` (`make(i)` gives each its key and tokens) with [`WRITERS`] concurrent
/// writers. Returns the states written, if `keep` (for the callers that go on writing).
pub async fn install_many(
    store: &Store,
    n: usize,
    keep: bool,
    make: Arc<dyn Fn(usize) -> (tokenwal::core::GrantKey, TokenSet) + Send + Sync>,
) -> Vec<GrantState> {
    let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
    let writers = WRITERS.min(n.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for w in 0..writers {
        let (store, machine, make, progress) =
            (store.clone(), Arc::clone(&machine), Arc::clone(&make), Arc::clone(&progress));
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in (w..n).step_by(writers) {
                let (key, tokens) = make(i);
                let done = machine
                    .install(None, key, tokens, InstallSource::Import, now())
                    .make_durable(&store)
                    .await
                    .expect("install is durable");
                if keep {
                    out.push((i, done.state().clone()));
                }
                let p = progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if p % 100_000 == 0 {
                    eprintln!("  populated {p}/{n} in {:.1?}", started.elapsed());
                }
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("writer task"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, s)| s).collect()
}

/// The large stores of the recovery, footprint and scheduler scenarios: grants `g0..g{n}`, each
/// installed once (one `Installed` journal record each), healthy, with access-token expiries
/// staggered over a day starting 6 hours after the build (so nothing is due while they are
/// measured) and refresh tokens valid for 90 days.
pub struct ScaleStore {
    /// The store directory.
    pub path: PathBuf,
}

/// A built scale store is reused for this long (its expiries start 6 hours after the build).
const REUSE_FOR: Duration = Duration::from_secs(4 * 3600);

/// Builds (or reuses, if built less than 4 hours ago) the scale store of `n` grants under `dir`
/// (`grants-{n}`, or `customer-grants-{n}` with `--grants customer-account`).
pub async fn scale_store(dir: &Path, n: usize) -> ScaleStore {
    let name = match kind() {
        Kind::Admin => format!("grants-{n}"),
        Kind::Customer => format!("customer-grants-{n}"),
    };
    let path = dir.join(&name);
    let marker = dir.join(format!("{name}.ready"));
    if let Some(at) = std::fs::read_to_string(&marker).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
        if now().0.saturating_sub(at) < REUSE_FOR.as_millis() as u64 && path.is_dir() {
            eprintln!("reusing {} (built {} s ago)", path.display(), (now().0 - at) / 1000);
            return ScaleStore { path };
        }
    }
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(dir).expect("work directory");
    eprintln!("building {} ({n} grants)", path.display());
    let built_at = now();
    let (store, _) =
        Store::open(&path, &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default()).expect("open a new store");
    let day = 86_400_000u64;
    let make = Arc::new(move |i: usize| {
        let access = UnixMillis(built_at.0 + 6 * 3_600_000 + (i as u64 * day) / n.max(1) as u64);
        (scale_key(i), scale_tokens(i as u64, access, UnixMillis(built_at.0 + 90 * day)))
    });
    let started = Instant::now();
    install_many(&store, n, false, make).await;
    let wall = started.elapsed();
    let stats = store.stats();
    assert_eq!(store.grant_count(), n);
    drop(store);
    {
        let t = Table::new(
            &format!(
                "Building the {n}-grant store of {} grants (through Store::apply, {WRITERS} concurrent installers)",
                kind().name()
            ),
            &["grants", "wall", "installs/s", "syncs", "syncs/install"],
        );
        t.row(&[
            format!("{n}"),
            crate::util::fmt_dur(wall),
            format!("{:.0}", n as f64 / wall.as_secs_f64()),
            format!("{}", stats.syncs),
            format!("{:.4}", stats.syncs_per_batch()),
        ]);
    }
    std::fs::write(&marker, format!("{}", built_at.0)).expect("marker");
    ScaleStore { path }
}
