//! The `tokenwal` binary against a real OAuth 2.0 server no one here wrote — panva's `oidc-provider`
//! (npm, `tests/oidc/server.js`) — through a provider profile read from a TOML providers file:
//! a **public client** (`client_auth = "none"`: no secret anywhere) whose first grant is an
//! authorization code exchanged with **PKCE** by the test (the app's part), and a server that
//! **rotates** the refresh token on every refresh and **revokes the whole grant when a retired
//! refresh token is presented** (`rotation = "family-revoke-on-reuse"`).
//!
//! A fault-injecting proxy sits between tokenwal and the server. The suite shows:
//!
//! - many rotations through `tokenwal token` processes, with answers lost after the server rotated
//!   (the proxy drops them), failures before the server saw anything, and `tokenwal` killed with
//!   SIGKILL mid-refresh both before and after the server rotated: the grant survives every fault
//!   the server did not see, and is reported as needing re-login (exit 77) exactly when an answer
//!   carrying a rotation was lost — and each time the server confirms that the family is really
//!   dead (no false re-auth), and a new login brings the grant back;
//! - reuse detection is real: replaying a retired refresh token by hand makes the server revoke the
//!   family, and tokenwal then reports the grant dead after one request, instead of looping.
//!
//! Needs node and `npm ci` in `tests/oidc` (`.ci/run`); skipped with a message without node unless
//! `TOKENWAL_REQUIRE_NODE=1` (CI), in which case it fails.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokenwal_testkit::cli::Out;
use tokenwal_testkit::oidc::OidcServer;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const CLIENT: &str = "public-client";
const REDIRECT: &str = "http://127.0.0.1:1/callback";
const EXIT_NEEDS_REAUTH: i32 = 77;
/// Long enough for a token of the public client (3 s, `tests/oidc/server.js`) to be due (at half its
/// life).
const DUE: Duration = Duration::from_millis(1_600);
/// Long enough for it to have expired. While the access token is still valid, a `tokenwal token`
/// whose early refresh fails (ambiguously, or rejected) answers with that token and leaves the
/// outcome to the next call; once it has expired the call must wait for the outcome — the case
/// the rounds that lose a rotation are about.
const EXPIRED: Duration = Duration::from_millis(3_200);

/// What the proxy does with one token request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Forward and answer.
    Pass,
    /// Answer 503 without forwarding: the server saw nothing.
    FailBefore,
    /// Forward, then answer 520 with a plain-text body: the server rotated, the answer is lost.
    DropAfter,
    /// Hold the request without forwarding (the test kills tokenwal meanwhile).
    HoldBefore,
    /// Forward, then hold the answer (the test kills tokenwal meanwhile).
    HoldAfter,
}

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    faults: Mutex<VecDeque<Fault>>,
    /// Requests that reached the proxy.
    requests: AtomicUsize,
    /// Every token pair the server issued through the proxy (answered or not), oldest first.
    issued: Mutex<Vec<(String, String)>>,
    /// Told when a held request arrives.
    held: Mutex<mpsc::Sender<Fault>>,
}

async fn proxy_token(
    axum::extract::State(p): axum::extract::State<Arc<ProxyState>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    p.requests.fetch_add(1, Ordering::SeqCst);
    let fault = p.faults.lock().unwrap().pop_front().unwrap_or(Fault::Pass);
    match fault {
        Fault::FailBefore => {
            return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable").into_response()
        }
        Fault::HoldBefore => {
            let _ = p.held.lock().unwrap().send(fault);
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    assert!(!headers.contains_key("authorization"), "a public client sends no Authorization header");
    assert_eq!(form.get("client_id").map(String::as_str), Some(CLIENT));
    assert!(!form.contains_key("client_secret"), "a public client sends no secret");
    let mut req = p.client.post(&p.upstream).body(body);
    for name in ["content-type", "accept"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.clone());
        }
    }
    let resp = req.send().await.expect("upstream answers");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("upstream body");
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if let (Some(a), Some(r)) = (v["access_token"].as_str(), v["refresh_token"].as_str()) {
        p.issued.lock().unwrap().push((a.to_owned(), r.to_owned()));
    }
    match fault {
        Fault::DropAfter => (
            axum::http::StatusCode::from_u16(520).unwrap(),
            [(axum::http::header::CONTENT_TYPE, "text/plain")],
            "error code: 520",
        )
            .into_response(),
        Fault::HoldAfter => {
            let _ = p.held.lock().unwrap().send(fault);
            std::future::pending().await
        }
        _ => (
            axum::http::StatusCode::from_u16(status).unwrap(),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response(),
    }
}

/// The server, the proxy in front of its token endpoint, and a store and config for tokenwal.
struct Rig {
    server: OidcServer,
    rt: tokio::runtime::Runtime,
    proxy: Arc<ProxyState>,
    held: mpsc::Receiver<Fault>,
    dir: tempfile::TempDir,
    config: String,
    http: reqwest::Client,
}

impl Rig {
    fn start() -> Option<Rig> {
        let server = tokenwal_testkit::oidc::start()?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (tx, held) = mpsc::channel();
        let proxy = Arc::new(ProxyState {
            upstream: server.token_url(),
            client: reqwest::Client::new(),
            faults: Mutex::default(),
            requests: AtomicUsize::new(0),
            issued: Mutex::default(),
            held: Mutex::new(tx),
        });
        let p2 = Arc::clone(&proxy);
        let proxy_url = rt.block_on(async move {
            let app = axum::Router::new().route("/token", axum::routing::post(proxy_token)).with_state(p2);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/token", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            url
        });
        let dir = tempfile::tempdir().unwrap();
        // The profile under test, as an operator would write it. The server's access tokens for
        // this client live 3 s (server.js), so tokenwal refreshes each at half its life, 1.5 s: a
        // `tokenwal token` after [`DUE`] is one rotation.
        let providers = dir.path().join("providers.toml");
        std::fs::write(
            &providers,
            format!(
                "# oidc-provider's public client\n\
                 [providers.oidc]\n\
                 token_url = \"{proxy_url}\"\n\
                 client_auth = \"none\"\n\
                 rotation = \"family-revoke-on-reuse\"\n\
                 refresh_buffer = \"30s\"\n"
            ),
        )
        .unwrap();
        let config = dir.path().join("config.json");
        let json = serde_json::json!({
            "client_id": CLIENT,
            "providers_file": providers,
            "provider": "oidc",
            "request_timeout": "5s",
            "max_wait": "20s",
        });
        std::fs::write(&config, json.to_string()).unwrap();
        let config = config.to_str().unwrap().to_owned();
        Some(Rig { server, rt, proxy, held, dir, config, http: reqwest::Client::new() })
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }

    fn tokenwal(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut all = vec!["--config", self.config.as_str()];
        all.extend_from_slice(args);
        tokenwal_testkit::cli::run(BIN, &self.db(), &all, &[], stdin, true)
    }

    fn requests(&self) -> usize {
        self.proxy.requests.load(Ordering::SeqCst)
    }

    fn fault(&self, f: Fault) {
        self.proxy.faults.lock().unwrap().push_back(f);
    }

    /// The newest pair the server issued through the proxy.
    fn newest(&self) -> (String, String) {
        self.proxy.issued.lock().unwrap().last().cloned().expect("the server issued a pair")
    }

    /// The app's part: an authorization request with a PKCE challenge (S256) for `account`, the
    /// redirects followed with the server's cookies, the code exchanged with the verifier, and the
    /// pair handed to `tokenwal import`. Returns the pair.
    fn login(&self, account: &str) -> (String, String) {
        let (access, refresh) = self.rt.block_on(authorization_code_with_pkce(&self.server.base, account));
        let line = serde_json::json!({
            "account": account, "access_token": access, "refresh_token": refresh, "expires_in": 3,
        });
        let out = self.tokenwal(&["import"], Some(&line.to_string()));
        assert_eq!(out.code, 0, "{out:?}");
        (access, refresh)
    }

    /// Presents `refresh` to the server directly (bypassing the proxy): the HTTP status.
    fn direct_refresh(&self, refresh: &str) -> u16 {
        self.rt.block_on(async {
            let form = [("grant_type", "refresh_token"), ("client_id", CLIENT), ("refresh_token", refresh)];
            self.http.post(self.server.token_url()).form(&form).send().await.unwrap().status().as_u16()
        })
    }

    /// Whose access token `access` is, by the server's userinfo endpoint (`None`: rejected).
    fn userinfo(&self, access: &str) -> Option<String> {
        self.rt.block_on(async {
            let r = self.http.get(format!("{}/me", self.server.base)).bearer_auth(access).send().await.unwrap();
            if r.status() != 200 {
                return None;
            }
            let v: serde_json::Value = r.json().await.unwrap();
            v["sub"].as_str().map(str::to_owned)
        })
    }

    /// Spawns `tokenwal token ACCOUNT`, waits until the proxy holds its request, and kills it with
    /// SIGKILL (no shutdown of any kind).
    fn kill_mid_refresh(&self, account: &str, hold: Fault) {
        self.fault(hold);
        let mut child = tokenwal_testkit::cli::clean_command(BIN)
            .arg("--db")
            .arg(self.db())
            .args(["--config", &self.config, "token", account])
            .env("TOKENWAL_STORE_KEY", tokenwal_testkit::cli::test_key())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let seen = self.held.recv_timeout(Duration::from_secs(30)).expect("the refresh reaches the proxy");
        assert_eq!(seen, hold);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "killed, not exited");
    }
}

/// RFC 7636's S256 challenge of `verifier`: base64url(SHA-256), no padding.
fn s256(verifier: &str) -> String {
    use sha2::Digest;
    base64url(&sha2::Sha256::digest(verifier.as_bytes()))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The authorization request's and the redirects' cookies, kept by name.
fn keep_cookies(jar: &mut HashMap<String, String>, resp: &reqwest::Response) {
    for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
        let pair = v.to_str().unwrap().split(';').next().unwrap();
        if let Some((name, value)) = pair.split_once('=') {
            jar.insert(name.trim().to_owned(), value.to_owned());
        }
    }
}

/// GETs `url` without following redirects, sending and keeping cookies: the `Location`.
async fn step(http: &reqwest::Client, jar: &mut HashMap<String, String>, url: &str) -> String {
    let cookie = jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ");
    let resp = http.get(url).header(reqwest::header::COOKIE, cookie).send().await.unwrap();
    keep_cookies(jar, &resp);
    assert!(resp.status().is_redirection(), "{url}: {}", resp.status());
    resp.headers()[reqwest::header::LOCATION].to_str().unwrap().to_owned()
}

/// The authorization request of a public client for `account` (with `challenge` as its S256 PKCE
/// challenge, if any), its redirects followed with the server's cookies (the server's interaction
/// endpoint logs `account` in at once: no browser). Returns the query of the redirect to the app.
async fn authorize(base: &str, account: &str, challenge: Option<&str>) -> HashMap<String, String> {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let state = format!("{:x}", rand::random::<u64>());
    let mut auth = url::Url::parse(&format!("{base}/auth")).unwrap();
    auth.query_pairs_mut()
        .append_pair("client_id", CLIENT)
        .append_pair("response_type", "code")
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", "openid offline_access")
        .append_pair("login_hint", account)
        .append_pair("state", &state);
    if let Some(c) = challenge {
        auth.query_pairs_mut().append_pair("code_challenge", c).append_pair("code_challenge_method", "S256");
    }
    let mut jar = HashMap::new();
    let mut url = auth;
    for _ in 0..5 {
        let location = step(&http, &mut jar, url.as_str()).await;
        url = url.join(&location).unwrap();
        if url.as_str().starts_with(REDIRECT) {
            let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
            assert_eq!(q.get("state"), Some(&state), "{url}");
            return q;
        }
    }
    panic!("no redirect to the app after 5 steps: {url}");
}

/// The code exchange at the token endpoint (a public client: `client_id`, no secret): the status and
/// the JSON answer.
async fn exchange(base: &str, code: &str, verifier: Option<&str>) -> (u16, serde_json::Value) {
    let mut form =
        vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", REDIRECT), ("client_id", CLIENT)];
    form.extend(verifier.map(|v| ("code_verifier", v)));
    let resp = reqwest::Client::new().post(format!("{base}/token")).form(&form).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or_default())
}

/// A PKCE verifier: 64 random hex characters (RFC 7636 allows 43-128 of `[A-Za-z0-9-._~]`).
fn verifier() -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>(),
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The authorization code grant with PKCE, as a SPA or a headless storefront does it: (access
/// token, refresh token).
async fn authorization_code_with_pkce(base: &str, account: &str) -> (String, String) {
    let verifier = verifier();
    let q = authorize(base, account, Some(&s256(&verifier))).await;
    let code = q.get("code").unwrap_or_else(|| panic!("no code: {q:?}"));
    let (status, v) = exchange(base, code, Some(&verifier)).await;
    assert_eq!(status, 200, "{v}");
    (v["access_token"].as_str().unwrap().to_owned(), v["refresh_token"].as_str().unwrap().to_owned())
}

#[test]
fn the_public_client_must_use_pkce() {
    let Some(rig) = Rig::start() else { return };
    let base = rig.server.base.clone();
    rig.rt.block_on(async {
        // No challenge: the authorization request is refused.
        let q = authorize(&base, "carol", None).await;
        assert_eq!(q.get("error").map(String::as_str), Some("invalid_request"), "{q:?}");
        assert!(q["error_description"].contains("PKCE"), "{q:?}");
        // A code exchanged without its verifier, or with another one, is refused.
        for wrong in [None, Some(verifier())] {
            let v = verifier();
            let q = authorize(&base, "carol", Some(&s256(&v))).await;
            let (status, answer) = exchange(&base, &q["code"], wrong.as_deref()).await;
            assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_grant")), "{answer}");
        }
        // With it: a refresh token for the public client.
        let (access, refresh) = authorization_code_with_pkce(&base, "carol").await;
        assert!(!access.is_empty() && !refresh.is_empty());
    });
}

#[test]
fn rotations_survive_every_fault_the_server_did_not_see_and_need_relogin_exactly_when_a_rotation_was_lost() {
    let Some(rig) = Rig::start() else { return };
    let account = "alice";
    rig.login(account);
    let pattern = [
        Fault::Pass,
        Fault::Pass,
        Fault::FailBefore,
        Fault::Pass,
        Fault::DropAfter,
        Fault::Pass,
        Fault::HoldBefore,
        Fault::Pass,
        Fault::HoldAfter,
        Fault::Pass,
    ];
    let (mut rotations, mut relogins) = (0, 0);
    for (round, fault) in pattern.iter().cycle().take(3 * pattern.len()).copied().enumerate() {
        let lost_rotation = matches!(fault, Fault::DropAfter | Fault::HoldAfter);
        std::thread::sleep(if lost_rotation { EXPIRED } else { DUE });
        match fault {
            Fault::HoldBefore | Fault::HoldAfter => rig.kill_mid_refresh(account, fault),
            f => rig.fault(f),
        }
        let out = rig.tokenwal(&["token", account], None);
        for (_, refresh) in rig.proxy.issued.lock().unwrap().iter() {
            assert!(!out.all().contains(refresh.as_str()), "round {round}: a refresh token was printed");
        }
        let (newest_access, newest_refresh) = rig.newest();
        if lost_rotation {
            // The server rotated and the answer never reached tokenwal: the only way to learn the
            // outcome was to present the old token again, which the server takes for reuse.
            assert_eq!(out.code, EXIT_NEEDS_REAUTH, "round {round} ({fault:?}): {out:?}");
            // Not a false re-auth: the family is really dead at the server — the rotation in the
            // lost answer, and the access tokens with it.
            assert_eq!(rig.direct_refresh(&newest_refresh), 400, "round {round}: the lost rotation is revoked");
            assert_eq!(rig.userinfo(&newest_access), None, "round {round}: its access token is revoked");
            // Not a loop: asked again, tokenwal says the same and sends nothing.
            let sent = rig.requests();
            let again = rig.tokenwal(&["token", account], None);
            assert_eq!(again.code, EXIT_NEEDS_REAUTH, "{again:?}");
            assert_eq!(rig.requests(), sent, "round {round}: a dead grant is not retried");
            // The app logs the user in again and hands tokenwal the new pair.
            rig.login(account);
            relogins += 1;
        } else {
            // Every fault the server did not see (503 before forwarding, a kill before the request
            // left the proxy) ends healthy, on the newest rotation, which the server accepts.
            assert_eq!(out.code, 0, "round {round} ({fault:?}): {out:?}");
            assert_eq!(out.stdout.trim(), newest_access, "round {round}: tokenwal serves the newest rotation");
            assert_eq!(rig.userinfo(&newest_access).as_deref(), Some(account), "round {round}");
            rotations += 1;
        }
    }
    assert_eq!((rotations, relogins), (24, 6));
    // The grant is alive at the end: one more rotation through `run --once`'s due refresh.
    std::thread::sleep(DUE);
    let sent = rig.requests();
    let out = rig.tokenwal(&["run", "--once"], None);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(rig.requests(), sent + 1);
    let (access, _) = rig.newest();
    std::thread::sleep(DUE);
    assert_eq!(rig.tokenwal(&["token", account], None).code, 0);
    assert_ne!(rig.newest().0, access, "a token call after DUE rotates");
}

#[test]
fn replaying_a_retired_refresh_token_revokes_the_family_and_tokenwal_reports_the_grant_dead() {
    let Some(rig) = Rig::start() else { return };
    let (_, retired) = rig.login("bob");
    // Two rotations through tokenwal: the code exchange's refresh token is retired.
    for _ in 0..2 {
        std::thread::sleep(DUE);
        assert_eq!(rig.tokenwal(&["token", "bob"], None).code, 0);
    }
    let (access, live) = rig.newest();
    assert_eq!(rig.userinfo(&access).as_deref(), Some("bob"));

    // Someone replays the retired token by hand (a stolen copy, an old backup): the server refuses
    // it and revokes the whole family — the access token tokenwal serves dies at once.
    assert_eq!(rig.direct_refresh(&retired), 400);
    assert_eq!(rig.userinfo(&access), None, "the family's access token is revoked");

    // tokenwal presents its live token once, is refused, and reports the grant dead.
    std::thread::sleep(EXPIRED);
    let sent = rig.requests();
    let out = rig.tokenwal(&["token", "bob"], None);
    assert_eq!(out.code, EXIT_NEEDS_REAUTH, "{out:?}");
    assert_eq!(rig.requests(), sent + 1, "one request: the live token, refused");
    // Not a loop: neither `token` nor `run --once` sends anything for a dead grant.
    assert_eq!(rig.tokenwal(&["token", "bob"], None).code, EXIT_NEEDS_REAUTH);
    let out = rig.tokenwal(&["run", "--once"], None);
    assert!(!out.all().contains(&live), "{out:?}");
    assert_eq!(rig.requests(), sent + 1, "{out:?}");
    // The server agrees: the token tokenwal held is dead too.
    assert_eq!(rig.direct_refresh(&live), 400);
}
