//! goim job: takes pushes from logic and fans them out to the comets that hold the targets.
//! Room messages are packed into one `OpRaw` batch per flush; a flush happens as soon as the
//! room's queue is empty (goim waits up to 1 s), so batching adds no latency when idle and
//! grows with load.

pub mod etcd;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use goim_proto::comet::{BroadcastReq, BroadcastRoomReq, PushMsgReq};
use goim_proto::job::PushReply;
use goim_proto::logic::push_msg::Type as PushType;
use goim_proto::logic::PushMsg;
use goim_proto::op;
use goim_proto::packet::{Packet, SERVER_VER};
use goim_proto::protocol::Proto;
use goim_proto::service::{CometService, JobService};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tonic::Status;

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
    /// Longest a call to one comet may take; a dead comet then costs the others this much
    /// at most, and the push is counted undeliverable for it.
    #[serde(with = "humantime_serde")]
    pub comet_timeout: Duration,
    /// A room's batcher exits after this long without messages (goim 15m).
    #[serde(with = "humantime_serde")]
    pub room_idle: Duration,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            room_batch: 20,
            room_batch_bytes: 64 * 1024,
            room_queue: 1024,
            room_linger: Duration::ZERO,
            comet_timeout: Duration::from_secs(5),
            room_idle: Duration::from_secs(60),
        }
    }
}

/// Where job finds comets: by server name, or all of them.
pub trait CometDirectory: Send + Sync + 'static {
    fn get(&self, name: &str) -> Option<Arc<dyn CometService>>;
    fn all(&self) -> Vec<(String, Arc<dyn CometService>)>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct JobMetrics {
    /// Calls made to comets, by kind.
    pub comet_calls: Family<Reason, Counter>,
    /// Pushes that reached no comet, by reason (`unknown_comet`, `no_comets`, `comet_error`).
    pub undeliverable: Family<Reason, Counter>,
    /// Room batches sent, and the messages in them.
    pub room_batches: Counter,
    pub room_messages: Counter,
}

impl JobMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("goim_job");
        r.register("comet_calls", "Calls to comets", self.comet_calls.clone());
        r.register(
            "undeliverable",
            "Pushes or comet calls that failed",
            self.undeliverable.clone(),
        );
        r.register(
            "room_batches",
            "Room batches flushed",
            self.room_batches.clone(),
        );
        r.register(
            "room_messages",
            "Room messages flushed",
            self.room_messages.clone(),
        );
    }

    fn undeliverable(&self, reason: &'static str) {
        self.undeliverable.get_or_create(&Reason { reason }).inc();
    }

    fn call(&self, reason: &'static str) {
        self.comet_calls.get_or_create(&Reason { reason }).inc();
    }
}

/// A room message waiting for its batch.
struct RoomMsg {
    op: i32,
    msg: Bytes,
}

struct Inner {
    cfg: JobConfig,
    comets: Arc<dyn CometDirectory>,
    metrics: Arc<JobMetrics>,
    rooms: Mutex<HashMap<String, mpsc::Sender<RoomMsg>>>,
}

#[derive(Clone)]
pub struct Job {
    inner: Arc<Inner>,
}

/// A single push pre-encoded as goim's job does: one packet inside an `OpRaw` proto.
fn raw_single(operation: i32, msg: Bytes) -> Proto {
    Proto {
        ver: SERVER_VER as i32,
        op: op::RAW,
        seq: 0,
        body: Packet::new(SERVER_VER, operation, 0, msg).encode(),
    }
}

impl Job {
    pub fn new(cfg: JobConfig, comets: Arc<dyn CometDirectory>, metrics: Arc<JobMetrics>) -> Self {
        Job {
            inner: Arc::new(Inner {
                cfg,
                comets,
                metrics,
                rooms: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn push_keys(&self, m: PushMsg) -> Result<(), Status> {
        let inner = &self.inner;
        let Some(comet) = inner.comets.get(&m.server) else {
            // The comet went away between logic's lookup and now (goim drops silently).
            inner.metrics.undeliverable("unknown_comet");
            tracing::debug!(server = %m.server, "push for unknown comet dropped");
            return Ok(());
        };
        let req = PushMsgReq {
            keys: m.keys,
            proto_op: m.operation,
            proto: Some(raw_single(m.operation, m.msg)),
            mids: m.mids,
        };
        inner.metrics.call("push");
        match tokio::time::timeout(inner.cfg.comet_timeout, comet.push_msg(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                inner.metrics.undeliverable("comet_error");
                tracing::warn!(server = %m.server, error = %e, "push to comet failed");
            }
            Err(_) => {
                inner.metrics.undeliverable("comet_error");
                tracing::warn!(server = %m.server, "push to comet timed out");
            }
        }
        Ok(())
    }

    async fn broadcast(&self, m: PushMsg) -> Result<(), Status> {
        let inner = &self.inner;
        let comets = inner.comets.all();
        if comets.is_empty() {
            // goim divides by zero here.
            inner.metrics.undeliverable("no_comets");
            return Ok(());
        }
        // `speed` is for the whole cluster; each comet paces its share, at least 1/s.
        let speed = if m.speed > 0 {
            (m.speed / comets.len() as i32).max(1)
        } else {
            0
        };
        let proto = raw_single(m.operation, m.msg);
        let op = m.operation;
        to_all(inner, "broadcast", |comet| {
            let req = BroadcastReq {
                proto_op: op,
                proto: Some(proto.clone()),
                speed,
            };
            async move { comet.broadcast(req).await.map(|_| ()) }
        })
        .await;
        Ok(())
    }

    /// Hands a room message to the room's batcher, starting one if needed. Waits when the
    /// room's queue is full, so an accepted push is never dropped here (goim drops at 40).
    async fn push_room(&self, m: PushMsg) -> Result<(), Status> {
        if m.room.is_empty() {
            return Err(Status::invalid_argument("room push without a room"));
        }
        let mut msg = RoomMsg {
            op: m.operation,
            msg: m.msg,
        };
        loop {
            let tx = {
                let mut rooms = self.inner.rooms.lock().unwrap_or_else(|e| e.into_inner());
                match rooms.get(&m.room) {
                    Some(tx) => tx.clone(),
                    None => {
                        let (tx, rx) = mpsc::channel(self.inner.cfg.room_queue.max(1));
                        rooms.insert(m.room.clone(), tx.clone());
                        tokio::spawn(room_batcher(self.inner.clone(), m.room.clone(), rx));
                        tx
                    }
                }
            };
            match tx.send(msg).await {
                Ok(()) => return Ok(()),
                // The batcher retired between our lookup and the send: start a new one.
                Err(mpsc::error::SendError(back)) => msg = back,
            }
        }
    }
}

/// One room's batcher: takes what is queued (up to the batch bounds), sends it to every comet
/// as one raw batch, repeats. Retires after `room_idle` without messages.
async fn room_batcher(inner: Arc<Inner>, room: String, mut rx: mpsc::Receiver<RoomMsg>) {
    let cfg = &inner.cfg;
    loop {
        let first = match tokio::time::timeout(cfg.room_idle, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(_) => {
                // Retire only if nothing raced in; senders that lose the race retry.
                let retired = {
                    let mut rooms = inner.rooms.lock().unwrap_or_else(|e| e.into_inner());
                    let idle = rx.is_empty();
                    if idle {
                        rooms.remove(&room);
                        rx.close();
                    }
                    idle
                };
                if retired {
                    // Anything sent before the close is still flushed, never lost here.
                    while let Ok(m) = rx.try_recv() {
                        flush(&inner, &room, vec![m]).await;
                    }
                    return;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].msg.len();
        if !cfg.room_linger.is_zero() {
            let deadline = tokio::time::Instant::now() + cfg.room_linger;
            while batch.len() < cfg.room_batch && bytes < cfg.room_batch_bytes {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => {
                        bytes += m.msg.len();
                        batch.push(m);
                    }
                    _ => break,
                }
            }
        }
        while batch.len() < cfg.room_batch && bytes < cfg.room_batch_bytes {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.msg.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        flush(&inner, &room, batch).await;
    }
}

/// Calls every comet at once, each bounded by `comet_timeout`, and waits for all, so one
/// slow or dead comet neither delays the others' next batch nor reorders anything.
async fn to_all<F, Fut>(inner: &Inner, kind: &'static str, call: F)
where
    F: Fn(Arc<dyn CometService>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>> + Send + 'static,
{
    let comets = inner.comets.all();
    if comets.is_empty() {
        inner.metrics.undeliverable("no_comets");
        return;
    }
    let mut set = tokio::task::JoinSet::new();
    for (name, comet) in comets {
        inner.metrics.call(kind);
        let fut = tokio::time::timeout(inner.cfg.comet_timeout, call(comet));
        set.spawn(async move { (name, fut.await) });
    }
    while let Some(done) = set.join_next().await {
        let Ok((name, r)) = done else { continue };
        let err = match r {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        inner.metrics.undeliverable("comet_error");
        tracing::warn!(server = %name, kind, error = %err, "call to comet failed");
    }
}

async fn flush(inner: &Inner, room: &str, batch: Vec<RoomMsg>) {
    let size: usize = batch.iter().map(|m| 16 + m.msg.len()).sum();
    let mut buf = BytesMut::with_capacity(size);
    for m in &batch {
        Packet::new(SERVER_VER, m.op, 0, m.msg.clone()).encode_into(&mut buf);
    }
    inner.metrics.room_batches.inc();
    inner.metrics.room_messages.inc_by(batch.len() as u64);
    let proto = Proto {
        ver: SERVER_VER as i32,
        op: op::RAW,
        seq: 0,
        body: buf.freeze(),
    };
    let room = room.to_string();
    to_all(inner, "room", |comet| {
        let req = BroadcastRoomReq {
            room_id: room.clone(),
            proto: Some(proto.clone()),
        };
        async move { comet.broadcast_room(req).await.map(|_| ()) }
    })
    .await;
}

#[async_trait]
impl JobService for Job {
    async fn push(&self, m: PushMsg) -> Result<PushReply, Status> {
        match PushType::try_from(m.r#type) {
            Ok(PushType::Push) => self.push_keys(m).await?,
            Ok(PushType::Room) => self.push_room(m).await?,
            Ok(PushType::Broadcast) => self.broadcast(m).await?,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown push type {}",
                    m.r#type
                )))
            }
        }
        Ok(PushReply {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_proto::comet::{
        BroadcastReply, BroadcastRoomReply, PushMsgReply, RoomsReply, RoomsReq,
    };
    use goim_proto::packet::raw_packets;

    /// Records what job sends; unit tests may mock the comet.
    #[derive(Default)]
    struct Recorder {
        rooms: Mutex<Vec<BroadcastRoomReq>>,
        pushes: Mutex<Vec<PushMsgReq>>,
        broadcasts: Mutex<Vec<BroadcastReq>>,
        room_sent: tokio::sync::Notify,
    }

    #[async_trait]
    impl CometService for Recorder {
        async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, Status> {
            self.pushes.lock().unwrap().push(req);
            Ok(PushMsgReply {})
        }
        async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, Status> {
            self.broadcasts.lock().unwrap().push(req);
            Ok(BroadcastReply {})
        }
        async fn broadcast_room(
            &self,
            req: BroadcastRoomReq,
        ) -> Result<BroadcastRoomReply, Status> {
            self.rooms.lock().unwrap().push(req);
            self.room_sent.notify_one();
            Ok(BroadcastRoomReply {})
        }
        async fn rooms(&self, _: RoomsReq) -> Result<RoomsReply, Status> {
            Ok(RoomsReply::default())
        }
    }

    struct Dir(Vec<(String, Arc<Recorder>)>);
    impl CometDirectory for Dir {
        fn get(&self, name: &str) -> Option<Arc<dyn CometService>> {
            self.0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c.clone() as Arc<dyn CometService>)
        }
        fn all(&self) -> Vec<(String, Arc<dyn CometService>)> {
            self.0
                .iter()
                .map(|(n, c)| (n.clone(), c.clone() as Arc<dyn CometService>))
                .collect()
        }
    }

    fn job(comets: usize) -> (Job, Vec<Arc<Recorder>>, Arc<JobMetrics>) {
        let recs: Vec<_> = (0..comets).map(|_| Arc::new(Recorder::default())).collect();
        let dir = Dir(recs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("c{i}"), r.clone()))
            .collect());
        let metrics = Arc::new(JobMetrics::default());
        (
            Job::new(JobConfig::default(), Arc::new(dir), metrics.clone()),
            recs,
            metrics,
        )
    }

    fn msg(t: PushType) -> PushMsg {
        PushMsg {
            r#type: t as i32,
            operation: 1000,
            msg: Bytes::from_static(b"{\"test\":1}"),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn key_push_goes_to_its_comet_only() {
        let (job, recs, metrics) = job(2);
        let mut m = msg(PushType::Push);
        m.server = "c1".into();
        m.keys = vec!["k".into()];
        job.push(m.clone()).await.unwrap();
        assert!(recs[0].pushes.lock().unwrap().is_empty());
        let sent = recs[1].pushes.lock().unwrap().pop().unwrap();
        assert_eq!((sent.keys, sent.proto_op), (vec!["k".to_string()], 1000));
        let proto = sent.proto.unwrap();
        assert_eq!(proto.op, op::RAW);
        let inner: Vec<_> = raw_packets(proto.body).collect();
        assert_eq!(inner, vec![Packet::new(1, 1000, 0, &b"{\"test\":1}"[..])]);
        m.server = "gone".into();
        job.push(m).await.unwrap();
        assert_eq!(
            metrics
                .undeliverable
                .get_or_create(&Reason {
                    reason: "unknown_comet"
                })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn broadcast_splits_speed_and_survives_zero_comets() {
        let (job, recs, _) = job(2);
        let mut m = msg(PushType::Broadcast);
        m.speed = 10;
        job.push(m.clone()).await.unwrap();
        for r in &recs {
            assert_eq!(r.broadcasts.lock().unwrap()[0].speed, 5);
        }
        let (job, _, metrics) = self::job(0);
        job.push(m).await.unwrap();
        assert_eq!(
            metrics
                .undeliverable
                .get_or_create(&Reason {
                    reason: "no_comets"
                })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn room_messages_keep_order_and_batch() {
        let (job, recs, _) = job(1);
        for i in 0..50 {
            let mut m = msg(PushType::Room);
            m.room = "live://1".into();
            m.msg = Bytes::from(format!("{i}"));
            job.push(m).await.unwrap();
        }
        let mut got: Vec<String> = Vec::new();
        while got.len() < 50 {
            let notified = recs[0].room_sent.notified();
            let batches: Vec<_> = std::mem::take(&mut *recs[0].rooms.lock().unwrap());
            for b in batches {
                assert_eq!(b.room_id, "live://1");
                let packets: Vec<_> = raw_packets(b.proto.unwrap().body).collect();
                assert!(!packets.is_empty() && packets.len() <= 20);
                got.extend(
                    packets
                        .iter()
                        .map(|p| String::from_utf8(p.body.to_vec()).unwrap()),
                );
            }
            if got.len() < 50 {
                notified.await;
            }
        }
        let want: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn unknown_type_is_refused() {
        let (job, _, _) = job(1);
        let mut m = msg(PushType::Push);
        m.r#type = 9;
        assert_eq!(
            job.push(m).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
