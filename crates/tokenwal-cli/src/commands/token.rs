//! `tokenwal token SHOP`.

use std::io::Write;

use super::{open_engine, parse_shop};
use crate::error::CliError;
use crate::settings::Settings;

/// `tokenwal token SHOP`: a valid access token on stdout.
pub async fn token(settings: &Settings, shop: &str) -> Result<(), CliError> {
    let shop = parse_shop(shop)?;
    let (engine, _) = open_engine(settings, false, true).await?;
    let result = engine.access_token(&shop).await;
    engine.shutdown().await;
    drop(engine);
    let token = result?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", token.expose_secret()).map_err(|e| CliError::io("cannot write to stdout", e))?;
    Ok(())
}
