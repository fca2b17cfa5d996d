//! `tokenwal keygen` and `tokenwal rekey`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use tokenwal::store::{keys, Reseal, Store, StoreConfig, StoreError};

use super::{open_store, print_json};
use crate::error::CliError;
use crate::settings::Settings;

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
    if settings.postgres().is_some() {
        return Err(CliError::Usage(
            "keys check/upgrade work on a directory store; a PostgreSQL store is opened (and checked) by every command"
                .into(),
        ));
    }
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
