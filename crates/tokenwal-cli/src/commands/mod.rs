//! Every command but `demo`, one module per command family.

mod compact;
mod export;
mod grants;
mod import;
mod inspect;
mod keys;
mod recover;
mod run;
mod shops;
mod sim;
mod status;
mod token;

use serde::Serialize;
use tokenwal::core::{GrantState, ShopDomain};
use tokenwal::store::{OpenReport, RecoveryMode, Store, StoreConfig};
use tokenwal::{Engine, RecoveryReport};
use tracing::warn;

use crate::error::CliError;
use crate::settings::Settings;

pub use compact::{compact, migrate_schema};
pub use export::{export, EXPORT_REFUSAL};
pub use grants::grants;
pub use import::{import, ImportOptions};
pub use inspect::inspect;
pub use keys::{keygen, rekey};
pub(crate) use recover::report_line;
pub use recover::{recover, recover_dry_run};
pub use run::run;
pub(crate) use run::{fail_stop_at_open, keep_running, open_retrying, shutdown_signal, wind_down};
pub use shops::shops;
pub use sim::sim;
pub use status::status;
pub use token::token;

/// Opens the store at `settings.db`, sealed under `settings.keys()`. `create`: make it if missing
/// (import); otherwise a missing directory is an error rather than a new empty store. Histories are
/// read strictly (a corrupt journal record is an error naming it) unless `--skip-corrupt-records` was
/// given.
pub fn open_store(settings: &Settings, create: bool) -> Result<(Store, OpenReport), CliError> {
    let path = settings.db.as_path();
    if let Some(location) = settings.postgres() {
        let keys = settings.keys()?;
        let mode = if settings.skip_corrupt_records { RecoveryMode::SkipCorruptRecords } else { RecoveryMode::Strict };
        let config = StoreConfig::default().with_recovery(mode).with_retention(settings.compaction()?.retention);
        // A PostgreSQL store is shared: this command joins the `run` processes using it.
        return Ok(Store::open_postgres(location, &keys, config)?);
    }
    if !create && !path.exists() {
        return Err(CliError::NoStore { path: path.to_owned() });
    }
    let keys = settings.keys()?;
    let mode = if settings.skip_corrupt_records { RecoveryMode::SkipCorruptRecords } else { RecoveryMode::Strict };
    let config = StoreConfig::default().with_recovery(mode).with_retention(settings.compaction()?.retention);
    let (store, report) = Store::open(path, &keys, config)?;
    for what in &report.corrupt {
        warn!(%what, "corrupt entry in the store: quarantined (never served, never guessed at)");
    }
    Ok((store, report))
}

/// `Engine::open` (recovery runs first), with the lock error made clear. Only `run` may start
/// from an empty directory; `token` and `recover` need an existing store.
pub(crate) async fn open_engine(
    settings: &Settings,
    proactive: bool,
    must_exist: bool,
) -> Result<(Engine, RecoveryReport), CliError> {
    let config = settings.engine_config(proactive)?;
    if must_exist && settings.postgres().is_none() && !settings.db.exists() {
        return Err(CliError::NoStore { path: settings.db.clone() });
    }
    Ok(Engine::open(config).await?)
}

fn print_json(v: &impl Serialize) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?;
    println!("{s}");
    Ok(())
}

/// The grant named by a command-line argument: `provider/account` in full (any provider), else an
/// account of the configured non-Admin provider profile (`4242:7` with `shopify-customer-account`),
/// else an Admin API shop domain.
pub(crate) fn resolve_grant(settings: &Settings, arg: &str) -> Result<tokenwal::core::GrantKey, CliError> {
    use tokenwal::core::GrantKey;
    if let Some((provider, account)) = arg.split_once('/') {
        if provider == tokenwal::core::SHOPIFY_PROVIDER {
            return Ok(GrantKey::shopify(&parse_shop(account)?));
        }
        return GrantKey::new(provider, account).map_err(|e| CliError::Usage(format!("invalid grant {arg:?}: {e}")));
    }
    match settings.profile().filter(|p| !p.is_shopify_admin()) {
        Some(p) => GrantKey::new(&p.provider, arg)
            .map_err(|e| CliError::Usage(format!("invalid `{}` account: {e}", p.provider))),
        None => Ok(GrantKey::shopify(&parse_shop(arg)?)),
    }
}

fn parse_shop(s: &str) -> Result<ShopDomain, CliError> {
    ShopDomain::parse(s).map_err(|e| CliError::Usage(format!("invalid shop domain: {e}")))
}

/// All grants, sorted by shop; corrupt ones are logged and skipped.
fn all_grants(store: &Store) -> Result<Vec<GrantState>, CliError> {
    Ok(all_grants_and_corrupt(store)?.0)
}

/// All grants, sorted by shop, and the names of the corrupt states the scan skipped.
fn all_grants_and_corrupt(store: &Store) -> Result<(Vec<GrantState>, Vec<String>), CliError> {
    let mut grants = Vec::new();
    let scan = store.for_each_grant(|s| grants.push(s))?;
    for what in &scan.corrupt {
        warn!(%what, "corrupt grant state skipped");
    }
    grants.sort_by(|a, b| a.grant.cmp(&b.grant));
    Ok((grants, scan.corrupt))
}
