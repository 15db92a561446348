//! Job settings: room batching, delivery queues, history.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Most messages in one room batch (goim 20).
    pub room_batch: usize,
    /// Most bytes in one room batch.
    pub room_batch_bytes: usize,
    /// Messages waiting per room before logic's push call waits (backpressure, not loss).
    pub room_queue: usize,
    /// How long a room batch may wait for more messages after its first one. 0 (default):
    /// flush as soon as the queue is empty, adding no latency. goim waits up to 1s, which
    /// packs more messages per write at the cost of that latency.
    #[serde(with = "humantime_serde")]
    pub room_linger: Duration,
    /// Longest a call to one comet may take; the delivery is then counted
    /// `comet_unreachable` and that comet's next delivery goes out.
    #[serde(with = "humantime_serde")]
    pub comet_timeout: Duration,
    /// A room's batcher (and a comet's queue) retires after this long without work, so a
    /// room pushed to once costs nothing soon after (goim keeps it 15m).
    #[serde(with = "humantime_serde")]
    pub room_idle: Duration,
    /// Most rooms with messages in flight at once; a push to a new room beyond it is refused
    /// (logic answers an error), so distinct room names cannot grow job without bound.
    pub max_rooms: usize,
    /// Deliveries queued per comet; beyond it a delivery to that comet is dropped and counted
    /// `comet_queue_full` (the other comets are not held up).
    pub comet_queue: usize,
    /// How long a delivery waits for a comet the registry does not show yet (a pod that is
    /// ready while its record is still being written) before it is counted `unknown_comet`.
    #[serde(with = "humantime_serde")]
    pub unknown_comet_wait: Duration,
    /// On SIGTERM, how long job keeps delivering what it holds; what is left then is counted
    /// `job_shutdown`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Room history by room type (the part of the room id before `://`): rooms of a type
    /// listed here are numbered and their last messages kept, so clients that reconnect can
    /// recover what they missed (docs/PROTOCOL.md). Types not listed keep none.
    pub history: BTreeMap<String, HistoryConfig>,
    /// Most bytes of message bodies all rooms' history holds together.
    pub history_bytes: usize,
    /// How long a room's position is remembered after its last message (its messages go
    /// after their TTL), so a client that missed nothing is told so.
    #[serde(with = "humantime_serde")]
    pub history_meta_ttl: Duration,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            room_batch: 20,
            room_batch_bytes: 64 * 1024,
            room_queue: 1024,
            room_linger: Duration::ZERO,
            comet_timeout: Duration::from_secs(5),
            room_idle: Duration::from_secs(5),
            max_rooms: 100_000,
            comet_queue: 4096,
            unknown_comet_wait: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            history: BTreeMap::new(),
            history_bytes: 64 << 20,
            history_meta_ttl: Duration::from_secs(3600),
        }
    }
}

/// History kept for the rooms of one type (the part of a room id before `://`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Messages kept per room; 0 keeps none (and sends no positions).
    pub size: usize,
    /// How long a message is kept.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 100,
            ttl: Duration::from_secs(300),
        }
    }
}
