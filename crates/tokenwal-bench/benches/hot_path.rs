//! Scenario 1, the hot path: `Engine::access_token` for a cached, valid token, against a plain
//! `Mutex<HashMap>` lookup in the same run, over 100k shops (`TOKENWAL_BENCH_SHOPS` overrides),
//! single-threaded and with 2 threads.
//!
//! The shops are visited in a fixed pseudo-random order (not one hot key). `access_token`'s future
//! is polled once with a no-op waker: a cached token completes on the first poll without touching the
//! runtime, so what is measured is the engine's own work, not an executor's.
//!
//! With 2 threads, each thread makes every iteration's call once (different shops), so the time per
//! iteration is the latency each thread sees; the throughput line counts both threads' calls.
//!
//! `cargo bench -p tokenwal-bench --bench hot_path`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokenwal::core::{AccessToken, ClientSecret, RefreshToken, ShopDomain, TokenSet, UnixMillis};
use tokenwal::{Config, Engine, StoreLocation};

fn shops() -> usize {
    std::env::var("TOKENWAL_BENCH_SHOPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
}

/// Polls a future that must be ready at once.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a cached access_token must not wait"),
    }
}

/// A fixed visiting order: a stride coprime with `n` walks every shop once per cycle, far apart.
fn order(n: usize) -> Vec<usize> {
    let mut stride = (n as f64 * 0.618_033_988_7) as usize | 1;
    while gcd(stride, n) != 1 {
        stride += 2;
    }
    (0..n).map(|i| (i * stride) % n).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

struct Fixture {
    engine: Engine,
    shops: Vec<ShopDomain>,
    order: Vec<usize>,
    map: Mutex<HashMap<String, String>>,
    map_exp: Mutex<HashMap<String, (String, u64)>>,
    unlocked: HashMap<String, String>,
    _rt: tokio::runtime::Runtime,
}

fn fixture(n: usize) -> Arc<Fixture> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let shops: Vec<ShopDomain> =
        (0..n).map(|i| ShopDomain::parse(&format!("hot-{i}.myshopify.com")).unwrap()).collect();
    let now = UnixMillis::from_system_time(SystemTime::now());
    let day = Duration::from_secs(86_400);
    let token = |i: usize| format!("shpat_{i:032x}");
    let engine = rt.block_on(async {
        let mut config = Config::shopify(StoreLocation::InMemory, "bench", ClientSecret::new("bench-secret"))
            .with_insecure_test_endpoint(url::Url::parse("http://127.0.0.1:9/").unwrap());
        config.proactive = false;
        let (engine, _) = Engine::open(config).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        let workers = 256;
        for w in 0..workers {
            let (engine, shops) = (engine.clone(), shops.clone());
            tasks.spawn(async move {
                for i in (w..shops.len()).step_by(workers) {
                    let tokens = TokenSet {
                        access_token: AccessToken::new(token(i)),
                        access_expires_at: now.saturating_add(day),
                        refresh_token: RefreshToken::new(format!("shprt_{i:032x}")),
                        refresh_expires_at: Some(now.saturating_add(90 * day)),
                        scope: Some("read_orders".into()),
                    };
                    engine.install(&shops[i], tokens).await.unwrap();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        engine
    });
    // Every shop must be served from the cache, with the installed token.
    for (i, s) in shops.iter().enumerate() {
        assert_eq!(ready(engine.access_token(s)).unwrap().expose_secret(), token(i));
    }
    let map = Mutex::new(shops.iter().enumerate().map(|(i, s)| (s.as_str().to_owned(), token(i))).collect());
    let exp = now.saturating_add(day).0;
    let map_exp = Mutex::new(shops.iter().enumerate().map(|(i, s)| (s.as_str().to_owned(), (token(i), exp))).collect());
    let unlocked = shops.iter().enumerate().map(|(i, s)| (s.as_str().to_owned(), token(i))).collect();
    Arc::new(Fixture { engine, order: order(n), shops, map, map_exp, unlocked, _rt: rt })
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The lookups compared. `UnlockedMap` (a read-only map, no lock at all) is not a cache anyone could
/// use; it shows how far this machine's memory system lets a lookup scale across 2 threads.
#[derive(Clone, Copy)]
enum Kind {
    Engine,
    MutexMap,
    MutexMapWithExpiry,
    UnlockedMap,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Engine => "engine_access_token",
            Kind::MutexMap => "mutex_hashmap",
            Kind::MutexMapWithExpiry => "mutex_hashmap_with_expiry_check",
            Kind::UnlockedMap => "unlocked_readonly_hashmap",
        }
    }
}

#[inline(never)]
fn call(f: &Fixture, kind: Kind, i: usize) -> usize {
    let s = &f.shops[f.order[i % f.order.len()]];
    match kind {
        Kind::Engine => ready(f.engine.access_token(black_box(s))).unwrap().expose_secret().len(),
        Kind::MutexMap => f.map.lock().unwrap().get(black_box(s.as_str())).cloned().unwrap().len(),
        Kind::UnlockedMap => f.unlocked.get(black_box(s.as_str())).cloned().unwrap().len(),
        Kind::MutexMapWithExpiry => {
            let now = unix_ms();
            let g = f.map_exp.lock().unwrap();
            let (t, exp) = g.get(black_box(s.as_str())).unwrap();
            assert!(now < *exp);
            t.clone().len()
        }
    }
}

fn hot_path(c: &mut Criterion) {
    let n = shops();
    let f = fixture(n);
    let mut group = c.benchmark_group(format!("hot_path_{n}_shops"));
    group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    let kinds = [Kind::Engine, Kind::MutexMap, Kind::MutexMapWithExpiry, Kind::UnlockedMap];
    group.throughput(Throughput::Elements(1));
    for kind in kinds {
        let mut i = 0usize;
        group.bench_function(BenchmarkId::new(kind.name(), "1_thread"), |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                call(&f, kind, i)
            })
        });
    }
    group.throughput(Throughput::Elements(2));
    for kind in kinds {
        group.bench_function(BenchmarkId::new(kind.name(), "2_threads"), |b| {
            b.iter_custom(|iters| {
                let barrier = std::sync::Barrier::new(2);
                let start = std::thread::scope(|scope| {
                    let hs: Vec<_> = (0..2usize)
                        .map(|t| {
                            let (f, barrier) = (&f, &barrier);
                            scope.spawn(move || {
                                barrier.wait();
                                let start = Instant::now();
                                // The two threads walk different halves of the order.
                                let offset = t * (f.order.len() / 2);
                                for k in 0..iters as usize {
                                    black_box(call(f, kind, offset + k));
                                }
                                (start, Instant::now())
                            })
                        })
                        .collect();
                    let times: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
                    let first = times.iter().map(|t| t.0).min().unwrap();
                    let last = times.iter().map(|t| t.1).max().unwrap();
                    last - first
                });
                start
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
