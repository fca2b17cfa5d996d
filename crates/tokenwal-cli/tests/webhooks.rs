//! `tokenwal webhooks dead-letters` and `tokenwal webhooks replay` as a real process, against a
//! store holding dead letters (one of them torn) and a receiver on a real socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenwal_core::UnixMillis;
use tokenwal_store::{DeadLetter, KeyRing, Store, StoreConfig, StoreKey};

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const HOOK_SECRET: &str = "hook-signing-secret-XYZ";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn tokenwal(db: &Path, config: &Path, args: &[&str]) -> Out {
    let out = Command::new(BIN)
        .arg("--db")
        .arg(db)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_clear()
        .env("TOKENWAL_STORE_KEY", &*StoreKey::insecure_test_key().to_base64())
        .env("TOKENWAL_WEBHOOK_SECRET", HOOK_SECRET)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!format!("{}{}", out.stdout, out.stderr).contains(HOOK_SECRET), "the secret leaked");
    out
}

/// Every delivery a receiver saw: (event id, signature valid).
type Seen = Arc<Mutex<Vec<(String, bool)>>>;

/// A one-request-per-connection HTTP receiver answering `status`.
fn receiver(status: Arc<AtomicU16>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut headers = Vec::new();
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
                if let Some((k, v)) = l.trim_end().split_once(':') {
                    headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
                }
            }
            let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
            let mut body = vec![0; h("content-length").parse().unwrap_or(0)];
            reader.read_exact(&mut body).unwrap();
            let ok = tokenwal::webhook_sink::verify(
                HOOK_SECRET.as_bytes(),
                &h("x-tokenwal-timestamp"),
                &body,
                &h("x-tokenwal-hmac-sha256"),
            );
            log.lock().unwrap().push((h("x-tokenwal-event-id"), ok));
            let code = status.load(Ordering::SeqCst);
            let _ = write!(conn, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, seen)
}

fn letter(lsn: u64) -> DeadLetter {
    DeadLetter {
        lsn,
        attempts: 10,
        first_failed_at: UnixMillis(1_800_000_000_000),
        last_attempt_at: UnixMillis(1_800_000_000_000),
        last_error: "status 503".into(),
        payload: format!(r#"{{"id":"ab-{lsn}","kind":"needs_reauth","shop":"s{lsn}.myshopify.com","lsn":{lsn}}}"#)
            .into_bytes(),
    }
}

#[test]
fn dead_letters_are_listed_and_replayed_and_a_torn_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    {
        let (store, _) = Store::open(&db, &KeyRing::insecure_test_ring(), StoreConfig::default()).unwrap();
        for lsn in [3, 4, 5] {
            store.put_dead_letter("webhook", &letter(lsn)).unwrap();
        }
    }
    // Tear letter 4 behind the store's back (sled releases its lock from background threads).
    let deadline = Instant::now() + Duration::from_secs(10);
    let sled = loop {
        match sled::open(&db) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut torn = letter(4).encode().unwrap();
    torn.truncate(torn.len() - 2);
    let key = tokenwal_store::dead_letter::dead_letter_key("webhook", 4).unwrap();
    sled.open_tree("meta").unwrap().insert(key, torn).unwrap();
    sled.flush().unwrap();
    drop(sled);
    std::thread::sleep(Duration::from_millis(200));

    let status = Arc::new(AtomicU16::new(503));
    let (url, seen) = receiver(Arc::clone(&status));
    let config = dir.path().join("config.json");
    std::fs::write(&config, format!(r#"{{"webhook_url":"{url}","webhook_max_attempts":3}}"#)).unwrap();

    let out = tokenwal(&db, &config, &["webhooks", "dead-letters", "--json"]);
    assert_eq!(out.code, 1, "a torn letter fails the listing, after it: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let ids: Vec<&str> = v["dead_letters"].as_array().unwrap().iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["ab-3", "ab-5"]);
    assert_eq!(v["dead_letters"][0]["attempts"], 10);
    assert!(v["corrupt"][0].as_str().unwrap().contains("meta/dead_letter/webhook/4"), "{v}");
    assert!(out.stderr.contains("meta/dead_letter/webhook/4"), "{}", out.stderr);

    // Refused again: kept, one more attempt, exit 75.
    let out = tokenwal(&db, &config, &["webhooks", "replay", "ab-3"]);
    assert_eq!(out.code, 75, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("ab-3: refused again (status 503); kept"), "{}", out.stdout);
    let out = tokenwal(&db, &config, &["webhooks", "dead-letters"]);
    assert!(out.stdout.lines().any(|l| l.starts_with("ab-3") && l.contains(" 11 ")), "{}", out.stdout);

    // Accepted: both sound letters delivered and removed; the torn one named, not sent.
    status.store(200, Ordering::SeqCst);
    let out = tokenwal(&db, &config, &["webhooks", "replay", "--all"]);
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("ab-3: delivered") && out.stdout.contains("ab-5: delivered"), "{}", out.stdout);
    assert!(out.stderr.contains("meta/dead_letter/webhook/4"), "{}", out.stderr);
    let got = seen.lock().unwrap().clone();
    assert_eq!(got, [("ab-3".into(), true), ("ab-3".into(), true), ("ab-5".into(), true)]);
    let out = tokenwal(&db, &config, &["webhooks", "dead-letters", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["dead_letters"].as_array().unwrap().len(), 0);
    assert_eq!(v["corrupt"].as_array().unwrap().len(), 1);

    let out = tokenwal(&db, &config, &["webhooks", "replay"]);
    assert_eq!(out.code, 2, "an id or --all: {}", out.stderr);
    let out = tokenwal(&db, &config, &["webhooks", "replay", "ab-99"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("no dead letter ab-99"), "{}", out.stderr);
}
