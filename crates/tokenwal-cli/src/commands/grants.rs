//! `tokenwal grants`: every grant of every provider (Admin API shops, Customer Account API
//! customers, generic-provider accounts), by `provider/account`.

use tokenwal::core::UnixMillis;

use super::{all_grants, open_store, print_json};
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt::{self, now};
use crate::views::{self, GrantView};

/// `tokenwal grants`: optionally only `provider`'s grants, or those in `state`.
pub fn grants(settings: &Settings, provider: Option<&str>, state: Option<&str>, json: bool) -> Result<(), CliError> {
    let (store, _) = open_store(settings, false)?;
    let key = store.fingerprint_key();
    let now = now();
    let views: Vec<GrantView> = all_grants(&store)?
        .iter()
        .filter(|s| provider.is_none_or(|p| s.grant.provider() == p))
        .filter(|s| state.is_none_or(|st| s.phase.name() == st))
        .map(|s| GrantView::of(s, &key))
        .collect();
    if json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let note = match (&v.why, &v.since) {
                _ if v.state == "healthy" => String::new(),
                (Some(why), Some(since)) => {
                    format!("{why} (since {})", timefmt::relative(UnixMillis(since.at_ms), now))
                }
                (None, Some(since)) => format!("since {}", timefmt::relative(UnixMillis(since.at_ms), now)),
                _ => String::new(),
            };
            vec![
                v.grant.clone(),
                v.state.to_owned(),
                v.generation.to_string(),
                views::expiry_cell(&v.access_expires, now),
                views::expiry_cell(&v.refresh_expires, now),
                note,
            ]
        })
        .collect();
    print!("{}", views::table(&["GRANT", "STATE", "GEN", "ACCESS EXPIRES", "REFRESH EXPIRES", "WHY / SINCE"], &rows));
    Ok(())
}
