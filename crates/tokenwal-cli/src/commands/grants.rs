//! `tokenwal grants`: every grant of every provider (Admin API shops, Customer Account API
//! customers, generic-provider accounts), by `provider/account`.

use super::{all_grants, open_store, print_json};
use crate::error::CliError;
use crate::settings::Settings;
use crate::timefmt::now;
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
    print!("{}", views::overview("GRANT", &views, |v| v.grant.clone(), now));
    Ok(())
}
