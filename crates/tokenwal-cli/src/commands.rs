//! Every command but `demo`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;
use tokenwal::core::{
    recovery, Event, Goal, GrantKey, GrantState, InstallSource, Intention, NoChange, Phase, Refusal, ShopDomain,
    UnixMillis,
};
use tokenwal::store::{keys, OpenReport, RecoveryMode, Reseal, Store, StoreConfig, StoreError};
use tokenwal::{Driven, Driver, Engine, Offline, RecoveryReport};
use tracing::{info, warn};

use crate::error::CliError;
use crate::import;
use crate::settings::Settings;
use crate::timefmt::{self, now};
use crate::views::{self, GrantView, Instant, RecordView};

/// Opens the store at `settings.db`, sealed under `settings.keys()`. `create`: make it if missing
/// (import); otherwise a missing directory is an error rather than a new empty store. Histories are
/// read strictly (a corrupt journal record is an error naming it) unless `--skip-corrupt-records` was
/// given.
pub fn open_store(settings: &Settings, create: bool) -> Result<(Store, OpenReport), CliError> {
    let path = settings.db.as_path();
    if !create && !path.exists() {
        return Err(CliError::NoStore { path: path.to_owned() });
    }
    let keys = settings.keys()?;
    let mode = if settings.skip_corrupt_records { RecoveryMode::SkipCorruptRecords } else { RecoveryMode::Strict };
    let (store, report) = Store::open(path, &keys, StoreConfig::default().with_recovery(mode))?;
    for what in &report.corrupt {
        warn!(%what, "corrupt entry in the store: quarantined (never served, never guessed at)");
    }
    Ok((store, report))
}

/// `Engine::open` (recovery runs first), with the lock error made clear. Only `run` may start
/// from an empty directory; `token` and `recover` need an existing store.
async fn open_engine(
    settings: &Settings,
    proactive: bool,
    must_exist: bool,
) -> Result<(Engine, RecoveryReport), CliError> {
    let config = settings.engine_config(proactive)?;
    if must_exist && !settings.db.exists() {
        return Err(CliError::NoStore { path: settings.db.clone() });
    }
    Ok(Engine::open(config).await?)
}

fn print_json(v: &impl Serialize) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?;
    println!("{s}");
    Ok(())
}

fn parse_shop(s: &str) -> Result<ShopDomain, CliError> {
    ShopDomain::parse(s).map_err(|e| CliError::Usage(format!("invalid shop domain: {e}")))
}

/// All grants, sorted by shop; corrupt ones are logged and skipped.
fn all_grants(store: &Store) -> Result<Vec<GrantState>, CliError> {
    Ok(all_grants_and_corrupt(store)?.0)
}

/// All grants, sorted by shop, and the names of the corrupt states the scan skipped.
fn all_grants_and_corrupt(store: &Store) -> Result<(Vec<GrantState>, Vec<String>), CliError> {
    let mut grants = Vec::new();
    let scan = store.for_each_grant(|s| grants.push(s))?;
    for what in &scan.corrupt {
        warn!(%what, "corrupt grant state skipped");
    }
    grants.sort_by(|a, b| a.grant.cmp(&b.grant));
    Ok((grants, scan.corrupt))
}

// ------------------------------------------------------------------------------------------ import

/// How `tokenwal import` treats a line whose shop already holds a different pair.
pub struct ImportOptions {
    /// Install even over a newer pair.
    pub force: bool,
    /// Why (required with `force`; logged and printed).
    pub reason: Option<String>,
}

/// What became of the valid lines of an import.
#[derive(Default)]
struct ImportTally {
    imported: usize,
    unchanged: usize,
    refused: usize,
}

/// `tokenwal import [FILE|-]`.
///
/// Each valid line is a checked install through the engine's driver (`Goal::Install`): the pair the
/// shop holds already is left alone, and a pair older than the one held is refused and reported (a
/// re-run import after the worker rotated must not put superseded refresh tokens back), unless
/// `--force --reason`.
pub async fn import(settings: &Settings, file: &str, options: &ImportOptions) -> Result<(), CliError> {
    let reader: Box<dyn BufRead> = if file == "-" {
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprintln!("reading token sets as JSON lines from stdin (end with Ctrl-D)");
        }
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(file).map_err(|e| CliError::io(format!("cannot open {file}"), e))?;
        Box::new(std::io::BufReader::new(f))
    };
    // Validate everything first: a line is installed whole or not at all, and a bad file does
    // not even create the store.
    let mut valid = Vec::new();
    let (mut total, mut failed) = (0usize, 0usize);
    let now = now();
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| CliError::io(format!("cannot read line {n}"), e))?;
        let Ok(line) = String::from_utf8(line) else {
            total += 1;
            failed += 1;
            eprintln!("line {n}: not UTF-8");
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        total += 1;
        match import::parse_line(line, now) {
            Ok(parsed) => valid.push((n, parsed)),
            Err(why) => {
                failed += 1;
                eprintln!("line {n}: {why}");
            }
        }
    }
    let mut tally = ImportTally::default();
    if !valid.is_empty() {
        let (store, _) = open_store(settings, true)?;
        let machine = settings.machine(store.fingerprint_key());
        let driver = Driver::new(&store, &machine, &Offline);
        if let (true, Some(reason)) = (options.force, &options.reason) {
            warn!(%reason, "forced import: pairs older than the ones held will be installed");
        }
        for (n, (shop, tokens)) in valid {
            let grant = GrantKey::shopify(&shop);
            let goal = Goal::Install { tokens, source: InstallSource::Import, force: options.force };
            match driver.drive(&grant, &goal).await? {
                Driven::Wrote(done) => {
                    info!(line = n, %shop, generation = done.state().generation.0, "imported");
                    tally.imported += 1;
                }
                Driven::Unchanged { why: NoChange::SamePair, .. } => {
                    eprintln!("line {n}: {shop}: already holds this pair; unchanged");
                    tally.unchanged += 1;
                }
                Driven::Refused { refusal: Refusal::OlderPair { held }, .. } => {
                    eprintln!(
                        "line {n}: {shop}: refused: the store holds a newer pair (generation {}); this line's \
                         pair is older and was not imported (override: --force --reason TEXT)",
                        held.0
                    );
                    tally.refused += 1;
                }
                other => {
                    return Err(CliError::Engine(tokenwal::Error::Internal(format!(
                        "line {n}: {shop}: import ended as {other:?}"
                    ))))
                }
            }
        }
    }
    let ImportTally { imported, unchanged, refused } = tally;
    eprintln!(
        "imported {imported} token set(s) into {}; {unchanged} unchanged (same pair), {refused} refused \
         (the store holds a newer pair); {failed} invalid line(s)",
        settings.db.display()
    );
    if failed > 0 {
        return Err(CliError::ImportFailed { failed, total });
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------ status

#[derive(Serialize, Default)]
struct StateCounts {
    healthy: usize,
    refreshing: usize,
    ambiguous: usize,
    #[serde(rename = "needs-reauth")]
    needs_reauth: usize,
    uninstalled: usize,
    /// A first acquisition (migration, token exchange) certainly not processed: no tokens yet.
    #[serde(rename = "not-installed")]
    not_installed: usize,
}

#[derive(Serialize)]
struct OldestAmbiguous {
    shop: String,
    since: Instant,
    tries: u32,
    last_reason: String,
}

#[derive(Serialize)]
struct NextDue {
    shop: String,
    due: Instant,
    overdue: bool,
}

#[derive(Serialize)]
struct StoreInfo {
    path: String,
    size_bytes: u64,
    open_attempts: usize,
    corrupt: Vec<String>,
}

#[derive(Serialize)]
struct StatusView {
    app_handle: Option<String>,
    grants: usize,
    states: StateCounts,
    oldest_ambiguous: Option<OldestAmbiguous>,
    next_refresh_due: Option<NextDue>,
    overdue: usize,
    store: StoreInfo,
}

fn dir_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `tokenwal status`.
pub fn status(settings: &Settings, json: bool) -> Result<(), CliError> {
    let (store, report) = open_store(settings, false)?;
    let machine = settings.machine(store.fingerprint_key());
    let now = now();
    let (grants, scanned_corrupt) = all_grants_and_corrupt(&store)?;
    // Corrupt entries: the open index's (found at open) and the grant states' (found by the scan).
    let mut corrupt = report.corrupt.clone();
    corrupt.extend(scanned_corrupt.into_iter().filter(|w| !report.corrupt.contains(w)));
    let mut states = StateCounts::default();
    let mut oldest: Option<OldestAmbiguous> = None;
    let mut next: Option<NextDue> = None;
    let mut overdue = 0;
    for s in &grants {
        let amb = match &s.phase {
            Phase::Healthy => {
                states.healthy += 1;
                None
            }
            Phase::Refreshing { resolving, .. } => {
                states.refreshing += 1;
                resolving.as_ref()
            }
            Phase::Ambiguous(a) => {
                states.ambiguous += 1;
                Some(a)
            }
            Phase::NeedsReauth { .. } => {
                states.needs_reauth += 1;
                None
            }
            Phase::Uninstalled { .. } => {
                states.uninstalled += 1;
                None
            }
            // A first acquisition that was certainly not processed: no tokens yet.
            Phase::NotInstalled { .. } => {
                states.not_installed += 1;
                None
            }
        };
        if let Some(a) = amb {
            if oldest.as_ref().is_none_or(|o| a.since.0 < o.since.at_ms) {
                oldest = Some(OldestAmbiguous {
                    shop: s.grant.account().to_owned(),
                    since: Instant::of(a.since),
                    tries: a.tries,
                    last_reason: a.last_reason.to_string(),
                });
            }
        }
        if let (Phase::Healthy, Some(t)) = (&s.phase, &s.tokens) {
            let due = machine.due_at(t, s.updated_at);
            if due <= now {
                overdue += 1;
            }
            if next.as_ref().is_none_or(|n| due.0 < n.due.at_ms) {
                next = Some(NextDue { shop: s.grant.account().to_owned(), due: Instant::of(due), overdue: due <= now });
            }
        }
    }
    let view = StatusView {
        app_handle: settings.app_handle().map(str::to_owned),
        grants: grants.len(),
        states,
        oldest_ambiguous: oldest,
        next_refresh_due: next,
        overdue,
        store: StoreInfo {
            path: settings.db.display().to_string(),
            size_bytes: dir_size(&settings.db),
            open_attempts: report.open_attempts,
            corrupt,
        },
    };
    if json {
        return print_json(&view);
    }
    let mut out = String::new();
    if let Some(h) = &view.app_handle {
        out.push_str(&format!("app                {h}\n"));
    }
    out.push_str(&format!(
        "store              {} ({:.1} MiB on disk)\n",
        view.store.path,
        view.store.size_bytes as f64 / 1_048_576.0
    ));
    out.push_str(&format!("shops              {}\n", view.grants));
    let s = &view.states;
    for (name, n) in [
        ("healthy", s.healthy),
        ("refreshing", s.refreshing),
        ("ambiguous", s.ambiguous),
        ("needs-reauth", s.needs_reauth),
        ("uninstalled", s.uninstalled),
        ("not-installed", s.not_installed),
    ] {
        out.push_str(&format!("  {name:<16} {n}\n"));
    }
    match &view.oldest_ambiguous {
        Some(o) => out.push_str(&format!(
            "oldest ambiguous   {} since {} — {} tr{}, last: {}\n",
            o.shop,
            timefmt::stamp(UnixMillis(o.since.at_ms), now),
            o.tries,
            if o.tries == 1 { "y" } else { "ies" },
            o.last_reason
        )),
        None => out.push_str("oldest ambiguous   none\n"),
    }
    match &view.next_refresh_due {
        Some(n) if n.overdue => out.push_str(&format!(
            "next refresh due   {} shop(s) overdue, oldest {} since {} (is `tokenwal run` running?)\n",
            view.overdue,
            n.shop,
            timefmt::stamp(UnixMillis(n.due.at_ms), now)
        )),
        Some(n) => out.push_str(&format!(
            "next refresh due   {} at {}\n",
            n.shop,
            timefmt::stamp(UnixMillis(n.due.at_ms), now)
        )),
        None => out.push_str("next refresh due   none\n"),
    }
    out.push_str(&format!("open attempts      {} (recovery's work list)\n", view.store.open_attempts));
    out.push_str(&format!("corrupt entries    {}\n", view.store.corrupt.len()));
    print!("{out}");
    Ok(())
}

// ------------------------------------------------------------------------------------------ shops

/// `tokenwal shops`.
pub fn shops(settings: &Settings, state: Option<&str>, app_handle: Option<&str>, json: bool) -> Result<(), CliError> {
    let app_handle = match app_handle.or(settings.app_handle()) {
        Some(h) if !tokenwal::webhook_sink::valid_handle(h) => {
            return Err(CliError::Usage(format!("app handle {h:?} is not valid: expected [a-z0-9-]{{1,100}}")))
        }
        h => h,
    };
    let (store, _) = open_store(settings, false)?;
    let key = store.fingerprint_key();
    let now = now();
    let views: Vec<GrantView> = all_grants(&store)?
        .iter()
        .filter(|s| state.is_none_or(|st| s.phase.name() == st))
        .map(|s| GrantView::of(s, &key).with_deep_link(s, app_handle))
        .collect();
    if json {
        return print_json(&views);
    }
    if state == Some("needs-reauth") {
        // Re-auth routing: who to contact, why, since when, and the link that makes the merchant's
        // next app open run token exchange.
        let rows: Vec<Vec<String>> = views
            .iter()
            .map(|v| {
                let since = v.since.map(|s| timefmt::stamp(UnixMillis(s.at_ms), now)).unwrap_or_default();
                let link = v.deep_link.clone().unwrap_or_else(|| "-".into());
                vec![v.shop.clone(), since, v.why.clone().unwrap_or_default(), link]
            })
            .collect();
        print!("{}", views::table(&["SHOP", "SINCE", "WHY", "RE-AUTH LINK"], &rows));
        if app_handle.is_none() && !views.is_empty() {
            eprintln!("tokenwal: pass --app-handle (or set app_handle in the config file) to print re-auth links");
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let note = match (v.state, &v.why, &v.since) {
                ("healthy", _, _) => String::new(),
                (_, Some(why), Some(since)) => {
                    format!("{why} (since {})", timefmt::relative(UnixMillis(since.at_ms), now))
                }
                (_, None, Some(since)) => format!("since {}", timefmt::relative(UnixMillis(since.at_ms), now)),
                _ => String::new(),
            };
            vec![
                v.shop.clone(),
                v.state.to_owned(),
                v.generation.to_string(),
                views::expiry_cell(&v.access_expires, now),
                views::expiry_cell(&v.refresh_expires, now),
                note,
            ]
        })
        .collect();
    print!("{}", views::table(&["SHOP", "STATE", "GEN", "ACCESS EXPIRES", "REFRESH EXPIRES", "WHY / SINCE"], &rows));
    Ok(())
}

// ------------------------------------------------------------------------------------------ inspect

#[derive(Serialize)]
struct InspectView {
    #[serde(flatten)]
    grant: GrantView,
    history: Vec<RecordView>,
    skipped_corrupt_records: Vec<u64>,
}

/// `tokenwal inspect SHOP`.
pub fn inspect(settings: &Settings, shop: &str, json: bool) -> Result<(), CliError> {
    let shop = parse_shop(shop)?;
    let (store, _) = open_store(settings, false)?;
    let grant = GrantKey::shopify(&shop);
    let state = store.get(&grant)?.ok_or_else(|| CliError::NotInstalled { shop: shop.to_string() })?;
    let key = store.fingerprint_key();
    let history = store.history_report(&grant)?;
    let view = InspectView {
        grant: GrantView::of(&state, &key),
        history: history.records.iter().map(|(lsn, r)| RecordView::of(*lsn, r)).collect(),
        skipped_corrupt_records: history.skipped.clone(),
    };
    if json {
        return print_json(&view);
    }
    let now = now();
    let g = &view.grant;
    let mut out = String::new();
    let mut field = |k: &str, v: String| out.push_str(&format!("{k:<18} {v}\n"));
    field("shop", g.shop.clone());
    field("state", format!("{} (generation {}, version {})", g.state, g.generation, g.version));
    if let Some(why) = &g.why {
        field("why", why.clone());
    }
    if let Some(since) = &g.since {
        field("since", timefmt::stamp(UnixMillis(since.at_ms), now));
    }
    if let Some(t) = g.tries {
        field("tries", t.to_string());
    }
    field("access expires", views::expiry_cell(&g.access_expires, now));
    field("refresh expires", views::expiry_cell(&g.refresh_expires, now));
    field("refresh token", views::or_dash(g.refresh_fingerprint.as_ref().map(|f| format!("fingerprint {f}"))));
    field("scope", views::or_dash(g.scope.clone()));
    field(
        "first presented",
        views::or_dash(g.credential_first_presented.map(|i| timefmt::stamp(UnixMillis(i.at_ms), now))),
    );
    field("failures", g.consecutive_failures.to_string());
    field("not before", views::or_dash(g.not_before.map(|i| timefmt::stamp(UnixMillis(i.at_ms), now))));
    field("updated", timefmt::stamp(UnixMillis(g.updated.at_ms), now));
    out.push_str(&format!("\nhistory ({} records)\n", view.history.len()));
    let rows: Vec<Vec<String>> = view
        .history
        .iter()
        .map(|r| {
            vec![
                r.lsn.to_string(),
                r.time.at.0.to_string(),
                r.kind.to_owned(),
                views::or_dash(r.attempt.map(|a| a.to_string())),
                views::or_dash(r.generation.map(|a| a.to_string())),
                views::or_dash(r.request_id.clone()),
                r.detail.clone(),
            ]
        })
        .collect();
    out.push_str(&views::table(&["LSN", "TIME", "KIND", "ATTEMPT", "GEN", "REQUEST ID", "DETAIL"], &rows));
    if !view.skipped_corrupt_records.is_empty() {
        out.push_str(&format!("corrupt records skipped: {:?}\n", view.skipped_corrupt_records));
    }
    print!("{out}");
    Ok(())
}

// ------------------------------------------------------------------------------------------ recover

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
        elapsed_ms: r.elapsed.as_millis() as u64,
    }
}

/// One line describing a recovery report (for logs and `recover`).
pub fn report_line(r: &RecoveryReport) -> String {
    format!(
        "recovery: {} shops, {} open ({} interrupted by a stop), {} resolved by retrying the old token, \
         {} still ambiguous (retried in the background), {} need re-auth, {} corrupt, in {} ms",
        r.grants,
        r.open,
        r.interrupted,
        r.resolved,
        r.still_ambiguous,
        r.needs_reauth,
        r.corrupt.len(),
        r.elapsed.as_millis()
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

// ------------------------------------------------------------------------------------------ token

/// `tokenwal token SHOP`: a valid access token on stdout.
pub async fn token(settings: &Settings, shop: &str) -> Result<(), CliError> {
    let shop = parse_shop(shop)?;
    let (engine, _) = open_engine(settings, false, true).await?;
    let result = engine.access_token(&shop).await;
    engine.shutdown().await;
    drop(engine);
    let token = result?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", token.expose_secret()).map_err(|e| CliError::io("cannot write to stdout", e))?;
    Ok(())
}

// ------------------------------------------------------------------------------------------ export

/// Why `export` needs `--reveal-secrets`.
pub const EXPORT_REFUSAL: &str = "export writes every shop's access and refresh tokens in clear text. \
Anyone holding a refresh token can mint access tokens for that shop. If that is what you want (a migration, \
a backup you will keep safe), run `tokenwal export --reveal-secrets > file` and protect the file.";

/// `tokenwal export --reveal-secrets`.
pub fn export(settings: &Settings) -> Result<(), CliError> {
    let (store, _) = open_store(settings, false)?;
    let grants = all_grants(&store)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut n, mut dead) = (0, 0);
    for s in &grants {
        let Some(t) = &s.tokens else { continue };
        writeln!(out, "{}", import::export_line(s.grant.account(), t))
            .map_err(|e| CliError::io("cannot write to stdout", e))?;
        n += 1;
        if matches!(s.phase, Phase::NeedsReauth { .. }) {
            dead += 1;
        }
    }
    out.flush().map_err(|e| CliError::io("cannot write to stdout", e))?;
    eprintln!("exported {n} token set(s) ({dead} of them need re-auth: their tokens are dead)");
    Ok(())
}

// ------------------------------------------------------------------------------------------ run

/// `tokenwal run`.
pub async fn run(settings: &Settings, once: bool, sweep: Duration, grace: Duration) -> Result<(), CliError> {
    // Signals are handled from the start: recovery at open may wait on a hung token endpoint.
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let (engine, report) = tokio::select! {
        opened = open_engine(settings, !once, false) => opened?,
        _ = &mut stop => {
            warn!("stopped during recovery: what it had not finished stays journaled for the next start");
            return Ok(());
        }
    };
    info!(store = %settings.db.display(), "{}", report_line(&report));
    if once {
        let result = tokio::select! {
            r = engine.refresh_due() => r,
            _ = &mut stop => {
                warn!("stopped: refreshes in flight stay journaled for the next start");
                return Ok(());
            }
        };
        engine.shutdown().await;
        let n = result?;
        let counts = phase_counts(&engine)?;
        drop(engine);
        info!(attempted = n, "refreshed every due shop; {counts}");
        return Ok(());
    }
    let mut events = engine.subscribe();
    let mut tally = EventTally::default();
    let mut summary = tokio::time::interval(Duration::from_secs(60));
    summary.tick().await;
    let mut sweeper = tokio::time::interval(sweep.max(Duration::from_secs(1)));
    sweeper.tick().await;
    info!("running: keeping every shop fresh until SIGINT or SIGTERM");
    loop {
        tokio::select! {
            _ = &mut stop => break,
            e = events.recv() => match e {
                Ok(e) => tally.add(&e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tally.lagged += n,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = summary.tick() => {
                info!("last minute: {tally}");
                tally = EventTally::default();
            }
            _ = sweeper.tick() => {
                // A safety net under the scheduler: anything due that it has not picked up.
                match engine.refresh_due().await {
                    Ok(0) => {}
                    Ok(n) => info!(attempted = n, "sweep refreshed due shops the scheduler had not"),
                    Err(e) => warn!(error = %e, "sweep failed"),
                }
            }
        }
    }
    info!(grace_secs = grace.as_secs_f64(), "stopping: waiting for refreshes in flight");
    tokio::select! {
        _ = engine.shutdown() => info!("stopped"),
        // Safe by the durability contract: an attempt cut short stays journaled as an intent and
        // the next start's recovery retries its old refresh token.
        _ = tokio::time::sleep(grace) => warn!(
            "refreshes still in flight after the grace period: abandoned; they stay journaled and recovery \
             resolves them at the next start"
        ),
        _ = shutdown_signal() => warn!("second signal: refreshes in flight abandoned; recovery resolves them at the next start"),
    }
    drop(engine);
    Ok(())
}

fn phase_counts(engine: &Engine) -> Result<String, CliError> {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    engine.store().for_each_grant(|s| *counts.entry(s.phase.name()).or_default() += 1)?;
    Ok(counts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "))
}

/// Events seen since the last summary.
#[derive(Default)]
struct EventTally {
    refreshed: u64,
    ambiguous: u64,
    resolved: u64,
    needs_reauth: u64,
    credentials: u64,
    throttled: u64,
    other: u64,
    lagged: u64,
}

impl EventTally {
    fn add(&mut self, e: &Event) {
        match e {
            Event::Refreshed { .. } => self.refreshed += 1,
            Event::Ambiguous { .. } => self.ambiguous += 1,
            Event::Resolved { .. } => self.resolved += 1,
            Event::NeedsReauth { .. } => self.needs_reauth += 1,
            Event::AppCredentialsRejected { .. } => self.credentials += 1,
            Event::Throttled { .. } => self.throttled += 1,
            _ => self.other += 1,
        }
    }
}

impl std::fmt::Display for EventTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} refreshed, {} ambiguous, {} resolved, {} needs-reauth, {} app-credentials-rejected, {} throttled, \
             {} other",
            self.refreshed,
            self.ambiguous,
            self.resolved,
            self.needs_reauth,
            self.credentials,
            self.throttled,
            self.other
        )?;
        if self.lagged > 0 {
            write!(f, " ({} events missed)", self.lagged)?;
        }
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

// ------------------------------------------------------------------------------------------ sim

/// `tokenwal sim`.
pub async fn sim(config: tokenwal_sim::SimConfig, port: u16) -> Result<(), CliError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let handle =
        tokenwal_sim::serve(config, addr).await.map_err(|e| CliError::io(format!("cannot serve on {addr}"), e))?;
    println!("{}", handle.base_url());
    std::io::stdout().flush().map_err(|e| CliError::io("cannot write to stdout", e))?;
    eprintln!(
        "simulator listening; point tokenwal at it with --insecure-test-endpoint {} (Ctrl-C stops it)",
        handle.base_url()
    );
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------ keys

/// `tokenwal keygen FILE` (a new key file, mode 0600, never overwriting) and `keygen --rotate FILE`
/// (prepend a new active key, keep the old ones for reading).
pub fn keygen(file: &Path, rotate: bool) -> Result<(), CliError> {
    if rotate {
        let ring = keys::rotate_key_file(file).map_err(StoreError::Key)?;
        let ids: Vec<String> = ring.ids().iter().skip(1).map(|i| i.to_string()).collect();
        println!(
            "new active store key {} in {} (older keys kept for reading: {}).\n\
             Restart the process using the store, then run `tokenwal rekey` until it reports 0 remaining.",
            ring.active_id(),
            file.display(),
            ids.join(", ")
        );
    } else {
        let id = keys::write_new_key_file(file).map_err(StoreError::Key)?;
        println!(
            "wrote store key {id} to {} (mode 0600). Point TOKENWAL_STORE_KEY_FILE (or store_key_file in the \
             config file) at it, and back it up separately from the store: without it the store cannot be read.",
            file.display()
        );
    }
    Ok(())
}

/// What `tokenwal rekey` found and did.
#[derive(Serialize)]
struct RekeyReport {
    active_key: String,
    ring: Vec<String>,
    upgraded_from_format_1: usize,
    resealed: usize,
    /// Values sealed under each key id (grant states, plus the fingerprint key).
    in_use: BTreeMap<String, usize>,
    remaining_under_old_keys: usize,
    /// Grants sealed under a key the ring does not hold.
    unreadable: Vec<String>,
    corrupt: Vec<String>,
}

/// How often `rekey` reports progress on stderr.
const REKEY_PROGRESS_EVERY: usize = 10;

/// `tokenwal rekey [--check] [--limit N] [--upgrade]`: re-seals every grant state (and the
/// fingerprint key) under the active key. Each grant is one durable compare-and-swap, so an
/// interrupted run leaves a mix the ring still reads, and running it again finishes the job.
pub fn rekey(
    settings: &Settings,
    check: bool,
    limit: Option<usize>,
    upgrade: bool,
    json: bool,
) -> Result<(), CliError> {
    if !settings.db.exists() {
        return Err(CliError::NoStore { path: settings.db.clone() });
    }
    let ring = settings.keys()?;
    let upgraded =
        if upgrade && !check { Store::upgrade_format1(&settings.db, &ring, StoreConfig::default())? } else { 0 };
    // Opening re-seals the fingerprint key under the active key.
    let (store, _) = open_store(settings, false)?;
    let active = ring.active_id();
    let mut resealed = 0;
    let mut unreadable = Vec::new();
    let mut corrupt = Vec::new();
    if !check {
        let todo = store.grants_under_old_keys()?;
        let total = limit.map_or(todo.len(), |l| l.min(todo.len()));
        for g in todo.into_iter().take(total) {
            match store.reseal_blocking(&g) {
                Ok(Reseal::Resealed) => resealed += 1,
                Ok(_) => {}
                Err(StoreError::KeyUnavailable { what, key_id, .. }) => {
                    unreadable.push(format!("{what} (key id {key_id})"))
                }
                Err(StoreError::Corrupt { what, .. }) => corrupt.push(what),
                Err(e) => return Err(e.into()),
            }
            if resealed > 0 && resealed % REKEY_PROGRESS_EVERY == 0 {
                eprintln!("rekey: re-sealed {resealed}/{total}");
            }
        }
    }
    let usage = store.key_usage()?;
    corrupt.extend(usage.corrupt.iter().cloned());
    corrupt.sort();
    corrupt.dedup();
    let mut in_use: BTreeMap<String, usize> = usage.grants.iter().map(|(id, n)| (id.to_string(), *n)).collect();
    if let Some(id) = usage.fingerprint_key {
        *in_use.entry(id.to_string()).or_default() += 1;
    }
    let report = RekeyReport {
        active_key: active.to_string(),
        ring: ring.ids().iter().map(|i| i.to_string()).collect(),
        upgraded_from_format_1: upgraded,
        resealed,
        in_use,
        remaining_under_old_keys: usage.remaining_under_other_keys(active),
        unreadable,
        corrupt,
    };
    if json {
        print_json(&report)?;
    } else {
        println!("active store key: {}   key ring: {}", report.active_key, report.ring.join(", "));
        if upgraded > 0 {
            println!("upgraded from format 1: sealed {upgraded} values");
        }
        if !check {
            println!("re-sealed now: {resealed}");
        }
        for (id, n) in &report.in_use {
            let role = if *id == report.active_key { "active" } else { "old" };
            println!("  sealed under {id} ({role}): {n}");
        }
        for u in &report.unreadable {
            println!("  unreadable: {u}: that key is not in the ring");
        }
        for c in &report.corrupt {
            println!("  corrupt: {c}");
        }
        match report.remaining_under_old_keys {
            0 => println!(
                "remaining under old keys: 0 — the old keys are no longer needed and may be removed from the key file"
            ),
            n => println!("remaining under old keys: {n} — keep the old keys; run `tokenwal rekey` (again) to finish"),
        }
    }
    if !report.unreadable.is_empty() {
        return Err(CliError::Config(format!(
            "{} grant(s) are sealed under keys not in the ring: supply those keys (see docs/security.md)",
            report.unreadable.len()
        )));
    }
    Ok(())
}
