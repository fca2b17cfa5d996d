//! `tokenwal migrate` as a real process against the simulator: a bulk migration of 300 shops with
//! lost answers (RotateThenDrop), 429s with Retry-After, invalid input lines and a `kill -9` of the
//! process mid-run; the re-run must end with every shop migrated exactly once and none locked out.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokenwal::core::{GrantKey, ShopDomain};
use tokenwal_sim::{Fault, SimConfig};
use tokenwal_testkit::cli::Out;
use tokenwal_testkit::BlockingSim;

const BIN: &str = env!("CARGO_BIN_EXE_tokenwal");
const CLIENT_ID: &str = "sim-client-id";
const BAD_LINE_TOKEN: &str = "shpat_SECRET_OF_A_BAD_LINE";

fn command(db: &Path, base: &str, args: &[&str]) -> Command {
    let mut cmd = tokenwal_testkit::cli::clean_command(BIN);
    cmd.arg("--db").arg(db).arg("--insecure-test-endpoint").arg(base).arg("migrate").args(args);
    cmd.envs(tokenwal_testkit::cli::CREDENTIALS);
    cmd.env("TOKENWAL_STORE_KEY", tokenwal_testkit::cli::test_key());
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn finish(child: Child) -> Out {
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn shop(i: usize) -> String {
    format!("bulk-{i:03}.myshopify.com")
}

#[test]
fn bulk_migration_with_lost_answers_429s_and_a_crash_migrates_every_shop_exactly_once() {
    const N: usize = 300;
    let sim = BlockingSim::start_with(SimConfig::default(), 2);
    let base = sim.h().base_url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");

    // 300 shops with legacy tokens; random shops lose their answers or get throttled.
    let mut legacy = Vec::new();
    for i in 0..N {
        let t = sim.h().with_model(|m| m.seed_legacy_token(&shop(i), None, None)).unwrap();
        legacy.push(t.as_str().to_owned());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut order: Vec<usize> = (0..N).collect();
    order.shuffle(&mut rng);
    let dropped = &order[..45];
    let throttled = &order[45..51];
    for &i in dropped {
        sim.h().push_faults(&shop(i), [Fault::RotateThenDrop]).unwrap();
    }
    for &i in throttled {
        sim.h().push_faults(&shop(i), [Fault::Throttle { retry_after_secs: 1 }, Fault::RotateThenDrop]).unwrap();
    }

    // The input: the shops in random order, plus three bad lines.
    let file = dir.path().join("legacy.jsonl");
    let mut f = std::fs::File::create(&file).unwrap();
    for (k, &i) in order.iter().enumerate() {
        if k == 10 {
            writeln!(f, r#"{{"shop":"Not A Shop","access_token":"{BAD_LINE_TOKEN}"}}"#).unwrap();
        }
        if k == 20 {
            writeln!(f, r#"{{"shop":"{}","access_token":"{BAD_LINE_TOKEN}""#, shop(i)).unwrap();
        }
        writeln!(f, r#"{{"shop":"{}","access_token":"{}"}}"#, shop(i), legacy[i]).unwrap();
    }
    writeln!(f, r#"{{"shop":"{}","access_token":"{BAD_LINE_TOKEN}"}}"#, shop(order[0])).unwrap();
    drop(f);
    let file = file.to_str().unwrap();
    let args = ["--concurrency", "8", "--rate", "0", "--max-retry-wait", "3s", "--json", file];

    // Run 1, killed (SIGKILL) once a third of the shops are migrated at the server.
    let started = Instant::now();
    let mut child = command(&db, &base, &args).spawn().unwrap();
    while sim.h().counters().total.migrations < (N / 3) as u64 {
        assert!(child.try_wait().unwrap().is_none(), "run 1 ended before the kill");
        assert!(started.elapsed() < Duration::from_secs(60), "run 1 too slow");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let killed = finish(child);
    assert_ne!(killed.code, 0);
    let at_kill = sim.h().counters().total.migrations;
    assert!(at_kill < N as u64, "killed mid-run: {at_kill} of {N} migrated at the server");

    // Run 2 finishes the job.
    let out = finish(command(&db, &base, &args).spawn().unwrap());
    assert_eq!(out.code, 65, "only the input errors are left: {}\n{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let n = |k: &str| report[k].as_u64().unwrap();
    assert_eq!(n("shops"), N as u64);
    assert_eq!((n("failed"), n("not_attempted")), (0, 0), "{}", out.stdout);
    assert_eq!(n("migrated") + n("already_migrated") + n("resumed"), N as u64);
    // Every shop the server migrated before the kill is known to the store: committed (already
    // migrated) or with its durable intent (resumed with the same legacy token), never sent afresh.
    assert!(n("already_migrated") + n("resumed") >= at_kill, "the killed run's migrations are kept: {report}");
    let lines: Vec<u64> =
        report["input_errors"].as_array().unwrap().iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, [11, 22, N as u64 + 3], "{}", report["input_errors"]);
    for text in [&out.stdout, &out.stderr, &killed.stdout, &killed.stderr] {
        assert!(!text.contains(BAD_LINE_TOKEN) && !text.contains(&legacy[0]), "a token leaked");
    }
    assert!(out.stderr.contains("line 11: invalid shop domain") && out.stderr.contains("line 22: not valid JSON"));
    assert!(out.stderr.contains(&format!("line {}: {} was already given on line", N + 3, shop(order[0]))));

    // Exactly once at the server; legacy tokens revoked; every shop's current pair alive there.
    let counters = sim.h().counters();
    let store =
        tokenwal::store::Store::open(&db, &tokenwal::KeyRing::insecure_test_ring(), Default::default()).unwrap().0;
    let now = sim.h().now_ms();
    let mut replays = 0;
    for i in 0..N {
        let s = shop(i);
        let c = counters.shop(&s);
        assert_eq!(c.migrations, 1, "{s}: migrated exactly once at the server: {c:?}");
        replays += c.migration_replays;
        let view = sim.h().with_model(|m| m.shop_state(&s, now));
        assert!(view.alive, "{s}: locked out");
        assert!(view.legacy_tokens.iter().all(|l| format!("{:?}", l.status) == "Revoked"), "{s}: legacy revoked");
        let state = store.get(&GrantKey::shopify(&ShopDomain::parse(&s).unwrap())).unwrap().unwrap();
        assert!(state.has_live_pair(), "{s}: {:?}", state.phase);
        let t = state.tokens.as_ref().unwrap();
        sim.h().with_model(|m| {
            assert!(m.refresh_token_accepted(CLIENT_ID, &s, t.refresh_token.expose_secret(), now), "{s}: refresh");
            assert!(m.access_token_valid(&s, t.access_token.expose_secret(), now), "{s}: access");
        });
    }
    let dropped_faults = counters.total.faults_of("rotate_then_drop");
    let throttles = counters.total.faults_of("throttle");
    assert_eq!((dropped_faults, throttles), (51, 6), "every planned fault fired");
    assert!(replays >= 51, "each lost answer was recovered by a same-token retry: {replays}");
    drop(store);

    // Run 3: nothing left to do, nothing sent.
    let requests = sim.h().counters().total.token_requests;
    let again = finish(command(&db, &base, &args).spawn().unwrap());
    let report: serde_json::Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(report["already_migrated"].as_u64(), Some(N as u64), "{}", again.stdout);
    assert_eq!(sim.h().counters().total.token_requests, requests, "a re-run sends nothing");
    println!(
        "migrated {N} shops: {at_kill} before the kill, run 2 {} migrated / {} resumed / {} already; \
         {dropped_faults} lost answers, {throttles} 429s, {replays} same-token replays; {:.1}s total",
        n("migrated"),
        n("resumed"),
        n("already_migrated"),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn canary_dry_run_and_failures_per_shop() {
    let sim = BlockingSim::start_with(SimConfig::default(), 2);
    let base = sim.h().base_url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store");
    let mut lines = String::new();
    for i in 0..10 {
        let t = sim.h().with_model(|m| m.seed_legacy_token(&shop(i), None, None)).unwrap();
        // Shop 7's token is not known to the server: a definitive rejection.
        let token = if i == 7 { "shpat_unknown_to_the_server".to_owned() } else { t.as_str().to_owned() };
        lines.push_str(&format!("{{\"shop\":\"{}\",\"access_token\":\"{token}\"}}\n", shop(i)));
    }
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, &lines).unwrap();
    let file = file.to_str().unwrap();

    // Dry run: nothing sent, no store created.
    let dry = finish(command(&db, &base, &["--dry-run", "--json", file]).spawn().unwrap());
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let v: serde_json::Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(v["results"].as_array().unwrap().iter().filter(|r| r["result"] == "would-migrate").count(), 10);
    assert_eq!(sim.h().counters().total.token_requests, 0);

    // Canary of 20%: two shops, then a stop (no --yes, not a terminal).
    let canary = finish(command(&db, &base, &["--canary", "20%", "--json", file]).spawn().unwrap());
    assert_eq!(canary.code, 0, "{}", canary.stderr);
    let v: serde_json::Value = serde_json::from_str(&canary.stdout).unwrap();
    assert_eq!((v["migrated"].as_u64(), v["not_attempted"].as_u64()), (Some(2), Some(8)), "{v}");
    assert_eq!(v["stopped_after_canary"], true);
    assert_eq!(sim.h().counters().total.migrations, 2);

    // --yes: the rest; shop 5's answer is lost and shop 6 is throttled first (both retried), shop 7
    // fails with its own reason, the others succeed.
    sim.h().push_faults(&shop(5), [Fault::RotateThenDrop]).unwrap();
    sim.h().push_faults(&shop(6), [Fault::Throttle { retry_after_secs: 1 }]).unwrap();
    let rest = finish(command(&db, &base, &["--canary", "20%", "--yes", file]).spawn().unwrap());
    assert_eq!(rest.code, 1, "a definitive failure: {}\n{}", rest.stdout, rest.stderr);
    assert!(
        rest.stdout.contains("already migrated   2") && rest.stdout.contains("migrated           7"),
        "{}",
        rest.stdout
    );
    assert!(rest.stdout.contains(&format!("{} (line 8): ", shop(7))), "{}", rest.stdout);
    assert!(!rest.stdout.contains(&shop(5)) && !rest.stdout.contains(&shop(6)), "{}", rest.stdout);
    assert_eq!(sim.h().counters().total.migrations, 9);
    assert_eq!(sim.h().counters().shop(&shop(5)).migration_replays, 1, "the lost answer was replayed");
}
