//! The whole configuration: defaults, then a TOML file, then environment and flags.

use std::path::Path;

use anyhow::Context;
use goim_comet::CometConfig;
use goim_job::JobConfig;
use goim_logic::serve::HttpLimits;
use goim_logic::LogicConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub comet: CometConfig,
    pub logic: LogicConfig,
    pub job: JobConfig,
    /// Limits of every role's HTTP listener (API, metrics and probes).
    pub http: HttpLimits,
    pub cluster: ClusterConfig,
}

/// Distributed mode: etcd, the roles' gRPC and metrics listeners, identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Directory with `ca.crt` (and `tls.crt`, `tls.key` for client certs) to reach etcd over
    /// TLS; empty: plain text.
    pub etcd_tls_dir: String,
    /// Prefixes every etcd key: `/goim/{cluster}/...`.
    pub name: String,
    /// Seconds a dead role's keys outlive it.
    pub lease_ttl: i64,
    /// Host other roles dial this one at (default: POD_IP, else the listen IP, else the host
    /// name).
    pub advertise: String,
    pub comet_grpc: String,
    pub comet_http: String,
    /// Logic gRPC endpoints the comet calls (a Kubernetes Service in a cluster).
    pub logic: Vec<String>,
    pub logic_grpc: String,
    pub job_grpc: String,
    pub job_http: String,
    /// Job identity on the hash ring (default: the host name).
    pub job_id: String,
    /// The operator writes the comet's registry record; the comet only reads it.
    pub operator_managed: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            etcd: vec!["127.0.0.1:2379".into()],
            etcd_tls_dir: String::new(),
            name: "default".into(),
            lease_ttl: 10,
            advertise: String::new(),
            comet_grpc: "0.0.0.0:3109".into(),
            comet_http: "0.0.0.0:3108".into(),
            logic: vec!["127.0.0.1:3119".into()],
            logic_grpc: "0.0.0.0:3119".into(),
            job_grpc: "0.0.0.0:3129".into(),
            job_http: "0.0.0.0:3128".into(),
            job_id: String::new(),
            operator_managed: false,
        }
    }
}

impl ClusterConfig {
    /// An etcd client, over TLS when `etcd_tls_dir` is set.
    pub async fn etcd(&self) -> anyhow::Result<goim_discovery::Client> {
        let tls = if self.etcd_tls_dir.is_empty() {
            None
        } else {
            let dir = Path::new(&self.etcd_tls_dir);
            Some(
                goim_discovery::Tls::from_dir(dir)
                    .with_context(|| format!("reading etcd TLS files in {}", dir.display()))?,
            )
        };
        goim_discovery::connect_tls(&self.etcd, tls.as_ref())
            .await
            .context("etcd client")
    }
}

/// Where standalone's HTTP API listens by default: this machine only, since it pushes to
/// everyone and takes no key unless one is configured.
pub const STANDALONE_HTTP: &str = "127.0.0.1:3111";

impl Config {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// As [`Config::load`] for standalone: the HTTP API listens on loopback unless the file
    /// says where (the client listeners stay on every interface). Flags and environment
    /// still apply after this.
    pub fn load_standalone(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut cfg = Config::load(path)?;
        let http_in_file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)?;
                let table: toml::Table = toml::from_str(&text)?;
                table.get("logic").and_then(|l| l.get("http")).is_some()
            }
            None => false,
        };
        if !http_in_file {
            cfg.logic.http = STANDALONE_HTTP.into();
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn file_overrides_defaults() {
        let c: Config = toml::from_str(
            "[comet]\ntcp = \"127.0.0.1:1\"\nhandshake_timeout = \"5s\"\n[logic]\nheartbeat = \"30s\"\n[job]\nroom_batch = 7\n",
        )
        .unwrap();
        assert_eq!(c.comet.tcp, "127.0.0.1:1");
        assert_eq!(c.comet.handshake_timeout, Duration::from_secs(5));
        assert_eq!(c.comet.ws, CometConfig::default().ws);
        assert_eq!(c.logic.heartbeat, Duration::from_secs(30));
        assert_eq!(c.job.room_batch, 7);
    }

    /// The operator's goim.toml parses as the roles' config, with what the spec asked for.
    #[test]
    fn what_the_operator_writes_is_what_the_roles_read() {
        let pc: goim_operator::crd::PushCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "goim.rs/v1alpha1", "kind": "PushCluster",
            "metadata": {"name": "chat", "namespace": "prod"},
            "spec": {"image": "i", "etcd": {"endpoints": ["etcd:2379"]},
                "comet": {"drainSeconds": 7, "buckets": 16},
                "history": {"rooms": {"chat": {"size": 50, "ttlSeconds": 60},
                    "a\"b]\n[x": {"size": 1, "ttlSeconds": 1}},
                    "users": {"size": 20, "ttlSeconds": 30}}}
        }))
        .unwrap();
        let text = goim_operator::builders::config_toml(&pc);
        let c: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.comet.drain_period, Duration::from_secs(7));
        assert_eq!(c.comet.buckets, 16);
        assert_eq!(c.cluster.name, "prod.chat");
        assert!(c.cluster.operator_managed);
        assert!(c.logic.user_streams);
        let h = &c.job.history;
        assert_eq!(
            (h["chat"].size, h["chat"].ttl),
            (50, Duration::from_secs(60))
        );
        assert_eq!(h["user"].size, 20);
        // A hostile type name stays a key (the schema refuses it; the writer never breaks).
        assert_eq!(h["a\"b]\n[x"].size, 1);
        // Without history: no streams, nothing kept.
        let mut plain = pc.clone();
        plain.spec.history = Default::default();
        let c: Config = toml::from_str(&goim_operator::builders::config_toml(&plain)).unwrap();
        assert!(!c.logic.user_streams && c.job.history.is_empty());
    }

    /// Standalone's push API listens on loopback unless the file says otherwise.
    #[test]
    fn standalone_http_defaults_to_loopback() {
        assert_eq!(
            Config::load_standalone(None).unwrap().logic.http,
            STANDALONE_HTTP
        );
        assert_eq!(Config::load(None).unwrap().logic.http, "0.0.0.0:3111");
        let dir = std::env::temp_dir().join(format!("goim-cfg-{}", std::process::id()));
        std::fs::write(&dir, "[logic]\nhttp = \"0.0.0.0:9\"\n").unwrap();
        assert_eq!(
            Config::load_standalone(Some(&dir)).unwrap().logic.http,
            "0.0.0.0:9"
        );
        std::fs::write(&dir, "[comet]\ntcp = \"0.0.0.0:1\"\n").unwrap();
        assert_eq!(
            Config::load_standalone(Some(&dir)).unwrap().logic.http,
            STANDALONE_HTTP
        );
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("[comet]\ntcpp = \"x\"\n").is_err());
        assert!(toml::from_str::<Config>("[comet]\nbuckets = \"many\"\n").is_err());
    }
}
