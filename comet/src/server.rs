//! The comet: buckets of connections, the push paths job calls, listeners and the background
//! loops (room counts to logic).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use goim_proto::comet::{
    BroadcastReply, BroadcastReq, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgReq,
    RoomsAck, RoomsReply, RoomsReq, RoomsUpdate,
};
use goim_proto::logic::OnlineReq;
use goim_proto::op;
use goim_proto::packet::{raw_packets, Header, SERVER_VER};
use goim_proto::protocol::Proto;
use goim_proto::service::{CometService, LogicService};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::bucket::{bucket_index, Bucket, Delivery, Shared};
use crate::channel::{Channel, Numbered, Outgoing};
use crate::conn;
use crate::connection::Transport;
use crate::metrics::CometMetrics;
use crate::room_watch::RoomHold;
use goim_config::CometConfig;

/// Fan-out work handed to a bucket's worker, so one room's or broadcast's messages reach each
/// connection in the order job sent them, and the shards of a big room run in parallel.
enum BucketJob {
    Room(Arc<str>, Outgoing, Option<Arc<Numbered>>),
    All(i32, Outgoing),
}

/// Connection and IP totals, as comets report their load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub conn_count: u64,
    pub ip_count: u64,
}

pub struct Comet {
    pub(crate) cfg: CometConfig,
    pub(crate) buckets: Arc<[Bucket]>,
    pub(crate) shared: Shared,
    pub(crate) logic: Arc<dyn LogicService>,
    pub(crate) metrics: Arc<CometMetrics>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    workers: Vec<mpsc::Sender<BucketJob>>,
    limit: Arc<Semaphore>,
    /// Connections per client address (`max_connections_per_ip`).
    pub(crate) per_ip: Arc<crate::per_ip::PerIp>,
    /// New connections per client address per second (`handshakes_per_ip_per_sec`).
    pub(crate) handshakes: crate::per_ip::HandshakeRate,
    /// Draining (the operator's record says so, or the comet is stopping): new clients are
    /// refused and the current ones closed evenly over `drain_period`. A watch, so the
    /// registry can publish it at once.
    draining: tokio::sync::watch::Sender<bool>,
    /// Stopping for good (SIGTERM): the drain cannot be called off.
    exiting: std::sync::atomic::AtomicBool,
    /// Distributed mode: no client is taken before the comet holds its etcd lease (a Connect
    /// naming no lease would hang its presence on one nobody renews).
    lease_required: std::sync::atomic::AtomicBool,
    /// The etcd lease this comet's state hangs on (distributed mode; 0 in standalone). Sent
    /// with Connect, Disconnect and RenewOnline so logic writes presence on it.
    lease: std::sync::atomic::AtomicI64,
    /// How long a drain lasts, in milliseconds: `drain_period` until the operator's record
    /// says otherwise (it changes without a restart).
    drain_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Comet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comet")
            .field("name", &self.cfg.name)
            .finish()
    }
}

/// How long before closing it a draining comet tells an extension client to reconnect.
const RECONNECT_LEAD: Duration = Duration::from_secs(1);

/// The longest drain (the operator's `drainSeconds` allows up to an hour): the value comes
/// from configuration or etcd, and the drain's deadline must not overflow.
const MAX_DRAIN: Duration = Duration::from_secs(3600);

fn bounded_drain(d: Duration) -> Duration {
    d.min(MAX_DRAIN)
}

fn drain_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A packet of one of the extension ops (docs/PROTOCOL.md), with a JSON body.
pub(crate) fn extension_packet(op: i32, seq: i32, ver: i16, body: &serde_json::Value) -> Outgoing {
    let body = body.to_string();
    Outgoing::Packet {
        header: Header::new(body.len(), ver, op, seq).encode(),
        body: body.into(),
    }
}

/// The user stream's name on the wire; job numbers it as `user://{mid}`.
pub(crate) const USER_STREAM: &str = "user";
/// The connection's own stream (pushes to its key) on the wire; job numbers it as
/// `key://{mid}/{key}`.
pub(crate) const KEY_STREAM: &str = "key";
/// Room types job numbers user and key streams under: no room may use them.
pub(crate) fn reserved_type(typ: &str) -> bool {
    typ == "user" || typ == "key"
}

/// The numbering of `count` messages of `stream` from `offset`, with its `POSITION` packet.
pub(crate) fn numbered(stream: &str, epoch: &str, offset: u64, count: u64) -> Numbered {
    let body = serde_json::json!({
        "stream": stream,
        "epoch": epoch,
        "offset": offset,
        "count": count,
    });
    Numbered {
        stream: stream.into(),
        epoch: epoch.into(),
        offset,
        count,
        position: extension_packet(op::POSITION, 0, SERVER_VER, &body),
    }
}

/// Turns a job's `Proto` into what is queued: `OpRaw` bodies go out as they are.
pub fn outgoing(p: Proto) -> Outgoing {
    if p.op == op::RAW {
        Outgoing::Raw(p.body)
    } else {
        let header = Header::new(p.body.len(), p.ver as i16, p.op, p.seq).encode();
        Outgoing::Packet {
            header,
            body: p.body,
        }
    }
}

impl Comet {
    /// Builds a comet and starts its bucket workers. Needs a Tokio runtime.
    pub fn new(
        cfg: CometConfig,
        logic: Arc<dyn LogicService>,
        metrics: Arc<CometMetrics>,
    ) -> Arc<Comet> {
        let cfg = cfg.normalized();
        let buckets: Arc<[Bucket]> = (0..cfg.buckets).map(|_| Bucket::default()).collect();
        let mut workers = Vec::with_capacity(cfg.buckets);
        for i in 0..cfg.buckets {
            let (tx, mut rx) = mpsc::channel::<BucketJob>(cfg.bucket_queue);
            let (buckets, metrics, cap) = (buckets.clone(), metrics.clone(), cfg.push_queue);
            let direct_writes = cfg.direct_writes;
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    // Direct writes while this worker keeps up. With fan-out work waiting, the
                    // comet is loaded: queue, and each connection's task, running later,
                    // writes its whole backlog in one writev (fewer syscalls per delivery).
                    // Measured: writing directly even then costs 15 % more CPU per delivery.
                    let direct = direct_writes && rx.is_empty();
                    let d = match &job {
                        BucketJob::Room(room, out, numbered) => {
                            buckets[i].push_room(room, out, numbered.as_deref(), cap, direct)
                        }
                        BucketJob::All(op, out) => buckets[i].push_all(*op, out, cap, direct),
                    };
                    record(&metrics, d);
                }
            });
            workers.push(tx);
        }
        let cfg_drain = cfg.drain_period;
        Arc::new(Comet {
            per_ip: crate::per_ip::PerIp::new(cfg.max_connections_per_ip),
            handshakes: crate::per_ip::HandshakeRate::new(
                cfg.handshakes_per_ip_per_sec,
                cfg.handshakes_per_ip_burst,
            ),
            limit: Arc::new(Semaphore::new(
                cfg.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            cfg,
            buckets,
            shared: Shared {
                rooms: Arc::new(crate::rooms::Rooms::counting_drops(
                    metrics.room_watchers_dropped.clone(),
                    metrics.rooms_unwatched.clone(),
                )),
                ips: Default::default(),
            },
            logic,
            metrics,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            workers,
            draining: tokio::sync::watch::channel(false).0,
            exiting: Default::default(),
            lease_required: Default::default(),
            lease: Default::default(),
            drain_ms: std::sync::atomic::AtomicU64::new(drain_millis(bounded_drain(cfg_drain))),
        })
    }

    /// How long a drain lasts now.
    pub fn drain_period(&self) -> Duration {
        Duration::from_millis(self.drain_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A new drain time (the operator's record); a drain under way keeps its pace.
    pub fn set_drain_period(&self, d: Duration) {
        self.drain_ms.store(
            drain_millis(bounded_drain(d)),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &CometConfig {
        &self.cfg
    }

    pub(crate) fn bucket(&self, key: &str) -> &Bucket {
        &self.buckets[bucket_index(key, self.buckets.len())]
    }

    pub(crate) fn register(&self, ch: &Arc<Channel>, room: &str) {
        let dropped = self.bucket(&ch.key).put(ch, room, &self.shared);
        // What the connection this one replaced had not written yet.
        self.metrics.dropped("kicked", dropped);
    }

    pub(crate) fn unregister(&self, ch: &Arc<Channel>) {
        self.bucket(&ch.key).del(ch, &self.shared);
    }

    pub(crate) fn change_room(&self, ch: &Arc<Channel>, room: &str) {
        let before = ch.room().map(|r| r.id.clone());
        self.bucket(&ch.key)
            .change_room(ch, room, &self.shared.rooms);
        if before.as_deref() != Some(room) {
            if let Some(old) = before {
                self.room_event(ch, &old, false);
            }
            if !room.is_empty() {
                self.room_event(ch, room, true);
            }
        }
    }

    /// Holds `room` on this comet until the hold is dropped, once every job watching this
    /// comet's rooms routes it here: join it while holding, and a message pushed to the room
    /// after the client is told it joined reaches it.
    pub(crate) async fn announce_room(&self, room: &str) -> RoomHold {
        RoomHold::announce(&self.shared.rooms, room).await
    }

    /// Waits until every job watching this comet's rooms routes the rooms of a connection
    /// that joined them at auth (at once unless one of them just appeared). Unlike
    /// [`Comet::announce_room`], it waits after joining: the connection is registered at
    /// once, so pushes to its key find it, and room batches meanwhile queue behind the
    /// auth reply.
    pub(crate) async fn rooms_announced(&self, ch: &Channel) {
        let newest = ch
            .room()
            .into_iter()
            .chain(ch.extra_rooms())
            .map(|r| r.added)
            .max();
        let watchers = &self.shared.rooms.watchers;
        if let Some(seq) = newest.filter(|&s| !watchers.is_announced(s)) {
            // Boxed: rare, and inline it would grow every connection's task.
            Box::pin(watchers.announced(seq)).await;
        }
    }

    pub(crate) fn add_room(&self, ch: &Arc<Channel>, room: &str) -> Result<bool, &'static str> {
        let joined = self
            .bucket(&ch.key)
            .add_room(ch, room, &self.shared.rooms, self.cfg.max_extra_rooms)
            .map_err(|()| "too many rooms")?;
        if joined {
            self.room_event(ch, room, true);
        }
        Ok(joined)
    }

    pub(crate) fn remove_room(&self, ch: &Arc<Channel>, room: &str) -> bool {
        let left = self
            .bucket(&ch.key)
            .remove_room(ch, room, &self.shared.rooms);
        if left {
            self.room_event(ch, room, false);
        }
        left
    }

    /// Tells logic a connection joined or left a room (`room_events`), in the background:
    /// a room change never waits on it, and one lost is logged.
    fn room_event(&self, ch: &Arc<Channel>, room: &str, joined: bool) {
        if !self.cfg.room_events {
            return;
        }
        let req = goim_proto::logic::RoomEventReq {
            mid: ch.mid,
            key: ch.key.to_string(),
            server: self.cfg.name.clone(),
            room: room.to_string(),
            joined,
        };
        let logic = self.logic.clone();
        tokio::spawn(async move {
            if let Err(e) = logic.room_event(req).await {
                tracing::debug!(error = %e, "room event not delivered");
            }
        });
    }

    /// Current connection and distinct-IP counts.
    pub fn load(&self) -> Load {
        Load {
            conn_count: self.buckets.iter().map(|b| b.channel_count() as u64).sum(),
            ip_count: self.shared.ips.len() as u64,
        }
    }

    /// Accepts connections until shutdown. Each connection is its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, transport: Transport) {
        self.accept_loop(listener, transport, None).await
    }

    /// As [`Comet::serve`], each connection speaking TLS first (WSS, TCP over TLS); the
    /// certificates are the ones current at accept.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        transport: Transport,
        tls: Arc<goim_tls::ServerTls>,
    ) {
        self.accept_loop(listener, transport, Some(tls)).await
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        transport: Transport,
        tls: Option<Arc<goim_tls::ServerTls>>,
    ) {
        let mut backoff =
            goim_discovery::Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    if !backoff.wait(&self.shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            self.metrics.accepted.inc();
            if self.is_draining() {
                self.metrics.closed("draining");
                continue;
            }
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                self.metrics.closed("connection_limit");
                continue;
            };
            // Behind a PROXY-protocol balancer the address here is the balancer's: the
            // per-address limits wait for the header (conn::serve).
            let ip_slot = if self.cfg.proxy_protocol {
                None
            } else {
                match self.admit(peer.ip()) {
                    Ok(slot) => slot,
                    Err(reason) => {
                        self.metrics.closed(reason);
                        continue;
                    }
                }
            };
            let _ = stream.set_nodelay(true);
            let comet = self.clone();
            let tls = tls.as_ref().map(|t| t.config());
            self.tasks.spawn(async move {
                conn::serve(&comet, stream, peer, transport, tls).await;
                drop((permit, ip_slot));
            });
        }
    }

    /// The per-address limits for a new connection from `ip`: its connection slot, or the
    /// reason it is refused.
    pub(crate) fn admit(
        &self,
        ip: std::net::IpAddr,
    ) -> Result<Option<crate::per_ip::IpSlot>, &'static str> {
        if !self.handshakes.allow(ip, std::time::Instant::now()) {
            return Err("handshake_rate");
        }
        self.per_ip.take(ip).map_err(|()| "ip_limit")
    }

    /// Sends the local room counts to logic once and applies the cluster-wide counts it
    /// returns to heartbeat replies.
    pub async fn renew_online(&self) -> Result<(), Status> {
        let req = OnlineReq {
            server: self.cfg.name.clone(),
            room_count: self.shared.rooms.counts(),
            lease: self.lease(),
        };
        let reply = self.logic.renew_online(req).await?;
        self.shared.rooms.set_all(&reply.all_room_count);
        Ok(())
    }

    /// [`Comet::renew_online`] every `renew_interval`; after an error, again in 1 s as goim.
    pub async fn renew_online_loop(self: Arc<Self>) {
        loop {
            let wait = match self.renew_online().await {
                Ok(()) => self.cfg.renew_interval,
                Err(e) => {
                    tracing::warn!(error = %e, "renew online failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Stops accepting, closes every client (each tells logic it is gone) and waits for them.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        // Connections do not watch the token (that would cost every delivery a waiter on a
        // shared lock); each is closed through its own channel.
        for ch in self.buckets.iter().flat_map(|b| b.channels()) {
            self.metrics.dropped("shutdown", ch.close(false));
        }
        self.tasks.close();
        if tokio::time::timeout(self.cfg.shutdown_timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("connections still closing at the shutdown deadline were dropped");
        }
    }

    /// Whether a live connection holds `key` (as user `mid`, when given).
    pub fn holds(&self, key: &str, mid: Option<i64>) -> bool {
        self.bucket(key)
            .get(key)
            .is_some_and(|ch| mid.is_none_or(|m| m == ch.mid))
    }

    /// From now on, clients are refused while the comet holds no etcd lease.
    pub fn require_lease(&self) {
        self.lease_required
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a client may be authenticated now (see [`Comet::require_lease`]).
    pub(crate) fn can_take_clients(&self) -> bool {
        self.lease() != 0
            || !self
                .lease_required
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn lease(&self) -> i64 {
        self.lease.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_lease(&self, id: i64) {
        self.lease.store(id, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Changes of the drain state, for the registry to publish.
    pub fn draining_changes(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Draining: refuse new clients and close the current ones evenly over `drain_period`,
    /// so they reconnect elsewhere without a thundering herd. A drain for exit
    /// ([`Comet::drain_and_wait`]) cannot be called off.
    pub fn set_draining(self: &Arc<Self>, on: bool) {
        if !on && self.exiting.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let was = self.draining.send_replace(on);
        if !on || was {
            return;
        }
        tokio::spawn(self.clone().drain_clients());
    }

    /// Drains (as [`Comet::set_draining`]) and waits until no client is left or
    /// `drain_period` plus `grace` has passed; returns how many clients were still connected.
    pub async fn drain_and_wait(self: &Arc<Self>, grace: Duration) -> u64 {
        self.exiting
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.set_draining(true);
        let deadline = tokio::time::Instant::now() + self.drain_period() + grace;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            let left = self.load().conn_count;
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tick.tick().await;
        }
    }

    /// Closes every client evenly over `drain_period`. A client that speaks the extensions is
    /// told at once when to reconnect elsewhere ([`op::RECONNECT`]) and is closed
    /// `RECONNECT_LEAD` later, so it can connect to another comet before this one lets go.
    async fn drain_clients(self: Arc<Self>) {
        let chans: Vec<Arc<Channel>> = self.buckets.iter().flat_map(|b| b.channels()).collect();
        let n = chans.len().max(1) as u32;
        let period = self.drain_period();
        let lead = RECONNECT_LEAD.min(period / 2);
        let spread = period - lead;
        let start = tokio::time::Instant::now();
        let advice_at = |i: usize| spread * i as u32 / n;
        for (i, ch) in chans.iter().enumerate() {
            if ch.is_extended() {
                let body = serde_json::json!({
                    "reason": "drain",
                    "after_ms": advice_at(i).as_millis() as u64,
                });
                let out = extension_packet(op::RECONNECT, 0, SERVER_VER, &body);
                // Past the queue bound, like any push: advice is worth a slot.
                ch.offer(None, out, self.cfg.push_queue + 1, false);
            }
        }
        for (i, ch) in chans.iter().enumerate() {
            tokio::time::sleep_until(start + advice_at(i) + lead).await;
            if !self.is_draining() || self.shutdown.is_cancelled() {
                return;
            }
            self.metrics.dropped("drain", ch.close(false));
        }
    }

    /// In a cluster: the jobs registered in etcd (`None` until listed). A room's first member
    /// waits until each of them watches this comet's rooms.
    pub fn set_jobs(&self, jobs: Option<Vec<String>>) {
        self.shared.rooms.watchers.set_jobs(jobs);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    async fn to_buckets(&self, job: impl Fn() -> BucketJob) -> Result<(), Status> {
        for w in &self.workers {
            w.send(job())
                .await
                .map_err(|_| Status::unavailable("comet is shutting down"))?;
        }
        Ok(())
    }
}

fn record(metrics: &CometMetrics, d: Delivery) {
    metrics.pushes_queued.inc_by(d.queued);
    metrics.writes.inc_by(d.written);
    metrics.dropped("queue_full", d.dropped);
}

impl Comet {
    /// An admin kick (`PushMsgReq.kick`): each named connection (of `mids[i]` for `keys[i]`,
    /// when given) is told why, if it speaks the extensions, and closed.
    fn kick(&self, req: &PushMsgReq) -> PushMsgReply {
        let body = bytes::Bytes::from(serde_json::json!({ "reason": req.kick }).to_string());
        let (mut absent, mut wrong_user) = (0, 0);
        for (i, key) in req.keys.iter().enumerate() {
            match self.bucket(key).get(key) {
                Some(ch) if req.mids.get(i).is_some_and(|&mid| mid != ch.mid) => wrong_user += 1,
                Some(ch) => {
                    let notice = ch.is_extended().then(|| {
                        outgoing(Proto {
                            ver: 1,
                            op: op::KICKED,
                            seq: 0,
                            body: body.clone(),
                        })
                    });
                    ch.evict(notice);
                }
                None => absent += 1,
            }
        }
        if absent + wrong_user > 0 {
            tracing::debug!(absent, wrong_user, "kick: connections already gone");
        }
        PushMsgReply {}
    }
}

#[async_trait]
impl CometService for Comet {
    async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, Status> {
        if !req.kick.is_empty() {
            return Ok(self.kick(&req));
        }
        let Some(proto) = req.proto.filter(|_| !req.keys.is_empty()) else {
            return Err(Status::invalid_argument("rpc pushmsg arg error"));
        };
        if !req.mids.is_empty() && req.mids.len() != req.keys.len() {
            return Err(Status::invalid_argument(
                "rpc pushmsg: mids must be parallel to keys",
            ));
        }
        // A numbered push to a user: its position goes first to clients that speak the
        // extensions.
        let stream = if req.stream.starts_with("key://") {
            KEY_STREAM
        } else {
            USER_STREAM
        };
        let numbered = (req.offset > 0).then(|| numbered(stream, &req.epoch, req.offset, 1));
        let out = outgoing(proto);
        let mut d = Delivery::default();
        let (mut absent, mut wrong_user) = (0, 0);
        let cap = self.cfg.push_queue;
        // Unlike goim, a full queue on one key does not skip the remaining keys.
        for (i, key) in req.keys.iter().enumerate() {
            match self.bucket(key).get(key) {
                // A push to a user goes only to that user's connection: the key may have
                // been reused by another user since logic looked it up.
                Some(ch) if req.mids.get(i).is_some_and(|&mid| mid != ch.mid) => wrong_user += 1,
                Some(ch) => {
                    let op = Some(req.proto_op);
                    let direct = self.cfg.direct_writes;
                    d.add(ch.offer_numbered(&out, numbered.as_ref(), op, cap, direct))
                }
                None => absent += 1,
            }
        }
        record(&self.metrics, d);
        self.metrics.dropped("no_connection", absent);
        self.metrics.dropped("wrong_user", wrong_user);
        Ok(PushMsgReply {})
    }

    async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, Status> {
        let Some(proto) = req.proto else {
            return Err(Status::invalid_argument("rpc broadcast arg error"));
        };
        let out = outgoing(proto);
        let op = req.proto_op;
        if req.speed <= 0 {
            self.to_buckets(|| BucketJob::All(op, out.clone())).await?;
            return Ok(BroadcastReply {});
        }
        // Paced: about `speed` connections a second, one bucket at a time. goim sleeps whole
        // seconds per bucket; this keeps the fraction.
        let speed = req.speed as f64;
        let (buckets, metrics, cap) = (
            self.buckets.clone(),
            self.metrics.clone(),
            self.cfg.push_queue,
        );
        let (shutdown, direct) = (self.shutdown.clone(), self.cfg.direct_writes);
        tokio::spawn(async move {
            for b in buckets.iter() {
                let d = b.push_all(op, &out, cap, direct);
                record(&metrics, d);
                let pause = Duration::from_secs_f64(b.channel_count() as f64 / speed);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
        Ok(BroadcastReply {})
    }

    async fn broadcast_room(&self, req: BroadcastRoomReq) -> Result<BroadcastRoomReply, Status> {
        let Some(proto) = req.proto.filter(|_| !req.room_id.is_empty()) else {
            return Err(Status::invalid_argument("rpc broadcast room arg error"));
        };
        let numbered = (req.offset > 0).then(|| {
            let count = if proto.op == op::RAW {
                raw_packets(proto.body.clone()).count() as u64
            } else {
                1
            };
            Arc::new(numbered(&req.room_id, &req.epoch, req.offset, count))
        });
        let out = outgoing(proto);
        let room: Arc<str> = req.room_id.into();
        self.to_buckets(|| BucketJob::Room(room.clone(), out.clone(), numbered.clone()))
            .await?;
        Ok(BroadcastRoomReply {})
    }

    async fn watch_rooms(
        &self,
        acks: mpsc::Receiver<RoomsAck>,
    ) -> Result<mpsc::Receiver<RoomsUpdate>, Status> {
        let rooms = self.shared.rooms.clone();
        if !rooms.watchers.admit_another() {
            return Err(Status::resource_exhausted(format!(
                "this comet serves {} room watches already",
                crate::room_watch::MAX_WATCHERS
            )));
        }
        let (tx, updates) = mpsc::channel(4);
        tokio::spawn(crate::room_watch::serve(rooms, acks, tx));
        Ok(updates)
    }

    async fn rooms(&self, _req: RoomsReq) -> Result<RoomsReply, Status> {
        Ok(RoomsReply {
            rooms: self
                .shared
                .rooms
                .counts()
                .into_keys()
                .map(|r| (r, true))
                .collect(),
        })
    }
}

/// Binds a listener with a deep accept queue: connection storms (a comet restart sends every
/// client back at once) otherwise overflow the default backlog and clients wait out SYN
/// retransmits.
pub async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(8192)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr}: no address"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain time comes from etcd (the operator's record): a huge value must not make
    /// the drain's deadline overflow (`Instant + Duration` panics).
    #[test]
    fn a_drain_time_from_etcd_is_bounded() {
        let now = tokio::time::Instant::now();
        let d = bounded_drain(Duration::from_millis(u64::MAX));
        assert_eq!(d, MAX_DRAIN);
        let _deadline = now + Duration::from_millis(drain_millis(d)) + Duration::from_secs(1);
        assert_eq!(
            bounded_drain(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }
}
