//! Command line: `goim [--config FILE] <role> [flags]`. Flags and their environment variables
//! override the file, which overrides the defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "goim",
    version,
    about = "goim-rs: a Kubernetes-native goim push gateway"
)]
pub struct Cli {
    /// TOML configuration file with [comet], [logic] and [job] sections.
    #[arg(long, short, env = "GOIM_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// comet, logic and job in one process with in-memory state: no cluster needed.
    Standalone(StandaloneArgs),
}

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// Comet TCP listen address (host:port).
    #[arg(long, env = "GOIM_TCP")]
    pub tcp: Option<String>,
    /// Comet WebSocket listen address (host:port); clients connect to ws://host:port/sub.
    #[arg(long, env = "GOIM_WS")]
    pub ws: Option<String>,
    /// Logic HTTP listen address (host:port): push API, /metrics, /healthz.
    #[arg(long, env = "GOIM_HTTP")]
    pub http: Option<String>,
    /// Comet server id (default: the host name).
    #[arg(long, env = "GOIM_NAME")]
    pub name: Option<String>,
}

impl StandaloneArgs {
    pub fn apply(self, cfg: &mut Config) {
        if let Some(v) = self.tcp {
            cfg.comet.tcp = v;
        }
        if let Some(v) = self.ws {
            cfg.comet.ws = v;
        }
        if let Some(v) = self.http {
            cfg.logic.http = v;
        }
        if let Some(v) = self.name {
            cfg.comet.name = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override() {
        let cli = Cli::try_parse_from([
            "goim",
            "standalone",
            "--tcp",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:9",
        ])
        .unwrap();
        let mut cfg = Config::default();
        let Command::Standalone(args) = cli.command;
        args.apply(&mut cfg);
        assert_eq!(cfg.comet.tcp, "127.0.0.1:0");
        assert_eq!(cfg.logic.http, "127.0.0.1:9");
        assert_eq!(cfg.comet.ws, "0.0.0.0:3102");
    }
}
