//! `tokenwal status`: counts by state, the oldest ambiguity, the next refresh due, the store.

use serde::Serialize;
use std::path::Path;
use tokenwal::core::{Phase, UnixMillis};

use super::{all_grants_and_corrupt, open_store, print_json};
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt::{self, now};
use crate::views::Instant;

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
    /// `size_bytes` over the grants (0 without grants).
    bytes_per_grant: u64,
    open_attempts: usize,
    corrupt: Vec<String>,
}

#[derive(Serialize)]
struct StatusView {
    app_handle: Option<String>,
    grants: usize,
    /// Grants per provider id (`shopify`, `shopify-customer-account`, …).
    providers: std::collections::BTreeMap<String, usize>,
    states: StateCounts,
    oldest_ambiguous: Option<OldestAmbiguous>,
    next_refresh_due: Option<NextDue>,
    overdue: usize,
    store: StoreInfo,
}

pub(super) fn dir_size(p: &Path) -> u64 {
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

/// How status names a grant: the shop for the Admin API (as always), `provider/account` otherwise.
fn grant_name(g: &tokenwal::core::GrantKey) -> String {
    if g.provider() == tokenwal::core::SHOPIFY_PROVIDER {
        g.account().to_owned()
    } else {
        g.to_string()
    }
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
    let mut providers = std::collections::BTreeMap::<String, usize>::new();
    for s in &grants {
        *providers.entry(s.grant.provider().to_owned()).or_default() += 1;
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
                    shop: grant_name(&s.grant),
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
                next = Some(NextDue { shop: grant_name(&s.grant), due: Instant::of(due), overdue: due <= now });
            }
        }
    }
    let size_bytes = match store.database_bytes()? {
        Some(n) => n,
        None => dir_size(&settings.db),
    };
    let view = StatusView {
        app_handle: settings.app_handle().map(str::to_owned),
        grants: grants.len(),
        providers,
        states,
        oldest_ambiguous: oldest,
        next_refresh_due: next,
        overdue,
        store: StoreInfo {
            // A PostgreSQL URL without its password.
            path: settings.db_display().to_string(),
            size_bytes,
            bytes_per_grant: size_bytes.checked_div(grants.len() as u64).unwrap_or(0),
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
        "store              {} ({:.1} MiB on disk, {:.1} KiB per grant)\n",
        view.store.path,
        view.store.size_bytes as f64 / 1_048_576.0,
        view.store.bytes_per_grant as f64 / 1024.0
    ));
    out.push_str(&format!("shops              {}\n", view.grants));
    if view.providers.keys().any(|p| p != tokenwal::core::SHOPIFY_PROVIDER) {
        let per: Vec<String> = view.providers.iter().map(|(p, n)| format!("{p} {n}")).collect();
        out.push_str(&format!("  by provider      {}\n", per.join(", ")));
    }
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
