//! The `tokenwal-sim` binary prints its address and serves the configured app.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Kills the child even when an assertion fails.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_prints_its_address_and_serves() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_tokenwal-sim"))
            .args(["--listen", "127.0.0.1:0", "--seed", "3", "--client-id", "bin-app", "--policy", "strict"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tokenwal-sim"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    let base = line.trim().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{base:?}");

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let config: serde_json::Value = http.get(format!("{base}/_sim/config")).send().await.unwrap().json().await.unwrap();
    assert_eq!(config["policy"]["kind"], "strict");
    let seeded = http
        .post(format!("{base}/_sim/shops"))
        .json(&serde_json::json!({"shop": "a.myshopify.com", "client_id": "bin-app"}))
        .send()
        .await
        .unwrap();
    assert!(seeded.status().is_success());
}
