//! goim job: takes pushes from logic and fans them out to the comets that hold the targets.
//! Room messages are batched per room ([`rooms`]); every comet has its own bounded delivery
//! queue ([`outbox`]), so a slow or dead comet delays and loses only its own deliveries. A
//! push is accepted (code 0 to logic) once it is queued in job's memory; what is lost after
//! that is counted by reason in `goim_job_undeliverable`.

pub mod etcd;
mod history;
mod metrics;
mod outbox;
mod rooms;
pub mod routes;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use goim_discovery::Departures;
use goim_proto::comet::{BroadcastReq, PushMsgReq};
use goim_proto::job::PushReply;
use goim_proto::logic::push_msg::Type as PushType;
use goim_proto::logic::{HistoryReply, HistoryReq, PushMsg};
use goim_proto::op;
use goim_proto::packet::{Packet, SERVER_VER};
use goim_proto::protocol::Proto;
use goim_proto::service::{CometService, JobService};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tonic::Status;

pub use goim_config::{HistoryConfig, JobConfig};
use history::History;
pub use metrics::{JobMetrics, Reason};
use outbox::Delivery;
use rooms::RoomMsg;

pub use goim_proto::MAX_ID as MAX_ROOM_ID;

/// Where job finds comets: by server name, or all of them.
pub trait CometDirectory: Send + Sync + 'static {
    fn get(&self, name: &str) -> Option<Arc<dyn CometService>>;
    /// Every comet that takes deliveries now.
    fn names(&self) -> Vec<String>;
    /// Changes with the directory (`None`: it never changes).
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
    /// Which process serves `name` now (its etcd lease, say). A comet restarted under its
    /// name is another instance: what job knew of its predecessor's rooms is forgotten at
    /// once, not when the old watch's lease runs out. `None`: the directory cannot tell.
    fn instance(&self, _name: &str) -> Option<i64> {
        None
    }
}

pub(crate) struct Inner {
    cfg: JobConfig,
    comets: Arc<dyn CometDirectory>,
    metrics: Arc<JobMetrics>,
    rooms: Mutex<HashMap<String, mpsc::Sender<RoomMsg>>>,
    outboxes: Mutex<HashMap<String, mpsc::Sender<Delivery>>>,
    /// Comets the directory lists, and those it dropped within `unknown_comet_wait`: a comet
    /// that drops out for a moment (its lease lapsed during an etcd stall and it is
    /// re-registering) still gets room batches and broadcasts, delivered once it is back or
    /// counted. Follows every directory change, so a departure is timed when it happens.
    recent: Arc<Departures>,
    /// Which comets hold which rooms: a room batch goes only where it has members.
    pub(crate) routes: Arc<routes::Routes>,
    /// Follows the comets' rooms into `routes`; stopped with the job.
    _follower: tokio_util::sync::DropGuard,
    /// Positions and recent messages of rooms whose type keeps history.
    pub(crate) history: History,
    /// Room batchers, then comet queues: a drain waits for each in turn.
    room_tasks: TaskTracker,
    tasks: TaskTracker,
    draining: AtomicBool,
    /// Held (shared) by every push while it is being taken; a drain takes it exclusively
    /// after setting `draining`, so no push slips in behind the drain.
    taking: tokio::sync::RwLock<()>,
    /// Bumped by every push refused while draining: the job keeps answering (so logic
    /// retries elsewhere) until these stop.
    refused: watch::Sender<u64>,
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

/// For a task draining a queue that senders find by name in `map`: when nothing is queued,
/// closes the queue and removes its own entry (not a successor's), and returns true. Senders
/// that then find the queue closed start a new one; what they already sent is still received.
fn retire_if_idle<T>(
    map: &Mutex<HashMap<String, mpsc::Sender<T>>>,
    name: &str,
    rx: &mut mpsc::Receiver<T>,
    me: &mpsc::WeakSender<T>,
) -> bool {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if !rx.is_empty() {
        return false;
    }
    let mine = me.upgrade();
    if map
        .get(name)
        .zip(mine.as_ref())
        .is_some_and(|(tx, mine)| tx.same_channel(mine))
    {
        map.remove(name);
    }
    rx.close();
    true
}

impl Inner {
    /// The comets a room batch or broadcast goes to: those the directory lists, and those it
    /// listed within `unknown_comet_wait`.
    pub(crate) fn targets(&self) -> Vec<String> {
        self.recent.observe(self.comets.names())
    }
}

impl Job {
    /// This job's id under jobs/ in etcd: comets it watches wait for it before a new room's
    /// first member is let in (see `RoomsAck.job`).
    pub fn set_id(&self, id: &str) {
        self.inner.routes.set_job_id(id);
    }

    /// Call within a tokio runtime: a task follows the directory's changes.
    pub fn new(cfg: JobConfig, comets: Arc<dyn CometDirectory>, metrics: Arc<JobMetrics>) -> Self {
        let recent = Arc::new(Departures::new(cfg.unknown_comet_wait));
        if let Some(changes) = comets.changes() {
            let dir = comets.clone();
            Departures::follow(Arc::downgrade(&recent), changes, move || dir.names());
        }
        let history = History::new(
            cfg.history.clone(),
            cfg.history_bytes,
            cfg.history_meta_ttl,
            cfg.max_rooms,
            metrics.clone(),
        );
        let routes = Arc::new(routes::Routes::default());
        let stop = tokio_util::sync::CancellationToken::new();
        let follower = routes::follow_all(routes.clone(), comets.clone(), comets.changes());
        let token = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = follower => {}
                _ = token.cancelled() => {}
            }
        });
        let job = Job {
            inner: Arc::new(Inner {
                routes,
                _follower: stop.drop_guard(),
                history,
                cfg,
                comets,
                metrics,
                rooms: Mutex::new(HashMap::new()),
                outboxes: Mutex::new(HashMap::new()),
                recent,
                room_tasks: TaskTracker::new(),
                tasks: TaskTracker::new(),
                draining: AtomicBool::new(false),
                taking: tokio::sync::RwLock::new(()),
                refused: watch::channel(0).0,
            }),
        };
        job.inner.targets();
        // Expired history goes even from rooms nobody pushes to any more.
        let weak = Arc::downgrade(&job.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.history.sweep();
            }
        });
        job
    }

    fn push_keys(&self, m: PushMsg) {
        let req = PushMsgReq {
            keys: m.keys,
            proto_op: m.operation,
            proto: Some(raw_single(m.operation, m.msg)),
            mids: m.mids,
            kick: m.kick,
            ..Default::default()
        };
        self.inner.enqueue(&m.server, Delivery::Keys(req));
    }

    /// A push to one user (`user://{mid}`) or one of its connections (`key://{mid}/{key}`)
    /// whose messages are numbered: numbered once in that stream (and kept, when
    /// `[job.history.user]` says so), even with no connection to deliver to (the user may be
    /// reconnecting), then handed to the comet of each key with its position.
    fn push_user(&self, m: PushMsg) -> Result<(), Status> {
        let mid_of = |rest: &str| rest.split('/').next()?.parse::<i64>().ok();
        let stream_mid = m
            .stream
            .strip_prefix("user://")
            .or_else(|| m.stream.strip_prefix("key://"))
            .and_then(mid_of);
        let Some(stream_mid) = stream_mid.filter(|_| m.stream.len() <= MAX_ROOM_ID) else {
            return Err(Status::invalid_argument(format!(
                "a numbered push names a user://{{mid}} or key://{{mid}}/{{key}} stream of at most {MAX_ROOM_ID} bytes"
            )));
        };
        if m.servers.len() != m.keys.len() || m.mids.len() != m.keys.len() {
            return Err(Status::invalid_argument(
                "a numbered push names a comet and a user for every key",
            ));
        }
        let inner = &self.inner;
        let proto = raw_single(m.operation, m.msg.clone());
        let mid = stream_mid;
        inner.history.append_for_readers(
            &m.stream,
            &[(m.operation, m.msg)],
            |position, readers| {
                let (epoch, offset) =
                    position.map_or((String::new(), 0), |(e, o)| (e.to_string(), o));
                let mut by: BTreeMap<String, (Vec<String>, Vec<i64>)> = BTreeMap::new();
                for ((key, mid), server) in m.keys.into_iter().zip(m.mids).zip(m.servers) {
                    let e = by.entry(server).or_default();
                    e.0.push(key);
                    e.1.push(mid);
                }
                // Connections that recovered since the lookup, unless it found them.
                for r in readers {
                    let e = by.entry(r.server.to_string()).or_default();
                    if !e.0.iter().any(|k| **k == *r.key) {
                        e.0.push(r.key.to_string());
                        e.1.push(mid);
                    }
                }
                for (server, (keys, mids)) in by {
                    let req = PushMsgReq {
                        keys,
                        proto_op: m.operation,
                        proto: Some(proto.clone()),
                        mids,
                        stream: m.stream.clone(),
                        epoch: epoch.clone(),
                        offset,
                        kick: String::new(),
                    };
                    inner.enqueue(&server, Delivery::Keys(req));
                }
            },
        );
        Ok(())
    }

    fn broadcast(&self, m: PushMsg) {
        let inner = &self.inner;
        let comets = inner.targets();
        if comets.is_empty() {
            // goim divides by zero here.
            inner.metrics.undeliverable("no_comets", 1);
            return;
        }
        // `speed` is for the whole cluster; each comet paces its share, at least 1/s.
        let speed = if m.speed > 0 {
            (m.speed / comets.len() as i32).max(1)
        } else {
            0
        };
        let proto = raw_single(m.operation, m.msg);
        for name in comets {
            let req = BroadcastReq {
                proto_op: m.operation,
                proto: Some(proto.clone()),
                speed,
            };
            inner.enqueue(&name, Delivery::All(req));
        }
    }

    /// Stops taking pushes (logic sends them to another job) and delivers what is queued,
    /// for at most `drain_timeout`; what is still queued then is counted `job_shutdown`.
    /// Returns that count.
    pub async fn drain(&self) -> u64 {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + inner.cfg.drain_timeout;
        // Pushes already past the draining check finish being taken first.
        let _ = tokio::time::timeout_at(deadline, inner.taking.write()).await;
        // Dropping the room senders lets every batcher flush what it holds and end; then
        // the comet queues get the same.
        inner
            .rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        inner.room_tasks.close();
        let _ = tokio::time::timeout_at(deadline, inner.room_tasks.wait()).await;
        inner
            .outboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        inner.tasks.close();
        let _ = tokio::time::timeout_at(deadline, inner.tasks.wait()).await;
        let left = inner.metrics.queued.get().max(0) as u64;
        inner.metrics.undeliverable("job_shutdown", left);
        if left > 0 {
            tracing::warn!(left, "drain deadline passed with deliveries queued");
        }
        left
    }

    /// After [`Job::drain`]: returns once no push was refused for `quiet` (logic has seen
    /// this job leave the ring), or at `limit`. Closing while logic still sends here would
    /// break calls in flight, which logic cannot safely retry elsewhere; a refused one it can.
    pub async fn wait_quiet(&self, quiet: Duration, limit: Duration) {
        let mut refused = self.inner.refused.subscribe();
        let _ = tokio::time::timeout(limit, async {
            while let Ok(Ok(())) = tokio::time::timeout(quiet, refused.changed()).await {}
        })
        .await;
    }
}

#[async_trait]
impl JobService for Job {
    async fn push(&self, m: PushMsg) -> Result<PushReply, Status> {
        let _taking = self.inner.taking.read().await;
        if self.inner.draining.load(Ordering::SeqCst) {
            // Nothing was taken: logic tries another job.
            self.inner.refused.send_modify(|n| *n += 1);
            return Err(Status::unavailable("job is draining"));
        }
        match PushType::try_from(m.r#type) {
            Ok(PushType::Push) if !m.stream.is_empty() => self.push_user(m)?,
            Ok(PushType::Push) => self.push_keys(m),
            Ok(PushType::Room) => {
                if m.room.is_empty() || m.room.len() > MAX_ROOM_ID {
                    return Err(Status::invalid_argument(format!(
                        "room push needs a room id of 1 to {MAX_ROOM_ID} bytes"
                    )));
                }
                // Numbered user and key streams live under user:// and key://: no room may
                // write there.
                if m.room.starts_with("user://") || m.room.starts_with("key://") {
                    return Err(Status::invalid_argument(
                        "room types user and key are reserved",
                    ));
                }
                let msg = RoomMsg {
                    op: m.operation,
                    msg: m.msg,
                };
                self.inner.push_room(&m.room, msg).await?
            }
            Ok(PushType::Broadcast) => self.broadcast(m),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown push type {}",
                    m.r#type
                )))
            }
        }
        Ok(PushReply {})
    }

    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, Status> {
        // A draining job numbers nothing more: the next job on the ring does, under its own
        // epoch, and answers for the room.
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("job is draining"));
        }
        if req.room.is_empty() || req.room.len() > MAX_ROOM_ID {
            return Err(Status::invalid_argument(format!(
                "history needs a room id of 1 to {MAX_ROOM_ID} bytes"
            )));
        }
        Ok(self.inner.history.since(&req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_proto::comet::{
        BroadcastReply, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgsReply,
        PushMsgsReq, RoomsReply, RoomsReq,
    };
    use goim_proto::packet::raw_packets;
    use tokio::sync::Notify;

    /// Records what job sends; unit tests may mock the comet. A `stalled` comet never
    /// answers (a dead pod whose connection hangs).
    #[derive(Default)]
    struct Recorder {
        rooms: Mutex<Vec<BroadcastRoomReq>>,
        pushes: Mutex<Vec<PushMsgReq>>,
        broadcasts: Mutex<Vec<BroadcastReq>>,
        /// Every call in the order it came: `push k`, `pushes k1,k2`, `broadcast`.
        calls: Mutex<Vec<String>>,
        sent: Notify,
        stalled: bool,
        /// When set, each call waits for a permit before answering.
        gate: Option<tokio::sync::Semaphore>,
    }

    impl Recorder {
        async fn answer(&self) {
            if self.stalled {
                std::future::pending::<()>().await;
            }
            if let Some(g) = &self.gate {
                g.acquire().await.unwrap().forget();
            }
            self.sent.notify_waiters();
        }
    }

    #[async_trait]
    impl CometService for Recorder {
        async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, Status> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("push {}", req.keys.join(",")));
            self.pushes.lock().unwrap().push(req);
            self.answer().await;
            Ok(PushMsgReply {})
        }
        async fn push_msgs(&self, req: PushMsgsReq) -> Result<PushMsgsReply, Status> {
            let keys: Vec<String> = req.pushes.iter().map(|p| p.keys.join("+")).collect();
            self.calls
                .lock()
                .unwrap()
                .push(format!("pushes {}", keys.join(",")));
            self.pushes.lock().unwrap().extend(req.pushes);
            self.answer().await;
            Ok(PushMsgsReply { refused: 0 })
        }
        async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, Status> {
            self.calls.lock().unwrap().push("broadcast".into());
            self.broadcasts.lock().unwrap().push(req);
            self.answer().await;
            Ok(BroadcastReply {})
        }
        async fn broadcast_room(
            &self,
            req: BroadcastRoomReq,
        ) -> Result<BroadcastRoomReply, Status> {
            self.rooms.lock().unwrap().push(req);
            self.answer().await;
            Ok(BroadcastRoomReply {})
        }
        async fn rooms(&self, _: RoomsReq) -> Result<RoomsReply, Status> {
            Ok(RoomsReply::default())
        }
    }

    /// Comets by name; `late` ones appear only when `arrive` is called.
    struct Dir {
        comets: Mutex<Vec<(String, Arc<Recorder>)>>,
        changes: watch::Sender<u64>,
    }

    impl Dir {
        fn arrive(&self, name: &str, r: Arc<Recorder>) {
            self.comets.lock().unwrap().push((name.to_string(), r));
            self.changes.send_modify(|v| *v += 1);
        }

        fn leave(&self, name: &str) -> Arc<Recorder> {
            let mut comets = self.comets.lock().unwrap();
            let i = comets.iter().position(|(n, _)| n == name).unwrap();
            let (_, r) = comets.remove(i);
            self.changes.send_modify(|v| *v += 1);
            r
        }
    }

    impl CometDirectory for Dir {
        fn get(&self, name: &str) -> Option<Arc<dyn CometService>> {
            self.comets
                .lock()
                .unwrap()
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c.clone() as Arc<dyn CometService>)
        }
        fn names(&self) -> Vec<String> {
            self.comets
                .lock()
                .unwrap()
                .iter()
                .map(|(n, _)| n.clone())
                .collect()
        }
        fn changes(&self) -> Option<watch::Receiver<u64>> {
            Some(self.changes.subscribe())
        }
    }

    struct Fixture {
        job: Job,
        recs: Vec<Arc<Recorder>>,
        metrics: Arc<JobMetrics>,
        dir: Arc<Dir>,
    }

    fn job_with(cfg: JobConfig, recs: Vec<Recorder>) -> Fixture {
        let recs: Vec<Arc<Recorder>> = recs.into_iter().map(Arc::new).collect();
        let dir = Arc::new(Dir {
            comets: Mutex::new(
                recs.iter()
                    .enumerate()
                    .map(|(i, r)| (format!("c{i}"), r.clone()))
                    .collect(),
            ),
            changes: watch::channel(0).0,
        });
        let metrics = Arc::new(JobMetrics::default());
        Fixture {
            job: Job::new(cfg, dir.clone(), metrics.clone()),
            recs,
            metrics,
            dir,
        }
    }

    fn job(comets: usize) -> Fixture {
        job_with(
            JobConfig::default(),
            (0..comets).map(|_| Recorder::default()).collect(),
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

    /// Waits until `f` holds, re-checking whenever `rec` answers a call.
    async fn until(rec: &Recorder, f: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let next = rec.sent.notified();
                if f() {
                    return;
                }
                next.await;
            }
        })
        .await
        .expect("condition not reached");
    }

    /// Waits for a metric that an outbox updates without calling a comet.
    async fn metric(f: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("metric not reached");
    }

    #[tokio::test]
    async fn key_push_goes_to_its_comet_only() {
        let f = job(2);
        let mut m = msg(PushType::Push);
        m.server = "c1".into();
        m.keys = vec!["k".into()];
        m.mids = vec![7];
        f.job.push(m.clone()).await.unwrap();
        until(&f.recs[1], || !f.recs[1].pushes.lock().unwrap().is_empty()).await;
        assert!(f.recs[0].pushes.lock().unwrap().is_empty());
        let sent = f.recs[1].pushes.lock().unwrap().pop().unwrap();
        assert_eq!(
            (sent.keys, sent.proto_op, sent.mids),
            (vec!["k".to_string()], 1000, vec![7])
        );
        let proto = sent.proto.unwrap();
        assert_eq!(proto.op, op::RAW);
        let inner: Vec<_> = raw_packets(proto.body).collect();
        assert_eq!(inner, vec![Packet::new(1, 1000, 0, &b"{\"test\":1}"[..])]);
    }

    /// A draining job keeps answering while pushes still arrive (each refused, so logic
    /// retries it on another job) and lets go only once they stop.
    #[tokio::test(start_paused = true)]
    async fn a_drained_job_waits_until_pushes_stop_arriving() {
        let f = job(1);
        f.job.drain().await;
        let pusher = {
            let job = f.job.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let e = job.push(msg(PushType::Broadcast)).await.unwrap_err();
                    assert_eq!(e.message(), "job is draining");
                }
            })
        };
        let started = tokio::time::Instant::now();
        f.job
            .wait_quiet(Duration::from_millis(300), Duration::from_secs(10))
            .await;
        assert!(pusher.is_finished(), "returned while pushes still arrived");
        assert_eq!(*f.job.inner.refused.borrow(), 5);
        // The last refusal came at 500 ms; quiet 300 ms after it.
        assert_eq!(started.elapsed(), Duration::from_millis(800));
        // Pushes that never stop: the limit ends the wait.
        let endless = {
            let job = f.job.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = job.push(msg(PushType::Broadcast)).await;
                }
            })
        };
        let started = tokio::time::Instant::now();
        f.job
            .wait_quiet(Duration::from_millis(300), Duration::from_secs(2))
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        endless.abort();
    }

    /// Key pushes that queue up behind a call in flight go to their comet in one call, in
    /// order; a delivery of another kind between them keeps its place.
    #[tokio::test]
    async fn queued_key_pushes_go_in_one_call_in_order() {
        let gated = Recorder {
            gate: Some(tokio::sync::Semaphore::new(0)),
            ..Default::default()
        };
        let f = job_with(JobConfig::default(), vec![gated]);
        let rec = &f.recs[0];
        let key = |k: &str| {
            let mut m = msg(PushType::Push);
            m.server = "c0".into();
            m.keys = vec![k.into()];
            m.mids = vec![7];
            m
        };
        f.job.push(key("k1")).await.unwrap();
        // k1's call is in flight (held by the gate) before the rest is queued.
        metric(|| rec.calls.lock().unwrap().len() == 1).await;
        for k in ["k2", "k3"] {
            f.job.push(key(k)).await.unwrap();
        }
        f.job.push(msg(PushType::Broadcast)).await.unwrap();
        for k in ["k4", "k5", "k6"] {
            f.job.push(key(k)).await.unwrap();
        }
        rec.gate.as_ref().unwrap().add_permits(100);
        until(rec, || rec.pushes.lock().unwrap().len() == 6).await;
        assert_eq!(
            *rec.calls.lock().unwrap(),
            ["push k1", "pushes k2,k3", "broadcast", "pushes k4,k5,k6"]
        );
        let keys: Vec<String> = rec
            .pushes
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.keys.join(","))
            .collect();
        assert_eq!(keys, ["k1", "k2", "k3", "k4", "k5", "k6"]);
        assert_eq!(f.metrics.undeliverable_count("comet_refused"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_to_an_unknown_comet_waits_for_it_then_is_counted() {
        let f = job(1);
        let mut m = msg(PushType::Push);
        m.keys = vec!["k".into()];
        // A comet whose record reaches job a moment after the push: delivered.
        m.server = "late".into();
        f.job.push(m.clone()).await.unwrap();
        let late = Arc::new(Recorder::default());
        f.dir.arrive("late", late.clone());
        until(&late, || late.pushes.lock().unwrap().len() == 1).await;
        // One that never shows up: counted once the wait is over.
        m.server = "gone".into();
        f.job.push(m).await.unwrap();
        metric(|| f.metrics.undeliverable_count("unknown_comet") == 1).await;
    }

    /// A comet that never answers delays only its own deliveries: the next room batches
    /// reach the healthy comet at once, and the stalled ones are counted when they time out.
    #[tokio::test(start_paused = true)]
    async fn a_dead_comet_stalls_only_itself() {
        let dead = Recorder {
            stalled: true,
            ..Default::default()
        };
        let f = job_with(JobConfig::default(), vec![dead, Recorder::default()]);
        for i in 0..3 {
            let mut m = msg(PushType::Room);
            m.room = format!("live://{i}");
            f.job.push(m).await.unwrap();
        }
        let healthy = &f.recs[1];
        until(healthy, || healthy.rooms.lock().unwrap().len() == 3).await;
        metric(|| f.metrics.undeliverable_count("comet_unreachable") == 3).await;
    }

    /// etcd stalls longer than the lease TTL: a comet's records vanish when it resumes and
    /// come back a moment later. A room push in between still reaches that comet, even when
    /// job saw no push for a long time before (it remembers when a comet dropped out, not
    /// when it last looked).
    #[tokio::test(start_paused = true)]
    async fn a_comet_that_lapses_for_a_moment_still_gets_room_batches() {
        let f = job(2);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let lapsed = f.dir.leave("c0");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut m = msg(PushType::Room);
        m.room = "live://1".into();
        f.job.push(m).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        f.dir.arrive("c0", lapsed.clone());
        until(&lapsed, || lapsed.rooms.lock().unwrap().len() == 1).await;
        let other = &f.recs[1];
        until(other, || other.rooms.lock().unwrap().len() == 1).await;
        assert_eq!(f.metrics.undeliverable_count("unknown_comet"), 0);
    }

    /// A push to a numbered user: one position for the message, whichever comets its keys
    /// are on; numbered (and kept) with no key at all, for the user's next recovery.
    #[tokio::test]
    async fn a_numbered_user_push_is_numbered_once_and_kept_while_offline() {
        let cfg = JobConfig {
            history: BTreeMap::from([("user".to_string(), HistoryConfig::default())]),
            ..Default::default()
        };
        let f = job_with(cfg, vec![Recorder::default(), Recorder::default()]);
        let mut m = msg(PushType::Push);
        m.stream = "user://7".into();
        m.keys = vec!["a".into(), "b".into(), "c".into()];
        m.mids = vec![7, 7, 7];
        m.servers = vec!["c0".into(), "c1".into(), "c0".into()];
        f.job.push(m.clone()).await.unwrap();
        for (r, keys) in f.recs.iter().zip([vec!["a", "c"], vec!["b"]]) {
            until(r, || !r.pushes.lock().unwrap().is_empty()).await;
            let got = r.pushes.lock().unwrap()[0].clone();
            assert_eq!(got.keys, keys);
            assert_eq!((got.stream.as_str(), got.offset), ("user://7", 1));
        }
        // Offline: nothing to deliver, numbered and kept all the same.
        m.keys.clear();
        m.mids.clear();
        m.servers.clear();
        f.job.push(m.clone()).await.unwrap();
        let epoch = f.recs[0].pushes.lock().unwrap()[0].epoch.clone();
        let h = f
            .job
            .history(HistoryReq {
                room: "user://7".into(),
                epoch,
                offset: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(h.recovered);
        assert_eq!(h.offset, 2);
        // Keys, users and comets must line up.
        m.keys = vec!["a".into()];
        assert_eq!(
            f.job.push(m).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// The race a recovering connection used to lose to: logic looked a user's keys up
    /// before the connection registered, the connection read the stream's history, then the
    /// job numbered the push (after what the history held) and sent it only where the lookup
    /// said. A push numbered after a history read now also goes to the reader's comet and
    /// key, once, while the read is recent.
    #[tokio::test]
    async fn a_push_numbered_after_a_history_read_reaches_the_reader() {
        let cfg = JobConfig {
            history: BTreeMap::from([("user".to_string(), HistoryConfig::default())]),
            ..Default::default()
        };
        let f = job_with(cfg, vec![Recorder::default(), Recorder::default()]);
        let h = f
            .job
            .history(HistoryReq {
                room: "user://7".into(),
                server: "c1".into(),
                key: "new".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(h.offset, 0);
        // The lookup saw only the old connection, on c0.
        let mut m = msg(PushType::Push);
        m.stream = "user://7".into();
        m.keys = vec!["old".into()];
        m.mids = vec![7];
        m.servers = vec!["c0".into()];
        f.job.push(m.clone()).await.unwrap();
        let r = &f.recs[1];
        until(r, || !r.pushes.lock().unwrap().is_empty()).await;
        let got = r.pushes.lock().unwrap()[0].clone();
        assert_eq!((got.keys, got.mids), (vec!["new".to_string()], vec![7]));
        assert_eq!((got.stream.as_str(), got.offset), ("user://7", 1));
        // A later lookup that found it: sent there once, not twice.
        m.keys = vec!["old".into(), "new".into()];
        m.mids = vec![7, 7];
        m.servers = vec!["c0".into(), "c1".into()];
        f.job.push(m).await.unwrap();
        until(r, || r.pushes.lock().unwrap().len() == 2).await;
        let got = r.pushes.lock().unwrap()[1].clone();
        assert_eq!((got.keys, got.offset), (vec!["new".to_string()], 2));
        let c0 = &f.recs[0];
        until(c0, || c0.pushes.lock().unwrap().len() == 2).await;
        assert_eq!(c0.pushes.lock().unwrap()[1].keys, vec!["old".to_string()]);
    }

    #[tokio::test]
    async fn broadcast_splits_speed_and_survives_zero_comets() {
        let f = job(2);
        let mut m = msg(PushType::Broadcast);
        m.speed = 10;
        f.job.push(m.clone()).await.unwrap();
        for r in &f.recs {
            until(r, || !r.broadcasts.lock().unwrap().is_empty()).await;
            assert_eq!(r.broadcasts.lock().unwrap()[0].speed, 5);
        }
        let none = job(0);
        none.job.push(m).await.unwrap();
        assert_eq!(none.metrics.undeliverable_count("no_comets"), 1);
    }

    #[tokio::test]
    async fn room_messages_keep_order_and_batch() {
        let f = job(1);
        for i in 0..50 {
            let mut m = msg(PushType::Room);
            m.room = "live://1".into();
            m.msg = Bytes::from(format!("{i}"));
            f.job.push(m).await.unwrap();
        }
        let rec = &f.recs[0];
        let count = || {
            rec.rooms
                .lock()
                .unwrap()
                .iter()
                .map(|b| raw_packets(b.proto.clone().unwrap().body).count())
                .sum::<usize>()
        };
        until(rec, || count() == 50).await;
        let mut got: Vec<String> = Vec::new();
        for b in rec.rooms.lock().unwrap().iter() {
            assert_eq!(b.room_id, "live://1");
            let packets: Vec<_> = raw_packets(b.proto.clone().unwrap().body).collect();
            assert!(!packets.is_empty() && packets.len() <= 20);
            got.extend(
                packets
                    .iter()
                    .map(|p| String::from_utf8(p.body.to_vec()).unwrap()),
            );
        }
        let want: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
    }

    /// Distinct room names cannot grow job without bound, and long ones are refused.
    #[tokio::test]
    async fn rooms_in_flight_are_bounded() {
        let cfg = JobConfig {
            max_rooms: 2,
            ..Default::default()
        };
        let stalled = Recorder {
            stalled: true,
            ..Default::default()
        };
        let f = job_with(cfg, vec![stalled]);
        let mut m = msg(PushType::Room);
        m.room = "x".repeat(MAX_ROOM_ID + 1);
        assert_eq!(
            f.job.push(m.clone()).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        // Room batchers retire once idle; until then, at most `max_rooms` live.
        let mut refused = 0;
        for i in 0..5 {
            m.room = format!("live://{i}");
            if let Err(e) = f.job.push(m.clone()).await {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                refused += 1;
            }
        }
        assert_eq!(refused, 3);
        assert!(f.metrics.rooms.get() <= 2);
        assert_eq!(f.metrics.undeliverable_count("too_many_rooms"), refused);
    }

    /// SIGTERM: pushes are refused (logic tries another job), what is queued is delivered,
    /// and what cannot be delivered by the deadline is counted.
    #[tokio::test(start_paused = true)]
    async fn drain_delivers_what_is_queued_and_counts_the_rest() {
        let stalled = Recorder {
            stalled: true,
            ..Default::default()
        };
        // Calls outlive the drain deadline: what is in flight then counts as lost too.
        let cfg = JobConfig {
            comet_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let f = job_with(cfg, vec![Recorder::default(), stalled]);
        for i in 0..10 {
            let mut m = msg(PushType::Room);
            m.room = "live://1".into();
            m.msg = Bytes::from(format!("{i}"));
            f.job.push(m).await.unwrap();
        }
        let left = f.job.drain().await;
        let ok = &f.recs[0];
        let delivered: usize = ok
            .rooms
            .lock()
            .unwrap()
            .iter()
            .map(|b| raw_packets(b.proto.clone().unwrap().body).count())
            .sum();
        assert_eq!(delivered, 10);
        // The stalled comet's deliveries were still in flight or queued at the deadline.
        assert!(left > 0);
        assert_eq!(f.metrics.undeliverable_count("comet_unreachable"), 0);
        assert_eq!(f.metrics.undeliverable_count("job_shutdown"), left);
        assert_eq!(
            f.job
                .push(msg(PushType::Broadcast))
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn unknown_type_is_refused() {
        let f = job(1);
        let mut m = msg(PushType::Push);
        m.r#type = 9;
        assert_eq!(
            f.job.push(m).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
