//! Comets offered to clients, from the etcd registry and the comets' load reports.

use goim_discovery::{CometRecord, CometState, LoadRecord, WatchCache};

use crate::nodes::{CometInstance, NodeSource};

/// Comets from the registry and their load reports.
#[derive(Clone)]
pub struct EtcdNodes {
    pub comets: WatchCache<CometRecord>,
    pub loads: WatchCache<LoadRecord>,
}

impl NodeSource for EtcdNodes {
    fn instances(&self) -> Vec<CometInstance> {
        self.comets
            .snapshot()
            .into_iter()
            .filter_map(|(name, e)| {
                // A registered comet with no load report is not running (yet, or any more).
                let load = self.loads.get(&name)?.value;
                let r = e.value;
                Some(CometInstance {
                    name,
                    region: r.region,
                    zone: r.zone,
                    grpc_addr: format!("grpc://{}", r.grpc),
                    addrs: r.addrs,
                    weight: r.weight,
                    draining: r.state == CometState::Draining || load.draining,
                    conn_count: load.conn_count as i64,
                    ip_count: load.ip_count as i64,
                    updated: load.updated.saturating_mul(1_000_000),
                })
            })
            .collect()
    }
}
