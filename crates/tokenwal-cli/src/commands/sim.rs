//! `tokenwal sim`.

use std::io::Write;

use super::run::shutdown_signal;
use crate::error::CliError;

/// `tokenwal sim`.
pub async fn sim(config: tokenwal_sim::SimConfig, port: u16) -> Result<(), CliError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let handle =
        tokenwal_sim::serve(config, addr).await.map_err(|e| CliError::io(format!("cannot serve on {addr}"), e))?;
    println!("{}", handle.base_url());
    std::io::stdout().flush().map_err(|e| CliError::io("cannot write to stdout", e))?;
    eprintln!(
        "simulator listening; point tokenwal at it with --insecure-test-endpoint {} (Ctrl-C stops it)",
        handle.base_url()
    );
    eprintln!(
        "Customer Account API mode: token_url = \"{}\" in a shopify-customer-account profile",
        handle.customer_token_url_template()
    );
    shutdown_signal().await;
    handle.shutdown().await;
    Ok(())
}
