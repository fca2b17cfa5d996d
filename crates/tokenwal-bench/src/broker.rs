//! Scenario 10, broker (issue 14.6): the token call of `tokenwal serve` over its Unix socket, at 64
//! concurrent keep-alive clients, beside the in-process `Engine::access_token` at the same concurrency.
//!
//! The broker is the real release binary (`target/release/tokenwal`, next to this bench's own binary:
//! build both with `cargo build --release --workspace --bins`) on a fresh disk store against the
//! in-process simulator; one shop is installed with an hour of life, so every call is a cached
//! answer (no I/O, no refresh: the simulator's request counter is checked at the end). Each client
//! is one HTTP/1.1 keep-alive connection that writes the call and reads the answer by its
//! `content-length` (as `wrk` does: the set-up calls use hyper). Closed loop: each client sends its
//! next request as soon as the previous answer is read. Open loop (`--rate`): a pacer thread on the
//! OS timer releases the requests on a schedule, uniform or Poisson (`--arrivals`). Every request's
//! latency is recorded. The clients and the broker share the machine's cores: on a 2-core box the
//! client side takes a good part of the CPU, which the figures include.

use crate::util::{fmt_dur, percentile, sig3, Table};
use crate::Opts;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::ClientSecret;
use tokenwal::{Config, Engine, StoreLocation};
use tokenwal_sim::{serve, SimConfig};

const BEARER: &str = "bench-broker-token-0123456789abcdef";
/// The Authorization header, built once (the client's per-request work is part of the measurement).
const AUTHORIZATION: &str = "Bearer bench-broker-token-0123456789abcdef";
const SHOP: &str = "bench-broker.myshopify.com";
const CLIENTS: usize = 64;

/// The `tokenwal` binary beside this one.
fn tokenwal_bin() -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    let bin = me.parent().expect("bin dir").join("tokenwal");
    if !bin.exists() {
        eprintln!("broker: {} not found: build it first (cargo build --release --workspace --bins)", bin.display());
        std::process::exit(2);
    }
    bin
}

/// A process's user CPU time from `/proc/PID/stat` (10 ms ticks). The broker's own work (parsing,
/// routing, the answer) is user time; the socket reads, writes and wake-ups are system time, which
/// grows when the machine is busy (fewer requests per wake-up), so the split shows which one a change
/// moved.
fn user_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at "state" (field 3); utime
    // is field 14.
    let utime = stat.rsplit_once(')')?.1.split_whitespace().nth(11)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(utime * 10))
}

/// One keep-alive connection's sender.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(sock: &Path) -> Sender {
    let stream = tokio::net::UnixStream::connect(sock).await.expect("connect to the broker");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn send(sender: &mut Sender, method: &str, path: &str, body: Option<String>) -> (u16, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("authorization", AUTHORIZATION)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    sender.ready().await.expect("connection ready");
    let res = sender.send_request(req).await.expect("answer");
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

/// The measured clients' connection: the token call's request written as fixed bytes and the answer
/// read by its `content-length` on one task, as a load generator such as `wrk` does, so that the
/// client's own CPU (which shares the two cores with the broker) stays small. hyper's client costs
/// about twice as much per call (a connection task beside the caller's, the request built each time).
struct RawClient {
    stream: tokio::net::UnixStream,
    /// The token call, with the headers the hyper client sends.
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(sock: &Path) -> RawClient {
        let stream = tokio::net::UnixStream::connect(sock).await.expect("connect to the broker");
        let request =
            format!("GET /v1/shops/{SHOP}/token HTTP/1.1\r\nhost: localhost\r\nauthorization: {AUTHORIZATION}\r\n\r\n");
        RawClient { stream, request: request.into_bytes(), buf: Vec::with_capacity(4096) }
    }

    /// Sends the token call and reads its answer: the status and the body.
    async fn token_call(&mut self) -> (u16, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(&self.request).await.expect("write the request");
        self.buf.clear();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).expect("an HTTP head in ASCII");
                let status = head.get(9..12).and_then(|s| s.parse().ok()).expect("a status line");
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                    })
                    .expect("the broker answers with a content-length");
                let body_at = end + 4;
                while self.buf.len() < body_at + len {
                    self.read_more().await;
                }
                assert_eq!(self.buf.len(), body_at + len, "no answer was asked for beyond this one");
                return (status, self.buf[body_at..].to_vec());
            }
            self.read_more().await;
        }
    }

    async fn read_more(&mut self) {
        use tokio::io::AsyncReadExt;
        let n = self.stream.read_buf(&mut self.buf).await.expect("read the answer");
        assert!(n > 0, "the broker closed the connection");
    }
}

/// Runs `clients` tasks made by `make`; each returns the latencies it measured inside the
/// measurement window of length `run`. Returns requests/s over that window and the sorted latencies.
async fn drive<F, Fut>(clients: usize, run: Duration, mut make: F) -> (f64, Vec<Duration>)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Vec<Duration>> + Send + 'static,
{
    let tasks: Vec<_> = (0..clients).map(|i| tokio::spawn(make(i))).collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let rate = all.len() as f64 / run.as_secs_f64();
    let busy: Duration = all.iter().sum();
    eprintln!(
        "broker: {} requests, mean latency {:?}, clients busy {:.0}% of the window",
        all.len(),
        busy / all.len().max(1) as u32,
        100.0 * busy.as_secs_f64() / (clients as f64 * run.as_secs_f64())
    );
    all.sort();
    (rate, all)
}

/// The open loop's pacer: releases request k (its scheduled time and the time it was released) to
/// client k mod clients, until `deadline`; dropping the senders ends the clients. The requests are
/// spaced 1/rate apart (uniform), or with exponentially distributed gaps of mean 1/rate (Poisson: the
/// arrivals of many independent callers, bunched now and then as real traffic is).
fn pace(
    clients: Vec<tokio::sync::mpsc::UnboundedSender<(Instant, Instant)>>,
    rate: f64,
    poisson: bool,
    deadline: Instant,
) {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut slot = Instant::now();
    let mut k: usize = 0;
    while slot < deadline {
        let now = Instant::now();
        if slot > now {
            std::thread::sleep(slot - now);
            continue;
        }
        let _ = clients[k % clients.len()].send((slot, now));
        k += 1;
        let gap = if poisson { -(1.0 - rng.gen::<f64>()).ln() / rate } else { 1.0 / rate };
        slot += Duration::from_secs_f64(gap);
    }
}

/// Runs the scenario.
pub async fn run(opts: &Opts) {
    let (warmup, run) = if opts.quick {
        (Duration::from_millis(200), Duration::from_secs(1))
    } else {
        (Duration::from_secs(1), Duration::from_secs(10))
    };
    let sim = serve(SimConfig::default(), "127.0.0.1:0".parse().expect("addr")).await.expect("simulator");
    let base = sim.base_url();
    let dir = opts.dir.join(format!("broker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    let sock = dir.join("broker.sock");
    let key = tokenwal_store::StoreKey::insecure_test_key().to_base64().to_string();
    let mut child = Command::new(tokenwal_bin())
        .arg("--db")
        .arg(dir.join("store"))
        .args(["serve", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .args(opts.broker_workers.map(|w| format!("--workers={w}")))
        .env_remove("RUST_LOG")
        .env("TOKENWAL_STORE_KEY", key)
        .env("TOKENWAL_CLIENT_ID", "sim-client-id")
        .env("TOKENWAL_CLIENT_SECRET", "sim-client-secret")
        .env("TOKENWAL_INSECURE_TEST_ENDPOINT", &base)
        .env("TOKENWAL_BROKER_TOKEN", BEARER)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokenwal serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("listening on ") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("the broker did not start");
    let mut admin = connect(&sock).await;
    loop {
        if send(&mut admin, "GET", "/readyz", None).await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seeded = sim.seed_shop(SHOP);
    let grant = format!(
        r#"{{"access_token":"{}","refresh_token":"{}","expires_in":3600,"scope":"{}"}}"#,
        seeded.access_token.as_str(),
        seeded.refresh_token.as_str(),
        seeded.scope
    );
    let (status, body) = send(&mut admin, "PUT", &format!("/v1/shops/{SHOP}/grant"), Some(grant)).await;
    assert_eq!(status, 200, "install: {}", String::from_utf8_lossy(&body));

    // The broker over the Unix socket, at each concurrency (default: 64 only).
    let concurrencies = opts.concurrency.clone().unwrap_or_else(|| vec![CLIENTS]);
    let sock = Arc::new(sock);
    let mut broker_rows = Vec::new();
    // Closed loop at each concurrency (every client sends its next request when the answer is read),
    // then, with --rate, open loop: the clients together send `rate` requests/s on a fixed schedule
    // and each latency counts from the request's scheduled time (so a stall is not hidden by the
    // client waiting for it: no coordinated omission).
    let mut runs: Vec<(usize, Option<f64>)> = concurrencies.iter().map(|c| (*c, None)).collect();
    if let Some(r) = opts.rate {
        runs.extend(concurrencies.iter().map(|c| (*c, Some(r))));
    }
    for (clients, offered) in runs {
        eprintln!("broker: {clients} clients for {run:?} over {}", sock.display());
        let deadline = Instant::now() + warmup + run;
        let measure_from = Instant::now() + warmup;
        // The broker's CPU over the measurement window: per request, it does not depend on how busy
        // the machine is.
        let pid = child.id();
        let cpu_probe = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let before = crate::util::process_cpu_time(pid).zip(user_cpu_time(pid));
            let me = crate::util::try_cpu_time();
            let machine_before = crate::util::machine_cpu();
            tokio::time::sleep_until(deadline.into()).await;
            let machine = machine_before.zip(crate::util::machine_cpu()).map(|(b, a)| a.since(&b));
            let after = crate::util::process_cpu_time(pid).zip(user_cpu_time(pid));
            // (total, user)
            let broker = before.zip(after).map(|((bt, bu), (at, au))| (at.saturating_sub(bt), au.saturating_sub(bu)));
            let client = me.zip(crate::util::try_cpu_time()).map(|(b, a)| a.saturating_sub(b));
            (broker, client, machine)
        });
        // Open loop: one pacer thread releases request k to client k mod clients at its slot; it
        // sleeps on the OS timer (tens of µs of slack), not on tokio's 1 ms timer tick, so the
        // arrivals are spread as the schedule says instead of bunched on each tick.
        let poisson = opts.poisson;
        let mut schedules: Vec<_> = match offered {
            Some(r) => {
                let (txs, rxs): (Vec<_>, Vec<_>) = (0..clients).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
                std::thread::Builder::new()
                    .name("bench-pacer".into())
                    .spawn(move || pace(txs, r, poisson, deadline))
                    .expect("pacer thread");
                rxs.into_iter().map(Some).collect()
            }
            None => (0..clients).map(|_| None).collect(),
        };
        // Open loop, strictly: every latency counted from its request's scheduled slot, the pacer's
        // own lateness (a thread on the same two cores) included.
        let strict = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (rate, lat) = drive(clients, run, |i| {
            let sock = Arc::clone(&sock);
            let mut schedule = schedules[i].take();
            let strict = Arc::clone(&strict);
            async move {
                let mut s = RawClient::connect(&sock).await;
                let mut out = Vec::with_capacity(100_000);
                let mut from_slot = Vec::new();
                let mut prev_done = Instant::now();
                loop {
                    let (t, slot) = match schedule.as_mut() {
                        Some(rx) => match rx.recv().await {
                            // Late because the previous answer came after this request's slot: the
                            // wait is the server's, counted from the slot. Otherwise from the moment
                            // the pacer released it (the pacer's own lateness is not the broker's).
                            Some((slot, _)) if prev_done > slot => (slot, Some(slot)),
                            Some((slot, released)) => (released, Some(slot)),
                            None => break,
                        },
                        None if Instant::now() < deadline => (Instant::now(), None),
                        None => break,
                    };
                    let (status, body) = s.token_call().await;
                    assert!(status == 200 && !body.is_empty(), "token call answered {status}");
                    prev_done = Instant::now();
                    if t >= measure_from {
                        out.push(prev_done - t);
                        from_slot.extend(slot.map(|slot| prev_done - slot));
                    }
                }
                strict.lock().expect("strict latencies").extend(from_slot);
                out
            }
        })
        .await;
        let cpu = cpu_probe.await.expect("cpu probe");
        let mut strict = std::mem::take(&mut *strict.lock().expect("strict latencies"));
        strict.sort();
        broker_rows.push((clients, offered, rate, lat, strict, cpu));
    }
    let refreshes = sim.counters().shop(SHOP).token_requests;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();

    // The same call in process, on an engine configured alike (in-memory store: the cached path
    // touches no store either way).
    let mut c = Config::shopify(StoreLocation::InMemory, "sim-client-id", ClientSecret::new("sim-client-secret"))
        .with_insecure_test_endpoint(url::Url::parse(&base).expect("url"))
        .with_store_keys(tokenwal::KeySource::Ring(tokenwal::KeyRing::insecure_test_ring()));
    c.proactive = false;
    let (engine, _) = Engine::open(c).await.expect("engine");
    let shop = tokenwal::core::ShopDomain::parse(SHOP).expect("shop");
    let t = sim.seed_shop(SHOP);
    let tokens = tokenwal::core::TokenSet {
        access_token: tokenwal::core::AccessToken::new(t.access_token.as_str()),
        access_expires_at: crate::util::now().saturating_add(Duration::from_secs(3600)),
        refresh_token: tokenwal::core::RefreshToken::new(t.refresh_token.as_str()),
        refresh_expires_at: None,
        scope: Some(t.scope.clone()),
    };
    engine.install(&shop, tokens).await.expect("install");
    let mut engine_rows = Vec::new();
    for &clients in &concurrencies {
        let deadline = Instant::now() + warmup + run;
        let measure_from = Instant::now() + warmup;
        let (rate, lat) = drive(clients, run, |_| {
            let (engine, shop) = (engine.clone(), shop.clone());
            async move {
                let mut out = Vec::with_capacity(1_000_000);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let token = engine.access_token(&shop).await.expect("token");
                    std::hint::black_box(token);
                    if t >= measure_from {
                        out.push(t.elapsed());
                    }
                    // Yield as a socket round trip would, so that every caller interleaves.
                    tokio::task::yield_now().await;
                }
                out
            }
        })
        .await;
        engine_rows.push((clients, rate, lat));
    }

    let table = Table::new(
        "Broker: the cached token call over the Unix socket, beside the in-process access_token",
        &[
            "path",
            "clients",
            "requests/s",
            "p50",
            "p99",
            "max",
            "p99 from the slot",
            "requests",
            "broker CPU per request",
            "of which user",
            "of which system",
            "client CPU per request",
            "VM steal",
            "machine busy",
        ],
    );
    for (clients, offered, rate, lat, strict, cpu) in &broker_rows {
        table.row(&[
            match offered {
                None => "tokenwal serve, GET /v1/shops/{shop}/token, HTTP/1.1 keep-alive, closed loop".into(),
                Some(r) => format!(
                    "tokenwal serve, same call, open loop at {} requests/s offered ({} arrivals)",
                    sig3(*r),
                    if opts.poisson { "Poisson" } else { "uniform" }
                ),
            },
            clients.to_string(),
            sig3(*rate),
            fmt_dur(percentile(lat, 50.0)),
            fmt_dur(percentile(lat, 99.0)),
            fmt_dur(lat.last().copied().unwrap_or_default()),
            if strict.is_empty() { "-".into() } else { fmt_dur(percentile(strict, 99.0)) },
            lat.len().to_string(),
            cpu.0.map_or("-".into(), |(t, _)| fmt_dur(t / lat.len().max(1) as u32)),
            cpu.0.map_or("-".into(), |(_, u)| fmt_dur(u / lat.len().max(1) as u32)),
            cpu.0.map_or("-".into(), |(t, u)| fmt_dur(t.saturating_sub(u) / lat.len().max(1) as u32)),
            cpu.1.map_or("-".into(), |c| fmt_dur(c / lat.len().max(1) as u32)),
            cpu.2.map_or("-".into(), |m| format!("{:.1} %", m.steal_share() * 100.0)),
            cpu.2.map_or("-".into(), |m| format!("{:.0} %", m.busy_share() * 100.0)),
        ]);
    }
    for (clients, rate, lat) in &engine_rows {
        table.row(&[
            "in process, Engine::access_token".into(),
            clients.to_string(),
            sig3(*rate),
            fmt_dur(percentile(lat, 50.0)),
            fmt_dur(percentile(lat, 99.0)),
            fmt_dur(lat.last().copied().unwrap_or_default()),
            "-".into(),
            lat.len().to_string(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    eprintln!("broker: token requests at the simulator during the runs: {refreshes} (cached answers only)");
    assert_eq!(refreshes, 0, "the cached token call refreshed");
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
