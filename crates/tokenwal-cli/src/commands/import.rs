//! `tokenwal import`: validate every JSON line first, then install each through the engine's driver
//! as a checked install (an older pair than the one held is refused, the same pair is left alone).

use std::io::BufRead;
use tokenwal::core::{Goal, InstallSource, NoChange, Refusal, SHOPIFY_PROVIDER};
use tokenwal::{Driven, Driver, Offline};
use tracing::{info, warn};

use super::open_store;
use crate::error::CliError;
use crate::import;
use crate::settings::Settings;
use crate::timefmt::now;

/// How `tokenwal import` treats a line whose shop already holds a different pair.
pub struct ImportOptions {
    /// Print a JSON summary on stdout (per line: grant, outcome, why).
    pub json: bool,
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

/// One line of `tokenwal import --json` (never a secret: the grant, the outcome, why).
#[derive(serde::Serialize)]
struct LineOutcome {
    line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant: Option<String>,
    /// `imported`, `unchanged`, `refused` or `invalid`.
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<String>,
}

/// `tokenwal import --json`.
#[derive(serde::Serialize)]
struct ImportSummary {
    store: String,
    imported: usize,
    unchanged: usize,
    refused: usize,
    invalid: usize,
    lines: Vec<LineOutcome>,
}

/// `tokenwal import [FILE|-]`.
///
/// Each valid line is a checked install through the engine's driver (`Goal::Install`): the pair the
/// shop holds already is left alone, and a pair older than the one held is refused and reported (a
/// re-run import after the worker rotated must not put superseded refresh tokens back), unless
/// `--force --reason`.
pub async fn import(settings: &Settings, file: &str, options: &ImportOptions) -> Result<(), CliError> {
    let reader = crate::input::open(file, "token sets")?;
    // Validate everything first: a line is installed whole or not at all, and a bad file does
    // not even create the store.
    let mut valid = Vec::new();
    let (mut total, mut failed) = (0usize, 0usize);
    let mut lines = Vec::new();
    let now = now();
    // The grants of the configured provider profile (Shopify's Admin API unless `provider` says
    // otherwise): lines name a `shop`, or an `account` of that provider.
    let provider = settings.profile().map_or(SHOPIFY_PROVIDER, |p| p.provider.as_str());
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| CliError::io(format!("cannot read line {n}"), e))?;
        let Ok(line) = String::from_utf8(line) else {
            total += 1;
            failed += 1;
            eprintln!("line {n}: not UTF-8");
            lines.push(LineOutcome { line: n, grant: None, outcome: "invalid", why: Some("not UTF-8".into()) });
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        total += 1;
        match import::parse_grant_line(line, now, provider) {
            Ok(parsed) => valid.push((n, parsed)),
            Err(why) => {
                failed += 1;
                eprintln!("line {n}: {why}");
                lines.push(LineOutcome { line: n, grant: None, outcome: "invalid", why: Some(why.to_string()) });
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
        for (n, (grant, tokens)) in valid {
            // The shop domain for Admin API grants, as always; the account for other providers.
            let shop = grant.account().to_owned();
            let goal = Goal::Install { tokens, source: InstallSource::Import, force: options.force };
            let record =
                |outcome, why: Option<String>| LineOutcome { line: n, grant: Some(grant.to_string()), outcome, why };
            match driver.drive(&grant, &goal).await? {
                Driven::Wrote(done) => {
                    info!(line = n, %shop, generation = done.state().generation.0, "imported");
                    tally.imported += 1;
                    lines.push(record("imported", None));
                }
                Driven::Unchanged { why: NoChange::SamePair, .. } => {
                    eprintln!("line {n}: {shop}: already holds this pair; unchanged");
                    tally.unchanged += 1;
                    lines.push(record("unchanged", Some("already holds this pair".into())));
                }
                Driven::Refused { refusal: Refusal::OlderPair { held }, .. } => {
                    eprintln!(
                        "line {n}: {shop}: refused: the store holds a newer pair (generation {}); this line's \
                         pair is older and was not imported (override: --force --reason TEXT)",
                        held.0
                    );
                    tally.refused += 1;
                    lines
                        .push(record("refused", Some(format!("the store holds a newer pair (generation {})", held.0))));
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
        settings.db_display()
    );
    if options.json {
        lines.sort_by_key(|l| l.line);
        let summary = ImportSummary {
            store: settings.db_display().to_string(),
            imported,
            unchanged,
            refused,
            invalid: failed,
            lines,
        };
        super::print_json(&summary)?;
    }
    if failed > 0 {
        return Err(CliError::ImportFailed { failed, total });
    }
    Ok(())
}
