//! Apply throughput with 1 and 64 concurrent writers, sled vs memory, and syncs per batch.
//!
//! Each writer owns one grant and alternates a refresh intent (`plan_attempt`) with a superseding
//! install, so every batch passes its compare-and-swap. The time reported is per batch; the syncs
//! per batch (group commit at work) are printed to stderr after each benchmark.
//!
//! `cargo bench -p tokenwal-store --bench apply` (`-- seal` for the sealing cost alone)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal_core::*;
use tokenwal_store::{Store, StoreConfig};

const T0: u64 = 1_800_000_000_000;

fn key(i: usize) -> GrantKey {
    GrantKey::shopify(&ShopDomain::parse(&format!("bench-{i}.myshopify.com")).unwrap())
}

fn tokens(now: u64) -> TokenSet {
    TokenSet {
        access_token: AccessToken::new(format!("shpat_{now}")),
        access_expires_at: UnixMillis(now + 3_600_000),
        refresh_token: RefreshToken::new(format!("shprt_{now}")),
        refresh_expires_at: None,
        scope: Some("read_orders".into()),
    }
}

/// The next `n` batches of one grant, advancing `s`.
fn chain(m: &Machine, s: &mut GrantState, n: u64) -> Vec<WriteBatch> {
    (0..n)
        .map(|_| {
            let now = UnixMillis(s.updated_at.0 + 1);
            let b = if s.phase.is_open() {
                m.install(Some(s), s.grant.clone(), tokens(now.0), InstallSource::Import, now)
                    .transition()
                    .write_batch()
            } else {
                m.plan_attempt(s, now).unwrap().transition().write_batch()
            }
            .unwrap();
            *s = codec::decode_state(&b.state).unwrap();
            b
        })
        .collect()
}

fn apply(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("apply");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for backend in ["memory", "sled"] {
        for writers in [1usize, 64] {
            let dir = tempfile::tempdir().unwrap();
            let store = match backend {
                "sled" => {
                    Store::open(
                        dir.path().join("store"),
                        &tokenwal_store::KeyRing::insecure_test_ring(),
                        StoreConfig::default(),
                    )
                    .unwrap()
                    .0
                }
                _ => Store::in_memory(),
            };
            let m = Machine::shopify(store.fingerprint_key());
            let mut states: Vec<GrantState> = (0..writers)
                .map(|i| {
                    let b = m
                        .install(None, key(i), tokens(T0), InstallSource::Import, UnixMillis(T0))
                        .transition()
                        .write_batch()
                        .unwrap();
                    let s = codec::decode_state(&b.state).unwrap();
                    store.apply_blocking(b).unwrap();
                    s
                })
                .collect();
            let before = store.stats();
            group.bench_function(BenchmarkId::new(backend, writers), |b| {
                b.iter_custom(|iters| {
                    let per_writer = iters.div_ceil(writers as u64).max(1);
                    let chains: Vec<_> = states.iter_mut().map(|s| chain(&m, s, per_writer)).collect();
                    let store = Arc::new(store.clone());
                    let start = Instant::now();
                    rt.block_on(async {
                        let tasks: Vec<_> = chains
                            .into_iter()
                            .map(|batches| {
                                let store = Arc::clone(&store);
                                tokio::spawn(async move {
                                    for b in batches {
                                        store.apply(b).await.unwrap();
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                    let done = per_writer * writers as u64;
                    start.elapsed().mul_f64(iters as f64 / done as f64)
                })
            });
            let after = store.stats();
            let (syncs, batches) = (after.syncs - before.syncs, after.batches_applied - before.batches_applied);
            eprintln!(
                "apply/{backend}/{writers}: {batches} batches, {syncs} syncs, {:.3} syncs per batch; \
                 committer time per sync: {:?} writing, {:?} syncing",
                syncs as f64 / batches.max(1) as f64,
                (after.write_time - before.write_time) / syncs.max(1) as u32,
                (after.sync_time - before.sync_time) / syncs.max(1) as u32,
            );
        }
    }
    group.finish();
}

/// The cost sealing adds per state write: one seal (on the writer's thread) and one open (the
/// committer authenticates the stored state before its compare-and-swap), for a typical state frame.
fn seal(c: &mut Criterion) {
    let keys = tokenwal_store::KeyRing::ephemeral();
    let m = Machine::shopify(FingerprintKey::from_bytes([1; 32]));
    let b =
        m.install(None, key(0), tokens(T0), InstallSource::Import, UnixMillis(T0)).transition().write_batch().unwrap();
    let sealed = tokenwal_store::seal_state_frame(&keys, &key(0), 1, &b.state);
    eprintln!("seal: state frame {} bytes, sealed {} bytes", b.state.len(), sealed.len());
    let mut group = c.benchmark_group("seal");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group.bench_function("seal", |bn| bn.iter(|| tokenwal_store::seal_state_frame(&keys, &key(0), 1, &b.state)));
    group.bench_function("open", |bn| bn.iter(|| tokenwal_store::open_state_frame(&keys, &key(0), &sealed).unwrap()));
    group.bench_function("seal+open", |bn| {
        bn.iter(|| {
            let s = tokenwal_store::seal_state_frame(&keys, &key(0), 1, &b.state);
            tokenwal_store::open_state_frame(&keys, &key(0), &s).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, apply, seal);
criterion_main!(benches);
