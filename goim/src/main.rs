use clap::Parser;
use goim::cli::{Cli, Command};
use goim::config::Config;
use goim::standalone::Standalone;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let mut cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Standalone(args) => {
            args.apply(&mut cfg);
            let server = Standalone::start(cfg).await?;
            wait_for_signal().await?;
            server.shutdown().await;
        }
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        r = tokio::signal::ctrl_c() => { r?; tracing::info!("SIGINT: shutting down") }
    }
    Ok(())
}
