//! Drives `tokenwal serve` the way the broker suites do: a real process on a real Unix socket, and a
//! minimal HTTP/1.1 client over it (one request per connection, `Connection: close`).
//!
//! The binary's path comes from the caller (`env!("CARGO_BIN_EXE_tokenwal")`).

use crate::cli::{clean_command, test_key, CREDENTIALS};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends one request on `s` and reads the answer (panics if there is none).
pub fn exchange(s: impl Read + Write, method: &str, path: &str, bearer: Option<&str>, body: Option<&[u8]>) -> Answer {
    try_exchange(s, method, path, bearer, body).unwrap_or_else(|| panic!("{method} {path}: no HTTP answer"))
}

/// Sends one request on `s`; `None` if the connection closed without an answer (the process exited).
pub fn try_exchange(
    mut s: impl Read + Write,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
) -> Option<Answer> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = bearer {
        head.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    match body {
        Some(b) => head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len())),
        None if method != "GET" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    // The broker may answer (413) before reading a large body: a failed write is not the test's concern.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.unwrap_or_default()));
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    if raw.is_empty() {
        return None;
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    assert!(
        !headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "chunked answers are not expected"
    );
    Some(Answer { status, headers, body: raw[split + 4..].to_vec() })
}

/// One request over the Unix socket `sock` (panics if it cannot connect or gets no answer).
pub fn call(sock: &Path, method: &str, path: &str, bearer: Option<&str>, body: Option<&[u8]>) -> Answer {
    try_call(sock, method, path, bearer, body).unwrap_or_else(|| panic!("{method} {path} at {sock:?}: no answer"))
}

/// One request over the Unix socket `sock`; `None` if nothing listens there or no answer came (the
/// broker is down or exited meanwhile).
pub fn try_call(sock: &Path, method: &str, path: &str, bearer: Option<&str>, body: Option<&[u8]>) -> Option<Answer> {
    let s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    try_exchange(s, method, path, bearer, body)
}

/// A `tokenwal --db DB serve ARGS` command with a clean environment, the test store key, the
/// simulator's default app and `sim_base` as the endpoint (no bearer token: the caller adds one).
pub fn serve_command(bin: &str, db: &Path, sim_base: &str, args: &[&str]) -> Command {
    let mut cmd = clean_command(bin);
    cmd.env_remove("TOKENWAL_BROKER_TOKEN")
        .arg("--db")
        .arg(db)
        .arg("serve")
        .args(args)
        .env("TOKENWAL_STORE_KEY", test_key())
        .env("TOKENWAL_INSECURE_TEST_ENDPOINT", sim_base)
        .envs(CREDENTIALS);
    cmd
}

/// A running broker process: its stderr lines collect in `log`.
pub struct Broker {
    /// The process.
    pub child: Child,
    /// Its stderr so far (kept across restarts when passed back to [`Broker::start`]).
    pub log: Arc<Mutex<Vec<String>>>,
    /// Its socket.
    pub sock: PathBuf,
    /// Its bearer token.
    pub bearer: String,
}

/// How to start a broker: the binary, the store, the simulator, the config file, the bearer token.
#[derive(Clone, Debug)]
pub struct BrokerSetup {
    /// The `tokenwal` binary.
    pub bin: String,
    /// `--db`: a directory or a `postgres://` URL.
    pub db: PathBuf,
    /// The simulator's base URL.
    pub sim_base: String,
    /// `--config`.
    pub config: PathBuf,
    /// `TOKENWAL_BROKER_TOKEN`.
    pub bearer: String,
}

impl Broker {
    /// Starts a broker for `setup` on `sock` at trace level (`--grace 10s`) and waits for its
    /// `listening on` line; `log` carries on an earlier run's log.
    pub fn start(setup: &BrokerSetup, sock: &Path, log: Option<Arc<Mutex<Vec<String>>>>) -> Broker {
        let listen = format!("unix:{}", sock.display());
        let mut child = serve_command(&setup.bin, &setup.db, &setup.sim_base, &["--listen", &listen, "--grace", "10s"])
            .arg("--config")
            .arg(&setup.config)
            .env("TOKENWAL_BROKER_TOKEN", &setup.bearer)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = log.unwrap_or_default();
        let want = format!("listening on {listen}");
        let before = log.lock().unwrap().iter().filter(|l| **l == want).count();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while log.lock().unwrap().iter().filter(|l| **l == want).count() == before {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("broker exited {s}: {}", log.lock().unwrap().join("\n"));
            }
            assert!(Instant::now() < deadline, "no `{want}` line: {}", log.lock().unwrap().join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { child, log, sock: sock.to_owned(), bearer: setup.bearer.clone() }
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL, and reaped.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One request with its bearer token.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Answer {
        call(&self.sock, method, path, Some(&self.bearer), body)
    }

    /// Waits (at most 30 s) until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while try_call(&self.sock, "GET", "/readyz", Some(&self.bearer), None).is_none_or(|a| a.status != 200) {
            assert!(Instant::now() < deadline, "never ready: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    /// A broker left running by a failed test would keep its database sessions.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `PUT …/grant` body for a simulator-seeded shop; `expiry` is `{"expires_at": …}` or
/// `{"expires_in": …}`.
pub fn grant_body(t: &tokenwal_sim::TokenSet, expiry: serde_json::Value) -> Vec<u8> {
    let mut b = serde_json::json!({
        "access_token": t.access_token.as_str(),
        "refresh_token": t.refresh_token.as_str(),
        "refresh_token_expires_in": t.refresh_token_expires_in,
        "scope": t.scope,
    });
    let (k, v) = expiry.as_object().unwrap().iter().next().unwrap();
    b[k] = v.clone();
    b.to_string().into_bytes()
}

/// Writes `text` to `path` with `mode`.
pub fn write_private(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
