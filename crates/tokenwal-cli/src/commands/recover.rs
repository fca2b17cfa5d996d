//! `tokenwal recover` and `recover --dry-run`.

use serde::Serialize;
use tokenwal::core::{recovery, Intention, UnixMillis};
use tokenwal::RecoveryReport;
use tracing::warn;

use super::{open_engine, open_store, print_json};
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt::{self, now};
use crate::views::{self, Instant};

#[derive(Serialize)]
struct PlanItemView {
    shop: String,
    found: &'static str,
    writes: Option<&'static str>,
    intention: &'static str,
    not_before: Option<Instant>,
    reason: Option<String>,
}

#[derive(Serialize)]
struct PlanView {
    dry_run: bool,
    open: usize,
    interrupted: usize,
    to_resolve: usize,
    needs_reauth: usize,
    items: Vec<PlanItemView>,
}

#[derive(Serialize)]
struct ReportView {
    dry_run: bool,
    grants: usize,
    open: usize,
    interrupted: usize,
    resolved: usize,
    still_ambiguous: usize,
    needs_reauth: usize,
    corrupt: Vec<String>,
    /// Still recovering when open's recovery budget ran out (`recovery_budget`).
    pending: usize,
    elapsed_ms: u64,
}

fn report_view(r: &RecoveryReport) -> ReportView {
    ReportView {
        dry_run: false,
        grants: r.grants,
        open: r.open,
        interrupted: r.interrupted,
        resolved: r.resolved,
        still_ambiguous: r.still_ambiguous,
        needs_reauth: r.needs_reauth,
        corrupt: r.corrupt.clone(),
        pending: r.pending,
        elapsed_ms: r.elapsed.as_millis() as u64,
    }
}

/// One line describing a recovery report (for logs and `recover`).
pub fn report_line(r: &RecoveryReport) -> String {
    format!(
        "recovery: {} shops, {} open ({} interrupted by a stop), {} resolved by retrying the old token, \
         {} still ambiguous (retried in the background), {} need re-auth, {} corrupt, in {} ms{}",
        r.grants,
        r.open,
        r.interrupted,
        r.resolved,
        r.still_ambiguous,
        r.needs_reauth,
        r.corrupt.len(),
        r.elapsed.as_millis(),
        if r.pending == 0 {
            String::new()
        } else {
            format!("; {} still recovering when the recovery budget ran out", r.pending)
        }
    )
}

/// `tokenwal recover --dry-run`: the plan over the open grants, nothing written or sent.
pub fn recover_dry_run(settings: &Settings, json: bool) -> Result<(), CliError> {
    let (store, _) = open_store(settings, false)?;
    let machine = settings.machine(store.fingerprint_key());
    let open = store.open_grants()?;
    let now = now();
    let plan = recovery::plan(&machine, &open, now, 0);
    let (interrupted, to_resolve, needs_reauth) = plan.summary();
    let items = plan
        .items
        .iter()
        .map(|i| {
            let (intention, not_before, reason) = match &i.intention {
                Intention::Resolve { not_before } => ("retry the old refresh token", not_before.map(Instant::of), None),
                Intention::NeedsReauth(r) => ("mark needs re-auth", None, Some(r.to_string())),
                Intention::Nothing => ("nothing", None, None),
            };
            PlanItemView {
                shop: i.grant.account().to_owned(),
                found: i.found,
                writes: i.transition.as_ref().map(|t| t.phase().name()),
                intention,
                not_before,
                reason,
            }
        })
        .collect();
    let view = PlanView { dry_run: true, open: open.len(), interrupted, to_resolve, needs_reauth, items };
    if json {
        return print_json(&view);
    }
    println!(
        "recovery plan (dry run: nothing written, nothing sent): {} open grant(s): {} interrupted by a stop, \
         {} to resolve by retrying the old refresh token, {} to mark needs re-auth",
        view.open, view.interrupted, view.to_resolve, view.needs_reauth
    );
    if !view.items.is_empty() {
        let rows: Vec<Vec<String>> = view
            .items
            .iter()
            .map(|i| {
                let mut then = i.intention.to_owned();
                if let Some(nb) = &i.not_before {
                    then.push_str(&format!(" (not before {})", timefmt::stamp(UnixMillis(nb.at_ms), now)));
                }
                if let Some(r) = &i.reason {
                    then.push_str(&format!(": {r}"));
                }
                vec![i.shop.clone(), i.found.to_owned(), views::or_dash(i.writes.map(str::to_owned)), then]
            })
            .collect();
        print!("{}", views::table(&["SHOP", "FOUND", "WRITES", "THEN"], &rows));
    }
    Ok(())
}

/// `tokenwal recover`: open the engine (which runs recovery) and print its report.
pub async fn recover(settings: &Settings, json: bool) -> Result<(), CliError> {
    let (engine, mut report) = open_engine(settings, false, true).await?;
    // Recovery checks the open grants; an operator's `recover` also checks every other grant's
    // state, so a corrupt one is named now rather than at its next use.
    let scan = engine.store().for_each_grant(|_| ());
    engine.shutdown().await;
    drop(engine);
    for what in scan?.corrupt {
        if !report.corrupt.contains(&what) {
            warn!(%what, "corrupt grant state: quarantined (never served, never guessed at)");
            report.corrupt.push(what);
        }
    }
    if json {
        print_json(&report_view(&report))
    } else {
        println!("{}", report_line(&report));
        Ok(())
    }
}
