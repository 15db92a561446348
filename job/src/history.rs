//! Room history: the job that owns a room on the ring numbers the room's messages with a
//! position (epoch, offset) and keeps the last few, so that a client that reconnects can be
//! sent exactly what it missed, or told it cannot be (docs/PROTOCOL.md). The epoch is drawn
//! when this job starts numbering the room: another job, or this one after a restart, numbers
//! it under a new epoch, so a client can always tell "nothing missed" from "maybe missed".
//!
//! Bounded per room type (messages and age), and in total bytes: beyond `history_bytes` the
//! room being appended to gives up its oldest messages (counted). A room's position outlives
//! its messages for `history_meta_ttl`, so a client that missed nothing is told so even after
//! the messages expired.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use goim_config::HistoryConfig;
use goim_proto::logic::{HistoryReply, HistoryReq};
use goim_proto::packet::{Packet, SERVER_VER};
use tokio::time::Instant;

use crate::metrics::JobMetrics;

struct Item {
    offset: u64,
    op: i32,
    body: Bytes,
    at: Instant,
}

struct Stream {
    epoch: String,
    /// Offset of the last message numbered (0: none yet).
    top: u64,
    items: VecDeque<Item>,
    last: Instant,
    /// Connections that read this (user) stream's history lately, newest last.
    readers: VecDeque<Reader>,
}

/// A connection that read a user stream's history: what is numbered after the read reaches
/// it, even when the lookup that addressed the push ran before the connection registered
/// (logic looks keys up before the job numbers). Kept for [`READER_TTL`], longer than a push
/// can take from lookup to numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reader {
    pub server: Arc<str>,
    pub key: Arc<str>,
    until: Instant,
}

const READER_TTL: Duration = Duration::from_secs(30);
/// Readers kept per stream (a user's devices reconnecting at once); the oldest goes first.
const MAX_READERS: usize = 16;
/// Longest comet name or key a reader may give (both are names goim-rs made).
const MAX_READER_NAME: usize = 256;

impl Stream {
    /// Drops messages older than `ttl`; returns the bytes freed.
    fn expire(&mut self, ttl: Duration, now: Instant) -> usize {
        let mut freed = 0;
        while self
            .items
            .front()
            .is_some_and(|i| now.duration_since(i.at) > ttl)
        {
            freed += self.items.pop_front().map_or(0, |i| i.body.len());
        }
        freed
    }
}

pub(crate) struct History {
    types: BTreeMap<String, HistoryConfig>,
    max_bytes: usize,
    meta_ttl: Duration,
    max_rooms: usize,
    rooms: Mutex<HashMap<String, Arc<Mutex<Stream>>>>,
    metrics: Arc<JobMetrics>,
}

/// A fresh epoch: random, so that no two numberings of a room share one.
fn new_epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
}

impl History {
    pub fn new(
        types: BTreeMap<String, HistoryConfig>,
        max_bytes: usize,
        meta_ttl: Duration,
        max_rooms: usize,
        metrics: Arc<JobMetrics>,
    ) -> Self {
        History {
            types,
            max_bytes,
            meta_ttl,
            max_rooms,
            rooms: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn config(&self, room: &str) -> Option<&HistoryConfig> {
        let (typ, _) = room.split_once("://")?;
        // A connection's own stream (key pushes) is kept as its user's is.
        let typ = if typ == "key" { "user" } else { typ };
        self.types.get(typ).filter(|c| c.size > 0)
    }

    fn stream(&self, room: &str, create: bool) -> Option<Arc<Mutex<Stream>>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = rooms.get(room) {
            return Some(s.clone());
        }
        if !create {
            return None;
        }
        // Positions are small, but clients can name rooms: bounded like the room batchers.
        // Past it a stream goes unnumbered (its clients cannot recover it), counted.
        if rooms.len() >= self.max_rooms {
            self.metrics.history_full.inc();
            return None;
        }
        let s = Arc::new(Mutex::new(Stream {
            epoch: new_epoch(),
            top: 0,
            items: VecDeque::new(),
            last: Instant::now(),
            readers: VecDeque::new(),
        }));
        rooms.insert(room.to_string(), s.clone());
        self.metrics.history_rooms.set(rooms.len() as i64);
        Some(s)
    }

    /// Numbers a batch of `room`'s messages and keeps them, then calls `send` with the
    /// position of the first one, still holding the room: batches are handed on in the order
    /// they were numbered. A room whose type keeps no history is sent with no position.
    pub fn append<R>(
        &self,
        room: &str,
        msgs: &[(i32, Bytes)],
        send: impl FnOnce(Option<(&str, u64)>) -> R,
    ) -> R {
        self.append_for_readers(room, msgs, |position, _| send(position))
    }

    /// As [`History::append`], also naming the connections that read the stream's history
    /// lately ([`Reader`]).
    pub fn append_for_readers<R>(
        &self,
        room: &str,
        msgs: &[(i32, Bytes)],
        send: impl FnOnce(Option<(&str, u64)>, &[Reader]) -> R,
    ) -> R {
        let Some(cfg) = self.config(room) else {
            return send(None, &[]);
        };
        let Some(stream) = self.stream(room, true) else {
            return send(None, &[]);
        };
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut freed = s.expire(cfg.ttl, now);
        let first = s.top + 1;
        let mut added = 0;
        for (i, (op, body)) in msgs.iter().enumerate() {
            s.items.push_back(Item {
                offset: first + i as u64,
                op: *op,
                body: body.clone(),
                at: now,
            });
            added += body.len();
        }
        s.top += msgs.len() as u64;
        s.last = now;
        while s.items.len() > cfg.size {
            freed += s.items.pop_front().map_or(0, |i| i.body.len());
        }
        // Over the total: this room gives up its oldest messages first.
        let total = (self.metrics.history_bytes.get() + added as i64 - freed as i64).max(0);
        let mut over = (total as usize).saturating_sub(self.max_bytes);
        while over > 0 {
            let Some(i) = s.items.pop_front() else { break };
            over = over.saturating_sub(i.body.len());
            freed += i.body.len();
            self.metrics.history_evicted.inc();
        }
        self.metrics
            .history_bytes
            .inc_by(added as i64 - freed as i64);
        let epoch = s.epoch.clone();
        while s.readers.front().is_some_and(|r| r.until <= now) {
            s.readers.pop_front();
        }
        let readers: Vec<Reader> = s.readers.iter().cloned().collect();
        send(Some((&epoch, first)), &readers)
    }

    /// What a client that last saw (`epoch`, `offset`) of `room` missed.
    pub fn since(&self, req: &HistoryReq) -> HistoryReply {
        let not_recovered = |epoch: String, offset: u64| HistoryReply {
            recovered: false,
            epoch,
            offset,
            batch: Bytes::new(),
        };
        let Some(cfg) = self.config(&req.room) else {
            return not_recovered(String::new(), 0);
        };
        // A room this job has not numbered yet gets its epoch now, so a client that joins
        // before the first message can still recover from (epoch, 0) later. Whatever a
        // client saw before was numbered by another job or an earlier run.
        let Some(stream) = self.stream(&req.room, true) else {
            return not_recovered(String::new(), 0);
        };
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let freed = s.expire(cfg.ttl, now);
        self.metrics.history_bytes.dec_by(freed as i64);
        // Under the stream's lock: everything numbered before this read is in the reply,
        // everything after reaches the reader.
        if (req.room.starts_with("user://") || req.room.starts_with("key://"))
            && !req.server.is_empty()
            && !req.key.is_empty()
            && req.server.len() <= MAX_READER_NAME
            && req.key.len() <= MAX_READER_NAME
        {
            s.readers.retain(|r| *r.key != *req.key && r.until > now);
            if s.readers.len() >= MAX_READERS {
                s.readers.pop_front();
            }
            s.readers.push_back(Reader {
                server: req.server.as_str().into(),
                key: req.key.as_str().into(),
                until: now + READER_TTL,
            });
        }
        if req.epoch != s.epoch || req.offset > s.top {
            return not_recovered(s.epoch.clone(), s.top);
        }
        let first_kept = s.items.front().map_or(s.top + 1, |i| i.offset);
        if req.offset + 1 < first_kept {
            // Some of what the client missed is gone.
            return not_recovered(s.epoch.clone(), s.top);
        }
        let missed = s.items.iter().filter(|i| i.offset > req.offset);
        let mut batch = BytesMut::new();
        for i in missed {
            Packet::new(SERVER_VER, i.op, 0, i.body.clone()).encode_into(&mut batch);
        }
        HistoryReply {
            recovered: true,
            epoch: s.epoch.clone(),
            offset: s.top,
            batch: batch.freeze(),
        }
    }

    /// Drops expired messages, and rooms with none left whose last message is older than
    /// `history_meta_ttl`.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let mut freed = 0;
        rooms.retain(|room, stream| {
            let ttl = self.config(room).map_or(Duration::ZERO, |c| c.ttl);
            let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
            freed += s.expire(ttl, now);
            !s.items.is_empty() || now.duration_since(s.last) <= self.meta_ttl
        });
        self.metrics.history_bytes.dec_by(freed as i64);
        self.metrics.history_rooms.set(rooms.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_proto::packet::raw_packets;

    fn history(size: usize, max_bytes: usize) -> History {
        let types = BTreeMap::from([(
            "chat".to_string(),
            HistoryConfig {
                size,
                ttl: Duration::from_secs(60),
            },
        )]);
        History::new(
            types,
            max_bytes,
            Duration::from_secs(600),
            2,
            Arc::new(JobMetrics::default()),
        )
    }

    fn msgs(from: u32, n: u32) -> Vec<(i32, Bytes)> {
        (from..from + n)
            .map(|i| (1000, Bytes::from(i.to_string())))
            .collect()
    }

    /// Appends and returns the position the batch was sent with.
    fn append(h: &History, room: &str, m: &[(i32, Bytes)]) -> Option<(String, u64)> {
        h.append(room, m, |p| p.map(|(e, o)| (e.to_string(), o)))
    }

    fn bodies(r: &HistoryReply) -> Vec<String> {
        raw_packets(r.batch.clone())
            .map(|p| String::from_utf8(p.body.to_vec()).unwrap())
            .collect()
    }

    fn req(room: &str, epoch: &str, offset: u64) -> HistoryReq {
        HistoryReq {
            room: room.into(),
            epoch: epoch.into(),
            offset,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn offsets_count_up_by_one_and_a_reconnect_gets_what_it_missed() {
        let h = history(100, 1 << 20);
        let (epoch, first) = append(&h, "chat://1", &msgs(1, 3)).unwrap();
        assert_eq!(first, 1);
        assert_eq!(
            append(&h, "chat://1", &msgs(4, 2)).unwrap(),
            (epoch.clone(), 4)
        );
        // Saw up to 2: gets 3, 4, 5 in order.
        let r = h.since(&req("chat://1", &epoch, 2));
        assert!(r.recovered);
        assert_eq!((r.epoch.as_str(), r.offset), (epoch.as_str(), 5));
        assert_eq!(bodies(&r), ["3", "4", "5"]);
        // Saw everything: recovered, nothing to send.
        let r = h.since(&req("chat://1", &epoch, 5));
        assert!(r.recovered && r.batch.is_empty());
        // Another room is numbered on its own, under its own epoch.
        let (other, first) = append(&h, "chat://2", &msgs(1, 1)).unwrap();
        assert_eq!(first, 1);
        assert_ne!(other, epoch);
    }

    #[tokio::test(start_paused = true)]
    async fn what_cannot_be_recovered_is_said() {
        let h = history(3, 1 << 20);
        let (epoch, _) = append(&h, "chat://1", &msgs(1, 5)).unwrap();
        // Only 3, 4, 5 are kept: a client that saw 1 missed 2, which is gone.
        let r = h.since(&req("chat://1", &epoch, 1));
        assert!(!r.recovered);
        assert_eq!((r.epoch.as_str(), r.offset), (epoch.as_str(), 5));
        assert!(h.since(&req("chat://1", &epoch, 2)).recovered);
        // Another epoch (a restarted or different job numbered what the client saw).
        assert!(!h.since(&req("chat://1", "0000000000000000", 5)).recovered);
        // A position past the top is not one this job gave.
        assert!(!h.since(&req("chat://1", &epoch, 9)).recovered);
        // A room this job never numbered: not what the client saw, but it is numbered from
        // now on, so a client that joins now can recover from (epoch, 0) later.
        let r = h.since(&req("chat://9", &epoch, 1));
        assert!(!r.recovered && !r.epoch.is_empty() && r.offset == 0);
        let (e9, first) = append(&h, "chat://9", &msgs(1, 1)).unwrap();
        assert_eq!((e9.as_str(), first), (r.epoch.as_str(), 1));
        assert!(h.since(&req("chat://9", &r.epoch, 0)).recovered);
        // Rooms are bounded (2 here): a third one gets no position, counted.
        assert!(h.since(&req("chat://10", "", 0)).epoch.is_empty());
        assert_eq!(append(&h, "chat://11", &msgs(1, 1)), None);
        assert_eq!(h.metrics.history_full.get(), 2);
        // Expired with time.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!h.since(&req("chat://1", &epoch, 4)).recovered);
        assert!(h.since(&req("chat://1", &epoch, 5)).recovered, "saw it all");
    }

    #[tokio::test(start_paused = true)]
    async fn rooms_without_history_get_no_position() {
        let h = history(100, 1 << 20);
        assert_eq!(append(&h, "live://1", &msgs(1, 2)), None);
        assert_eq!(append(&h, "nocolon", &msgs(1, 2)), None);
        assert!(!h.since(&req("live://1", "", 0)).recovered);
    }

    #[tokio::test(start_paused = true)]
    async fn total_bytes_are_bounded_and_evictions_counted() {
        // Bodies "1".."9" are one byte each: at most 4 bytes in all.
        let h = history(100, 4);
        append(&h, "chat://1", &msgs(1, 3)).unwrap();
        append(&h, "chat://2", &msgs(4, 3)).unwrap();
        assert!(h.metrics.history_bytes.get() <= 4);
        assert!(h.metrics.history_evicted.get() >= 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_forgets_rooms_long_idle() {
        let h = history(100, 1 << 20);
        let (epoch, _) = append(&h, "chat://1", &msgs(1, 1)).unwrap();
        tokio::time::advance(Duration::from_secs(120)).await;
        h.sweep();
        // The message expired but the position is remembered.
        assert_eq!(h.metrics.history_bytes.get(), 0);
        assert!(h.since(&req("chat://1", &epoch, 1)).recovered);
        tokio::time::advance(Duration::from_secs(600)).await;
        h.sweep();
        assert_eq!(h.metrics.history_rooms.get(), 0);
        assert!(!h.since(&req("chat://1", &epoch, 1)).recovered);
    }
}
