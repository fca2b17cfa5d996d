//! `tokenwal import`: validate every JSON line first, then install each through the journal.

use std::io::BufRead;
use tokenwal::core::{GrantKey, InstallSource};
use tokenwal::store::StoreError;
use tracing::info;

use super::open_store;
use crate::error::CliError;
use crate::import;
use crate::settings::Settings;
use crate::timefmt::now;

/// `tokenwal import [FILE|-]`.
pub async fn import(settings: &Settings, file: &str) -> Result<(), CliError> {
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
    let mut imported = 0;
    if !valid.is_empty() {
        let (store, _) = open_store(settings, true)?;
        let machine = settings.machine(store.fingerprint_key());
        for (n, (shop, tokens)) in valid {
            let grant = GrantKey::shopify(&shop);
            loop {
                let current = store.get(&grant)?;
                let pending =
                    machine.install(current.as_ref(), grant.clone(), tokens.clone(), InstallSource::Import, now);
                match pending.make_durable(&store).await {
                    Ok(done) => {
                        info!(line = n, %shop, generation = done.state().generation.0, "imported");
                        imported += 1;
                        break;
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    eprintln!("imported {imported} token set(s) into {}; {failed} invalid line(s)", settings.db.display());
    if failed > 0 {
        return Err(CliError::ImportFailed { failed, total });
    }
    Ok(())
}
