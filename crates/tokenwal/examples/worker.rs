//! Embedding tokenwal in a long-running tokio worker.
//!
//! ```sh
//! TOKENWAL_CLIENT_ID=... TOKENWAL_CLIENT_SECRET=... \
//!   cargo run -p tokenwal --example worker -- /var/lib/my-app/tokenwal my-shop.myshopify.com
//! ```
//!
//! It opens the engine (recovery runs first), forwards engine events to the log (where an app would
//! page someone or email a merchant), and serves a token for each shop every minute until Ctrl-C.

use std::time::Duration;
use tokenwal::core::{ClientSecret, Event, ShopDomain};
use tokenwal::{Config, Engine, Error, StoreLocation};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut args = std::env::args().skip(1);
    let store = args.next().ok_or("usage: worker STORE_DIR SHOP...")?;
    let shops = args.map(|s| ShopDomain::parse(&s)).collect::<Result<Vec<_>, _>>()?;
    let config = Config::shopify(
        StoreLocation::Path(store.into()),
        std::env::var("TOKENWAL_CLIENT_ID")?,
        ClientSecret::new(std::env::var("TOKENWAL_CLIENT_SECRET")?),
    );
    let (engine, report) = Engine::open(config).await?;
    tracing::info!(?report, "engine open");

    let mut events = engine.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                Event::NeedsReauth { grant, reason } => tracing::warn!(%grant, %reason, "merchant must reopen the app"),
                Event::AppCredentialsRejected { .. } => tracing::error!("app credentials rejected: page someone"),
                other => tracing::debug!(?other, "event"),
            }
        }
    });

    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                for shop in &shops {
                    match engine.access_token(shop).await {
                        // Call the Admin API with token.expose_secret() here.
                        Ok(_token) => tracing::info!(%shop, "token ready"),
                        Err(e) if e.is_transient() => tracing::warn!(%shop, error = %e, "will retry"),
                        Err(Error::NeedsReauth { .. }) => tracing::warn!(%shop, "needs re-auth"),
                        Err(e) => tracing::error!(%shop, error = %e, "token unavailable"),
                    }
                }
            }
        }
    }
    engine.shutdown().await;
    Ok(())
}
