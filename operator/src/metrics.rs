//! Operator metrics (Prometheus): reconciles, failures by kind, duration, and the domain
//! numbers (registered and draining comets, leadership).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorKind {
    pub kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<ErrorKind, Counter>,
    pub duration: Histogram,
    pub registered: Gauge,
    pub draining: Gauge,
    pub leader: Gauge,
    /// Comet pods deleted by the rolling update.
    pub replaced: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            registered: Gauge::default(),
            draining: Gauge::default(),
            leader: Gauge::default(),
            replaced: Counter::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("goim_operator");
        r.register("reconciles", "Reconciles run", self.reconciles.clone());
        r.register(
            "reconcile_failures",
            "Failed reconciles by error kind",
            self.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            self.duration.clone(),
        );
        r.register(
            "registered_comets",
            "Comet pods registered in etcd (last reconcile)",
            self.registered.clone(),
        );
        r.register(
            "draining_comets",
            "Comet pods draining (last reconcile)",
            self.draining.clone(),
        );
        r.register(
            "replaced_comets",
            "Comet pods the rolling update deleted (drained first)",
            self.replaced.clone(),
        );
        r.register("leader", "1 while this replica leads", self.leader.clone());
    }
}
