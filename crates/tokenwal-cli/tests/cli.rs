//! The `tokenwal` binary as a real process: import, export, status/shops/inspect, token against a
//! simulator started in this test process, recover, run --once, a locked store, and a short demo.
//!
//! Every command's output is collected and searched for the secrets the test knows: none may
//! appear except where printing it is the command's job (`token`, `export --reveal-secrets`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use tokenwal_sim::{Fault, SimHandle};

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
use tokenwal_testkit::cli::{Out, CREDENTIALS};
use tokenwal_testkit::BlockingSim;

/// Runs `tokenwal --db DB ARGS` with a clean environment plus the test store key and `env`, feeding
/// `stdin`.
fn tokenwal(db: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Out {
    tokenwal_keyed(db, args, env, stdin, true)
}

/// [`tokenwal`], with `TOKENWAL_STORE_KEY` set to the test key only if `with_key`.
fn tokenwal_keyed(db: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>, with_key: bool) -> Out {
    tokenwal_testkit::cli::run(BIN, db, args, env, stdin, with_key)
}

fn assert_no_secret(out: &Out, secrets: &[&str]) {
    for s in secrets {
        assert!(!out.all().contains(s), "a secret leaked into the output:\n{}", out.all());
    }
}

fn line(shop: &str, access: &str, refresh: &str, extra: &str) -> String {
    format!(r#"{{"shop":"{shop}","access_token":"{access}","refresh_token":"{refresh}"{extra}}}"#)
}

#[test]
fn import_reports_each_bad_line_and_stores_only_the_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let input = [
        line(
            "good-one.myshopify.com",
            "shpat_SECRET_A1",
            "shprt_SECRET_R1",
            r#","expires_in":3600,"scope":"read_orders""#,
        ),
        "{\"shop\": \"broken.myshopify.com\", \"access_token\": \"shpat_SECRET_A2\"".to_owned(),
        line("Bad-Case.myshopify.com", "shpat_SECRET_A3", "shprt_SECRET_R3", r#","expires_in":60"#),
        String::new(),
        line("no-expiry.myshopify.com", "shpat_SECRET_A4", "shprt_SECRET_R4", ""),
        line(
            "good-two.myshopify.com",
            "shpat_SECRET_A5",
            "shprt_SECRET_R5",
            r#","expires_at":"2030-01-01T00:00:00Z","refresh_token_expires_in":7776000"#,
        ),
        line("negative.myshopify.com", "shpat_SECRET_A6", "shprt_SECRET_R6", r#","expires_in":-1"#),
        line(
            "old-refresh.myshopify.com",
            "shpat_SECRET_A7",
            "shprt_SECRET_R7",
            r#","expires_in":60,"refresh_token_expires_at":1600000000"#,
        ),
        r#"{"shop":"missing.myshopify.com","refresh_token":"shprt_SECRET_R8","expires_in":60}"#.to_owned(),
    ]
    .join("\n");
    let out = tokenwal(&db, &["import", "-"], &[], Some(&input));
    assert_eq!(out.code, 65, "{out:?}");
    for (n, why) in [
        (2, "not valid JSON"),
        (3, "invalid shop domain"),
        (5, "missing field `expires_at` or `expires_in`"),
        (7, "`expires_in` must be a positive number of seconds"),
        (8, "refresh token already expired"),
        (9, "missing field `access_token`"),
    ] {
        let wanted = format!("line {n}: {why}");
        assert!(out.stderr.contains(&wanted), "{wanted:?} not in:\n{}", out.stderr);
    }
    assert!(out.stderr.contains("imported 2 token set(s)"), "{}", out.stderr);
    assert!(out.stderr.contains("6 of 8 lines were invalid"), "{}", out.stderr);
    assert!(!out.stderr.contains("line 1:") && !out.stderr.contains("line 6:") && !out.stderr.contains("line 4:"));
    assert_no_secret(&out, &["SECRET"]);

    // Only the valid lines are in the store; nothing of the invalid ones.
    let shops = tokenwal(&db, &["shops", "--json"], &[], None);
    assert_eq!(shops.code, 0, "{shops:?}");
    let v: serde_json::Value = serde_json::from_str(&shops.stdout).unwrap();
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|s| s["shop"].as_str().unwrap()).collect();
    assert_eq!(names, ["good-one.myshopify.com", "good-two.myshopify.com"]);
    assert_eq!(v[0]["state"], "healthy");
    assert_eq!(v[0]["scope"], "read_orders");
    assert_eq!(v[1]["refresh_expires"]["at"].as_str().unwrap().len(), 24);
    for shop in ["broken.myshopify.com", "negative.myshopify.com", "no-expiry.myshopify.com"] {
        let out = tokenwal(&db, &["inspect", shop], &[], None);
        assert_eq!(out.code, 66, "{out:?}");
        assert!(out.stderr.contains("not in the store"), "{out:?}");
    }
    assert_no_secret(&shops, &["SECRET"]);

    // A file argument works too, and a clean file exits 0.
    let file = dir.path().join("ok.jsonl");
    std::fs::write(
        &file,
        line("good-three.myshopify.com", "shpat_SECRET_A9", "shprt_SECRET_R9", r#","expires_in":10"#),
    )
    .unwrap();
    let out = tokenwal(&db, &["import", file.to_str().unwrap()], &[], None);
    assert_eq!(out.code, 0, "{out:?}");
    assert_no_secret(&out, &["SECRET"]);
}

#[test]
fn export_refuses_without_the_flag_and_round_trips_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let input = [
        line(
            "first.myshopify.com",
            "shpat_SECRET_X1",
            "shprt_SECRET_Y1",
            r#","expires_at":1900000000.25,"scope":"read_orders,write_products""#,
        ),
        line(
            "second.myshopify.com",
            "shpat_SECRET_X2",
            "shprt_SECRET_Y2",
            r#","expires_in":3600,"refresh_token_expires_in":86400"#,
        ),
    ]
    .join("\n");
    assert_eq!(tokenwal(&a, &["import"], &[], Some(&input)).code, 0);

    let refused = tokenwal(&a, &["export"], &[], None);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("--reveal-secrets") && refused.stderr.contains("clear text"), "{refused:?}");
    assert!(refused.stdout.is_empty());
    assert_no_secret(&refused, &["SECRET"]);

    let exported = tokenwal(&a, &["export", "--reveal-secrets"], &[], None);
    assert_eq!(exported.code, 0, "{exported:?}");
    let lines: Vec<&str> = exported.stdout.lines().collect();
    assert_eq!(lines.len(), 2);
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first["shop"], "first.myshopify.com");
    assert_eq!(first["access_token"], "shpat_SECRET_X1");
    assert_eq!(first["refresh_token"], "shprt_SECRET_Y1");
    assert_eq!(first["expires_at"], "2030-03-17T17:46:40.250Z");
    assert_eq!(first["scope"], "read_orders,write_products");
    assert!(!exported.stderr.contains("SECRET"));

    // Into a second store and out again: the same lines.
    let imported = tokenwal(&b, &["import"], &[], Some(&exported.stdout));
    assert_eq!(imported.code, 0, "{imported:?}");
    let again = tokenwal(&b, &["export", "--reveal-secrets", "--json"], &[], None);
    assert_eq!(again.stdout, exported.stdout);
}

#[test]
fn status_shops_and_inspect_show_state_and_history_but_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let missing = tokenwal(&db, &["status"], &[], None);
    assert_eq!(missing.code, 66, "{missing:?}");
    assert!(missing.stderr.contains("no store at"), "{missing:?}");

    let input = [
        line("alpha.myshopify.com", "shpat_SECRET_1", "shprt_SECRET_2", r#","expires_in":3600"#),
        line("beta.myshopify.com", "shpat_SECRET_3", "shprt_SECRET_4", r#","expires_at":1600000000"#),
    ]
    .join("\n");
    assert_eq!(tokenwal(&db, &["import"], &[], Some(&input)).code, 0);
    // A second import of a shop makes a new generation.
    assert_eq!(
        tokenwal(
            &db,
            &["import"],
            &[],
            Some(&line("alpha.myshopify.com", "shpat_SECRET_5", "shprt_SECRET_6", r#","expires_in":7200"#))
        )
        .code,
        0
    );

    let status = tokenwal(&db, &["status"], &[], None);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.contains("shops              2"), "{}", status.stdout);
    assert!(status.stdout.contains("healthy          2"), "{}", status.stdout);
    assert!(status.stdout.contains("overdue, oldest beta.myshopify.com"), "{}", status.stdout);
    let json = tokenwal(&db, &["status", "--json"], &[], None);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["grants"], 2);
    assert_eq!(v["states"]["healthy"], 2);
    assert_eq!(v["states"]["needs-reauth"], 0);
    assert_eq!(v["next_refresh_due"]["shop"], "beta.myshopify.com");
    assert_eq!(v["overdue"], 1);

    let shops = tokenwal(&db, &["shops"], &[], None);
    assert_eq!(shops.code, 0);
    assert!(shops.stdout.starts_with("SHOP"), "{}", shops.stdout);
    assert!(shops.stdout.contains("alpha.myshopify.com  healthy  2"), "{}", shops.stdout);
    let filtered = tokenwal(&db, &["shops", "--state", "needs-reauth"], &[], None);
    assert_eq!(filtered.stdout.lines().count(), 1, "{}", filtered.stdout);

    let inspect = tokenwal(&db, &["inspect", "alpha.myshopify.com"], &[], None);
    assert_eq!(inspect.code, 0, "{inspect:?}");
    assert!(inspect.stdout.contains("history (2 records)"), "{}", inspect.stdout);
    assert!(inspect.stdout.contains("installed"), "{}", inspect.stdout);
    let ij = tokenwal(&db, &["inspect", "alpha.myshopify.com", "--json"], &[], None);
    let v: serde_json::Value = serde_json::from_str(&ij.stdout).unwrap();
    assert_eq!(v["generation"], 2);
    assert_eq!(v["history"][1]["kind"], "installed");
    assert_eq!(v["history"][1]["generation"], 2);

    let bad = tokenwal(&db, &["inspect", "Alpha.myshopify.com"], &[], None);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("invalid shop domain"), "{bad:?}");

    let plan = tokenwal(&db, &["recover", "--dry-run"], &[], None);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(plan.stdout.contains("0 open grant(s)"), "{}", plan.stdout);

    for out in [&status, &json, &shops, &filtered, &inspect, &ij, &bad, &plan] {
        assert_no_secret(out, &["SECRET"]);
    }
}

#[test]
fn a_locked_store_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let (_held, _) = tokenwal_store::Store::open(
        &db,
        &tokenwal::KeyRing::insecure_test_ring(),
        tokenwal_store::StoreConfig::default(),
    )
    .unwrap();
    for args in [&["status"][..], &["shops"], &["import"], &["token", "x.myshopify.com"]] {
        let input = line("x.myshopify.com", "a", "r", r#","expires_in":60"#);
        let out = tokenwal(&db, args, &CREDENTIALS, Some(&input));
        assert_eq!(out.code, 75, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("store is in use by another process: is `tokenwal run` running?"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn credentials_are_never_command_line_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokenwal(dir.path(), &["token", "x.myshopify.com", "--client-secret", "hunter2"], &[], None);
    assert_eq!(out.code, 2, "{out:?}");
    let help = tokenwal(dir.path(), &["--help"], &[], None);
    assert_eq!(help.code, 0);
    for word in ["import", "run", "status", "shops", "inspect", "recover", "token", "export", "sim", "demo"] {
        assert!(help.stdout.contains(&format!("  {word} ")), "{word} missing from --help");
    }
    assert!(help.stdout.contains("TOKENWAL_CLIENT_SECRET") && help.stdout.contains("EXIT CODES"));
}

struct Sim(BlockingSim);

impl Sim {
    fn start() -> Sim {
        Sim(BlockingSim::start())
    }

    fn h(&self) -> &SimHandle {
        self.0.h()
    }

    /// Seeds `name` and returns an import line with an already-expired access token.
    fn seed(&self, name: &str) -> (String, String, String) {
        let shop = format!("{name}.myshopify.com");
        let t = self.h().seed_shop(&shop);
        let (a, r) = (t.access_token.as_str().to_owned(), t.refresh_token.as_str().to_owned());
        (line(&shop, &a, &r, r#","expires_at":1700000000,"refresh_token_expires_in":7776000"#), a, r)
    }

    fn accepted(&self, name: &str, token: &str) -> bool {
        let now = self.h().now_ms();
        self.h().with_model(|m| m.access_token_valid(&format!("{name}.myshopify.com"), token, now))
    }
}

#[test]
fn token_recover_and_run_against_the_simulator() {
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let base = sim.h().base_url();
    let mut env = CREDENTIALS.to_vec();
    env.push(("TOKENWAL_INSECURE_TEST_ENDPOINT", &base));
    let mut secrets: Vec<String> = vec!["sim-client-secret".into()];
    let mut lines = Vec::new();
    for name in ["fresh", "gone", "flaky", "cron"] {
        let (l, a, r) = sim.seed(name);
        lines.push(l);
        secrets.push(a);
        secrets.push(r);
    }
    assert_eq!(tokenwal(&db, &["import"], &[], Some(&lines.join("\n"))).code, 0);

    // A refresh, then the token on stdout: it works at the Admin API.
    let out = tokenwal(&db, &["token", "fresh.myshopify.com"], &env, None);
    assert_eq!(out.code, 0, "{out:?}");
    let token = out.stdout.trim().to_owned();
    assert!(token.starts_with("shpat_") && sim.accepted("fresh", &token), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    secrets.push(token.clone());
    // A second call serves the same (now stored) token without another request.
    let again = tokenwal(&db, &["token", "fresh.myshopify.com"], &env, None);
    assert_eq!(again.stdout.trim(), token);
    assert_eq!(sim.h().counters().shop("fresh.myshopify.com").token_requests, 1);
    let inspect = tokenwal(&db, &["inspect", "fresh.myshopify.com"], &[], None);
    assert!(inspect.stdout.contains("intent") && inspect.stdout.contains("committed"), "{}", inspect.stdout);
    assert!(inspect.stdout.contains("sim-"), "the request id is shown: {}", inspect.stdout);

    // The grant is dead at the server: needs re-auth, exit 77.
    sim.h().with_model(|m| m.uninstall("gone.myshopify.com"));
    let out = tokenwal(&db, &["token", "gone.myshopify.com"], &env, None);
    assert_eq!(out.code, 77, "{out:?}");
    assert!(out.stderr.contains("needs re-auth") && out.stdout.is_empty(), "{out:?}");

    // Not in the store (or no store at all): 66. Invalid: 2. No credentials: 78.
    assert_eq!(tokenwal(&db, &["token", "nobody.myshopify.com"], &env, None).code, 66);
    let nowhere = dir.path().join("nowhere");
    assert_eq!(tokenwal(&nowhere, &["token", "fresh.myshopify.com"], &env, None).code, 66);
    assert!(!nowhere.exists(), "token must not create a store");
    assert_eq!(tokenwal(&db, &["token", "nobody.example.com"], &env, None).code, 2);
    let out = tokenwal(&db, &["token", "fresh.myshopify.com"], &[], None);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(out.stderr.contains("TOKENWAL_CLIENT_SECRET"), "{out:?}");

    // A 503 and a caller who will not wait: transient, 75; the grant stays ambiguous.
    sim.h().push_faults("flaky.myshopify.com", [Fault::FailBeforeProcessing { status: 503, json: false }]).unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"max_wait": "0s", "app_handle": "test-app"}"#).unwrap();
    let cfg = config.to_str().unwrap();
    let out = tokenwal(&db, &["--config", cfg, "token", "flaky.myshopify.com"], &env, None);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("outcome unknown"), "{out:?}");

    // The dry run shows the plan and changes nothing; recovery then resolves it.
    let plan = tokenwal(&db, &["recover", "--dry-run", "--json"], &[], None);
    assert_eq!(plan.code, 0, "{plan:?}");
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(v["open"], 1);
    assert_eq!(v["items"][0]["shop"], "flaky.myshopify.com");
    assert_eq!(v["items"][0]["found"], "ambiguous");
    assert_eq!(v["items"][0]["intention"], "retry the old refresh token");
    let human = tokenwal(&db, &["recover", "--dry-run"], &[], None);
    assert!(human.stdout.contains("1 open grant(s)") && human.stdout.contains("flaky.myshopify.com"), "{human:?}");
    let status = tokenwal(&db, &["--config", cfg, "status"], &[], None);
    assert!(status.stdout.contains("oldest ambiguous   flaky.myshopify.com"), "{}", status.stdout);
    assert!(status.stdout.contains("app                test-app"), "{}", status.stdout);
    let requests_before = sim.h().counters().shop("flaky.myshopify.com").token_requests;
    assert_eq!(requests_before, 1, "the dry run sent nothing");
    let recovered = tokenwal(&db, &["recover", "--json"], &env, None);
    assert_eq!(recovered.code, 0, "{recovered:?}");
    let v: serde_json::Value = serde_json::from_str(&recovered.stdout).unwrap();
    assert_eq!((v["open"].as_u64(), v["resolved"].as_u64()), (Some(1), Some(1)), "{v}");
    let shops = tokenwal(&db, &["shops", "--state", "ambiguous"], &[], None);
    assert_eq!(shops.stdout.lines().count(), 1, "nothing ambiguous left: {}", shops.stdout);

    // run --once refreshes everything due (cron), then exits.
    let out = tokenwal(&db, &["run", "--once"], &env, None);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(sim.h().counters().shop("cron.myshopify.com").rotations, 1);
    let v: serde_json::Value = serde_json::from_str(&tokenwal(&db, &["shops", "--json"], &[], None).stdout).unwrap();
    let by_shop = |s: &str| v.as_array().unwrap().iter().find(|g| g["shop"] == s).unwrap().clone();
    assert_eq!(by_shop("cron.myshopify.com")["generation"], 2);
    assert_eq!(by_shop("gone.myshopify.com")["state"], "needs-reauth");
    assert!(by_shop("gone.myshopify.com")["why"].as_str().unwrap().contains("401 invalid_request"));
    assert!(by_shop("cron.myshopify.com").get("deep_link").is_none(), "links only for needs-reauth");

    // Re-auth routing: why, since when, and the admin link (app handle from the config file).
    let reauth = tokenwal(&db, &["--config", cfg, "shops", "--state", "needs-reauth"], &[], None);
    assert_eq!(reauth.code, 0, "{reauth:?}");
    let lines: Vec<&str> = reauth.stdout.lines().collect();
    assert!(lines[0].starts_with("SHOP") && lines[0].contains("SINCE") && lines[0].contains("RE-AUTH LINK"));
    assert_eq!(lines.len(), 2, "only the dead shop: {}", reauth.stdout);
    assert!(lines[1].starts_with("gone.myshopify.com"), "{}", lines[1]);
    assert!(lines[1].contains("401 invalid_request") && lines[1].contains("Z ("), "{}", lines[1]);
    assert!(lines[1].ends_with("https://admin.shopify.com/store/gone/apps/test-app"), "{}", lines[1]);
    // --app-handle wins over the config; --json is one document with stable field names.
    let args = ["--config", cfg, "shops", "--state", "needs-reauth", "--app-handle", "other-app", "--json"];
    let reauth_json = tokenwal(&db, &args, &[], None);
    let v: serde_json::Value = serde_json::from_str(&reauth_json.stdout).unwrap();
    let only = v.as_array().unwrap();
    assert_eq!(only.len(), 1, "{v}");
    assert_eq!(only[0]["shop"], "gone.myshopify.com");
    assert_eq!(only[0]["state"], "needs-reauth");
    assert_eq!(only[0]["deep_link"], "https://admin.shopify.com/store/gone/apps/other-app");
    assert!(only[0]["why"].as_str().unwrap().contains("401 invalid_request"));
    assert!(only[0]["since"]["at"].as_str().unwrap().ends_with('Z') && only[0]["since"]["at_ms"].as_u64().is_some());
    // Without a handle: no link, and a hint on stderr; a bad handle is a usage error.
    let bare = tokenwal(&db, &["shops", "--state", "needs-reauth"], &[], None);
    assert!(bare.stdout.lines().nth(1).unwrap().ends_with(" -") && bare.stderr.contains("--app-handle"), "{bare:?}");
    let bad = tokenwal(&db, &["shops", "--state", "needs-reauth", "--app-handle", "a/b"], &[], None);
    assert_eq!(bad.code, 2, "{bad:?}");

    let secret_refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    for o in [&inspect, &plan, &human, &status, &recovered, &shops, &out, &reauth, &reauth_json, &bare] {
        assert_no_secret(o, &secret_refs);
    }
}

/// Issue 18.2: re-running an import after the worker rotated must not roll shops back. Each line
/// whose pair is older than the one held is refused and reported; the same pair is left unchanged; a
/// newer pair is installed; `--force` needs `--reason`.
#[test]
fn a_rerun_import_after_rotation_rolls_no_shop_back() {
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let base = sim.h().base_url();
    let mut env = CREDENTIALS.to_vec();
    env.push(("TOKENWAL_INSECURE_TEST_ENDPOINT", &base));
    let (rotated, a1, r1) = sim.seed("rerun");
    let (kept, _, _) = sim.seed("kept");
    let file = dir.path().join("tokens.jsonl");
    std::fs::write(&file, format!("{rotated}\n{kept}\n")).unwrap();
    let import = |args: &[&str]| {
        let mut a = vec!["import", file.to_str().unwrap()];
        a.extend_from_slice(args);
        tokenwal(&db, &a, &[], None)
    };
    assert_eq!(import(&[]).code, 0);

    // The worker rotates `rerun`: the store now holds a newer pair.
    let out = tokenwal(&db, &["token", "rerun.myshopify.com"], &env, None);
    assert_eq!(out.code, 0, "{out:?}");
    let rotated_access = out.stdout.trim().to_owned();
    assert_ne!(rotated_access, a1);

    // The same file again: `rerun` refused (its pair is older), `kept` unchanged (same pair).
    let again = import(&[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains("line 1: rerun.myshopify.com: refused: the store holds a newer pair"), "{again:?}");
    assert!(again.stderr.contains("line 2: kept.myshopify.com: already holds this pair; unchanged"), "{again:?}");
    assert!(again.stderr.contains("imported 0 token set(s)"), "{again:?}");
    assert!(again.stderr.contains("1 unchanged (same pair), 1 refused"), "{again:?}");
    assert_no_secret(&again, &[&a1, &r1, &rotated_access]);
    // The rotated pair is still the one held, and it works.
    let out = tokenwal(&db, &["token", "rerun.myshopify.com"], &env, None);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout.trim(), rotated_access, "the import rolled the shop back");
    assert!(sim.accepted("rerun", &rotated_access));

    // --force needs a reason; with one, the older pair goes in (an operator's decision).
    let no_reason = import(&["--force"]);
    assert_eq!(no_reason.code, 2, "{no_reason:?}");
    assert!(no_reason.stderr.contains("--reason"), "{no_reason:?}");
    let forced = import(&["--force", "--reason", "held pair revoked by support ticket 42"]);
    assert_eq!(forced.code, 0, "{forced:?}");
    assert!(forced.stderr.contains("imported 1 token set(s)"), "{forced:?}");
}

#[test]
fn a_short_demo_locks_no_shop_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokenwal(dir.path(), &["demo", "--shops", "20", "--duration", "3s"], &[], None);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("verdict: tokenwal locked out 0 shop(s)"), "{}", out.stdout);
    for row in
        ["refreshes: rotations at the server (sim)", "ambiguous rotations", "shops LOCKED OUT", "engine restarts"]
    {
        assert!(out.stdout.contains(row), "{row} missing:\n{}", out.stdout);
    }
    let locked_row = out.stdout.lines().find(|l| l.starts_with("shops LOCKED OUT")).unwrap();
    // The last two columns are tokenwal and naive.
    assert_eq!(locked_row.split_whitespace().rev().nth(1), Some("0"), "{locked_row}");
}

#[test]
fn the_demo_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["demo", "--shops", "8", "--duration", "2s", "--no-baseline", "--json", "--seed", "7"];
    let out = tokenwal(dir.path(), &args, &[], None);
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["seed"], 7);
    assert_eq!(v["tokenwal"]["shops"], 8);
    assert_eq!(v["tokenwal"]["locked_out"], 0);
    assert_eq!(v["tokenwal"]["restarts"], 1);
    assert!(v["tokenwal"]["rotations"].as_u64().unwrap() > 0, "{v}");
    assert!(v["naive"].is_null());
}

#[test]
fn sim_prints_its_address_and_serves() {
    use std::io::{BufRead, BufReader, Read};
    let mut child = Command::new(BIN)
        .args(["sim", "--port", "0", "--access-ttl", "5s"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut url).unwrap();
    let addr = url.trim().strip_prefix("http://").unwrap_or_else(|| panic!("{url:?}")).to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.write_all(b"GET /_sim/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(r#"{"ok":true}"#), "{answer}");
}

#[cfg(unix)]
#[test]
fn run_keeps_shops_fresh_and_stops_cleanly_on_sigterm() {
    use std::time::{Duration, Instant};
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let (l, _, _) = sim.seed("daemon");
    assert_eq!(tokenwal(&db, &["import"], &[], Some(&l)).code, 0);
    let base = sim.h().base_url();
    let env = [CREDENTIALS[0], CREDENTIALS[1], ("TOKENWAL_INSECURE_TEST_ENDPOINT", base.as_str())];
    let (mut child, rx) = tokenwal_testkit::cli::spawn(BIN, &db, &["run", "--grace", "2s"], &env);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = Vec::new();
    // The expired token is refreshed by the scheduler without anyone asking.
    while sim.h().counters().shop("daemon.myshopify.com").rotations == 0 {
        assert!(Instant::now() < deadline, "no refresh: {log:?}");
        while let Ok(l) = rx.try_recv() {
            log.push(l);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let stopped = Instant::now();
    let code = child.wait().unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(5), "took {:?}", stopped.elapsed());
    log.extend(rx.iter());
    assert_eq!(code.code(), Some(0), "{log:#?}");
    let text = log.join("\n");
    assert!(text.contains("recovery: 1 shops") && text.contains("stopping"), "{text}");
    assert!(!text.contains("shpat_") && !text.contains("shprt_") && !text.contains("sim-client-secret"), "{text}");
    let shops = tokenwal(&db, &["shops", "--json"], &[], None);
    let v: serde_json::Value = serde_json::from_str(&shops.stdout).unwrap();
    assert_eq!(v[0]["state"], "healthy");
    assert!(v[0]["generation"].as_u64().unwrap() >= 2, "{v}");
}

#[test]
fn compact_trims_histories_to_the_configured_cap_and_status_shows_bytes_per_grant() {
    let sim = Sim::start();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let base = sim.h().base_url();
    let mut env = CREDENTIALS.to_vec();
    env.push(("TOKENWAL_INSECURE_TEST_ENDPOINT", &base));
    let mut lines = Vec::new();
    for name in ["busy", "quiet"] {
        lines.push(sim.seed(name).0);
    }
    assert_eq!(tokenwal(&db, &["import"], &[], Some(&lines.join("\n"))).code, 0);
    // installed, intent, committed
    assert_eq!(tokenwal(&db, &["token", "busy.myshopify.com"], &env, None).code, 0);
    let config = dir.path().join("tokenwal.json");
    std::fs::write(&config, r#"{"history_per_grant": 1}"#).unwrap();
    let config = config.to_str().unwrap();

    let out = tokenwal(&db, &["--config", config, "compact", "--json"], &[], None);
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["grants"].as_u64(), v["trimmed"].as_u64(), v["expired"].as_u64()),
        (Some(2), Some(2), Some(0)),
        "{v}"
    );
    let inspect = tokenwal(&db, &["inspect", "busy.myshopify.com", "--json"], &[], None);
    let h: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    let kinds: Vec<_> =
        h["history"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds, ["committed"], "{h}");
    // The state is untouched: the token is served from the store without a request.
    let before = sim.h().counters().shop("busy.myshopify.com").token_requests;
    assert_eq!(tokenwal(&db, &["token", "busy.myshopify.com"], &env, None).code, 0);
    assert_eq!(sim.h().counters().shop("busy.myshopify.com").token_requests, before);

    let bad = tokenwal(&db, &["--config", config, "compact"], &[], None);
    assert_eq!(bad.code, 0, "{bad:?}");
    std::fs::write(dir.path().join("zero.json"), r#"{"history_per_grant": 0}"#).unwrap();
    let zero = tokenwal(&db, &["--config", dir.path().join("zero.json").to_str().unwrap(), "compact"], &[], None);
    assert_ne!(zero.code, 0, "{zero:?}");
    assert!(zero.stderr.contains("history_per_grant must be at least 1"), "{zero:?}");

    let status = tokenwal(&db, &["status", "--json"], &[], None);
    let s: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let (size, per) = (s["store"]["size_bytes"].as_u64().unwrap(), s["store"]["bytes_per_grant"].as_u64().unwrap());
    assert!(size > 0 && per == size / 2, "{s}");
    let text = tokenwal(&db, &["status"], &[], None);
    assert!(text.stdout.contains("KiB per grant"), "{}", text.stdout);
}
