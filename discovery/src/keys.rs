//! The etcd key layout, one prefix per cluster (DESIGN.md), and the JSON records stored there.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Key builder for one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Keys {
            root: format!("/goim/{cluster}/"),
        }
    }

    /// Everything of this cluster (the operator's finalizer deletes it).
    pub fn cluster(&self) -> String {
        self.root.clone()
    }
    pub fn comets(&self) -> String {
        format!("{}comets/", self.root)
    }
    pub fn comet(&self, name: &str) -> String {
        format!("{}comets/{name}", self.root)
    }
    pub fn loads(&self) -> String {
        format!("{}load/", self.root)
    }
    pub fn load(&self, name: &str) -> String {
        format!("{}load/{name}", self.root)
    }
    /// Every connection's presence record (`online/key/`).
    pub fn online_keys(&self) -> String {
        format!("{}online/key/", self.root)
    }
    /// Every user's index (`online/mid/`).
    pub fn online_mids(&self) -> String {
        format!("{}online/mid/", self.root)
    }
    pub fn online_key(&self, key: &str) -> String {
        format!("{}online/key/{key}", self.root)
    }
    pub fn online_mid_prefix(&self, mid: i64) -> String {
        format!("{}online/mid/{mid}/", self.root)
    }
    pub fn online_mid(&self, mid: i64, key: &str) -> String {
        format!("{}online/mid/{mid}/{key}", self.root)
    }
    pub fn rooms_prefix(&self) -> String {
        format!("{}rooms/", self.root)
    }
    pub fn rooms(&self, name: &str) -> String {
        format!("{}rooms/{name}", self.root)
    }
    pub fn jobs(&self) -> String {
        format!("{}jobs/", self.root)
    }
    pub fn job(&self, id: &str) -> String {
        format!("{}jobs/{id}", self.root)
    }
}

/// The end of the key range holding every key under `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key: etcd's "\0" range end.
    vec![0]
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CometState {
    #[default]
    Active,
    /// Taking no new clients and closing the ones it has; never offered to clients.
    Draining,
}

/// `/goim/{cluster}/comets/{name}`: where a comet is and whether it takes clients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CometRecord {
    pub name: String,
    /// gRPC `host:port` job dials.
    pub grpc: String,
    /// Client listeners, for tools and tests.
    pub tcp: String,
    pub ws: String,
    /// Public addresses offered to non-web clients.
    pub addrs: Vec<String>,
    pub weight: i64,
    pub region: String,
    pub zone: String,
    pub state: CometState,
    /// How long this comet's drain lasts, in milliseconds; 0: its own configuration. Lets
    /// the operator change it without a restart.
    #[serde(skip_serializing_if = "is_zero")]
    pub drain_ms: u64,
    /// The pod the operator wrote this record for. A StatefulSet recreates a pod under its
    /// name; a record left by the earlier pod (draining, say) is not the new one's.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `/goim/{cluster}/load/{name}`: a comet's load, on its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadRecord {
    pub conn_count: u64,
    pub ip_count: u64,
    pub rooms: u64,
    /// Unix milliseconds.
    pub updated: i64,
    /// The comet is putting its connections' presence back (its lease changed, e.g. lapsed
    /// during an etcd stall): a presence lookup may miss some of them until this is false.
    pub presence_pending: bool,
    /// The comet is draining (stopping, or told to by the operator): not offered to clients.
    pub draining: bool,
}

/// `/goim/{cluster}/online/key/{key}`, on the owning comet's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OnlineRecord {
    pub mid: i64,
    pub comet: String,
    pub room: String,
}

/// `/goim/{cluster}/rooms/{name}`: a comet's room counts, on its lease.
pub type RoomCounts = HashMap<String, i32>;

/// `/goim/{cluster}/jobs/{id}`, on the job's lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobRecord {
    pub id: String,
    pub grpc: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("prod");
        assert_eq!(k.comet("comet-0"), "/goim/prod/comets/comet-0");
        assert_eq!(k.online_mid(7, "a/b"), "/goim/prod/online/mid/7/a/b");
        assert!(k.online_mid(7, "x").starts_with(&k.online_mid_prefix(7)));
        assert!(!k.online_mid(70, "x").starts_with(&k.online_mid_prefix(7)));
        assert!(k.online_key("a").starts_with(&k.online_keys()));
        assert_eq!(prefix_end("/goim/p/online/key/"), b"/goim/p/online/key0");
    }

    #[test]
    fn records_tolerate_missing_fields() {
        let r: CometRecord = serde_json::from_str(r#"{"name":"c","state":"draining"}"#).unwrap();
        assert_eq!(r.state, CometState::Draining);
        assert!(serde_json::from_str::<CometRecord>(r#"{"state":"gone"}"#).is_err());
    }
}
