//! The real OAuth 2.0 server of the oidc-provider suites: panva's `oidc-provider` (npm) run by node
//! from `tests/oidc/server.js` (rotation on every refresh, reuse detection, a confidential client
//! with a minting grant, a public client with the authorization code grant and PKCE).
//!
//! Needs node and `npm ci` in `tests/oidc` (`.ci/run` does both). Without node, [`start`] returns
//! `None` (the caller skips, saying why) unless `TOKENWAL_REQUIRE_NODE=1` (CI sets it): then it
//! panics, so that a CI run never skips the suite.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running server; killed when dropped.
pub struct OidcServer {
    child: Child,
    /// `http://127.0.0.1:PORT` (the issuer; the token endpoint is `{base}/token`).
    pub base: String,
}

impl OidcServer {
    /// The token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.base)
    }
}

impl Drop for OidcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tests/oidc` of the workspace.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/oidc")
}

/// Starts the server on a free loopback port, or returns `None` (skip) when node is absent and not
/// required.
pub fn start() -> Option<OidcServer> {
    let dir = dir();
    let required = std::env::var("TOKENWAL_REQUIRE_NODE").is_ok_and(|v| v == "1");
    if Command::new("node").arg("--version").output().is_err() {
        assert!(!required, "TOKENWAL_REQUIRE_NODE=1 but node is not installed");
        eprintln!(
            "SKIPPED: node is not installed; the oidc-provider suite needs it (install node and run `npm ci` in tests/oidc)"
        );
        return None;
    }
    assert!(
        dir.join("node_modules/oidc-provider").exists(),
        "oidc-provider is not installed: run `npm ci` in {}",
        dir.display()
    );
    let mut child = Command::new("node")
        .arg("server.js")
        .arg("0")
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let port = loop {
        let line = lines.next().expect("server prints its port").expect("readable stdout");
        if let Some(p) = line.strip_prefix("LISTENING ") {
            break p.trim().to_owned();
        }
    };
    // Keep draining stdout (oidc-provider prints warnings) so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Some(OidcServer { child, base: format!("http://127.0.0.1:{port}") })
}
