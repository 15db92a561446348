//! Comets for job from the etcd registry: one gRPC channel per comet, replaced when its address
//! changes and dropped when it leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use goim_discovery::{CometRecord, WatchCache};
use goim_proto::grpc::{channel, RemoteComet};
use goim_proto::service::CometService;

use crate::CometDirectory;

pub struct EtcdComets {
    comets: WatchCache<CometRecord>,
    clients: Mutex<HashMap<String, (String, Arc<RemoteComet>)>>,
}

impl EtcdComets {
    pub fn new(comets: WatchCache<CometRecord>) -> Self {
        EtcdComets {
            comets,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn synced(&self) -> bool {
        self.comets.synced()
    }

    fn client(&self, name: &str, addr: &str) -> Option<Arc<dyn CometService>> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, c)) = clients.get(name) {
            if a == addr {
                return Some(c.clone());
            }
        }
        match channel(addr) {
            Ok(ch) => {
                let c = Arc::new(RemoteComet::new(ch));
                clients.insert(name.to_string(), (addr.to_string(), c.clone()));
                Some(c)
            }
            Err(e) => {
                tracing::warn!(comet = name, %addr, error = %e, "bad comet address");
                None
            }
        }
    }
}

impl CometDirectory for EtcdComets {
    fn get(&self, name: &str) -> Option<Arc<dyn CometService>> {
        let rec = self.comets.get(name)?.value;
        self.client(name, &rec.grpc)
    }

    fn all(&self) -> Vec<(String, Arc<dyn CometService>)> {
        let snap = self.comets.snapshot();
        {
            let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            clients.retain(|k, _| snap.iter().any(|(n, _)| n == k));
        }
        snap.into_iter()
            .filter_map(|(name, e)| {
                let c = self.client(&name, &e.value.grpc)?;
                Some((name, c))
            })
            .collect()
    }
}
