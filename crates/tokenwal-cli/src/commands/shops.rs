//! `tokenwal shops`: shops by state, with re-auth links.

use tokenwal::core::UnixMillis;

use super::{all_grants, open_store, print_json};
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt::{self, now};
use crate::views::{self, GrantView};

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
        .map(|s| GrantView::of(s, &key).with_deep_link(s, app_handle, settings.login_url()))
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
                vec![v.display_name(), since, v.why.clone().unwrap_or_default(), link]
            })
            .collect();
        print!("{}", views::table(&["SHOP", "SINCE", "WHY", "RE-AUTH LINK"], &rows));
        if app_handle.is_none() && !views.is_empty() {
            eprintln!("tokenwal: pass --app-handle (or set app_handle in the config file) to print re-auth links");
        }
        return Ok(());
    }
    print!("{}", views::overview("SHOP", &views, GrantView::display_name, now));
    Ok(())
}
