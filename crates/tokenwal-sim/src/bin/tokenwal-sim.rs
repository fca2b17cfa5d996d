//! Runs the token-endpoint simulator until Ctrl-C.

use std::net::SocketAddr;

use clap::Parser;
use tokenwal_sim::{serve, SimConfig};

/// Simulator of Shopify's OAuth token endpoint, with fault injection.
#[derive(Parser)]
#[command(name = "tokenwal-sim", version)]
struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[command(flatten)]
    sim: SimConfig,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let cli = Cli::parse();
    let handle = serve(cli.sim, cli.listen).await?;
    println!("http://{}", handle.addr());
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}
