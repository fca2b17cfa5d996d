//! `tokenwal inspect GRANT`: one grant's state and history — a shop, an account of the configured
//! provider profile, or `provider/account` of any provider.

use serde::Serialize;
use tokenwal::core::UnixMillis;

use super::{open_store, print_json, resolve_grant};
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt::{self, now};
use crate::views::{self, GrantView, RecordView};

#[derive(Serialize)]
struct InspectView {
    #[serde(flatten)]
    grant: GrantView,
    history: Vec<RecordView>,
    skipped_corrupt_records: Vec<u64>,
}

/// `tokenwal inspect SHOP`.
pub fn inspect(settings: &Settings, shop: &str, json: bool) -> Result<(), CliError> {
    let grant = resolve_grant(settings, shop)?;
    let (store, _) = open_store(settings, false)?;
    let state = store.get(&grant)?.ok_or_else(|| CliError::NotInstalled { shop: grant.account().to_owned() })?;
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
    if g.provider == tokenwal::core::SHOPIFY_PROVIDER {
        field("shop", g.shop.clone());
    } else {
        field("grant", g.grant.clone());
    }
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
