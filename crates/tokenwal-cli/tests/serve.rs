//! `tokenwal serve` as a real process against the simulator, over its real Unix socket (issue 14.1):
//!
//! * every route and every status documented in docs/broker-openapi.json is driven, and each live
//!   answer (status, headers, body) is validated against the document with a JSON Schema validator;
//!   the test fails if a documented status was never exercised or an answer is undocumented;
//! * 50 concurrent token calls for one due shop make exactly one refresh at the simulator;
//! * a dead grant answers 409 with the re-auth link;
//! * kill -9 with a refresh on the wire, restart (recovery held on the wire: every token call and
//!   /readyz answer 503 "recovering"), release: the next token call succeeds, nothing is lost;
//! * the socket is mode 0600; the stderr of the whole run at trace level holds no token;
//! * without a bearer token it does not start (78), a world-readable token file is refused (78), a
//!   non-loopback address is refused with the reason (2); loopback TCP works.

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use tokenwal_testkit::broker::{
    self, call, exchange, grant_body, try_exchange, write_private, Answer, Broker, BrokerSetup,
};
use tokenwal_testkit::{accepted, requests, BlockingSim};

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const BEARER: &str = "broker-test-bearer-7d1f0c2a9e";
const APP_HANDLE: &str = "tokenwal-test";

// ---------------------------------------------------------------------------------------------
// The OpenAPI document: validation of live answers and coverage of documented statuses.

struct Spec {
    doc: Value,
    seen: BTreeSet<(String, String, String)>,
}

impl Spec {
    fn load() -> Spec {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/broker-openapi.json");
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        Spec { doc, seen: BTreeSet::new() }
    }

    /// `v` with every local `$ref` replaced by its target (the document has no cycles).
    fn resolve(&self, v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    let target = self.doc.pointer(r.trim_start_matches('#')).unwrap_or_else(|| panic!("dangling {r}"));
                    return self.resolve(target);
                }
                Value::Object(m.iter().map(|(k, v)| (k.clone(), self.resolve(v))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(|v| self.resolve(v)).collect()),
            other => other.clone(),
        }
    }

    fn validate(schema: &Value, instance: &Value, what: &str) {
        let v = jsonschema::options().should_validate_formats(true).build(schema).unwrap();
        let errors: Vec<String> = v.iter_errors(instance).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{what}: answer does not match the document: {errors:?}\n{instance}");
    }

    /// Checks a live answer against the document's operation `method template`.
    fn check(&mut self, method: &str, template: &str, a: &Answer) {
        let what = format!("{method} {template} -> {}", a.status);
        let op = self.doc["paths"][template][method.to_ascii_lowercase()].clone();
        assert!(op.is_object(), "{what}: undocumented operation");
        let status = a.status.to_string();
        let resp = op["responses"].get(&status).unwrap_or_else(|| panic!("{what}: undocumented status"));
        let resp = self.resolve(resp);
        for (name, h) in resp["headers"].as_object().into_iter().flatten() {
            let value = a.header(name);
            if h["required"] == true {
                assert!(value.is_some(), "{what}: missing header {name}");
            }
            if let Some(value) = value {
                Spec::validate(&h["schema"], &Value::String(value.to_owned()), &format!("{what} header {name}"));
            }
        }
        let content = resp["content"].as_object().expect("every documented answer has a body");
        let (media, m) = content.iter().next().unwrap();
        let ct = a.header("content-type").unwrap_or_else(|| panic!("{what}: no content-type"));
        assert_eq!(ct, media.as_str(), "{what}: content-type");
        if media == "application/json" {
            Spec::validate(&m["schema"], &a.json(), &what);
        } else {
            Spec::validate(&m["schema"], &Value::String(String::from_utf8(a.body.clone()).unwrap()), &what);
        }
        self.seen.insert((method.to_ascii_lowercase(), template.to_owned(), status));
    }

    /// Every documented (operation, status) but `default` was exercised.
    fn assert_complete(&self) {
        let mut missing = Vec::new();
        for (template, ops) in self.doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                for status in op["responses"].as_object().unwrap().keys().filter(|s| *s != "default") {
                    if !self.seen.contains(&(method.clone(), template.clone(), status.clone())) {
                        missing.push(format!("{method} {template} {status}"));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "documented but never exercised: {missing:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The broker process (tokenwal_testkit::broker).

fn setup(db: &Path, config: &Path, sim_base: &str) -> BrokerSetup {
    BrokerSetup {
        bin: BIN.to_owned(),
        db: db.to_owned(),
        sim_base: sim_base.to_owned(),
        config: config.to_owned(),
        bearer: BEARER.to_owned(),
    }
}

/// Starts a broker on `sock` at trace level and waits for its `listening on` line.
fn start(db: &Path, sock: &Path, config: &Path, sim_base: &str, log: Option<Arc<Mutex<Vec<String>>>>) -> Broker {
    Broker::start(&setup(db, config, sim_base), sock, log)
}

/// A temporary directory (kept alive by the first element) with a broker's store path, socket path
/// and private config file holding `config_json`.
fn broker_paths(config_json: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (db, sock, config) = (dir.path().join("store"), dir.path().join("b.sock"), dir.path().join("config.json"));
    write_private(&config, config_json, 0o600);
    (dir, db, sock, config)
}

fn serve_command(db: &Path, sim_base: &str, args: &[&str]) -> Command {
    broker::serve_command(BIN, db, sim_base, args)
}

fn wait_ready(b: &Broker) {
    b.wait_ready();
}

fn shop(name: &str) -> String {
    format!("{name}.myshopify.com")
}

#[test]
fn the_broker_answers_every_route_as_documented_and_survives_kill_9() {
    let sim = BlockingSim::start_with(tokenwal_sim::SimConfig::default(), 2);
    let base = sim.h().base_url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let sock = dir.path().join("broker.sock");
    let config = dir.path().join("config.json");
    // A long recovery budget: while recovery is held on the wire the broker stays "recovering".
    write_private(&config, &json!({ "app_handle": APP_HANDLE, "recovery_budget": "60s" }).to_string(), 0o600);
    let mut spec = Spec::load();
    let mut secrets: Vec<String> = vec![BEARER.to_owned()];
    let big = vec![b' '; 70 * 1024];

    let mut b = start(&db, &sock, &config, &base, None);
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::symlink_metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    }
    wait_ready(&b);
    let s = b.sock.clone();
    let mut go = |method: &str, template: &str, path: &str, bearer: Option<&str>, body: Option<&[u8]>| {
        let a = call(&s, method, path, bearer, body);
        spec.check(method, template, &a);
        a
    };
    const TOKEN: &str = "/v1/shops/{shop}/token";
    const UNAUTH: &str = "/v1/shops/{shop}/unauthorized";
    const GRANT: &str = "/v1/shops/{shop}/grant";
    const EXCH: &str = "/v1/shops/{shop}/token-exchange";
    const UNINST: &str = "/v1/shops/{shop}/uninstall";

    // Operations.
    assert_eq!(go("GET", "/healthz", "/healthz", Some(BEARER), None).json(), json!({"status": "alive"}));
    assert_eq!(go("GET", "/healthz", "/healthz", None, None).status, 401);
    assert_eq!(go("GET", "/readyz", "/readyz", Some(BEARER), None).json(), json!({"ready": true}));
    assert_eq!(go("GET", "/readyz", "/readyz", Some("wrong-token"), None).status, 401);
    let m = go("GET", "/metrics", "/metrics", Some(BEARER), None);
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("tokenwal_broker_requests_total{route=\"/healthz\",code=\"401\"} 1"), "{text}");
    // The engine's own metrics, registered into the broker's registry once it opened.
    assert!(text.contains("# TYPE tokenwal_store_up gauge") && text.contains("tokenwal_broker_ready 1"), "{text}");
    assert_eq!(go("GET", "/metrics", "/metrics", Some(&format!("{BEARER}x")), None).status, 401);

    // Outside the document: unknown routes and methods, behind the bearer check too.
    let alpha_path = format!("/v1/shops/{}/token", shop("alpha"));
    assert_eq!(call(&s, "GET", "/v2/nothing", None, None).status, 401);
    assert_eq!(call(&s, "GET", "/v2/nothing", Some(BEARER), None).json()["error"], "not_found");
    assert_eq!(call(&s, "DELETE", &alpha_path, None, None).status, 401);
    assert_eq!(call(&s, "DELETE", &alpha_path, Some(BEARER), None).json()["error"], "method_not_allowed");
    // They are counted, under the route `unmatched` (never the path: it could hold anything).
    let text = String::from_utf8(call(&s, "GET", "/metrics", Some(BEARER), None).body).unwrap();
    for (code, n) in [(401, 2), (404, 1), (405, 1)] {
        let line = format!("tokenwal_broker_requests_total{{route=\"unmatched\",code=\"{code}\"}} {n}\n");
        assert!(text.contains(&line), "{line} in {text}");
    }

    // Bad shop, unknown shop, no bearer on a token call.
    let a = go("GET", TOKEN, "/v1/shops/Alpha.myshopify.com/token", Some(BEARER), None);
    assert_eq!((a.status, a.json()["error"].clone()), (400, json!("invalid_shop")));
    assert!(a.json()["message"].as_str().unwrap().contains("uppercase"), "{:?}", a.json());
    let a = go("GET", TOKEN, "/v1/shops/alpha.example.com/token", Some(BEARER), None);
    assert!(a.json()["message"].as_str().unwrap().contains("myshopify.com"), "{:?}", a.json());
    assert_eq!(go("GET", TOKEN, &format!("/v1/shops/{}/token", shop("alpha")), Some(BEARER), None).status, 404);
    assert_eq!(go("GET", TOKEN, &format!("/v1/shops/{}/token", shop("alpha")), None, None).status, 401);

    // Install, bad installs.
    let seeded = sim.h().seed_shop(&shop("alpha"));
    secrets.extend([seeded.access_token.as_str().to_owned(), seeded.refresh_token.as_str().to_owned()]);
    let alpha_grant = format!("/v1/shops/{}/grant", shop("alpha"));
    let a = go("PUT", GRANT, &alpha_grant, Some(BEARER), Some(&grant_body(&seeded, json!({"expires_in": 3600}))));
    assert_eq!(a.json(), json!({"installed": true}));
    let a = go("PUT", GRANT, &alpha_grant, Some(BEARER), Some(br#"{"access_token":"shpat_x","expires_in":60}"#));
    assert!(a.json()["message"].as_str().unwrap().contains("refresh_token"), "{:?}", a.json());
    let a = go(
        "PUT",
        GRANT,
        &alpha_grant,
        Some(BEARER),
        Some(br#"{"access_token":"a","refresh_token":"r","expires_in":60,"shop":"x"}"#),
    );
    assert!(a.json()["message"].as_str().unwrap().contains("unknown field `shop`"), "{:?}", a.json());
    assert_eq!(go("PUT", GRANT, &alpha_grant, Some(BEARER), Some(&big)).status, 413);
    assert_eq!(go("PUT", GRANT, &alpha_grant, None, None).status, 401);

    // The cached token: no refresh.
    let alpha_token = format!("/v1/shops/{}/token", shop("alpha"));
    let t = go("GET", TOKEN, &alpha_token, Some(BEARER), None).json();
    assert_eq!(t["access_token"], seeded.access_token.as_str());
    assert_eq!(t["scope"], json!(seeded.scope));
    assert!(t["expires_in"].as_u64().unwrap() > 3500, "{t}");
    assert_eq!(requests(sim.h(), "alpha"), 0);

    // A 401 seen with the current token: one refresh, the newer token.
    let alpha_unauth = format!("/v1/shops/{}/unauthorized", shop("alpha"));
    let body = json!({"access_token": seeded.access_token.as_str()}).to_string();
    let t2 = go("POST", UNAUTH, &alpha_unauth, Some(BEARER), Some(body.as_bytes())).json();
    assert_ne!(t2["access_token"], t["access_token"]);
    secrets.push(t2["access_token"].as_str().unwrap().to_owned());
    assert_eq!(requests(sim.h(), "alpha"), 1);
    assert!(accepted(sim.h(), "alpha", &tokenwal::core::AccessToken::new(t2["access_token"].as_str().unwrap())));
    // The same stale report again: the newer token, no second refresh.
    let t3 = go("POST", UNAUTH, &alpha_unauth, Some(BEARER), Some(body.as_bytes())).json();
    assert_eq!(t3["access_token"], t2["access_token"]);
    assert_eq!(requests(sim.h(), "alpha"), 1);
    let a = go("POST", UNAUTH, &alpha_unauth, Some(BEARER), Some(br#"{"access_token":"x","token":"y"}"#));
    assert!(a.json()["message"].as_str().unwrap().contains("unknown field `token`"), "{:?}", a.json());
    assert_eq!(go("POST", UNAUTH, &alpha_unauth, Some(BEARER), Some(&big)).status, 413);
    assert_eq!(go("POST", UNAUTH, &alpha_unauth, None, Some(body.as_bytes())).status, 401);
    let nobody = format!("/v1/shops/{}/unauthorized", shop("nobody"));
    assert_eq!(go("POST", UNAUTH, &nobody, Some(BEARER), Some(body.as_bytes())).status, 404);

    // Re-installing the superseded pair (it expires earlier than the held one): refused.
    let a = go("PUT", GRANT, &alpha_grant, Some(BEARER), Some(&grant_body(&seeded, json!({"expires_in": 60}))));
    assert_eq!(a.json()["error"], "older_pair", "{:?}", a.json());
    assert_eq!(a.status, 409);

    // A dead grant: 409 with the state, the reason and the re-auth link, from both token calls.
    let dead = sim.h().seed_shop(&shop("dead"));
    secrets.extend([dead.access_token.as_str().to_owned(), dead.refresh_token.as_str().to_owned()]);
    let dead_grant = format!("/v1/shops/{}/grant", shop("dead"));
    // Revoked at Shopify before the install: whichever refresh comes first (the broker's scheduler's
    // or our call's) is refused.
    sim.h().with_model(|m| m.uninstall(&shop("dead")));
    go("PUT", GRANT, &dead_grant, Some(BEARER), Some(&grant_body(&dead, json!({"expires_at": 1_700_000_000}))));
    let a = go("GET", TOKEN, &format!("/v1/shops/{}/token", shop("dead")), Some(BEARER), None);
    assert_eq!(a.status, 409, "{:?}", a.json());
    let j = a.json();
    assert_eq!(j["state"], "needs-reauth");
    assert_eq!(j["reauth_url"], format!("https://admin.shopify.com/store/dead/apps/{APP_HANDLE}"));
    assert!(j["since"].is_string() && j["reason"].is_string(), "{j}");
    let dead_body = json!({"access_token": dead.access_token.as_str()}).to_string();
    let a = go(
        "POST",
        UNAUTH,
        &format!("/v1/shops/{}/unauthorized", shop("dead")),
        Some(BEARER),
        Some(dead_body.as_bytes()),
    );
    assert_eq!(a.status, 409);

    // Listing grants needing re-auth.
    let l = go("GET", "/v1/grants", "/v1/grants?state=needs-reauth", Some(BEARER), None).json();
    assert_eq!(l["grants"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(l["grants"][0]["shop"], shop("dead"));
    assert_eq!(l["grants"][0]["reauth_url"], j["reauth_url"]);
    let all = go("GET", "/v1/grants", "/v1/grants", Some(BEARER), None).json();
    assert_eq!(all["grants"].as_array().unwrap().len(), 2, "{all}");
    assert_eq!(go("GET", "/v1/grants", "/v1/grants?state=dead", Some(BEARER), None).status, 400);
    assert_eq!(go("GET", "/v1/grants", "/v1/grants?shop=x", Some(BEARER), None).status, 400);
    assert_eq!(go("GET", "/v1/grants", "/v1/grants", None, None).status, 401);

    // Token exchange through the journal.
    let session = sim.h().session_token(&shop("fresh"));
    secrets.push(session.clone());
    let fresh_exch = format!("/v1/shops/{}/token-exchange", shop("fresh"));
    let body = json!({ "session_token": session }).to_string();
    let t = go("POST", EXCH, &fresh_exch, Some(BEARER), Some(body.as_bytes())).json();
    secrets.push(t["access_token"].as_str().unwrap().to_owned());
    assert!(accepted(sim.h(), "fresh", &tokenwal::core::AccessToken::new(t["access_token"].as_str().unwrap())));
    let a = go("POST", EXCH, &fresh_exch, Some(BEARER), Some(br#"{"session_token":"not-a-jwt"}"#));
    assert_eq!(a.json()["error"], "invalid_session_token");
    assert_eq!(go("POST", EXCH, &fresh_exch, Some(BEARER), Some(&big)).status, 413);
    assert_eq!(go("POST", EXCH, &fresh_exch, None, Some(body.as_bytes())).status, 401);

    // Uninstall: idempotent, a bad time refused; then the token call says uninstalled.
    let fresh_uninst = format!("/v1/shops/{}/uninstall", shop("fresh"));
    assert_eq!(go("POST", UNINST, &fresh_uninst, Some(BEARER), Some(b"{}")).json(), json!({"uninstalled": true}));
    assert_eq!(go("POST", UNINST, &fresh_uninst, Some(BEARER), None).json(), json!({"uninstalled": false}));
    assert_eq!(go("POST", UNINST, &fresh_uninst, Some(BEARER), Some(br#"{"triggered_at":"yesterday"}"#)).status, 400);
    assert_eq!(go("POST", UNINST, &fresh_uninst, Some(BEARER), Some(&big)).status, 413);
    assert_eq!(go("POST", UNINST, &fresh_uninst, None, None).status, 401);
    let a = go("GET", TOKEN, &format!("/v1/shops/{}/token", shop("fresh")), Some(BEARER), None);
    assert_eq!((a.status, a.json()["state"].clone()), (409, json!("uninstalled")));

    // 50 concurrent token calls for one due shop: exactly one refresh at the simulator.
    let crowd = sim.h().seed_shop(&shop("crowd"));
    secrets.extend([crowd.access_token.as_str().to_owned(), crowd.refresh_token.as_str().to_owned()]);
    go(
        "PUT",
        GRANT,
        &format!("/v1/shops/{}/grant", shop("crowd")),
        Some(BEARER),
        Some(&grant_body(&crowd, json!({"expires_at": 1_700_000_000}))),
    );
    let barrier = Arc::new(Barrier::new(50));
    let answers: Vec<Answer> = (0..50)
        .map(|_| {
            let (s, barrier) = (s.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                call(&s, "GET", &format!("/v1/shops/{}/token", shop("crowd")), Some(BEARER), None)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let tokens: BTreeSet<String> =
        answers.iter().map(|a| a.json()["access_token"].as_str().unwrap().to_owned()).collect();
    assert_eq!(tokens.len(), 1, "one token for all 50 callers");
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(requests(sim.h(), "crowd"), 1, "exactly one refresh");
    secrets.extend(tokens);

    // A session token Shopify refuses (it expired by the simulator's clock; still valid by ours).
    let late = sim.h().session_token(&shop("late"));
    secrets.push(late.clone());
    sim.h().advance_clock(10 * 60 * 1000);
    let body = json!({ "session_token": late }).to_string();
    let a =
        go("POST", EXCH, &format!("/v1/shops/{}/token-exchange", shop("late")), Some(BEARER), Some(body.as_bytes()));
    assert_eq!((a.status, a.json()["error"].clone()), (403, json!("session_token_rejected")), "{:?}", a.json());

    // kill -9 with a refresh on the wire.
    let held = sim.h().seed_shop(&shop("held"));
    // Armed before the install: the broker's scheduler may refresh the due shop before our call does;
    // either way one refresh is held on the wire.
    sim.h().hold(&shop("held"));
    secrets.extend([held.access_token.as_str().to_owned(), held.refresh_token.as_str().to_owned()]);
    go(
        "PUT",
        GRANT,
        &format!("/v1/shops/{}/grant", shop("held")),
        Some(BEARER),
        Some(&grant_body(&held, json!({"expires_at": 1_700_000_000}))),
    );
    let (s2, held_path) = (s.clone(), format!("/v1/shops/{}/token", shop("held")));
    let waiter = std::thread::spawn(move || {
        let c = std::os::unix::net::UnixStream::connect(&s2).unwrap();
        let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
        let mut c = c;
        let _ = c.write_all(
            format!(
                "GET {held_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BEARER}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
    });
    assert!(sim.runtime().block_on(sim.h().wait_held(&shop("held"), Duration::from_secs(20))), "refresh on the wire");
    b.kill9();
    waiter.join().unwrap();
    sim.h().cancel(&shop("held"));
    assert!(sock.exists(), "kill -9 leaves the socket file behind");

    // Restart over the stale socket; recovery's retry of the old refresh token is held on the wire.
    sim.h().hold(&shop("held"));
    let log = Arc::clone(&b.log);
    b = start(&db, &sock, &config, &base, Some(log));
    assert!(sim.runtime().block_on(sim.h().wait_held(&shop("held"), Duration::from_secs(20))), "recovery retries");
    let alpha_body = json!({"access_token": "whatever"}).to_string();
    let recovering = [
        ("GET", TOKEN, alpha_token.clone(), None),
        ("POST", UNAUTH, alpha_unauth.clone(), Some(alpha_body.into_bytes())),
        ("PUT", GRANT, alpha_grant.clone(), Some(grant_body(&seeded, json!({"expires_in": 60})))),
        ("POST", EXCH, fresh_exch.clone(), Some(json!({"session_token": "x.y.z"}).to_string().into_bytes())),
        ("POST", UNINST, fresh_uninst.clone(), None),
        ("GET", "/v1/grants", "/v1/grants".to_owned(), None),
        ("GET", "/readyz", "/readyz".to_owned(), None),
    ];
    for (method, template, path, body) in recovering {
        let a = call(&sock, method, &path, Some(BEARER), body.as_deref());
        spec.check(method, template, &a);
        assert_eq!(a.status, 503, "{method} {path} while recovering");
        assert_eq!(a.json()["reason"], "recovering");
        assert!(a.header("retry-after").is_some());
    }
    assert!(sim.h().release(&shop("held")));
    wait_ready(&b);
    let a = call(&sock, "GET", &format!("/v1/shops/{}/token", shop("held")), Some(BEARER), None);
    spec.check("GET", TOKEN, &a);
    let t = a.json()["access_token"].as_str().unwrap().to_owned();
    secrets.push(t.clone());
    assert!(accepted(sim.h(), "held", &tokenwal::core::AccessToken::new(t.as_str())), "no lockout after kill -9");
    assert!(sim.h().grant_alive(&shop("held")));

    // SIGTERM: exit 0, the socket removed.
    assert!(Command::new("kill").args(["-TERM", &b.child.id().to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = b.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", b.log_text());
    assert!(!sock.exists(), "socket file removed at shutdown");

    spec.assert_complete();

    // Nothing known to be secret appears in the trace-level log of either run.
    std::thread::sleep(Duration::from_millis(100));
    let text = b.log_text();
    assert!(text.contains("route=\"/v1/shops/{shop}/token\""), "request logs present");
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "a secret ({} chars) appears in the log", secret.len());
    }
}

#[test]
fn without_a_bearer_token_the_broker_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix:{}", dir.path().join("b.sock").display());
    let out = serve_command(&dir.path().join("db"), "http://127.0.0.1:9", &["--listen", &sock]).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOKENWAL_BROKER_TOKEN"), "{out:?}");
    assert!(!dir.path().join("b.sock").exists());
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    write_private(&file, "a-long-enough-broker-token\n", 0o644);
    let sock = format!("unix:{}", dir.path().join("b.sock").display());
    let args = ["--listen", &sock, "--token-file", file.to_str().unwrap()];
    let out = serve_command(&dir.path().join("db"), "http://127.0.0.1:9", &args).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"), "{out:?}");
}

/// Runs `serve ARGS` (with a bearer token, in `dir`) that must be refused as a usage error (exit 2)
/// before it binds anything; returns its stderr.
fn refused_usage(dir: &Path, args: &[&str]) -> String {
    let out = serve_command(&dir.join("db"), "http://127.0.0.1:9", args)
        .env("TOKENWAL_BROKER_TOKEN", BEARER)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_non_loopback_address_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused_usage(dir.path(), &["--listen", "tcp:0.0.0.0:0"]);
    assert!(err.contains("not a loopback address") && err.contains("clear text"), "{err}");
}

#[test]
fn a_worker_count_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix:{}", dir.path().join("b.sock").display());
    for n in ["0", "65"] {
        let err = refused_usage(dir.path(), &["--listen", &sock, "--workers", n]);
        assert!(err.contains("--workers") && err.contains("1..=64"), "{err}");
        assert!(!dir.path().join("b.sock").exists());
    }
}

/// Also the one-thread runtime (`--workers 1`): a broker answers on it.
#[test]
fn loopback_tcp_serves_with_the_token_file() {
    let sim = BlockingSim::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    write_private(&file, &format!("{BEARER}\n"), 0o600);
    let mut child = serve_command(&dir.path().join("db"), &sim.h().base_url(), &["--listen", "tcp:127.0.0.1:0"])
        .args(["--workers", "1"])
        .arg("--token-file")
        .arg(&file)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let addr = loop {
        let line = lines.next().expect("a listening line").unwrap();
        if let Some(a) = line.strip_prefix("listening on tcp:") {
            break a.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = std::net::TcpStream::connect(&addr).unwrap();
        let a = exchange(s, "GET", "/readyz", Some(BEARER), None);
        if a.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = std::net::TcpStream::connect(&addr).unwrap();
    assert_eq!(exchange(s, "GET", "/healthz", Some("nope"), None).status, 401);
    let _ = child.kill();
    let _ = child.wait();
}

/// The store fails a sync while the broker serves: it exits 74 (as `run` does) so that its
/// supervisor restarts it, an answer given meanwhile is 503 `store_poisoned` (never a token from a
/// poisoned store), and the restart serves every grant whose install was answered 200.
#[test]
fn a_store_fail_stop_exits_74_and_the_restart_loses_no_acknowledged_install() {
    let sim = BlockingSim::start();
    let base = sim.h().base_url();
    let (_dir, db, sock, config) = broker_paths("{}");
    // The store's test hook (dev builds only): its 6th group sync fails.
    let listen = format!("unix:{}", sock.display());
    let mut child = serve_command(&db, &base, &["--listen", &listen])
        .env("TOKENWAL_BROKER_TOKEN", BEARER)
        .env("TOKENWAL_TEST_INJECT_SYNC_FAULT", "6")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() || std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(child.try_wait().unwrap().is_none() && Instant::now() < deadline, "{:?}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut installed = Vec::new();
    let mut poisoned = 0;
    for i in 0..50 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let name = format!("disk-{i}");
        let t = sim.h().seed_shop(&shop(&name));
        let body = grant_body(&t, json!({"expires_in": 3600}));
        let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) else { break };
        let path = format!("/v1/shops/{}/grant", shop(&name));
        // No answer: the broker exited (fail-stop) with this request in flight; it was not acknowledged.
        let Some(a) = try_exchange(s, "PUT", &path, Some(BEARER), Some(&body)) else { break };
        match a.status {
            200 => installed.push((name, t.access_token.as_str().to_owned())),
            503 if a.json()["reason"] == "store_poisoned" => poisoned += 1,
            // While the store opens.
            503 if a.json()["reason"] == "recovering" => std::thread::sleep(Duration::from_millis(20)),
            _ => panic!("{:?}", a.json()),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the broker kept running on a fail-stopped store");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(74), "{:?}", log.lock().unwrap());
    assert!(!installed.is_empty(), "the fault came before any install: raise the sync number");
    eprintln!("{} installs acknowledged, {poisoned} answered store_poisoned before the exit", installed.len());

    // The restart runs recovery and serves every acknowledged install.
    let b = start(&db, &sock, &config, &base, None);
    wait_ready(&b);
    for (name, token) in &installed {
        let a = call(&sock, "GET", &format!("/v1/shops/{}/token", shop(name)), Some(BEARER), None);
        assert_eq!(a.status, 200, "{name}: {:?}", a.json());
        assert_eq!(a.json()["access_token"], token.as_str());
    }
    let mut b = b;
    b.kill9();
}

/// Two 503s that do not come from the broker's own start:
///
/// * a grant still being recovered in the background after the open's budget (`recovery_budget: 0`):
///   the engine is open and ready, that one shop answers 503 `recovering` (the engine's
///   `Error::Recovering`), and once its retry is answered it is served;
/// * a refresh that fails transiently while the current token has less than the refresh margin left:
///   the engine falls back to that token, and the broker answers 503 `upstream` rather than hand out
///   a token a client library would try to refresh itself.
#[test]
fn per_grant_recovery_and_a_token_inside_the_margin_answer_503() {
    let sim = BlockingSim::start_with(tokenwal_sim::SimConfig::default(), 2);
    let base = sim.h().base_url();
    let (_dir, db, sock, config) = broker_paths(r#"{"recovery_budget": 0}"#);
    let mut b = start(&db, &sock, &config, &base, None);
    wait_ready(&b);
    let slow = sim.h().seed_shop(&shop("slow"));
    sim.h().hold(&shop("slow"));
    let path = format!("/v1/shops/{}/grant", shop("slow"));
    assert_eq!(
        call(&sock, "PUT", &path, Some(BEARER), Some(&grant_body(&slow, json!({"expires_at": 1_700_000_000})))).status,
        200
    );
    let s2 = sock.clone();
    let waiter = std::thread::spawn(move || {
        let c = std::os::unix::net::UnixStream::connect(&s2).unwrap();
        let _ = try_exchange(c, "GET", &format!("/v1/shops/{}/token", shop("slow")), Some(BEARER), None);
    });
    assert!(sim.runtime().block_on(sim.h().wait_held(&shop("slow"), Duration::from_secs(20))));
    b.kill9();
    waiter.join().unwrap();
    sim.h().cancel(&shop("slow"));

    sim.h().hold(&shop("slow"));
    let log = Arc::clone(&b.log);
    let mut b = start(&db, &sock, &config, &base, Some(log));
    wait_ready(&b);
    assert!(sim.runtime().block_on(sim.h().wait_held(&shop("slow"), Duration::from_secs(20))));
    let slow_token = format!("/v1/shops/{}/token", shop("slow"));
    let a = call(&sock, "GET", &slow_token, Some(BEARER), None);
    assert_eq!((a.status, a.json()["reason"].clone()), (503, json!("recovering")), "{:?}", a.json());
    assert!(a.header("retry-after").is_some());
    assert!(sim.h().release(&shop("slow")));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = call(&sock, "GET", &slow_token, Some(BEARER), None);
        if a.status == 200 {
            let t = a.json()["access_token"].as_str().unwrap().to_owned();
            assert!(accepted(sim.h(), "slow", &tokenwal::core::AccessToken::new(t.as_str())));
            break;
        }
        assert_eq!(a.json()["reason"], "recovering", "{:?}", a.json());
        assert!(Instant::now() < deadline, "never served after recovery");
        std::thread::sleep(Duration::from_millis(50));
    }

    // 200 s left, under the 300 s margin; the refresh fails before processing.
    let edge = sim.h().seed_shop(&shop("edge"));
    // Before the install: the scheduler may try the due shop at once.
    let fault = tokenwal_sim::Fault::FailBeforeProcessing { status: 503, json: false };
    sim.h().push_faults(&shop("edge"), vec![fault; 5]).unwrap();
    let path = format!("/v1/shops/{}/grant", shop("edge"));
    assert_eq!(
        call(&sock, "PUT", &path, Some(BEARER), Some(&grant_body(&edge, json!({"expires_in": 200})))).status,
        200
    );
    let a = call(&sock, "GET", &format!("/v1/shops/{}/token", shop("edge")), Some(BEARER), None);
    assert_eq!((a.status, a.json()["reason"].clone()), (503, json!("upstream")), "{:?}", a.json());
    assert!(a.header("retry-after").is_some());
    assert!(!String::from_utf8_lossy(&a.body).contains(edge.access_token.as_str()));
    b.kill9();
}

/// The broker renders a token's answer once and reuses it while the engine hands out that token:
/// after every way the token changes (a 401 report rotates it, an install replaces it) the very next
/// answer, and every one after it, carries the new token with its own expiry and scope, never the
/// cached answer of the old one.
#[test]
fn a_cached_answer_never_outlives_its_token() {
    let sim = BlockingSim::start_with(tokenwal_sim::SimConfig::default(), 2);
    let base = sim.h().base_url();
    let (_dir, db, sock, config) = broker_paths("{}");
    let mut b = start(&db, &sock, &config, &base, None);
    wait_ready(&b);
    let seeded = sim.h().seed_shop(&shop("rot"));
    let grant = format!("/v1/shops/{}/grant", shop("rot"));
    let token = format!("/v1/shops/{}/token", shop("rot"));
    assert_eq!(
        call(&sock, "PUT", &grant, Some(BEARER), Some(&grant_body(&seeded, json!({"expires_in": 3600})))).status,
        200
    );
    let get = || {
        let a = call(&sock, "GET", &token, Some(BEARER), None);
        assert_eq!(a.status, 200, "{:?}", a.json());
        a.json()
    };
    let t1 = get();
    assert_eq!(t1["access_token"], seeded.access_token.as_str());
    for _ in 0..3 {
        let t = get();
        assert_eq!((&t["access_token"], &t["expires_at"]), (&t1["access_token"], &t1["expires_at"]));
    }

    // A 401 seen with the cached token: rotated; its answer and every later one carry the new token.
    let body = json!({"access_token": seeded.access_token.as_str()}).to_string();
    let a =
        call(&sock, "POST", &format!("/v1/shops/{}/unauthorized", shop("rot")), Some(BEARER), Some(body.as_bytes()));
    assert_eq!(a.status, 200, "{:?}", a.json());
    let t2 = a.json();
    assert_ne!(t2["access_token"], t1["access_token"]);
    assert!(accepted(sim.h(), "rot", &tokenwal::core::AccessToken::new(t2["access_token"].as_str().unwrap())));
    for _ in 0..3 {
        let t = get();
        assert_eq!((&t["access_token"], &t["expires_at"]), (&t2["access_token"], &t2["expires_at"]), "{t}");
    }
    assert_eq!(requests(sim.h(), "rot"), 1);

    // A newer pair installed (it expires later than the held one): the next answer is the new pair's,
    // with its expiry and scope.
    let installed = json!({
        "access_token": "shpat_installed_by_the_test",
        "refresh_token": "shprt_installed_by_the_test",
        "expires_in": 7200,
        "scope": "read_products",
    })
    .to_string();
    assert_eq!(call(&sock, "PUT", &grant, Some(BEARER), Some(installed.as_bytes())).status, 200);
    for _ in 0..3 {
        let t = get();
        assert_eq!(t["access_token"], "shpat_installed_by_the_test", "{t}");
        assert_eq!(t["scope"], "read_products", "{t}");
        assert_ne!(t["expires_at"], t2["expires_at"], "{t}");
        assert!(t["expires_in"].as_u64().unwrap() > 3600, "{t}");
    }
    b.kill9();
}
