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
    /// TOML configuration file with [comet], [logic], [job] and [cluster] sections.
    #[arg(long, short, env = "GOIM_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// comet, logic and job in one process with in-memory state: no cluster needed.
    Standalone(StandaloneArgs),
    /// Holds client connections; registers in etcd; serves job over gRPC.
    Comet(CometArgs),
    /// Auth, online state in etcd, the HTTP push API; serves comets over gRPC.
    Logic(LogicArgs),
    /// Fans pushes out to the comets found in etcd.
    Job(JobArgs),
    /// The PushCluster operator.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Push a message through logic's HTTP API (body from --message or stdin).
    Push(crate::tools::PushArgs),
    /// Connect as a client and print what arrives, one JSON line per message.
    Watch(crate::tools::WatchArgs),
    /// Close connections by key or user, with a reason (logic's `/goim/kick`).
    Kick(crate::tools::KickArgs),
    /// Online counts from logic: total, top rooms, rooms.
    Online(crate::tools::OnlineArgs),
    /// The nodes logic offers clients.
    Nodes(crate::tools::NodesArgs),
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Print the PushCluster CRD as YAML.
    Crd,
    /// Reconcile PushClusters (in-cluster config, or KUBECONFIG).
    Run {
        /// Watch one namespace only (default: all).
        #[arg(long, env = "GOIM_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// /metrics, /healthz, /readyz listen address.
        #[arg(long, env = "GOIM_HTTP", default_value = "0.0.0.0:8080")]
        http: String,
        /// Run without leader election (one replica only).
        #[arg(long, env = "GOIM_NO_LEADER_ELECTION")]
        no_leader_election: bool,
        /// Namespace of the leader-election Lease (default: POD_NAMESPACE, else "default").
        #[arg(long, env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
    },
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

/// What every distributed role shares.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "GOIM_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Cluster name; prefixes every etcd key.
    #[arg(long, env = "GOIM_CLUSTER")]
    pub cluster: Option<String>,
    /// Directory with ca.crt (and tls.crt, tls.key) to reach etcd over TLS.
    #[arg(long, env = "GOIM_ETCD_TLS_DIR")]
    pub etcd_tls_dir: Option<String>,
    /// Host other roles dial this one at.
    #[arg(long, env = "GOIM_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds this role's etcd keys outlive it.
    #[arg(long, env = "GOIM_LEASE_TTL")]
    pub lease_ttl: Option<i64>,
}

#[derive(Debug, Args)]
pub struct CometArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[arg(long, env = "GOIM_TCP")]
    pub tcp: Option<String>,
    #[arg(long, env = "GOIM_WS")]
    pub ws: Option<String>,
    /// gRPC listen address for job (goim 3109).
    #[arg(long, env = "GOIM_GRPC")]
    pub grpc: Option<String>,
    /// /metrics, /healthz, /readyz listen address (default 3108).
    #[arg(long, env = "GOIM_HTTP")]
    pub http: Option<String>,
    /// Server id, unique and stable (default: the host name, as a StatefulSet pod name).
    #[arg(long, env = "GOIM_NAME")]
    pub name: Option<String>,
    /// Logic gRPC endpoints, comma-separated.
    #[arg(long, env = "GOIM_LOGIC", value_delimiter = ',')]
    pub logic: Option<Vec<String>>,
    /// The operator writes this comet's registry record; the comet only reads it.
    #[arg(long, env = "GOIM_OPERATOR_MANAGED")]
    pub operator_managed: bool,
}

#[derive(Debug, Args)]
pub struct LogicArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// HTTP API listen address (goim 3111).
    #[arg(long, env = "GOIM_HTTP")]
    pub http: Option<String>,
    /// gRPC listen address for comets (goim 3119).
    #[arg(long, env = "GOIM_GRPC")]
    pub grpc: Option<String>,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// gRPC listen address for logic (default 3129).
    #[arg(long, env = "GOIM_GRPC")]
    pub grpc: Option<String>,
    /// /metrics, /healthz, /readyz listen address (default 3128).
    #[arg(long, env = "GOIM_HTTP")]
    pub http: Option<String>,
    /// Identity on the hash ring (default: the host name).
    #[arg(long, env = "GOIM_JOB_ID")]
    pub id: Option<String>,
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

impl StandaloneArgs {
    pub fn apply(self, cfg: &mut Config) {
        set(&mut cfg.comet.tcp, self.tcp);
        set(&mut cfg.comet.ws, self.ws);
        set(&mut cfg.logic.http, self.http);
        set(&mut cfg.comet.name, self.name);
    }
}

impl EtcdArgs {
    pub fn apply(self, cfg: &mut Config) {
        set(&mut cfg.cluster.etcd, self.etcd);
        set(&mut cfg.cluster.name, self.cluster);
        set(&mut cfg.cluster.etcd_tls_dir, self.etcd_tls_dir);
        set(&mut cfg.cluster.advertise, self.advertise);
        set(&mut cfg.cluster.lease_ttl, self.lease_ttl);
    }
}

impl CometArgs {
    pub fn apply(self, cfg: &mut Config) {
        self.etcd.apply(cfg);
        set(&mut cfg.comet.tcp, self.tcp);
        set(&mut cfg.comet.ws, self.ws);
        set(&mut cfg.cluster.comet_grpc, self.grpc);
        set(&mut cfg.cluster.comet_http, self.http);
        set(&mut cfg.comet.name, self.name);
        set(&mut cfg.cluster.logic, self.logic);
        cfg.cluster.operator_managed |= self.operator_managed;
    }
}

impl LogicArgs {
    pub fn apply(self, cfg: &mut Config) {
        self.etcd.apply(cfg);
        set(&mut cfg.logic.http, self.http);
        set(&mut cfg.cluster.logic_grpc, self.grpc);
    }
}

impl JobArgs {
    pub fn apply(self, cfg: &mut Config) {
        self.etcd.apply(cfg);
        set(&mut cfg.cluster.job_grpc, self.grpc);
        set(&mut cfg.cluster.job_http, self.http);
        set(&mut cfg.cluster.job_id, self.id);
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
        let Command::Standalone(args) = cli.command else {
            panic!()
        };
        args.apply(&mut cfg);
        assert_eq!(cfg.comet.tcp, "127.0.0.1:0");
        assert_eq!(cfg.logic.http, "127.0.0.1:9");
        assert_eq!(cfg.comet.ws, "0.0.0.0:3102");
    }

    #[test]
    fn comet_flags() {
        let cli = Cli::try_parse_from([
            "goim",
            "comet",
            "--etcd",
            "a:1,b:2",
            "--cluster",
            "c1",
            "--logic",
            "l:1,l:2",
            "--operator-managed",
        ])
        .unwrap();
        let mut cfg = Config::default();
        let Command::Comet(args) = cli.command else {
            panic!()
        };
        args.apply(&mut cfg);
        assert_eq!(cfg.cluster.etcd, vec!["a:1", "b:2"]);
        assert_eq!(cfg.cluster.name, "c1");
        assert_eq!(cfg.cluster.logic.len(), 2);
        assert!(cfg.cluster.operator_managed);
    }
}
