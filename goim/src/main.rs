use clap::Parser;
use goim::cli::{Cli, Command, OperatorCommand};
use goim::config::Config;
use goim::distributed::{run_comet, run_job, run_logic, wait_for_signal};
use goim::standalone::Standalone;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let cli = Cli::parse();
    let mut cfg = if matches!(cli.command, Command::Standalone(_)) {
        Config::load_standalone(cli.config.as_deref())?
    } else {
        Config::load(cli.config.as_deref())?
    };
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
        // The API calls block: off the runtime's worker threads.
        Command::Push(args) => tokio::task::spawn_blocking(|| goim::tools::push(args)).await??,
        Command::Online(args) => {
            tokio::task::spawn_blocking(|| goim::tools::online(args)).await??
        }
        Command::Kick(args) => tokio::task::spawn_blocking(|| goim::tools::kick(args)).await??,
        Command::Nodes(args) => tokio::task::spawn_blocking(|| goim::tools::nodes(args)).await??,
        Command::Watch(args) => goim::tools::watch(args).await?,
        Command::Operator(OperatorCommand::Run {
            namespace,
            http,
            no_leader_election,
            lease_namespace,
        }) => run_operator(namespace, &http, no_leader_election, lease_namespace).await?,
    }
    Ok(())
}

async fn run_operator(
    namespace: Option<String>,
    http: &str,
    no_leader_election: bool,
    lease_namespace: Option<String>,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    let client = kube::Client::try_default().await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(goim_operator::metrics::Metrics::default());
    metrics.register(&mut registry);
    let refused = goim_logic::serve::refused_counter(&mut registry);
    let listener = goim_comet::listen(http).await?;
    let app = goim_logic::http::ops_router(Arc::new(registry), Arc::new(|| true));
    tokio::spawn(goim_logic::serve::serve(
        listener,
        app,
        Default::default(),
        refused,
        tokio_util::sync::CancellationToken::new(),
    ));
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "goim-operator".into())
    });
    let election = (!no_leader_election).then(|| {
        goim_operator::leader::Election::new(
            client.clone(),
            lease_namespace.as_deref().unwrap_or("default"),
            "goim-operator",
            &identity,
            std::time::Duration::from_secs(15),
        )
    });
    let opts = goim_operator::controller::Options {
        namespace,
        metrics,
        election,
    };
    goim_operator::controller::run(client, opts).await
}

/// Logs to stderr: readable on a terminal, one JSON object per line (no colour codes) when
/// collected into a file or by a log shipper.
fn init_logs() {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if std::io::stderr().is_terminal() {
        logs.init();
    } else {
        logs.json().with_ansi(false).init();
    }
}
