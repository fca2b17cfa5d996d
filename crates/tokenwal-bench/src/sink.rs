//! Scenario 8, the webhook sink's first look at a grant (docs/webhooks.md "The cursor and compaction"). To know
//! whether a grant was in needs-reauth just before a record (for the `recovered` event), the sink looks
//! back in the grant's history the first time it meets the grant — on a fresh start, once per grant.
//! Measured over every grant of a store whose grants each have a history of several records: the
//! whole-history read it made before (`Store::history`, then the last phase-changing record before the
//! LSN) against the bounded reverse scan it makes now (`Store::find_before`). Both give the same
//! answer for every grant (checked). Runs alternate (whole, reverse, whole, reverse) so that neither
//! gets a colder cache.

use crate::populate::WRITERS;
use crate::util::{fake_tokens, fmt_dur, now, scale_key, Table};
use crate::Opts;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenwal::core::{InstallSource, Machine, Record, UnixMillis};
use tokenwal::store::{Store, StoreConfig};

/// The sink's question: the last phase-changing record says whether the grant was in needs-reauth.
fn phase(r: &Record) -> Option<bool> {
    match r {
        Record::NeedsReauth { .. } => Some(true),
        Record::Installed { .. } | Record::Committed { .. } | Record::Uninstalled { .. } => Some(false),
        _ => None,
    }
}

/// Builds `n` grants with `h` records of history each (one install, then `h - 1` re-installs: every
/// record a phase-changing one, the sink's common case), through the real store API.
async fn build(store: &Store, n: usize, h: usize) {
    let machine = Arc::new(Machine::shopify(store.fingerprint_key()));
    let writers = WRITERS.min(n.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    let day = 86_400_000u64;
    for w in 0..writers {
        let (store, machine) = (store.clone(), Arc::clone(&machine));
        tasks.spawn(async move {
            for i in (w..n).step_by(writers) {
                let mut state = None;
                for k in 0..h {
                    let at = now();
                    let tokens =
                        fake_tokens((i * h + k) as u64, UnixMillis(at.0 + 6 * 3_600_000), UnixMillis(at.0 + 90 * day));
                    let done = machine
                        .install(state.as_ref(), scale_key(i), tokens, InstallSource::Import, at)
                        .make_durable(&store)
                        .await
                        .expect("install is durable");
                    state = Some(done.state().clone());
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("writer task");
    }
}

/// The scenario: 100k grants of 4 records each, then 10k grants of 32 records each (the whole-history
/// read grows with the history, the reverse scan does not); 2000 x 4 and 200 x 16 with `--quick`.
pub async fn run(opts: &Opts) {
    let shapes: [(usize, usize); 2] = if opts.quick { [(2_000, 4), (200, 16)] } else { [(100_000, 4), (10_000, 32)] };
    for (n, h) in shapes {
        shape(opts, n, h).await;
    }
}

/// One store of `n` grants with `h` records of history each.
async fn shape(opts: &Opts, n: usize, h: usize) {
    let path = opts.dir.join(format!("sink-{n}x{h}"));
    let _ = std::fs::remove_dir_all(&path);
    let (store, _) =
        Store::open(&path, &tokenwal::KeyRing::insecure_test_ring(), StoreConfig::default()).expect("open a new store");
    eprintln!("building {} ({n} grants x {h} records)", path.display());
    let started = Instant::now();
    build(&store, n, h).await;
    eprintln!("  built in {:.1?}", started.elapsed());
    // The record being derived is the newest: look before the end of the journal.
    let at = u64::MAX;
    let mut answers: Vec<Vec<bool>> = Vec::new();
    let mut rows: Vec<(&str, Duration, u64)> = Vec::new();
    for round in 0..4 {
        let whole = round % 2 == 0;
        let mut got = Vec::with_capacity(n);
        let mut records = 0u64;
        let t = Instant::now();
        for i in 0..n {
            let g = scale_key(i);
            let was = if whole {
                let history = store.history(&g).expect("history");
                records += history.len() as u64;
                history.iter().rev().filter(|(l, _)| *l < at).find_map(|(_, r)| phase(r))
            } else {
                store
                    .find_before(&g, at, |r| {
                        records += 1;
                        phase(r)
                    })
                    .expect("find_before")
            };
            got.push(was.unwrap_or(false));
        }
        let wall = t.elapsed();
        rows.push((if whole { "whole history (before)" } else { "reverse scan (now)" }, wall, records));
        answers.push(got);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "both lookups must give the same answers");
    let t = Table::new(
        &format!("Webhook sink: first look at each of {n} grants ({h} records of history each, sled, warm cache)"),
        &["lookup", "run", "wall", "per grant", "records decoded"],
    );
    for (k, (name, wall, records)) in rows.into_iter().enumerate() {
        t.row(&[
            name.to_owned(),
            format!("{}", k / 2 + 1),
            fmt_dur(wall),
            fmt_dur(wall / n as u32),
            format!("{records}"),
        ]);
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&path);
}
