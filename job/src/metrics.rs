//! Job metrics (Prometheus): what went to comets, and every message that did not, by reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Seconds, 100 µs to about 3 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

#[derive(Debug)]
pub struct JobMetrics {
    /// Calls made to comets, by kind.
    pub comet_calls: Family<Reason, Counter>,
    /// How long calls to comets took (answered or failed; timeouts count at the timeout),
    /// by kind.
    pub comet_call_seconds: Family<Reason, Histogram, fn() -> Histogram>,
    /// Messages that reached no comet, by reason: `unknown_comet` (the comet named by
    /// presence is not registered), `comet_unreachable` (the call failed or timed out),
    /// `comet_queue_full` (that comet's queue in job was full), `comet_refused` (a batched
    /// push the comet found malformed), `no_comets`, `job_shutdown`
    /// (still queued when the drain deadline passed), `too_many_rooms`.
    pub undeliverable: Family<Reason, Counter>,
    /// Room batches sent, and the messages in them.
    pub room_batches: Counter,
    /// Room batches not sent to a comet because it has no members in the room.
    pub room_deliveries_skipped: Counter,
    pub room_messages: Counter,
    /// Messages and deliveries held in job's memory (room queues and per-comet queues).
    pub queued: Gauge,
    /// Room batchers alive.
    pub rooms: Gauge,
    /// Bytes of message bodies kept as room history, and the rooms numbered.
    pub history_bytes: Gauge,
    pub history_rooms: Gauge,
    /// Messages dropped from history before their TTL to keep it under `history_bytes`.
    pub history_evicted: Counter,
    /// Streams (rooms, users) left unnumbered because `max_rooms` streams were numbered.
    pub history_full: Counter,
}

impl Default for JobMetrics {
    fn default() -> Self {
        JobMetrics {
            comet_calls: Family::default(),
            comet_call_seconds: Family::new_with_constructor(latency),
            undeliverable: Family::default(),
            room_batches: Counter::default(),
            room_deliveries_skipped: Counter::default(),
            room_messages: Counter::default(),
            queued: Gauge::default(),
            rooms: Gauge::default(),
            history_bytes: Gauge::default(),
            history_rooms: Gauge::default(),
            history_evicted: Counter::default(),
            history_full: Counter::default(),
        }
    }
}

impl JobMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("goim_job");
        r.register("comet_calls", "Calls to comets", self.comet_calls.clone());
        r.register(
            "comet_call_seconds",
            "How long calls to comets took, by kind",
            self.comet_call_seconds.clone(),
        );
        r.register(
            "undeliverable",
            "Messages that reached no comet, by reason",
            self.undeliverable.clone(),
        );
        r.register(
            "room_batches",
            "Room batches flushed",
            self.room_batches.clone(),
        );
        r.register(
            "room_deliveries_skipped",
            "Room batches not sent to a comet because it has no members in the room",
            self.room_deliveries_skipped.clone(),
        );
        r.register(
            "room_messages",
            "Room messages flushed",
            self.room_messages.clone(),
        );
        r.register(
            "queued",
            "Room messages and comet deliveries held in memory",
            self.queued.clone(),
        );
        r.register("rooms", "Room batchers alive", self.rooms.clone());
        r.register(
            "history_bytes",
            "Bytes of message bodies kept as room history",
            self.history_bytes.clone(),
        );
        r.register(
            "history_rooms",
            "Rooms whose position (and history) this job keeps",
            self.history_rooms.clone(),
        );
        r.register(
            "history_evicted",
            "Messages dropped from history early to stay under history_bytes",
            self.history_evicted.clone(),
        );
        r.register(
            "history_full",
            "Streams left unnumbered because max_rooms streams were numbered already",
            self.history_full.clone(),
        );
    }

    pub(crate) fn undeliverable(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.undeliverable
                .get_or_create(&Reason { reason })
                .inc_by(n);
        }
    }

    pub(crate) fn call(&self, kind: &'static str) {
        self.comet_calls
            .get_or_create(&Reason { reason: kind })
            .inc();
    }

    pub(crate) fn call_took(&self, kind: &'static str, took: std::time::Duration) {
        self.comet_call_seconds
            .get_or_create(&Reason { reason: kind })
            .observe(took.as_secs_f64());
    }

    /// A count by reason, for tests and status pages.
    pub fn undeliverable_count(&self, reason: &'static str) -> u64 {
        self.undeliverable.get_or_create(&Reason { reason }).get()
    }
}
