//! The real `tokenwal demo` (its own simulators, the engine and the naive baseline, faults,
//! crashes, revocations), run as a child process with `RUST_LOG=trace`: none of the tokens the
//! simulators issued, nor the client secret, appears anywhere in its stdout or stderr.
//!
//! The demo learns nothing from this test but the hidden, test-only `--issued-tokens-out FILE`,
//! which makes it write what its simulators issued after the runs.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");

#[test]
fn demo_at_trace_prints_no_issued_token_nor_the_client_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secrets_file = dir.path().join("issued.txt");
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKENWAL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "trace")
        .args(["demo", "--shops", "4", "--duration", "2s", "--crashes", "1", "--revoke", "1", "--workers", "2"])
        .args(["--fault-rate", "0.5", "--access-ttl", "2s", "--refresh-margin", "1s", "--timeout", "600ms"])
        .arg("--issued-tokens-out")
        .arg(&secrets_file);
    let started = std::time::Instant::now();
    let out = cmd.output().expect("run tokenwal demo");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = |s: &str| s.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect::<String>();
    assert!(
        out.status.success(),
        "demo failed ({:?}):\nstdout:\n{stdout}\nstderr tail:\n{}",
        out.status,
        tail(&stderr)
    );
    assert!(!stderr.contains("panicked"), "{}", tail(&stderr));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secrets_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the test-only secrets file is private");
    }
    let secrets: Vec<String> =
        std::fs::read_to_string(&secrets_file).unwrap().lines().map(str::to_owned).filter(|l| !l.is_empty()).collect();
    // Both runs: 4 seeded pairs each, plus every rotation under faults; and the client secret.
    assert!(secrets.len() > 30, "the simulators issued tokens: {}", secrets.len());
    assert!(secrets.iter().any(|s| s == "sim-client-secret"), "the client secret is in the list");
    assert!(secrets.iter().all(|s| s.len() >= 16), "only real secrets, no short strings that match by chance");

    // The output must really be TRACE: the engine's, the store's, and the HTTP stacks' lines.
    let lines = stderr.lines().count();
    let trace = stderr.lines().filter(|l| l.contains(" TRACE ")).count();
    let debug = stderr.lines().filter(|l| l.contains(" DEBUG ")).count();
    eprintln!("demo took {took:?}: {lines} stderr lines, {trace} TRACE, {debug} DEBUG, {} secrets", secrets.len());
    // (sled's own trace lines are capped at info by the CLI, see `SLED_LOG_CAP` in main.rs; the rest
    // gave 167 TRACE and 159 DEBUG lines in one run.)
    assert!(trace > 50 && debug > 50, "TRACE output expected: {trace} TRACE, {debug} DEBUG lines");
    for needle in MUST_APPEAR {
        assert!(stderr.contains(needle), "no {needle:?} in the TRACE output:\n{}", tail(&stderr));
    }

    for s in &secrets {
        assert!(!stdout.contains(s.as_str()), "stdout leaks an issued secret");
        assert!(!stderr.contains(s.as_str()), "stderr leaks an issued secret: {}", context(&stderr, s));
    }
}

/// Messages that only show up when tracing reaches each layer (client and server HTTP stacks,
/// the engine).
const MUST_APPEAR: &[&str] = &["starting new connection", "checkout waiting", "refresh"];

/// The line around the first occurrence of `s`, with `s` masked (for the failure message).
fn context(hay: &str, s: &str) -> String {
    let line = hay.lines().find(|l| l.contains(s)).unwrap_or_default();
    line.replace(s, "<SECRET>")
}
