//! Comets for job from the etcd registry: a comet takes deliveries while it is registered and
//! its load report (on its lease) is there; one gRPC channel per comet, replaced when its
//! address changes and dropped when it leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use goim_discovery::{CometRecord, LoadRecord, WatchCache};
use goim_proto::grpc::{Dialer, RemoteComet};
use goim_proto::service::CometService;

use crate::CometDirectory;

pub struct EtcdComets {
    comets: WatchCache<CometRecord>,
    loads: WatchCache<LoadRecord>,
    /// Bumped whenever either mirror changes.
    changes: tokio::sync::watch::Receiver<u64>,
    clients: Mutex<HashMap<String, (String, Arc<RemoteComet>)>>,
    dialer: Dialer,
}

impl EtcdComets {
    pub fn new(
        comets: WatchCache<CometRecord>,
        loads: WatchCache<LoadRecord>,
        dialer: Dialer,
    ) -> Self {
        let (tx, changes) = tokio::sync::watch::channel(0u64);
        for mut sub in [comets.subscribe(), loads.subscribe()] {
            let tx = tx.clone();
            tokio::spawn(async move {
                while sub.changed().await.is_ok() {
                    tx.send_modify(|v| *v += 1);
                }
            });
        }
        EtcdComets {
            comets,
            loads,
            changes,
            clients: Mutex::new(HashMap::new()),
            dialer,
        }
    }

    pub fn synced(&self) -> bool {
        self.comets.synced() && self.loads.synced()
    }

    fn client(&self, name: &str, addr: &str) -> Option<Arc<dyn CometService>> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, c)) = clients.get(name) {
            if a == addr {
                return Some(c.clone());
            }
        }
        match self.dialer.channel(addr) {
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
        // A comet is alive while its load report, on its own lease, is there: a crashed pod
        // whose record the operator wrote drops out within the lease TTL.
        self.loads.get(name)?;
        let rec = self.comets.get(name)?.value;
        self.client(name, &rec.grpc)
    }

    fn names(&self) -> Vec<String> {
        let snap = self.comets.snapshot();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|k, _| snap.iter().any(|(n, _)| n == k));
        drop(clients);
        snap.into_iter()
            .filter(|(name, _)| self.loads.get(name).is_some())
            .map(|(name, _)| name)
            .collect()
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.clone())
    }

    /// The lease of its load report: a new process gets a new lease.
    fn instance(&self, name: &str) -> Option<i64> {
        self.loads.get(name).map(|e| e.lease)
    }
}
