//! Comet metrics (Prometheus).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct CometMetrics {
    pub connections: Gauge,
    pub accepted: Counter,
    /// Pushes taken for a connection, queued or written at once (one per recipient).
    pub pushes_queued: Counter,
    /// Pushes not delivered, by reason (`queue_full`, ...).
    pub pushes_dropped: Family<Reason, Counter>,
    /// Connections closed for bad input or timeouts, by reason.
    pub closed: Family<Reason, Counter>,
    /// Writes to client sockets (each may carry many pushes).
    pub writes: Counter,
    /// Presence keys in etcd removed because no live connection backed them.
    pub presence_swept: Counter,
    /// Attempts to register in etcd (record, load, presence) that failed and were retried.
    pub registry_failures: Counter,
    /// History reads for a `JOIN` or `RECOVER` that failed (`error`, `timeout`): the client
    /// was answered "not recovered".
    pub history_failures: Family<Reason, Counter>,
    /// Jobs' room watches the comet dropped (`lagging`, `unacked`): new rooms then waited
    /// out the job's lease.
    pub room_watchers_dropped: crate::room_watch::DropCounter,
    /// New rooms let in after waiting [`crate::room_watch::ACK_TIMEOUT`] for a job in etcd
    /// that never watched this comet: that job's batches may miss members here.
    pub rooms_unwatched: Counter,
    last_drop_log: AtomicU64,
}

impl CometMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("goim_comet");
        r.register(
            "connections",
            "Open authenticated connections",
            self.connections.clone(),
        );
        r.register("accepted", "Accepted sockets", self.accepted.clone());
        r.register(
            "pushes_queued",
            "Pushes taken for connections: queued, or written at once (direct_writes)",
            self.pushes_queued.clone(),
        );
        r.register(
            "pushes_dropped",
            "Pushes dropped per connection",
            self.pushes_dropped.clone(),
        );
        r.register(
            "closed",
            "Connections closed by the server",
            self.closed.clone(),
        );
        r.register("writes", "Socket writes", self.writes.clone());
        r.register(
            "presence_swept",
            "Presence keys removed from etcd that no connection backed",
            self.presence_swept.clone(),
        );
        r.register(
            "registry_failures",
            "Failed attempts to register in etcd, each retried after a backoff",
            self.registry_failures.clone(),
        );
        r.register(
            "history_failures",
            "History reads for JOIN or RECOVER that failed, by reason; answered not recovered",
            self.history_failures.clone(),
        );
        r.register(
            "room_watchers_dropped",
            "Jobs' room watches dropped for lagging or not acknowledging, by reason",
            self.room_watchers_dropped.clone(),
        );
        r.register(
            "rooms_unwatched",
            "New rooms let in without a watch from every job in etcd, after waiting for it",
            self.rooms_unwatched.clone(),
        );
    }

    pub fn history_failure(&self, reason: &'static str) {
        self.history_failures
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&Reason { reason }).inc();
    }

    /// Counts dropped pushes and logs them at most once a second.
    pub fn dropped(&self, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.pushes_dropped
            .get_or_create(&Reason { reason })
            .inc_by(n);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_drop_log.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(reason, n, "pushes dropped");
        }
    }
}
