//! The whole configuration: defaults, then a TOML file, then environment and flags.

use std::path::Path;

use anyhow::Context;
use goim_comet::CometConfig;
use goim_job::JobConfig;
use goim_logic::LogicConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub comet: CometConfig,
    pub logic: LogicConfig,
    pub job: JobConfig,
}

impl Config {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
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

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("[comet]\ntcpp = \"x\"\n").is_err());
        assert!(toml::from_str::<Config>("[comet]\nbuckets = \"many\"\n").is_err());
    }
}
