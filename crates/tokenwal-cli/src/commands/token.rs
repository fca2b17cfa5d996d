//! `tokenwal token SHOP` (or `tokenwal token ACCOUNT` with a non-Admin provider profile).

use serde::Serialize;
use std::io::Write;

use super::{open_engine, resolve_grant};
use crate::error::CliError;
use crate::settings::Settings;
use crate::views::Instant;

/// `tokenwal token --json`: the token and whose it is. The one JSON output that holds a secret, as
/// the plain output does.
#[derive(Serialize)]
struct TokenView<'a> {
    grant: String,
    provider: &'a str,
    account: &'a str,
    access_token: &'a str,
    access_expires: Option<Instant>,
}

/// `tokenwal token SHOP`: a valid access token on stdout. With a provider profile other than the
/// Admin API's, the argument is an account at that provider (for `shopify-customer-account`,
/// `{shop_id}:{customer_id}`); `provider/account` names a grant in full. With `json`, one JSON
/// object: the grant, the token and its expiry.
pub async fn token(settings: &Settings, shop: &str, json: bool) -> Result<(), CliError> {
    let grant = resolve_grant(settings, shop)?;
    let (engine, _) = open_engine(settings, false, true).await?;
    let result = engine.access_token_for(&grant).await;
    let expires = engine.state(&grant).ok().flatten().and_then(|s| s.tokens).map(|t| Instant::of(t.access_expires_at));
    engine.shutdown().await;
    drop(engine);
    let token = result?;
    let mut out = std::io::stdout().lock();
    let line = if json {
        let view = TokenView {
            grant: grant.to_string(),
            provider: grant.provider(),
            account: grant.account(),
            access_token: token.expose_secret(),
            access_expires: expires,
        };
        serde_json::to_string(&view).map_err(|e| CliError::Usage(format!("cannot render JSON: {e}")))?
    } else {
        token.expose_secret().to_owned()
    };
    writeln!(out, "{line}").map_err(|e| CliError::io("cannot write to stdout", e))?;
    Ok(())
}
