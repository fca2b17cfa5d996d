//! `tokenwal token SHOP` (or `tokenwal token ACCOUNT` with a non-Admin provider profile).

use std::io::Write;
use tokenwal::core::{GrantKey, ShopDomain};

/// Whose token: an Admin API shop, or a grant of the configured provider profile.
enum Who {
    Shop(ShopDomain),
    Grant(GrantKey),
}

use super::{open_engine, parse_shop};
use crate::error::CliError;
use crate::settings::Settings;

/// `tokenwal token SHOP`: a valid access token on stdout. With a provider profile other than the
/// Admin API's, the argument is an account at that provider (for `shopify-customer-account`,
/// `{shop_id}:{customer_id}`).
pub async fn token(settings: &Settings, shop: &str) -> Result<(), CliError> {
    let grant = match settings.profile().filter(|p| !p.is_shopify_admin()) {
        Some(p) => Who::Grant(
            GrantKey::new(&p.provider, shop)
                .map_err(|e| CliError::Usage(format!("invalid `{}` account: {e}", p.provider)))?,
        ),
        None => Who::Shop(parse_shop(shop)?),
    };
    let (engine, _) = open_engine(settings, false, true).await?;
    let result = match &grant {
        Who::Shop(shop) => engine.access_token(shop).await,
        Who::Grant(grant) => engine.access_token_for(grant).await,
    };
    engine.shutdown().await;
    drop(engine);
    let token = result?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", token.expose_secret()).map_err(|e| CliError::io("cannot write to stdout", e))?;
    Ok(())
}
