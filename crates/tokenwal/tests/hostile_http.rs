//! The engine against hostile token endpoints over real loopback sockets: hand-written raw TCP
//! servers answer with redirects, lying lengths, endless bodies and junk (docs/hostile-input.md).
//!
//! For each: `access_token` never hands out anything from the answer, the grant's durable state keeps
//! the old, complete token set (no half set is ever stored), the outcome is classified with the
//! expected reason, and the run ends well within the request timeout (the body cap is enforced
//! while streaming) — or, for a peer that trickles or goes silent, at the timeout: connect for a
//! handshake that never completes, total for everything after it (the body included).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{AccessToken, AmbiguityReason, ClientSecret, GrantKey, Phase, RefreshToken, ShopDomain, TokenSet};
use tokenwal::{Config, Engine, Error, StoreLocation};
use tokenwal_testkit::now;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OLD_ACCESS: &str = "shpat_OLD_ACCESS_TOKEN";
const OLD_REFRESH: &str = "shprt_OLD_REFRESH_TOKEN";
const NEW_PAIR: &str =
    r#"{"access_token":"shpat_NEW_FROM_HOSTILE","refresh_token":"shprt_NEW_FROM_HOSTILE","expires_in":3600}"#;

fn shop() -> ShopDomain {
    ShopDomain::parse("hostile.myshopify.com").unwrap()
}

/// What a server does once it has read a request.
#[derive(Clone)]
enum Answer {
    /// Write these bytes and close.
    Canned(Vec<u8>),
    /// Write these header bytes, then body bytes forever (until the client goes away).
    Endless { head: Vec<u8>, chunked: bool },
    /// Slowloris: write `head`, then `drip` every [`DRIP_EVERY`], forever (until the client goes away).
    Trickle { head: Vec<u8>, drip: Vec<u8> },
    /// Write these bytes (possibly nothing), then keep the connection open without another byte and
    /// without closing it, until the client goes away.
    HeldOpen(Vec<u8>),
}

/// How often a trickling server writes its next piece.
const DRIP_EVERY: Duration = Duration::from_millis(250);

struct Server {
    port: u16,
    connections: Arc<AtomicUsize>,
    bytes_written: Arc<AtomicU64>,
    /// Connections the client closed (seen by a [`Answer::Trickle`] or [`Answer::HeldOpen`] server).
    hung_up: Arc<AtomicUsize>,
}

async fn read_request(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = s.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return;
        }
    }
}

async fn serve(answer: Answer) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let bytes_written = Arc::new(AtomicU64::new(0));
    let hung_up = Arc::new(AtomicUsize::new(0));
    let (c, w, h) = (Arc::clone(&connections), Arc::clone(&bytes_written), Arc::clone(&hung_up));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            let w = Arc::clone(&w);
            let h = Arc::clone(&h);
            tokio::spawn(async move {
                read_request(&mut s).await;
                match answer {
                    Answer::Canned(bytes) => {
                        let _ = s.write_all(&bytes).await;
                        let _ = s.shutdown().await;
                    }
                    Answer::Endless { head, chunked } => {
                        if s.write_all(&head).await.is_err() {
                            return;
                        }
                        let piece = vec![b'A'; 8192];
                        let mut first = true;
                        loop {
                            let body: &[u8] = if first {
                                // A token response that never ends: `{"access_token":"AAAA…`.
                                b"{\"access_token\":\""
                            } else {
                                &piece
                            };
                            let out = if chunked {
                                [format!("{:x}\r\n", body.len()).as_bytes(), body, b"\r\n"].concat()
                            } else {
                                body.to_vec()
                            };
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                            w.fetch_add(out.len() as u64, Ordering::SeqCst);
                            first = false;
                        }
                    }
                    Answer::Trickle { head, drip } => {
                        if s.write_all(&head).await.is_ok() {
                            loop {
                                tokio::time::sleep(DRIP_EVERY).await;
                                if s.write_all(&drip).await.is_err() || s.flush().await.is_err() {
                                    break;
                                }
                                w.fetch_add(drip.len() as u64, Ordering::SeqCst);
                            }
                        }
                        h.fetch_add(1, Ordering::SeqCst);
                    }
                    Answer::HeldOpen(bytes) => {
                        if s.write_all(&bytes).await.is_ok() {
                            // Never close: wait for the client to hang up (read returns 0 or fails).
                            let mut sink = [0u8; 1024];
                            while let Ok(n) = s.read(&mut sink).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        }
                        h.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    Server { port, connections, bytes_written, hung_up }
}

/// An engine (in memory) on `port` with one installed shop whose access token has expired.
async fn engine(port: u16) -> Engine {
    engine_with_total_timeout(port, Duration::from_secs(20)).await
}

/// [`engine`] with the whole-request timeout `total`.
async fn engine_with_total_timeout(port: u16, total: Duration) -> Engine {
    let base = url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    let mut c = Config::shopify(StoreLocation::InMemory, "hostile-client-id", ClientSecret::new("hostile-secret"))
        .with_insecure_test_endpoint(base);
    c.proactive = false;
    c.max_wait = Duration::ZERO;
    c.timeouts.connect = Duration::from_secs(2);
    c.timeouts.total = total;
    let (engine, _) = Engine::open(c).await.unwrap();
    let tokens = TokenSet {
        access_token: AccessToken::new(OLD_ACCESS),
        access_expires_at: now(),
        refresh_token: RefreshToken::new(OLD_REFRESH),
        refresh_expires_at: None,
        scope: None,
    };
    engine.install(&shop(), tokens).await.unwrap();
    engine
}

/// Runs one refresh against `answer` and returns the error, the ambiguity reason and the server.
async fn run(answer: Answer) -> (Error, AmbiguityReason, Server, Duration) {
    run_with_total_timeout(answer, Duration::from_secs(20)).await
}

/// [`run`] with the whole-request timeout `total`. The refresh must end within `total` plus
/// [`MARGIN`]; this test's own deadline turns a refresh that never ends into a failure, not a hang.
async fn run_with_total_timeout(answer: Answer, total: Duration) -> (Error, AmbiguityReason, Server, Duration) {
    let server = serve(answer).await;
    let engine = engine_with_total_timeout(server.port, total).await;
    let started = Instant::now();
    let err = tokio::time::timeout(total + MARGIN, engine.access_token(&shop()))
        .await
        .unwrap_or_else(|_| panic!("the refresh did not end within the {total:?} timeout plus {MARGIN:?}"))
        .expect_err("nothing from a hostile answer is handed out");
    let elapsed = started.elapsed();
    let state = engine.state(&GrantKey::shopify(&shop())).unwrap().unwrap();
    // The durable state still holds the old, complete set: nothing of the answer was stored.
    let tokens = state.tokens.as_ref().expect("tokens kept");
    assert_eq!(tokens.access_token.expose_secret(), OLD_ACCESS);
    assert_eq!(tokens.refresh_token.expose_secret(), OLD_REFRESH);
    assert_eq!(state.generation.0, 1, "no new generation");
    let Phase::Ambiguous(amb) = &state.phase else { panic!("expected ambiguous, got {:?}", state.phase) };
    let reason = amb.last_reason.clone();
    engine.shutdown().await;
    (err, reason, server, elapsed)
}

/// The slack allowed on top of a configured timeout (scheduling on a loaded 2-core machine). Generous
/// on purpose: these tests prove that a hostile peer cannot hold a request for ever, not a speed.
const MARGIN: Duration = Duration::from_secs(10);

fn canned(status: &str, headers: &[&str], body: &[u8]) -> Answer {
    let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    Answer::Canned([head.as_bytes(), body].concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_never_followed_and_never_success() {
    let trap = serve(canned("200 OK", &["content-type: application/json"], NEW_PAIR.as_bytes())).await;
    for status in
        ["301 Moved Permanently", "302 Found", "303 See Other", "307 Temporary Redirect", "308 Permanent Redirect"]
    {
        let location =
            format!("location: http://127.0.0.1:{}/shops/hostile.myshopify.com/admin/oauth/access_token", trap.port);
        let body = NEW_PAIR.as_bytes();
        let len = format!("content-length: {}", body.len());
        let (err, reason, server, _) =
            run(canned(status, &[&location, &len, "content-type: application/json"], body)).await;
        let code: u16 = status[..3].parse().unwrap();
        assert_eq!(reason, AmbiguityReason::UnexpectedStatus { status: code }, "{status}");
        assert!(matches!(err, Error::Ambiguous { .. }), "{status}: {err}");
        assert!(err.to_string().contains(&format!("unexpected status {code}")), "{err}");
        assert_eq!(server.connections.load(Ordering::SeqCst), 1, "{status}");
    }
    assert_eq!(trap.connections.load(Ordering::SeqCst), 0, "the redirect target saw a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bodies_are_cut_at_the_cap_while_streaming() {
    for (name, head, chunked) in [
        (
            "chunked, endless",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
            true,
        ),
        (
            "lying content-length",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000000000\r\n\r\n",
            false,
        ),
        (
            "no length, until close",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
            false,
        ),
    ] {
        let (err, reason, server, elapsed) = run(Answer::Endless { head: head.as_bytes().to_vec(), chunked }).await;
        assert_eq!(reason, AmbiguityReason::BodyTooLarge { status: 200 }, "{name}");
        assert!(matches!(err, Error::Ambiguous { .. }), "{name}: {err}");
        // Cut by the cap, not by the 20 s timeout; the server was stopped after a bounded amount
        // (the cap plus what the kernel's socket buffers absorbed), not after gigabytes.
        assert!(elapsed < Duration::from_secs(5), "{name}: took {elapsed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let written = server.bytes_written.load(Ordering::SeqCst);
        assert!(written < 64 << 20, "{name}: the server wrote {written} bytes");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(server.bytes_written.load(Ordering::SeqCst), written, "{name}: the client stopped reading");
    }
}

/// Slowloris and silent peers: a server that trickles the headers or the body a byte at a time for
/// ever, accepts and never answers, or answers and never closes. Each is cut by the whole-request
/// timeout — which bounds the body too, not only the wait for headers: a per-read timeout would never
/// fire on a byte every 250 ms — and is ambiguous (`timed out`: the request was sent, so the server may
/// have rotated), with nothing of the answer stored. Even a complete token pair whose end is never
/// confirmed (no length, connection never closed) is not success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_peers_are_cut_by_the_total_timeout() {
    let total = Duration::from_secs(2);
    let json = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n";
    let open_object = "{\"access_token\":\"";
    let cases: Vec<(&str, Answer)> = vec![
        ("accepts, reads the request, never answers", Answer::HeldOpen(Vec::new())),
        (
            "status line, then a header one byte at a time",
            Answer::Trickle { head: b"HTTP/1.1 200 OK\r\nx-slow: ".to_vec(), drip: b"a".to_vec() },
        ),
        (
            "chunked body one byte at a time",
            Answer::Trickle {
                head: format!("{json}transfer-encoding: chunked\r\n\r\n{:x}\r\n{open_object}\r\n", open_object.len())
                    .into_bytes(),
                drip: b"1\r\nA\r\n".to_vec(),
            },
        ),
        (
            "content-length body one byte at a time",
            Answer::Trickle {
                head: format!("{json}content-length: 100000\r\n\r\n{open_object}").into_bytes(),
                drip: b"A".to_vec(),
            },
        ),
        (
            "body until close, one byte at a time",
            Answer::Trickle {
                head: format!("{json}connection: close\r\n\r\n{open_object}").into_bytes(),
                drip: b"A".to_vec(),
            },
        ),
        (
            "a complete token pair without a length, never closed",
            Answer::HeldOpen(format!("{json}\r\n{NEW_PAIR}").into_bytes()),
        ),
        (
            "content-length longer than the body, never closed",
            Answer::HeldOpen(format!("{json}content-length: 5000\r\n\r\n{NEW_PAIR}").into_bytes()),
        ),
    ];
    for (name, answer) in cases {
        let (err, reason, server, elapsed) = run_with_total_timeout(answer, total).await;
        assert_eq!(reason, AmbiguityReason::Timeout, "{name}");
        assert!(matches!(err, Error::Ambiguous { .. }), "{name}: {err}");
        assert!(err.to_string().contains("timed out"), "{name}: {err}");
        let shown = format!("{err} {err:?} {reason:?}");
        assert!(!shown.contains("NEW_FROM_HOSTILE") && !shown.contains("OLD_"), "{name}: {shown}");
        // Ended by the timeout (not earlier, by something else) and within it plus the margin.
        assert!(elapsed >= total && elapsed < total + MARGIN, "{name}: took {elapsed:?}");
        assert_eq!(server.connections.load(Ordering::SeqCst), 1, "{name}: one attempt, no retry loop");
        // The client hung up: no connection is left to the peer after the attempt.
        let deadline = Instant::now() + MARGIN;
        while server.hung_up.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "{name}: the client never closed the connection");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_answers_are_classified_and_nothing_is_stored() {
    let json = "content-type: application/json";
    let html = "content-type: text/html; charset=utf-8";
    let len = |b: &[u8]| format!("content-length: {}", b.len());
    let bom = [b"\xef\xbb\xbf".as_slice(), NEW_PAIR.as_bytes()].concat();
    let bad_utf8 = br#"{"access_token":"shpat_\xff\xfe","refresh_token":"r","expires_in":3600}"#.to_vec();
    let page = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>".to_vec();
    let dup = br#"{"access_token":"a","refresh_token":"r","expires_in":3600,"expires_in":1}"#.to_vec();
    let huge = br#"{"access_token":"a","refresh_token":"r","expires_in":184467440737095516150}"#.to_vec();
    let negative = br#"{"access_token":"a","refresh_token":"r","expires_in":-60}"#.to_vec();
    let no_refresh = br#"{"access_token":"a","expires_in":3600}"#.to_vec();
    let cases: Vec<(&str, Answer, AmbiguityReason)> = vec![
        ("html error page on 200", canned("200 OK", &[html, &len(&page)], &page), unusable("not JSON")),
        ("BOM", canned("200 OK", &[json, &len(&bom)], &bom), unusable("not JSON")),
        ("invalid UTF-8", canned("200 OK", &[json, &len(&bad_utf8)], &bad_utf8), unusable("not JSON")),
        ("duplicate key", canned("200 OK", &[json, &len(&dup)], &dup), unusable("duplicate field `expires_in`")),
        ("u64 overflow", canned("200 OK", &[json, &len(&huge)], &huge), unusable("expires_in is not")),
        ("negative expires_in", canned("200 OK", &[json, &len(&negative)], &negative), unusable("expires_in is not")),
        ("missing refresh token", canned("200 OK", &[json, &len(&no_refresh)], &no_refresh), unusable("refresh_token")),
        (
            "content-length shorter than the body",
            canned("200 OK", &[json, "content-length: 20"], NEW_PAIR.as_bytes()),
            unusable("JSON ends early"),
        ),
        (
            "content-length longer than the body, then close",
            canned("200 OK", &[json, "content-length: 5000"], NEW_PAIR.as_bytes()),
            AmbiguityReason::ConnectionLost,
        ),
        (
            "headers only, then close",
            Answer::Canned(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n".to_vec()),
            AmbiguityReason::ConnectionLost,
        ),
        ("not HTTP at all", Answer::Canned(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()), AmbiguityReason::ConnectionLost),
        (
            "520 plain text",
            canned("520 Origin Error", &["content-length: 15"], b"error code: 520"),
            AmbiguityReason::ServerError { status: 520 },
        ),
    ];
    for (name, answer, want) in cases {
        let (err, reason, _, elapsed) = run(answer).await;
        match (&want, &reason) {
            (
                AmbiguityReason::UnparseableSuccess { detail: want_detail, .. },
                AmbiguityReason::UnparseableSuccess { status: 200, detail },
            ) => assert!(detail.contains(want_detail.as_str()), "{name}: {detail:?} lacks {want_detail:?}"),
            _ => assert_eq!(reason, want, "{name}"),
        }
        assert!(matches!(err, Error::Ambiguous { .. }), "{name}: {err}");
        let shown = format!("{err} {err:?} {reason:?}");
        assert!(!shown.contains("NEW_FROM_HOSTILE") && !shown.contains("OLD_"), "{name}: {shown}");
        assert!(elapsed < Duration::from_secs(5), "{name}: took {elapsed:?}");
    }
}

fn unusable(detail: &str) -> AmbiguityReason {
    AmbiguityReason::UnparseableSuccess { status: 200, detail: detail.to_owned() }
}

/// The content type is not trusted either way: a complete token response is the body's word, and an
/// HTML or JSON label on junk does not make it usable (the junk cases above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_content_type_is_not_what_decides() {
    let body = NEW_PAIR.as_bytes();
    let server =
        serve(canned("200 OK", &["content-type: text/html", &format!("content-length: {}", body.len())], body)).await;
    let engine = engine(server.port).await;
    let token = engine.access_token(&shop()).await.unwrap();
    assert_eq!(token.expose_secret(), "shpat_NEW_FROM_HOSTILE");
    engine.shutdown().await;
}

/// The engine's configuration and its errors print no secret (panics with `{:?}` of them included).
#[test]
fn config_and_errors_print_no_secret() {
    let c = Config::shopify(StoreLocation::InMemory, "id", ClientSecret::new("hostile-secret-value"));
    let e = Error::Config("x".into());
    let printed = format!("{c:?} {c:#?} {:?} {e} {e:?}", c.endpoint);
    assert!(!printed.contains("hostile-secret-value"), "{printed}");
    let shown = format!("{c:?}");
    let payload = std::panic::catch_unwind(|| panic!("bad config {shown}")).unwrap_err();
    let msg = payload.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("bad config") && !msg.contains("hostile-secret-value"), "{msg}");
}

/// A peer that never completes the TCP handshake (a listener whose accept queue is full: the kernel
/// drops the SYN) is cut by the connect timeout. Nothing was sent, so this one is *not* ambiguous: the
/// grant keeps its old set and phase, the caller gets `Unavailable`. Skips if the kernel completes the
/// handshake anyway (then nothing here can hold a connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_completes_the_handshake_is_cut_by_the_connect_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap(); // never accepted from
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    let full = loop {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(s)) if fillers.len() < 64 => fillers.push(s),
            Ok(_) => break false,
            Err(_) => break true, // this SYN was dropped: the queue is full
        }
    };
    if !full {
        eprintln!("skipped: the kernel completes handshakes past a full accept queue");
        return;
    }
    let engine = engine(addr.port()).await; // connect timeout 2 s
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(2) + MARGIN, engine.access_token(&shop()))
        .await
        .expect("the refresh did not end within the connect timeout plus the margin")
        .expect_err("nothing was sent");
    let elapsed = started.elapsed();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(2) + MARGIN, "took {elapsed:?}");
    let state = engine.state(&GrantKey::shopify(&shop())).unwrap().unwrap();
    assert!(!matches!(state.phase, Phase::Ambiguous(_)), "not sent is not ambiguous: {:?}", state.phase);
    let tokens = state.tokens.as_ref().expect("tokens kept");
    assert_eq!(tokens.refresh_token.expose_secret(), OLD_REFRESH);
    engine.shutdown().await;
    drop((fillers, listener));
}
