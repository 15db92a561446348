//! The comet list clients are offered: goim's `/goim/nodes/weighted` ranking (GOIM.md §8.3),
//! fed by whatever discovery the deployment uses (standalone: the local comet).

use std::collections::HashMap;

use serde::Serialize;

/// A comet as discovery sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CometInstance {
    /// Server id (StatefulSet pod name).
    pub name: String,
    pub region: String,
    pub zone: String,
    /// `grpc://host:port` of the comet's gRPC server, when it has one.
    pub grpc_addr: String,
    /// Public addresses offered to non-web clients.
    pub addrs: Vec<String>,
    pub weight: i64,
    /// A draining comet is never offered to clients.
    pub draining: bool,
    pub conn_count: i64,
    pub ip_count: i64,
    /// Unix nanoseconds of the last load report.
    pub updated: i64,
}

pub trait NodeSource: Send + Sync + 'static {
    fn instances(&self) -> Vec<CometInstance>;
}

const MIN_WEIGHT: i64 = 1;
const MAX_WEIGHT: i64 = 1 << 20;
pub const MAX_NODES: usize = 5;

#[derive(Debug, Default)]
struct Est {
    reported: i64,
    conns: i64,
}

/// goim's weight/connection balancer. Between load reports it counts each offer as a
/// connection on the chosen comet, so successive clients spread out.
#[derive(Debug, Default)]
pub struct Balancer {
    est: HashMap<String, Est>,
}

impl Balancer {
    /// Ranks the active comets for a client in `region` and returns at most [`MAX_NODES`].
    pub fn rank<'a>(
        &mut self,
        nodes: &'a [CometInstance],
        region: &str,
        region_weight: f64,
    ) -> Vec<&'a CometInstance> {
        let active: Vec<&CometInstance> = nodes.iter().filter(|n| !n.draining).collect();
        self.est.retain(|k, _| active.iter().any(|n| &n.name == k));
        for n in &active {
            let e = self.est.entry(n.name.clone()).or_default();
            if e.reported != n.conn_count {
                *e = Est {
                    reported: n.conn_count,
                    conns: n.conn_count,
                };
            }
        }
        let total_weight: i64 = active.iter().map(|n| n.weight.max(0)).sum();
        let total_conns: i64 = active.iter().map(|n| self.est[&n.name].conns).sum();
        let mut ranked: Vec<(i64, &CometInstance)> = active
            .iter()
            .map(|n| {
                let fixed = n.weight.max(0);
                let gain = if n.region == region {
                    region_weight
                } else {
                    1.0
                };
                let fw = fixed as f64 * gain;
                let tw = total_weight + fw as i64 - fixed;
                let current = if total_conns > 0 && tw > 0 {
                    let weight_ratio = fw / tw as f64;
                    let conn_ratio = self.est[&n.name].conns as f64 / total_conns as f64 * 0.5;
                    let diff = weight_ratio - conn_ratio;
                    let m = diff * total_conns as f64;
                    let rounded = if m.floor() - m >= -0.5 {
                        m.floor()
                    } else {
                        m.ceil()
                    };
                    let w = (fw + rounded) as i64;
                    if diff < 0.0 {
                        w.max(MIN_WEIGHT)
                    } else {
                        w.min(MAX_WEIGHT)
                    }
                } else {
                    0
                };
                (current, *n)
            })
            .collect();
        // Stable order for ties (goim's is random), so results are reproducible.
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        if let Some((_, top)) = ranked.first() {
            if let Some(e) = self.est.get_mut(&top.name) {
                e.conns += 1;
            }
        }
        ranked.into_iter().take(MAX_NODES).map(|(_, n)| n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, weight: i64, conns: i64) -> CometInstance {
        CometInstance {
            name: name.into(),
            region: String::new(),
            zone: String::new(),
            grpc_addr: String::new(),
            addrs: vec![format!("{name}.example")],
            weight,
            draining: false,
            conn_count: conns,
            ip_count: conns,
            updated: 0,
        }
    }

    #[test]
    fn prefers_less_loaded_and_skips_draining() {
        let mut b = Balancer::default();
        let mut nodes = vec![node("a", 10, 100), node("b", 10, 10), node("c", 10, 0)];
        nodes[2].draining = true;
        let r = b.rank(&nodes, "", 1.6);
        assert_eq!(
            r.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
    }

    #[test]
    fn offers_spread_between_reports() {
        let mut b = Balancer::default();
        let nodes = vec![node("a", 10, 1), node("b", 10, 1)];
        let mut firsts = HashMap::new();
        for _ in 0..100 {
            *firsts
                .entry(b.rank(&nodes, "", 1.6)[0].name.clone())
                .or_insert(0) += 1;
        }
        assert!(firsts["a"] >= 40 && firsts["b"] >= 40, "{firsts:?}");
    }

    #[test]
    fn at_most_five() {
        let mut b = Balancer::default();
        let nodes: Vec<_> = (0..8).map(|i| node(&format!("n{i}"), 1, 0)).collect();
        assert_eq!(b.rank(&nodes, "", 1.6).len(), MAX_NODES);
        assert!(b.rank(&[], "", 1.6).is_empty());
    }
}
