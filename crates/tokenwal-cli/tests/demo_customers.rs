//! `tokenwal demo --scenario customer-accounts` at small numbers, through the real binary: both runs
//! finish, tokenwal sends no customer to log in again needlessly and never overlaps two token
//! requests for one customer; the figures add up.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");

#[test]
fn the_customer_accounts_scenario_at_small_numbers() {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKENWAL_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(["demo", "--scenario", "customer-accounts", "--customers", "60", "--customer-shops", "3"])
        .args(["--duration", "3s", "--access-ttl", "2s", "--refresh-margin", "500ms", "--timeout", "600ms"])
        .args(["--workers", "4", "--seed", "11", "--json"])
        .output()
        .expect("run tokenwal demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_eq!(v["scenario"], "customer-accounts");
    assert_eq!(v["customers"], 60);
    let ours = &v["tokenwal"];
    let naive = &v["naive"];
    for r in [ours, naive] {
        assert_eq!(r["customers"], 60);
        assert!(r["token_requests"].as_u64().unwrap() > 0, "{r}");
        let forced = r["forced_to_log_in_again"].as_u64().unwrap();
        let lost = r["of_which_rotation_lost"].as_u64().unwrap();
        let needless = r["needlessly_logged_out"].as_u64().unwrap();
        assert_eq!(forced, lost + needless, "{r}");
    }
    assert_eq!(ours["needlessly_logged_out"], 0, "{ours}");
    assert_eq!(ours["overlapping_token_requests"], 0, "one engine, one request per customer at a time: {ours}");
}

#[test]
fn the_table_names_both_columns() {
    let out = Command::new(BIN)
        .args(["demo", "--scenario", "customer-accounts", "--customers", "10", "--customer-shops", "2"])
        .args(["--duration", "1s", "--access-ttl", "2s", "--refresh-margin", "500ms", "--timeout", "600ms"])
        .args(["--fault-rate", "0", "--workers", "2"])
        .output()
        .expect("run tokenwal demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tokenwal") && stdout.contains("naive"), "{stdout}");
    assert!(stdout.contains("customers forced to log in again"), "{stdout}");
    assert!(stdout.contains("verdict: tokenwal sent 0 customer(s) to log in again needlessly"), "{stdout}");
}
