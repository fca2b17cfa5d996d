//! `tokenwal compact`: the background compaction of `run`, now and to the end.

use serde::Serialize;
use std::time::Instant;

use super::{open_store, print_json, status::dir_size};
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt;
use tokenwal::store::Store;

#[derive(Serialize)]
struct CompactView {
    grants: usize,
    trimmed: usize,
    expired: usize,
    size_before_bytes: u64,
    size_after_bytes: u64,
    elapsed_ms: u64,
}

/// `tokenwal compact`.
pub fn compact(settings: &Settings, json: bool) -> Result<(), CliError> {
    let c = settings.compaction()?;
    let started = Instant::now();
    let size_before_bytes = dir_size(&settings.db);
    let (store, _) = open_store(settings, false)?;
    let chunk = store.config().compact_chunk.max(1);
    let mut grants = Vec::new();
    store.for_each_grant(|s| grants.push(s.grant))?;
    let mut trimmed = 0;
    for g in &grants {
        loop {
            let n = store.trim_history(g, c.history_per_grant)?;
            trimmed += n;
            if n < chunk {
                break;
            }
        }
    }
    let now = timefmt::now();
    let mut expired = 0;
    loop {
        let r = store.compact(now)?;
        expired += r.removed;
        if !r.more {
            break;
        }
    }
    // Not synced here: the next commit's sync makes it durable; a crash before then undoes it, to be
    // redone by the next compaction (docs/journal.md). Dropping the store flushes it to the OS.
    drop(store);
    let view = CompactView {
        grants: grants.len(),
        trimmed,
        expired,
        size_before_bytes,
        size_after_bytes: dir_size(&settings.db),
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    if json {
        return print_json(&view);
    }
    println!(
        "compacted {} grants: {} records beyond {} per grant, {} older than {} s; {:.1} → {:.1} MiB on disk ({} ms)",
        view.grants,
        view.trimmed,
        c.history_per_grant,
        view.expired,
        c.retention.as_secs(),
        view.size_before_bytes as f64 / 1_048_576.0,
        view.size_after_bytes as f64 / 1_048_576.0,
        view.elapsed_ms
    );
    println!("(sled reuses freed space for new writes; the files shrink only as its segments are rewritten)");
    Ok(())
}

/// What `tokenwal migrate-schema --json` prints.
#[derive(Serialize)]
struct SchemaReport {
    store: String,
    version_before: i32,
    version: i32,
}

/// `tokenwal migrate-schema`: creates or upgrades a PostgreSQL store's schema, nothing else (no
/// lease is taken, so it runs beside live processes; a migration takes a transaction-scoped lock).
pub fn migrate_schema(settings: &Settings, json: bool) -> Result<(), CliError> {
    let Some(location) = settings.postgres() else {
        return Err(CliError::Usage(
            "migrate-schema is for a PostgreSQL store: pass --db postgres://user@host/database[?schema=NAME]".into(),
        ));
    };
    let (before, now) = Store::migrate_postgres_schema(location)?;
    let report = SchemaReport { store: settings.db_display(), version_before: before, version: now };
    if json {
        return print_json(&report);
    }
    if before == now {
        println!("{}: schema is at version {now} (current); nothing to do", report.store);
    } else {
        println!("{}: schema migrated from version {before} to {now}", report.store);
    }
    Ok(())
}
