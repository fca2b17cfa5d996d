//! Runs the `tokenwal` binary the way the CLI suites do: a clean environment (no variable of the
//! caller's that the CLI reads), the fixed test store key unless told otherwise, optional stdin.
//!
//! The binary's path comes from the caller (`env!("CARGO_BIN_EXE_tokenwal")` is only defined in
//! the CLI package's own tests).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Every environment variable the CLI reads: removed before each run.
pub const ENV_VARS: [&str; 9] = [
    "TOKENWAL_STORE_KEY",
    "TOKENWAL_STORE_KEY_FILE",
    "TOKENWAL_CLIENT_ID",
    "TOKENWAL_CLIENT_SECRET",
    "TOKENWAL_DB",
    "TOKENWAL_CONFIG",
    "TOKENWAL_PROVIDERS",
    "TOKENWAL_INSECURE_TEST_ENDPOINT",
    "RUST_LOG",
];

/// The simulator's default app as CLI environment variables.
pub const CREDENTIALS: [(&str, &str); 2] =
    [("TOKENWAL_CLIENT_ID", crate::CLIENT_ID), ("TOKENWAL_CLIENT_SECRET", crate::SECRET)];

/// What a run printed, and its exit code (-1 if killed by a signal).
#[derive(Debug)]
pub struct Out {
    /// The exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Standard output, a newline, standard error.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// The fixed, public test store key, base64.
pub fn test_key() -> String {
    tokenwal_store::StoreKey::insecure_test_key().to_base64().to_string()
}

/// A `Command` for `bin` with every variable of [`ENV_VARS`] removed.
pub fn clean_command(bin: &str) -> Command {
    let mut cmd = Command::new(bin);
    for k in ENV_VARS {
        cmd.env_remove(k);
    }
    cmd
}

/// Runs `bin --db DB ARGS` with a clean environment plus (if `with_key`) `TOKENWAL_STORE_KEY` set
/// to the test key, and `env`, feeding `stdin`.
pub fn run(bin: &str, db: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>, with_key: bool) -> Out {
    let mut cmd = clean_command(bin);
    cmd.arg("--db").arg(db).args(args);
    if with_key {
        cmd.env("TOKENWAL_STORE_KEY", test_key());
    }
    cmd.envs(env.iter().copied());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tokenwal");
    if let Some(input) = stdin {
        // A command that does not read stdin may exit first: a broken pipe is not a failure.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Spawns `bin --db DB ARGS` (a daemon such as `run`) with a clean environment plus the test key and
/// `env`; stdin and stdout are null, and stderr's lines arrive on the returned channel (it ends when
/// the process closes stderr).
pub fn spawn(
    bin: &str,
    db: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = clean_command(bin)
        .arg("--db")
        .arg(db)
        .args(args)
        .env("TOKENWAL_STORE_KEY", test_key())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokenwal");
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// The CLI environment for the simulator: its default app's credentials and its endpoint.
pub fn sim_env(sim: &tokenwal_sim::SimHandle) -> Vec<(&'static str, String)> {
    vec![
        (CREDENTIALS[0].0, CREDENTIALS[0].1.to_string()),
        (CREDENTIALS[1].0, CREDENTIALS[1].1.to_string()),
        ("TOKENWAL_INSECURE_TEST_ENDPOINT", sim.base_url()),
    ]
}

/// [`sim_env`] plus `TOKENWAL_CONFIG`: a config file written in `dir` with `json` (an object).
pub fn sim_env_with_config(sim: &tokenwal_sim::SimHandle, dir: &Path, json: &str) -> Vec<(&'static str, String)> {
    let config = dir.join("config.json");
    std::fs::write(&config, json).unwrap();
    let mut env = sim_env(sim);
    env.push(("TOKENWAL_CONFIG", config.display().to_string()));
    env
}

/// Borrows an owned environment as [`run`] and [`spawn`] take it.
pub fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Waits until `child` exits and returns its code (`None`: killed by a signal); panics after `within`.
pub fn exits_within(child: &mut std::process::Child, within: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(std::time::Instant::now() < deadline, "tokenwal did not exit within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Sends SIGTERM to `pid` (panics if it cannot be sent).
pub fn sigterm(pid: u32) {
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
}

/// Reads lines from `rx` until one contains `needle` and returns them all; panics after `within`.
pub fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str, within: std::time::Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains(needle)) {
        assert!(std::time::Instant::now() < deadline, "no {needle:?} within {within:?}:\n{}", log.join("\n"));
        if let Ok(l) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            log.push(l);
        }
    }
    log
}

/// Kills a process (resuming it first, should it be stopped) when a test ends, passed or not: a
/// stopped or forgotten process would keep its database sessions, and the scratch schema could not
/// be dropped.
pub struct Resume(pub u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let pid = self.0.to_string();
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
}

/// Seeds each of `shops` in the simulator and `tokenwal import`s their tokens (access tokens
/// already expired: every shop is due) into `db`.
pub fn import_seeded(bin: &str, db: &Path, sim: &tokenwal_sim::SimHandle, shops: &[String]) {
    let lines: Vec<String> = shops
        .iter()
        .map(|shop| {
            let t = sim.seed_shop(shop);
            format!(
                r#"{{"shop":"{shop}","access_token":"{}","refresh_token":"{}","expires_at":1700000000,"refresh_token_expires_in":7776000}}"#,
                t.access_token.as_str(),
                t.refresh_token.as_str()
            )
        })
        .collect();
    let out = run(bin, db, &["import"], &[], Some(&lines.join("\n")), true);
    assert_eq!(out.code, 0, "{out:?}");
}

/// `tokenwal shops --json`: one object per shop (`shop`, `state`, …).
pub fn shops_json(bin: &str, db: &Path) -> Vec<serde_json::Value> {
    let out = run(bin, db, &["shops", "--json"], &[], None, true);
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).unwrap()
}
