//! The configuration every role reads, in one crate so that the binary parses and the
//! operator writes the same types: defaults, then a TOML file, then environment and flags.

pub mod comet;
pub mod http;
pub mod job;
pub mod logic;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use comet::CometConfig;
pub use http::HttpLimits;
pub use job::{HistoryConfig, JobConfig};
pub use logic::{
    AuthMode, BackoffConfig, ConversationsConfig, EventsConfig, ForwardConfig, HookConfig,
    JwtConfig, LogicConfig, NodeConfig,
};

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

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
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
    /// Mutual TLS between the roles' gRPC: a directory with `tls.crt`, `tls.key` and
    /// `ca.crt` (a cert-manager Secret from the cluster's own CA), read again when they
    /// change. Every gRPC server then requires a client certificate from that CA, and every
    /// role dialing another presents its certificate and checks the server's chain. Empty:
    /// plain text.
    pub grpc_tls_dir: String,
    /// With `grpc_tls_dir`: the name every role's certificate must carry (a DNS SAN) for
    /// the roles dialing it. Empty: the chain to the CA is checked but not the name (roles
    /// dial pod IPs, which certificates rarely name).
    pub grpc_tls_server_name: String,
    /// Prefixes every etcd key: `/goim/{cluster}/...`.
    pub name: String,
    /// Seconds a dead role's keys outlive it.
    pub lease_ttl: i64,
    /// How often logic compacts etcd's history: each time to the revision it saw one period
    /// earlier, so watchers keep at least that much. Every connect and disconnect is a
    /// revision, and etcd (Debian's, and many installs) keeps them all unless compacted, until
    /// its backend quota stops every write. 0: never (when etcd compacts by itself,
    /// `--auto-compaction-retention`).
    #[serde(with = "humantime_serde")]
    pub etcd_compact_every: std::time::Duration,
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
            grpc_tls_dir: String::new(),
            grpc_tls_server_name: String::new(),
            name: "default".into(),
            lease_ttl: 10,
            etcd_compact_every: std::time::Duration::from_secs(300),
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

/// Where standalone's HTTP API listens by default: this machine only, since it pushes to
/// everyone and takes no key unless one is configured.
pub const STANDALONE_HTTP: &str = "127.0.0.1:3111";
/// Standalone keeps its conversations in a SQLite file under the working directory unless
/// the config names a store.
pub const STANDALONE_CHAT_STORE: &str = "sqlite://goim-data/chat.db";

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        Config::parse(path, &read(path)?)
    }

    fn parse(path: &Path, text: &str) -> Result<Config, Error> {
        toml::from_str(text).map_err(|source| Error::Parse {
            path: path.into(),
            source,
        })
    }

    /// The TOML a role reads back as this config.
    pub fn to_toml(&self) -> String {
        // Every field is a string, number, bool, list or table: serializing cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// As [`Config::load`] for standalone: the HTTP API listens on loopback unless the file
    /// says where (the client listeners stay on every interface). Flags and environment
    /// still apply after this.
    pub fn load_standalone(path: Option<&Path>) -> Result<Config, Error> {
        let (mut cfg, http_in_file) = match path {
            Some(p) => {
                let text = read(p)?;
                let cfg = Config::parse(p, &text)?;
                let table: toml::Table = toml::from_str(&text).map_err(|source| Error::Parse {
                    path: p.into(),
                    source,
                })?;
                (
                    cfg,
                    table.get("logic").and_then(|l| l.get("http")).is_some(),
                )
            }
            None => (Config::default(), false),
        };
        if !http_in_file {
            cfg.logic.http = STANDALONE_HTTP.into();
        }
        let chat = &mut cfg.logic.conversations;
        if chat.store.is_empty() && chat.store_file.is_empty() {
            chat.store = STANDALONE_CHAT_STORE.into();
        }
        Ok(cfg)
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
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

    /// Standalone keeps conversations in a SQLite file unless told otherwise; distributed
    /// roles have them off until a store is named.
    #[test]
    fn standalone_keeps_conversations_in_a_file() {
        let chat = |c: Config| c.logic.conversations;
        assert_eq!(
            chat(Config::load_standalone(None).unwrap()).store,
            STANDALONE_CHAT_STORE
        );
        assert_eq!(chat(Config::load(None).unwrap()).store, "");
        let file = std::env::temp_dir().join(format!("goim-cfg-chat-{}", std::process::id()));
        std::fs::write(&file, "[logic.conversations]\nstore_file = \"/run/dsn\"\n").unwrap();
        let c = chat(Config::load_standalone(Some(&file)).unwrap());
        assert_eq!((c.store.as_str(), c.store_file.as_str()), ("", "/run/dsn"));
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("[comet]\ntcpp = \"x\"\n").is_err());
        assert!(toml::from_str::<Config>("[comet]\nbuckets = \"many\"\n").is_err());
    }
}
