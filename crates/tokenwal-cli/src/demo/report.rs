//! The demo's measurements, per-shop verdicts, and the side-by-side table.

use serde::Serialize;
use std::collections::BTreeMap;
use tokenwal_sim::CounterSet;

use super::World;
use crate::error::CliError;

/// How one shop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The app hands out a token the Admin API accepts.
    Ok,
    /// No working token, and the grant really is dead at the server.
    NeedsReauth(String),
    /// No working token although the grant is alive at the server.
    LockedOut(String),
}

impl Verdict {
    /// The verdict from the facts: does the app's token work, is the grant alive, and what the
    /// app says about the shop.
    pub fn of(working_token: bool, grant_alive: bool, app_says: String) -> Verdict {
        if working_token {
            Verdict::Ok
        } else if grant_alive {
            Verdict::LockedOut(app_says)
        } else {
            Verdict::NeedsReauth(app_says)
        }
    }
}

/// Everything measured in one run.
#[derive(Serialize, Default, Clone, Debug)]
pub(crate) struct RunReport {
    /// `tokenwal` or `naive`.
    pub app: &'static str,
    pub shops: usize,
    /// Crashes (each followed by a restart on what was persisted).
    pub restarts: usize,
    /// Token-endpoint requests (simulator).
    pub token_requests: u64,
    pub requests_per_shop: f64,
    /// First uses of a refresh token (simulator).
    pub rotations: u64,
    /// Retries of a used refresh token answered from retention (simulator).
    pub replays: u64,
    /// Faults applied, by kind (simulator).
    pub faults: BTreeMap<String, u64>,
    /// Rejections answered by the token endpoint, by OAuth error (simulator).
    pub rejections: BTreeMap<String, u64>,
    /// Rotations whose outcome the app did not know (distinct credentials).
    pub ambiguous: u64,
    /// Of those, resolved by retrying the same old refresh token.
    pub resolved_by_retry: u64,
    /// tokenwal: attempts cut by a crash and found by recovery.
    pub interrupted_by_crash: Option<u64>,
    /// tokenwal: summed recovery reports of the restarts.
    pub recovery: Option<RecoverySum>,
    /// naive: token pairs only in memory when the process crashed.
    pub pairs_lost_in_crashes: Option<u64>,
    /// App calls: token asked for and used at the Admin API.
    pub app_calls: u64,
    pub app_calls_working_token: u64,
    pub app_calls_rejected_token: u64,
    pub app_calls_no_token: u64,
    /// How long asking for a token took: p50, p99, max (ms).
    pub token_latency_ms: [f64; 3],
    pub ok: usize,
    pub needs_reauth: usize,
    pub locked_out: usize,
    pub needs_reauth_why: BTreeMap<String, usize>,
    pub locked_out_why: BTreeMap<String, usize>,
    pub locked_out_shops: Vec<String>,
    /// Wall time of the run including setup and settle.
    pub elapsed_ms: u64,
}

/// tokenwal's recovery reports, summed over restarts.
#[derive(Serialize, Default, Clone, Debug)]
pub(crate) struct RecoverySum {
    pub reports: usize,
    pub open: usize,
    pub interrupted: usize,
    pub resolved: usize,
    pub still_ambiguous: usize,
    pub needs_reauth: usize,
    pub corrupt: usize,
    pub max_elapsed_ms: u64,
}

impl RunReport {
    /// Records the verdicts of all shops.
    pub fn judge(&mut self, shops: &[(String, Verdict)]) {
        self.shops = shops.len();
        for (shop, v) in shops {
            match v {
                Verdict::Ok => self.ok += 1,
                Verdict::NeedsReauth(why) => {
                    self.needs_reauth += 1;
                    *self.needs_reauth_why.entry(why.clone()).or_default() += 1;
                }
                Verdict::LockedOut(why) => {
                    self.locked_out += 1;
                    *self.locked_out_why.entry(why.clone()).or_default() += 1;
                    self.locked_out_shops.push(shop.clone());
                }
            }
        }
    }

    /// Takes the simulator's counters.
    pub fn fill_from_sim(&mut self, c: &CounterSet, shops: usize) {
        let t = &c.total;
        self.token_requests = t.token_requests;
        self.requests_per_shop = t.token_requests as f64 / shops.max(1) as f64;
        self.rotations = t.rotations;
        self.replays = t.replays;
        self.faults = t.faults.iter().filter(|(k, _)| k.as_str() != "slow").map(|(k, v)| (k.clone(), *v)).collect();
        self.rejections = t.rejections.clone();
    }

    fn faults_total(&self) -> u64 {
        self.faults.values().sum()
    }

    fn lost_answers(&self) -> u64 {
        ["rotate_then_drop", "rotate_then_hang", "rotate_then_reset", "truncated", "malformed", "missing_expires_in"]
            .iter()
            .map(|k| self.faults.get(*k).copied().unwrap_or(0))
            .sum()
    }

    fn pct_working(&self) -> String {
        if self.app_calls == 0 {
            "—".into()
        } else {
            format!("{:.2}%", 100.0 * self.app_calls_working_token as f64 / self.app_calls as f64)
        }
    }
}

#[derive(Serialize)]
struct DemoJson<'a> {
    seed: u64,
    shops: usize,
    duration_ms: u64,
    access_ttl_ms: u64,
    fault_rate: f64,
    crash_at_ms: Vec<u64>,
    revoked_shops: Vec<String>,
    tokenwal: &'a RunReport,
    naive: Option<&'a RunReport>,
}

/// Prints the table (or JSON) to stdout.
pub(crate) fn print(world: &World, ours: &RunReport, theirs: Option<&RunReport>, json: bool) -> Result<(), CliError> {
    if json {
        let doc = DemoJson {
            seed: world.args.seed,
            shops: world.n(),
            duration_ms: world.duration.as_millis() as u64,
            access_ttl_ms: world.args.access_ttl.as_millis(),
            fault_rate: world.args.fault_rate,
            crash_at_ms: world.crash_at.iter().map(|d| d.as_millis() as u64).collect(),
            revoked_shops: world.revoked.iter().map(|&i| world.shops[i].to_string()).collect(),
            tokenwal: ours,
            naive: theirs,
        };
        let s = serde_json::to_string_pretty(&doc).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?;
        println!("{s}");
        return Ok(());
    }
    print!("{}", table(ours, theirs));
    Ok(())
}

fn table(ours: &RunReport, theirs: Option<&RunReport>) -> String {
    let dash = || "—".to_string();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut row = |label: &str, f: &dyn Fn(&RunReport) -> String| {
        rows.push((label.to_owned(), f(ours), theirs.map_or_else(dash, f)));
    };
    row("engine restarts (crashes mid-flight)", &|r| r.restarts.to_string());
    row("token requests (sim)", &|r| r.token_requests.to_string());
    row("  per shop", &|r| format!("{:.1}", r.requests_per_shop));
    row("faults injected (sim)", &|r| r.faults_total().to_string());
    row("  answers lost after the server acted", &|r| r.lost_answers().to_string());
    row("refreshes: rotations at the server (sim)", &|r| r.rotations.to_string());
    row("old token retried, answered from retention (sim)", &|r| r.replays.to_string());
    row("ambiguous rotations (outcome unknown to the app)", &|r| r.ambiguous.to_string());
    row("  resolved by retrying the old token", &|r| r.resolved_by_retry.to_string());
    row("  of them cut by a crash, found by recovery", &|r| {
        r.interrupted_by_crash.map_or_else(dash, |n| n.to_string())
    });
    row("token pairs lost in crashes (unsaved)", &|r| r.pairs_lost_in_crashes.map_or_else(dash, |n| n.to_string()));
    row("app calls", &|r| r.app_calls.to_string());
    row("  with a token the Admin API accepted", &|r| r.pct_working());
    row("  asking for the token: p50 / p99 / max ms", &|r| {
        let [a, b, c] = r.token_latency_ms;
        format!("{a:.1} / {b:.0} / {c:.0}")
    });
    row("shops OK at the end", &|r| r.ok.to_string());
    row("shops needing re-auth (grant really dead)", &|r| r.needs_reauth.to_string());
    row("shops LOCKED OUT (grant alive, no working token)", &|r| r.locked_out.to_string());

    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0).max(8);
    let w2 = rows.iter().map(|r| r.2.chars().count()).max().unwrap_or(0).max(8);
    let mut out = String::new();
    let naive = if theirs.is_some() { "naive" } else { "" };
    out.push_str(&format!("\n{:<w0$}  {:>w1$}  {:>w2$}\n", "", "tokenwal", naive));
    for (label, a, b) in &rows {
        out.push_str(&format!("{label:<w0$}  {a:>w1$}  {b:>w2$}\n"));
    }
    let whys = |title: &str, name: &str, m: &BTreeMap<String, usize>, out: &mut String| {
        if m.is_empty() {
            return;
        }
        out.push_str(&format!("\n{title} ({name}):\n"));
        let mut v: Vec<_> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (why, n) in v {
            out.push_str(&format!("  {n:>5}  {why}\n"));
        }
    };
    whys("needs re-auth, why", "tokenwal", &ours.needs_reauth_why, &mut out);
    whys("LOCKED OUT, why", "tokenwal", &ours.locked_out_why, &mut out);
    if let Some(t) = theirs {
        whys("needs re-auth, why", "naive", &t.needs_reauth_why, &mut out);
        whys("LOCKED OUT, why", "naive", &t.locked_out_why, &mut out);
    }
    if let Some(r) = &ours.recovery {
        out.push_str(&format!(
            "\ntokenwal recovery over {} restarts: {} open attempts found ({} interrupted intents), {} resolved at \
             open, {} left to the scheduler, {} marked needs re-auth, {} corrupt; slowest open {} ms\n",
            r.reports,
            r.open,
            r.interrupted,
            r.resolved,
            r.still_ambiguous,
            r.needs_reauth,
            r.corrupt,
            r.max_elapsed_ms
        ));
    }
    out.push_str(&format!(
        "\nverdict: tokenwal locked out {} shop(s){}\n",
        ours.locked_out,
        theirs.map_or(String::new(), |t| format!("; the naive refresher locked out {}", t.locked_out))
    ));
    out
}
