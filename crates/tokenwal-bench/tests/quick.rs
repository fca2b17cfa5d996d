//! Smoke test: every scenario of the bench binary runs to the end at `--quick` sizes. Nothing here
//! looks at a timing (numbers on a shared CI machine mean nothing); only that the tables come out.

use std::process::Command;

#[test]
fn every_scenario_runs_at_quick_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwal-bench"))
        .args(["all", "--quick", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
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
