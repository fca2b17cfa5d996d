//! Smoke test: every scenario of the bench binary runs to the end at `--quick` sizes. Nothing here
//! looks at a timing (numbers on a shared CI machine mean nothing); only that the tables come out.

use std::path::Path;
use std::process::Command;

/// Runs the bench binary with `args` and `--dir dir`, checks that it succeeded, and returns its stdout.
fn run(args: &[&str], dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwal-bench")).args(args).arg("--dir").arg(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn every_scenario_runs_at_quick_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run(&["all", "--quick"], dir.path());
    for title in [
        "### Machine",
        "### Engine refreshes against the simulator",
        "### Store only",
        "### Sync floor",
        "### Open and recover",
        "### Recovery of open intents",
        "### Footprint per grant",
        "### Disk under continuous refreshes",
        "### Proactive scheduler",
        "### Webhook sink: first look",
    ] {
        assert!(stdout.contains(title), "missing {title:?} in:\n{stdout}");
    }
    // Recovery resolved every interrupted attempt of the 1% in-flight store (20 of 2000).
    assert!(stdout.contains("20 interrupted, 20 resolved, 0 still ambiguous, 0 needs-reauth"), "{stdout}");
    // Every grant in flight: all recovered against the fast simulator; all still recovering when
    // open returned at its budget against the one that holds every answer.
    for n in [200, 1000] {
        let all = format!("{n} interrupted, {n} resolved, 0 still ambiguous, 0 needs-reauth, 0 still recovering");
        assert!(stdout.contains(&all), "{stdout}");
        let held = format!("{n} interrupted, 0 resolved, 0 still ambiguous, 0 needs-reauth, {n} still recovering");
        assert!(stdout.contains(&held), "{stdout}");
    }
}

/// The soak (not part of `all`) at quick sizes, with the engine's compaction made fast enough to run
/// within its 20 s: `--history-per-grant` and `--compact-interval` must reach the engine's
/// `Config::compaction` (with the defaults, the first pass would start after 60 s and delete nothing).
#[test]
fn soak_runs_the_engines_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run(&["soak", "--quick", "--history-per-grant", "2", "--compact-interval", "2s"], dir.path());
    assert!(stdout.contains("compaction every 2 s (history cap 2)"), "{stdout}");
    // The sample rows (`| 12 s | …`), not the header or the first-vs-last rows (`| 4 s → 20 s | …`).
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains(" s |") && !l.contains('→') && !l.contains("elapsed"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    let last = rows.last().unwrap_or_else(|| panic!("no sample rows in:\n{stdout}"));
    // Cells: "", elapsed, rotations, RSS, fds, tasks, live records, records compacted, …
    let compacted: u64 = last[7].parse().unwrap_or_else(|_| panic!("records compacted {:?} in:\n{stdout}", last[7]));
    assert!(compacted > 0, "the engine's compaction deleted nothing:\n{stdout}");
}

/// The per-grant scenario (not part of `all`) with Customer Account API grants: the stores hold
/// customer keys, the engine serves them through the built-in profile (every first call, cached
/// call and refresh succeeds: the child asserts it), and each refresh sent exactly one request.
#[test]
fn per_grant_runs_with_customer_account_grants() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run(&["per-grant", "--quick", "--grants", "customer-account"], dir.path());
    assert!(stdout.contains("### Per-grant costs, customer-account grants"), "{stdout}");
    assert!(stdout.contains("shopify-customer-account/68000000016:7000000123456 (50 B)"), "{stdout}");
    // 1 000 and 2 000 grants: 1 in 100 made due, each refreshed with one request.
    assert!(stdout.contains("(n = 10) | 10 |") && stdout.contains("(n = 20) | 20 |"), "{stdout}");
    assert!(dir.path().join("customer-grants-1000").is_dir());
}

#[test]
fn fleet_runs_several_processes_on_one_postgres_store() {
    // The scratch schema only decides skip (no PostgreSQL) or fail (TOKENWAL_REQUIRE_PG=1); the
    // bench makes schemas of its own, dropped below.
    let Some(pg) = tokenwal_store::PgScratch::new("tokenwal-bench fleet") else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwal-bench"))
        .args(["fleet", "--quick", "--processes", "2", "--concurrency", "8", "--pg", &tokenwal_store::test_pg_url()])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for line in stderr.lines() {
        if let Some(schema) = line.strip_prefix("fleet: schema ").and_then(|r| r.split(' ').next()) {
            pg.execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).unwrap();
        }
    }
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("### Fleet: engine processes on one PostgreSQL store"), "{stdout}");
    // 500 orphans, each probed exactly once, none overlapping, all healthy (the bench asserts it too).
    assert!(stdout.contains("| 500 | 2 |"), "{stdout}");
    assert!(stdout.contains("| 500 | 1 | 0 | 500 |"), "{stdout}");
}

/// The compaction scenario (not part of `all`) at quick sizes: 50 backlog grants × 41 records, a
/// history cap of 8 and a retention of 2 h. The pass must delete exactly what the backlog holds
/// beyond the cap and the retention (its counts and the store's counter agree), and the load must
/// go on through every phase, each call exactly one refresh (the simulator's rotations agree).
#[test]
fn compaction_runs_a_pass_under_refresh_load() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = run(&["compaction", "--quick"], dir.path());
    assert!(stdout.contains("a pass trims 33 and expires 4 records per backlog grant (1850 in all)"), "{stdout}");
    let row = |prefix: &str| -> Vec<String> {
        let line =
            stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    // Cells: "", concurrency, backlog grants, journal records, …
    assert_eq!(row("| 8 | 50 |")[3], "2050", "{stdout}");
    for phase in [
        "(a) no compaction",
        "(b) during the pass",
        "(b1) … its trim step",
        "(b2) … its retention step",
        "(c) after the pass",
    ] {
        let cells = row(&format!("| 8 | {phase} |"));
        // Cells: "", concurrency, phase, duration, refreshes, …, errors, "".
        let refreshes: u64 = cells[4].parse().unwrap();
        assert!(refreshes > 0 || phase.starts_with("(b"), "no refreshes in {phase}:\n{stdout}");
        assert_eq!(cells[cells.len() - 2], "0", "errors in {phase}:\n{stdout}");
    }
    // The pass row: "", concurrency, time, trimmed, expired, deleted (counter), …, refreshes / rotations, "".
    let pass = stdout
        .lines()
        .rfind(|l| l.starts_with("| 8 | ") && l.split('|').count() == 13)
        .unwrap_or_else(|| panic!("no pass row in:\n{stdout}"));
    let cells: Vec<&str> = pass.split('|').map(str::trim).collect();
    let (trimmed, expired, deleted): (u64, u64, u64) =
        (cells[3].parse().unwrap(), cells[4].parse().unwrap(), cells[5].parse().unwrap());
    // Every backlog grant loses 33 records to the cap (the load grants may lose more) and 4 to retention.
    assert!(trimmed >= 50 * 33, "trimmed {trimmed}:\n{stdout}");
    assert_eq!(expired, 50 * 4, "{stdout}");
    assert_eq!(deleted, trimmed + expired, "{stdout}");
    let (refreshes, rotations) = cells[11].split_once(" / ").unwrap();
    assert_eq!(refreshes, rotations, "{stdout}");
    assert!(refreshes.parse::<u64>().unwrap() > 0, "{stdout}");
}

/// The broker scenario (not part of `all`) at quick sizes: a real `tokenwal serve` (the workspace's
/// binary beside the bench's, built by `cargo test --workspace`), 4 clients closed loop, then open
/// loop at 500 requests/s with evenly spaced arrivals: every request the pacer released in the 1 s
/// window was answered (the count does not depend on the machine's speed), each a cached answer
/// (the scenario itself fails if the simulator saw a refresh).
#[test]
fn broker_runs_closed_and_open_loop_against_a_real_broker() {
    let dir = tempfile::tempdir().unwrap();
    let stdout =
        run(&["broker", "--quick", "--concurrency", "4", "--rate", "500", "--broker-workers", "1"], dir.path());
    let row = |prefix: &str| -> Vec<String> {
        let line =
            stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    // Cells: "", path, clients, requests/s, p50, p99, max, p99 from the slot, requests, …
    let closed = row("| tokenwal serve, GET /v1/shops/{shop}/token, HTTP/1.1 keep-alive, closed loop | 4 |");
    assert!(closed[8].parse::<u64>().unwrap() > 0, "{stdout}");
    assert_eq!(closed[7], "-", "{stdout}");
    let open = row("| tokenwal serve, same call, open loop at 500 requests/s offered (uniform arrivals) | 4 |");
    let answered: u64 = open[8].parse().unwrap();
    assert!((450..=550).contains(&answered), "{answered} answered of ~500 released:\n{stdout}");
    assert_ne!(open[7], "-", "{stdout}");
    row("| in process, Engine::access_token | 4 |");
}
