use clap::Parser;
use goim::cli::{Cli, Command, OperatorCommand};
use goim::config::Config;
use goim::distributed::{run_comet, run_job, run_logic, wait_for_signal};
use goim::standalone::Standalone;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
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
        Command::Comet(args) => {
            args.apply(&mut cfg);
            run_comet(cfg).await?;
        }
        Command::Logic(args) => {
            args.apply(&mut cfg);
            run_logic(cfg).await?;
        }
        Command::Job(args) => {
            args.apply(&mut cfg);
            run_job(cfg).await?;
        }
        Command::Operator(OperatorCommand::Crd) => print!("{}", goim_operator::crd::crd_yaml()),
        Command::Operator(OperatorCommand::Run { namespace }) => {
            let client = kube::Client::try_default().await?;
            goim_operator::controller::run(client, namespace).await?;
        }
    }
    Ok(())
}
