//! Issue 17 item 6 through the real binary: `import`, `token`, `shops`, `status`, `grants` and
//! `inspect` for Customer Account API grants and a generic provider's grants (from a providers
//! file) in one store, against the simulator's Customer Account API mode, with `--json` on each.

use serde_json::Value;
use std::path::Path;
use tokenwal_sim::{SimConfig, SimHandle};
use tokenwal_testkit::cli::Out;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");

fn tokenwal(db: &Path, config: &str, args: &[&str], stdin: Option<&str>) -> Out {
    let mut all = vec!["--config", config];
    all.extend_from_slice(args);
    tokenwal_testkit::cli::run(BIN, db, &all, &[], stdin, true)
}

fn json(out: &Out) -> Value {
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", out.stdout))
}

/// A JSON config serving `provider` from a providers file pointing both profiles at `sim`: the
/// built-in customer-account profile, and `my-idp`, a generic public client whose fixed token URL
/// is the simulator's shop 77 (its refresh tokens are seeded as that shop's customers).
fn config(dir: &Path, sim: &SimHandle, provider: &str) -> String {
    let providers = dir.join("providers.toml");
    let toml = format!(
        "[providers.shopify-customer-account]\ntoken_url = \"{}\"\n\n[providers.my-idp]\ntoken_url = \"{}\"\n\
         client_auth = \"none\"\nrotation = \"strict-single-use\"\nrefresh_buffer = \"1m\"\n",
        sim.customer_token_url_template(),
        sim.customer_token_url_template().replace("{shop_id}", "77"),
    );
    std::fs::write(&providers, toml).unwrap();
    let config = dir.join(format!("{provider}.json"));
    let doc =
        serde_json::json!({"client_id": "sim-public-client-id", "providers_file": providers, "provider": provider});
    std::fs::write(&config, doc.to_string()).unwrap();
    config.to_str().unwrap().to_owned()
}

fn line(account: &str, t: &tokenwal_sim::TokenSet) -> String {
    serde_json::json!({
        "account": account,
        "access_token": t.access_token.as_str(),
        "refresh_token": t.refresh_token.as_str(),
        "expires_in": 1,
    })
    .to_string()
}

#[test]
fn every_command_speaks_every_provider() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let sim = rt
        .block_on(tokenwal_sim::serve(
            SimConfig { seed: Some(3), ..SimConfig::default() },
            "127.0.0.1:0".parse().unwrap(),
        ))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let customers = config(dir.path(), &sim, "shopify-customer-account");
    let idp = config(dir.path(), &sim, "my-idp");

    // import: two customers of shop 4242 and one my-idp account.
    let c7 = sim.seed_customer(4242, 7);
    let c8 = sim.seed_customer(4242, 8);
    let u1 = sim.seed_customer(77, 1);
    let lines = format!("{}\n{}\n", line("4242:7", &c7), line("4242:8", &c8));
    let summary = json(&tokenwal(&db, &customers, &["import", "--json"], Some(&lines)));
    assert_eq!((summary["imported"].as_u64(), summary["invalid"].as_u64()), (Some(2), Some(0)), "{summary}");
    assert_eq!(summary["lines"][1]["grant"], "shopify-customer-account/4242:8");
    let out = tokenwal(&db, &idp, &["import"], Some(&line("user-1", &u1)));
    assert_eq!(out.code, 0, "{out:?}");
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // token: by account under the configured provider, or PROVIDER/ACCOUNT in full; --json.
    let t = json(&tokenwal(&db, &customers, &["token", "4242:7", "--json"], None));
    assert_eq!(t["grant"], "shopify-customer-account/4242:7");
    assert_eq!((t["provider"].as_str(), t["account"].as_str()), (Some("shopify-customer-account"), Some("4242:7")));
    let token = t["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("shcat_") && token != c7.access_token.as_str(), "refreshed: {t}");
    assert!(t["access_expires"]["at_ms"].as_u64().unwrap() > 0);
    let now = sim.now_ms();
    assert_eq!(sim.with_model(|m| m.customer_access_token_valid("4242", &token, now)), Some(7));
    let out = tokenwal(&db, &idp, &["token", "my-idp/user-1"], None);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.trim().starts_with("shcat_"), "{}", out.stdout);
    assert_ne!(out.stdout.trim(), u1.access_token.as_str());
    // The plain form prints the token alone.
    let out = tokenwal(&db, &customers, &["token", "4242:7"], None);
    assert_eq!(out.stdout.trim(), token);

    // A re-run import: 4242:7 rotated since (refused, never rolled back), 4242:8 did not (unchanged).
    let out = tokenwal(&db, &customers, &["import", "--json"], Some(&lines));
    let again = json(&out);
    assert_eq!((again["refused"].as_u64(), again["unchanged"].as_u64()), (Some(1), Some(1)), "{again}");
    assert_eq!(again["lines"][0]["outcome"], "refused");
    assert_eq!(again["lines"][1]["outcome"], "unchanged");
    assert!(!out.all().contains(c8.refresh_token.as_str()), "{}", out.all());

    // grants: every provider's grants, by PROVIDER/ACCOUNT, filterable; --json.
    let g = json(&tokenwal(&db, &customers, &["grants", "--json"], None));
    let names: Vec<&str> = g.as_array().unwrap().iter().map(|v| v["grant"].as_str().unwrap()).collect();
    assert_eq!(names, ["my-idp/user-1", "shopify-customer-account/4242:7", "shopify-customer-account/4242:8"]);
    assert!(g.as_array().unwrap().iter().all(|v| v["state"] == "healthy" && v["refresh_fingerprint"].is_string()));
    let only = json(&tokenwal(&db, &customers, &["grants", "--provider", "my-idp", "--json"], None));
    assert_eq!(only.as_array().unwrap().len(), 1);
    assert_eq!(only[0]["provider"], "my-idp");
    let table = tokenwal(&db, &customers, &["grants"], None);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        table.stdout.contains("GRANT") && table.stdout.contains("shopify-customer-account/4242:8"),
        "{}",
        table.stdout
    );

    // shops and status count and name them too (the Admin API's shops keep their bare names).
    let s = json(&tokenwal(&db, &customers, &["shops", "--json"], None));
    assert_eq!(s.as_array().unwrap().len(), 3);
    assert_eq!(s[1]["provider"], "shopify-customer-account");
    let table = tokenwal(&db, &customers, &["shops"], None);
    assert!(table.stdout.contains("shopify-customer-account/4242:7"), "{}", table.stdout);
    let st = json(&tokenwal(&db, &customers, &["status", "--json"], None));
    assert_eq!(st["grants"], 3);
    assert_eq!(st["providers"], serde_json::json!({"my-idp": 1, "shopify-customer-account": 2}));
    assert_eq!(st["states"]["healthy"], 3);
    let text = tokenwal(&db, &customers, &["status"], None);
    assert!(text.stdout.contains("by provider      my-idp 1, shopify-customer-account 2"), "{}", text.stdout);

    // inspect: by account or in full; --json; never a secret.
    let i = json(&tokenwal(&db, &customers, &["inspect", "4242:7", "--json"], None));
    assert_eq!(i["grant"], "shopify-customer-account/4242:7");
    let kinds: Vec<&str> = i["history"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"installed") && kinds.contains(&"committed"), "{kinds:?}");
    let i = json(&tokenwal(&db, &customers, &["inspect", "my-idp/user-1", "--json"], None));
    assert_eq!((i["provider"].as_str(), i["shop"].as_str()), (Some("my-idp"), Some("user-1")));
    let text = tokenwal(&db, &idp, &["inspect", "user-1"], None);
    assert_eq!(text.code, 0, "{text:?}");
    assert!(text.stdout.contains("grant              my-idp/user-1"), "{}", text.stdout);
    for out in [&text, &table] {
        assert!(!out.all().contains(&token) && !out.all().contains(c8.refresh_token.as_str()), "{}", out.all());
    }
    // A grant not in the store: 66. A malformed one: 2.
    assert_eq!(tokenwal(&db, &customers, &["inspect", "4242:9"], None).code, 66);
    assert_eq!(tokenwal(&db, &customers, &["inspect", "shopify-customer-account/x:y"], None).code, 2);
    drop(sim);
}
