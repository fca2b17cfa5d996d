//! Scenario `layout`: disk per grant of candidate on-disk layouts for a grant's history, on raw sled
//! (the store's version and cache settings, no store code), under the issue-15 churn: every grant
//! rewritten once per simulated hour. The evidence for the next store format (issue 15 items 1, 2
//! and 5: ≤ 4 KiB per grant including history), measured before building it.
//!
//! Values are random bytes (sealed data does not compress) of the sizes the store writes today: a
//! grant's sealed state ([`STATE_BYTES`]) and a journal record ([`RECORD_BYTES`]); a history entry
//! is a compact summary of one transition ([`ENTRY_BYTES`]: kind, times, version, attempt, outcome
//! and request id — no token). Each simulated hour writes every grant in batches of 64 (the size of
//! a commit group at this load), then `flush()`es; the disk is the allocated bytes of every file.

use crate::util::{disk_usage, fmt_bytes, Table};
use crate::Opts;

/// A grant's sealed state envelope plus its key, as `footprint` measures it (§5: 419 B).
const STATE_BYTES: usize = 419;
/// One journal record frame (§5: ≈ 180 logical bytes with its index entries' share).
const RECORD_BYTES: usize = 180;
/// One compact history entry: no token, fixed fields.
const ENTRY_BYTES: usize = 48;

/// A candidate layout.
#[derive(Clone, Copy)]
enum Layout {
    /// One key per grant: the state and a ring of its newest entries in one value.
    Inline,
    /// Two trees: grant → state, grant → ring.
    Split,
    /// `Inline`, plus today's LSN journal (an intent and a commit record per refresh) kept for one
    /// simulated hour, as a journal cursor (the webhook sink) would need it.
    InlineWithJournal,
    /// The grant states alone, one key per grant rewritten in place: what sled would hold in the
    /// planned format 3 (docs/format3.md), whose history lives in a segment log beside it.
    StateAlone,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Inline => "state + ring in one value",
            Layout::Split => "state and ring in two trees",
            Layout::InlineWithJournal => "one value + LSN journal kept 1 h",
            Layout::StateAlone => "state alone (format 3's sled part)",
        }
    }

    /// The layout `--path` names: `inline`, `split`, `journal` or `state`.
    fn named(name: &str) -> Option<Layout> {
        match name {
            "inline" => Some(Layout::Inline),
            "split" => Some(Layout::Split),
            "journal" => Some(Layout::InlineWithJournal),
            "state" => Some(Layout::StateAlone),
            _ => None,
        }
    }
}

/// A cheap deterministic byte stream (xorshift): incompressible enough for sled, which does not
/// compress anyway.
struct Bytes(u64);

impl Bytes {
    fn take(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}

pub async fn run(opts: &Opts) {
    let layouts = match opts.path.as_deref() {
        Some(name) => vec![Layout::named(name).unwrap_or_else(|| {
            eprintln!("layout: --path must be inline, split, journal or state, not {name:?}");
            std::process::exit(2)
        })],
        None => vec![Layout::Inline, Layout::Split, Layout::InlineWithJournal, Layout::StateAlone],
    };
    let grants = opts.churn_grants.unwrap_or(if opts.quick { 500 } else { 10_000 }) as u64;
    let hours = opts.refreshes.map_or(if opts.quick { 6 } else { 48 }, |r| (r / grants).max(1));
    let ring = opts.history_per_grant.unwrap_or(8);
    let cache = opts.cache_mib.unwrap_or(256) << 20;
    // About a dozen rows per layout, whatever the length.
    let every = (hours / 12).max(1);
    let t = Table::new(
        &format!(
            "Candidate history layouts on raw sled 0.34.7: {grants} grants rewritten once per simulated hour, \
             {STATE_BYTES} B state, ring of {ring} × {ENTRY_BYTES} B entries, {RECORD_BYTES} B journal records"
        ),
        &["layout", "simulated hours", "live journal records", "disk (allocated)", "allocated / grant", "wall so far"],
    );
    for layout in layouts {
        let dir = opts.dir.join("layout");
        let _ = std::fs::remove_dir_all(&dir);
        let opts = (grants, hours, ring, cache, every);
        let rows = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || churn(layout, &dir, opts)
        })
        .await
        .expect("layout churn");
        for (h, live, allocated, wall) in rows {
            t.row(&[
                layout.name().into(),
                h.to_string(),
                live.to_string(),
                fmt_bytes(allocated as f64),
                fmt_bytes(allocated as f64 / grants as f64),
                format!("{:.1} s", wall.as_secs_f64()),
            ]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

type Row = (u64, u64, u64, std::time::Duration);

fn churn(
    layout: Layout,
    dir: &std::path::Path,
    (grants, hours, ring, cache, every): (u64, u64, usize, u64, u64),
) -> Vec<Row> {
    let db = sled::Config::new().path(dir).cache_capacity(cache).flush_every_ms(Some(500)).open().expect("sled");
    let states = db.open_tree("grants").expect("tree");
    let rings = db.open_tree("history").expect("tree");
    let journal = db.open_tree("journal").expect("tree");
    let mut bytes = Bytes(0x9e37_79b9_7f4a_7c15);
    let (mut lsn, mut floor) = (0u64, 0u64);
    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    let value = match layout {
        Layout::Split | Layout::StateAlone => STATE_BYTES,
        Layout::Inline | Layout::InlineWithJournal => STATE_BYTES + ring * ENTRY_BYTES,
    };
    for h in 0..hours {
        for first in (0..grants).step_by(64) {
            let (mut s, mut r, mut j) = (sled::Batch::default(), sled::Batch::default(), sled::Batch::default());
            for g in first..(first + 64).min(grants) {
                let key = format!("shopify/g{g}.myshopify.com");
                s.insert(key.as_bytes(), bytes.take(value));
                if let Layout::Split = layout {
                    r.insert(key.as_bytes(), bytes.take(ring * ENTRY_BYTES));
                }
                if let Layout::InlineWithJournal = layout {
                    for _ in 0..2 {
                        j.insert(&lsn.to_be_bytes(), bytes.take(RECORD_BYTES));
                        lsn += 1;
                    }
                }
            }
            states.apply_batch(s).expect("write");
            rings.apply_batch(r).expect("write");
            journal.apply_batch(j).expect("write");
        }
        // Keep the last hour of journal records: what a cursor one hour behind would hold back.
        let keep_from = lsn.saturating_sub(2 * grants);
        let mut del = sled::Batch::default();
        for k in floor..keep_from {
            del.remove(&k.to_be_bytes()[..]);
        }
        floor = floor.max(keep_from);
        journal.apply_batch(del).expect("delete");
        db.flush().expect("flush");
        if (h + 1) % every == 0 || h + 1 == hours {
            rows.push((h + 1, journal.len() as u64, disk_usage(dir).1, started.elapsed()));
        }
    }
    rows
}
