//! Limits of every role's HTTP listener.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// A connection must send a whole request header within this (also while idle between
    /// keep-alive requests), or it is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest a request may take from its header to its reply.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Open connections at most.
    pub max_connections: usize,
    /// On shutdown, how long requests in flight may still finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}
