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
