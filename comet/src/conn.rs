//! The task that serves one client socket from accept to close: the handshake (WebSocket
//! upgrade, auth through logic, registration), then a loop that waits for the client's
//! packets, pushes to it and its heartbeat deadline. The socket and buffers are the
//! [`Connection`]'s, the protocol state the [`Handler`]'s; this file joins them to the comet.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use goim_proto::logic::{
    ConnectReq, DisconnectReq, HeartbeatReq, HistoryReply, HistoryReq, ReceiveReq, RefreshReq,
};
use goim_proto::op;
use goim_proto::packet::{raw_packets, Packet};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tonic::Status;

use crate::channel::{Channel, Outgoing};
use crate::connection::{ConnError, Connection, Limits, Transport};
use crate::handler::{Deadline, Handler, HandlerLimits, RateLimited, Replies, Session};
use crate::server::{extension_packet, numbered, reserved_type, Comet, KEY_STREAM, USER_STREAM};
use crate::ws;

/// How a connection ended.
enum Exit {
    Error(ConnError),
    Timeout,
    /// The token expired and no new one came within the grace period.
    TokenExpired,
    Kicked,
    /// Closed by an admin (`/goim/kick`).
    Evicted,
    Shutdown,
    RateLimited,
}

/// Serves one accepted socket to the end.
pub(crate) async fn serve(
    comet: &Arc<Comet>,
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let cfg = &comet.cfg;
    let limits = Limits {
        max_frame: cfg.ws_max_frame,
        max_fragments: cfg.ws_max_fragments,
        write_timeout: cfg.write_timeout,
    };
    let mut conn = Connection::new(stream, transport, limits);
    let mut pending = VecDeque::new();
    let deadline = Instant::now() + cfg.handshake_timeout;
    // Boxed: the handshake (PROXY header, TLS, upgrade, auth) runs once, and its state inline
    // would size every connection's task for its whole life (bytes per idle connection are
    // a measured goal).
    let handshake = Box::pin(handshake(comet, &mut conn, &mut pending, peer, tls));
    let handshake = tokio::select! {
        _ = comet.shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, handshake) => r,
    };
    let (ch, heartbeat, expires, _ip_slot) = match handshake {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "handshake failed");
            comet.metrics.closed(e.reason());
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "handshake timeout");
            comet.metrics.closed("handshake_timeout");
            return;
        }
    };
    comet.metrics.connections.inc();
    // The auth reply goes once every job routes the connection's rooms here.
    comet.rooms_announced(&ch).await;
    // The handler is made after the await: held across it, it would be stored twice in this
    // future (here and in `run`'s), on every connection.
    let exit = match conn.flush(VecDeque::new()).await {
        Ok(()) => {
            let limits = HandlerLimits {
                ops_per_sec: cfg.client_ops_per_sec,
                ops_burst: cfg.client_ops_burst,
                presence_renew: cfg.presence_renew,
            };
            let handler = Handler::new(ch.clone(), heartbeat, limits, pending, expires);
            // From here the push paths may write to the socket themselves (the auth reply
            // is out, so nothing can overtake it).
            if let Some(socket) = conn.socket() {
                ch.attach(socket);
            }
            let exit = run(comet, &mut conn, handler).await;
            // Before anything else is written (a close frame) and before the socket closes.
            ch.detach();
            exit
        }
        Err(e) => Exit::Error(e),
    };
    // A client's close was answered with a close frame: send it, briefly.
    if matches!(exit, Exit::Error(ConnError::Ws(ws::WsError::Closed))) {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.flush(VecDeque::new())).await;
    }
    comet.metrics.connections.dec();
    comet.unregister(&ch);
    let reason = match &exit {
        Exit::Error(e) => {
            tracing::debug!(%peer, key = %ch.key, error = %e, "connection closed");
            e.reason()
        }
        Exit::Timeout => "heartbeat_timeout",
        Exit::TokenExpired => "token_expired",
        Exit::Kicked => "duplicate_key",
        Exit::Evicted => "admin_kick",
        Exit::Shutdown if comet.is_draining() => "drain",
        Exit::Shutdown => "shutdown",
        Exit::RateLimited => "rate_limited",
    };
    // A client's own close is not a failure to count.
    if reason != "client_closed" {
        comet.metrics.closed(reason);
    }
    // A kicked connection's key lives on in the newer connection on this comet.
    if !matches!(exit, Exit::Kicked) {
        let req = DisconnectReq {
            mid: ch.mid,
            key: ch.key.to_string(),
            server: cfg.name.clone(),
            lease: comet.lease(),
            presence_revision: ch
                .presence_revision
                .load(std::sync::atomic::Ordering::Relaxed),
            reason: reason.into(),
        };
        if let Err(e) = comet.logic.disconnect(req).await {
            tracing::warn!(key = %ch.key, error = %e, "disconnect failed");
        }
    }
}

/// What a finished handshake hands the connection: its channel, heartbeat, token expiry and
/// (behind a PROXY-protocol balancer) its address's connection slot, boxed: it is rare, and
/// held for the connection's life.
type Accepted = (
    Arc<Channel>,
    Duration,
    i64,
    Option<Box<crate::per_ip::IpSlot>>,
);

/// Upgrade (WebSocket), then read until `OpAuth`, ignoring anything before it; authenticate
/// through logic and register. `Ok(None)`: logic refused (closed without a reply, as goim does).
async fn handshake(
    comet: &Arc<Comet>,
    conn: &mut Connection,
    pending: &mut VecDeque<Packet>,
    peer: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<Option<Accepted>, ConnError> {
    // Behind a balancer: the client's address from its PROXY header, then the per-address
    // limits the accept loop left for now.
    let mut ip_slot = None;
    let peer_ip = if comet.cfg.proxy_protocol {
        let ip = conn
            .read_proxy_header()
            .await?
            .map_or(peer.ip(), |a| a.ip());
        match comet.admit(ip) {
            Ok(slot) => ip_slot = slot.map(Box::new),
            Err(reason) => {
                comet.metrics.closed(reason);
                return Ok(None);
            }
        }
        ip
    } else {
        peer.ip()
    };
    if let Some(tls) = tls {
        conn.start_tls(tls)?;
    }
    conn.tls_handshake().await?;
    let cookie = if conn.transport() == Transport::WebSocket {
        conn.upgrade(&comet.config().ws_origins).await?.cookie
    } else {
        String::new()
    };
    conn.decode(pending)?;
    let auth = loop {
        if let Some(i) = pending.iter().position(|p| p.op == op::AUTH) {
            pending.drain(..i);
            break pending.pop_front().expect("position found");
        }
        pending.clear();
        conn.read(pending).await?;
    };
    if !comet.can_take_clients() {
        tracing::debug!(ip = %peer_ip, "refused: no etcd lease yet");
        comet.metrics.closed("no_lease");
        return Ok(None);
    }
    let req = ConnectReq {
        server: comet.cfg.name.clone(),
        cookie,
        token: auth.body.clone(),
        lease: comet.lease(),
    };
    let reply = match comet.logic.connect(req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(ip = %peer_ip, error = %e.message(), "auth refused");
            comet.metrics.closed("auth_failed");
            return Ok(None);
        }
    };
    let ch = Arc::new(Channel::new(
        reply.key.into(),
        reply.mid,
        peer_ip,
        &reply.accepts,
    ));
    ch.presence_revision.store(
        reply.presence_revision,
        std::sync::atomic::Ordering::Relaxed,
    );
    // A client that sends HELLO and RECOVER with its AUTH (in one write) has its user's
    // numbered pushes held from the start: none reaches it before the recovery's reply.
    if pending.front().is_some_and(|p| p.op == op::HELLO) {
        ch.set_extended();
        if pending.get(1).is_some_and(|p| p.op == op::RECOVER) {
            ch.begin_recovery(USER_STREAM);
            ch.begin_recovery(KEY_STREAM);
        }
    }
    comet.register(&ch, &reply.room_id);
    // Rooms the token names beside goim's one; ones no client may join are left out.
    for room in reply.rooms.iter().filter(|r| is_room_stream(r)) {
        if comet.add_room(&ch, room).is_err() {
            tracing::debug!(key = %ch.key, "token names more rooms than max_extra_rooms");
            break;
        }
    }
    // Registration is the last step under the handshake deadline and has no await after it:
    // a timeout can never leave a registered channel behind. The reply is written by the
    // caller, whose teardown unregisters on any failure.
    conn.reply(auth.ver, op::AUTH_REPLY, auth.seq, &[]);
    // goim sends nanoseconds; a zero or negative value would close at once, so fall back.
    let hb = u64::try_from(reply.heartbeat)
        .ok()
        .filter(|&n| n > 0)
        .map_or(Duration::from_secs(480), Duration::from_nanos);
    Ok(Some((ch, hb, reply.expires, ip_slot)))
}

async fn run(comet: &Arc<Comet>, conn: &mut Connection, mut handler: Handler) -> Exit {
    let ch = handler.channel().clone();
    // Read from the config where used, not kept in a local: every byte of this future is
    // paid by every connection.
    let grace = || comet.cfg.token_grace;
    let timer = sleep_until(handler.deadline(grace()));
    tokio::pin!(timer);
    let notified = ch.notify.notified();
    tokio::pin!(notified);
    // Only for a client that acks, and boxed: a timer on every idle connection would cost
    // ~100 bytes each (bytes per idle connection are a measured goal).
    let far = || Instant::now() + Duration::from_secs(86_400 * 365);
    let mut resend: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let cfg = &comet.cfg;
    loop {
        if !handler.pending_mut().is_empty() {
            match handler.answer(comet, conn).await {
                Err(RateLimited) => return Exit::RateLimited,
                Ok(true) => timer.as_mut().reset(handler.deadline(grace())),
                Ok(false) => {}
            }
        }
        // Replies, and pongs the WebSocket reader queued.
        if conn.has_replies() {
            ch.begin_write();
            let r = conn.flush(VecDeque::new()).await;
            ch.end_write();
            if let Err(e) = r {
                return Exit::Error(e);
            }
        }
        if handler.acks() {
            let due = ch.resend_due(cfg.ack_timeout).unwrap_or_else(far);
            let timer = resend.get_or_insert_with(|| Box::pin(sleep_until(due)));
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
        }
        // One hand-rolled poll instead of `select!`: the notification future lives across
        // iterations and read readiness is polled directly, so a delivery costs no waiter
        // registration on shared structures (shutdown closes channels one by one instead).
        let event = std::future::poll_fn(|cx| {
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Notified);
            }
            if let Poll::Ready(r) = conn.stream().poll_read_ready(cx) {
                return Poll::Ready(Event::Readable(r));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timeout);
            }
            if resend
                .as_mut()
                .is_some_and(|r| r.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Event::Resend);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Notified => {
                notified.set(ch.notify.notified());
                if ch.is_closed() {
                    if ch.was_evicted() {
                        // What was queued and the kick's notice, then the close.
                        let _ = conn.flush(ch.take_queue()).await;
                        return Exit::Evicted;
                    }
                    return if ch.was_kicked() {
                        Exit::Kicked
                    } else {
                        Exit::Shutdown
                    };
                }
                let items = ch.take_for_write();
                if !items.is_empty() {
                    if let Err(e) = conn.flush(items).await {
                        return Exit::Error(e);
                    }
                    comet.metrics.writes.inc();
                }
                ch.end_write();
            }
            Event::Readable(r) => {
                if let Err(e) = r
                    .map_err(ConnError::from)
                    .and_then(|()| conn.read_ready(handler.pending_mut()))
                {
                    return Exit::Error(e);
                }
            }
            Event::Timeout => match handler.on_deadline(Instant::now(), grace()) {
                Deadline::Heartbeat => return Exit::Timeout,
                Deadline::TokenExpired => return Exit::TokenExpired,
                Deadline::TokenExpiring => {
                    if ch.is_extended() {
                        let body = json!({
                            "expires": handler.expires(),
                            "grace_ms": u64::try_from(grace().as_millis()).unwrap_or(u64::MAX),
                        });
                        conn.reply(
                            goim_proto::packet::SERVER_VER,
                            op::TOKEN_EXPIRING,
                            0,
                            body.to_string().as_bytes(),
                        );
                    }
                    timer.as_mut().reset(handler.deadline(grace()));
                }
                Deadline::NotYet => timer.as_mut().reset(handler.deadline(grace())),
            },
            Event::Resend => {
                let r = ch.resend(cfg.ack_timeout, cfg.ack_retries);
                comet.metrics.dropped("unacked", r.given_up);
                if let Some(timer) = resend.as_mut() {
                    timer.as_mut().reset(far());
                }
            }
        }
    }
}

enum Event {
    Notified,
    Readable(io::Result<()>),
    Timeout,
    /// Pushes the client did not ack in time are due again.
    Resend,
}

impl Replies for Connection {
    fn reply(&mut self, ver: i16, op: i32, seq: i32, body: &[u8]) {
        Connection::reply(self, ver, op, seq, body);
    }
}

/// The body of an extension `JOIN` (docs/PROTOCOL.md).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinReq {
    room: String,
    #[serde(default)]
    recover: Option<Position>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Position {
    epoch: String,
    offset: u64,
}

/// How long a `JOIN` waits for the room's history before answering "not recovered".
const HISTORY_TIMEOUT: Duration = Duration::from_secs(5);

/// Joins the room and recovers what the client missed since its position: the room's
/// numbered batches are held from before the join until the history is in, then written
/// after it without what it already holds, so nothing comes twice, out of order or with a
/// gap; or the reply says "not recovered".
async fn join(comet: &Arc<Comet>, ch: &Arc<Channel>, ver: i16, seq: i32, body: Bytes) {
    let reply = |v: serde_json::Value| extension_packet(op::JOIN_REPLY, seq, ver, &v);
    let req = match serde_json::from_slice::<JoinReq>(&body) {
        Ok(r) if is_room_stream(&r.room) => r,
        Ok(_) => {
            let body = json!({"error": "room must be TYPE://ID, at most 256 bytes, not user://"});
            ch.end_recovery("", no_cover(), |_| vec![reply(body)]);
            return;
        }
        Err(e) => {
            let err = format!("bad join: {e}");
            ch.end_recovery("", no_cover(), |_| vec![reply(json!({ "error": err }))]);
            return;
        }
    };
    let room = req.room;
    // The room's numbered batches are held from before the join: the reply's position is
    // where this client starts, and it gets exactly what comes after.
    let hold = comet.announce_room(&room).await;
    ch.begin_recovery(&room);
    comet.change_room(ch, &room);
    drop(hold);
    let from = req.recover.as_ref().map(|p| p.offset);
    let since = req.recover.unwrap_or(Position {
        epoch: String::new(),
        offset: 0,
    });
    let h = history(comet, ch, room.clone(), since).await;
    // Numbered up to the reply's position: in the history sent, or before this client's
    // start. Not written again, even when still on its way.
    let covered = (Arc::from(h.epoch.as_str()), h.offset);
    ch.end_recovery(&room.clone(), covered, |overflow| {
        let mut reply_body = json!({ "room": room, "epoch": h.epoch, "offset": h.offset });
        let Some(from) = from else {
            return vec![reply(reply_body)];
        };
        // A batch that did not fit while held is lost: then nothing is complete.
        let recovered = h.recovered && !overflow;
        reply_body["recovered"] = json!(recovered);
        let mut items = vec![reply(reply_body)];
        let count = raw_packets(h.batch.clone()).count() as u64;
        if recovered && count > 0 {
            let n = numbered(&room, &h.epoch, from + 1, count);
            items.push(n.position);
            items.push(Outgoing::Raw(h.batch));
        }
        items
    });
}

/// The body of an extension `RECOVER` (docs/PROTOCOL.md): the user's stream, the
/// connection's own (key) stream, or both.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverReq {
    #[serde(default)]
    user: Option<Position>,
    #[serde(default)]
    key: Option<Position>,
}

/// The history of `stream` (job's name for it) after `from`, or "not recovered" when it
/// cannot be had within [`HISTORY_TIMEOUT`].
async fn history(comet: &Comet, ch: &Channel, stream: String, from: Position) -> HistoryReply {
    let asked = HistoryReq {
        room: stream,
        epoch: from.epoch,
        offset: from.offset,
        server: comet.name().to_string(),
        key: ch.key.to_string(),
    };
    match tokio::time::timeout(HISTORY_TIMEOUT, comet.logic.history(asked)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(key = %ch.key, error = %e.message(), "history failed");
            comet.metrics.history_failure("error");
            HistoryReply::default()
        }
        Err(_) => {
            tracing::debug!(key = %ch.key, "history timed out");
            comet.metrics.history_failure("timeout");
            HistoryReply::default()
        }
    }
}

/// Recovers the pushes to this connection's user, and to its key, since the positions
/// given, as `join` does for a room: numbered pushes are held meanwhile (from the handshake
/// on, when the client sent `HELLO` and `RECOVER` with its `AUTH`), then written after the
/// missed ones. One `RECOVER_REPLY` per stream named: the user's first.
async fn recover(comet: &Arc<Comet>, ch: &Arc<Channel>, ver: i16, seq: i32, body: Bytes) {
    let reply = move |v: serde_json::Value| extension_packet(op::RECOVER_REPLY, seq, ver, &v);
    let req = match serde_json::from_slice::<RecoverReq>(&body) {
        Ok(r) if r.user.is_some() || r.key.is_some() => r,
        other => {
            let err = match other {
                Err(e) => format!("bad recover: {e}"),
                Ok(_) => "bad recover: name the user stream, the key stream or both".into(),
            };
            // Holds begun at the handshake end here too.
            ch.end_recovery(KEY_STREAM, no_cover(), |_| Vec::new());
            ch.end_recovery(USER_STREAM, no_cover(), |_| {
                vec![reply(json!({ "error": err }))]
            });
            return;
        }
    };
    for (stream, from) in [(USER_STREAM, req.user), (KEY_STREAM, req.key)] {
        let Some(from) = from else {
            // Not asked for: a hold begun at the handshake lets go.
            ch.end_recovery(stream, no_cover(), |_| Vec::new());
            continue;
        };
        ch.begin_recovery(stream);
        let name = if stream == USER_STREAM {
            format!("user://{}", ch.mid)
        } else {
            format!("key://{}/{}", ch.mid, ch.key)
        };
        let offset = from.offset;
        let h = history(comet, ch, name, from).await;
        let covered = (Arc::from(h.epoch.as_str()), h.offset);
        ch.end_recovery(stream, covered, |overflow| {
            let recovered = h.recovered && !overflow;
            let mut items = vec![reply(json!({
                "stream": stream,
                "recovered": recovered,
                "epoch": h.epoch,
                "offset": h.offset,
            }))];
            let count = raw_packets(h.batch.clone()).count() as u64;
            if recovered && count > 0 {
                let n = numbered(stream, &h.epoch, offset + 1, count);
                items.push(n.position);
                items.push(Outgoing::Raw(h.batch));
            }
            items
        });
    }
}

/// A room id a `JOIN` may name: `type://id` within the bound, and never a user's stream
/// (`user://…` is numbered per user; only `RECOVER` reads it, for the connection's own user).
fn is_room_stream(room: &str) -> bool {
    room.len() <= goim_proto::MAX_ID
        && room
            .split_once("://")
            .is_some_and(|(typ, _)| !reserved_type(typ))
}

/// No position: nothing is covered.
fn no_cover() -> (Arc<str>, u64) {
    (Arc::from(""), 0)
}

/// What a client's packets may ask of the comet.
impl Session for Arc<Comet> {
    fn join(
        &self,
        ch: &Arc<Channel>,
        ver: i16,
        seq: i32,
        body: Bytes,
    ) -> impl Future<Output = ()> + Send {
        // Boxed: rare, and its state would otherwise size every connection's task.
        Box::pin(join(self, ch, ver, seq, body))
    }

    fn recover(
        &self,
        ch: &Arc<Channel>,
        ver: i16,
        seq: i32,
        body: Bytes,
    ) -> impl Future<Output = ()> + Send {
        Box::pin(recover(self, ch, ver, seq, body))
    }

    fn refresh(
        &self,
        ch: &Arc<Channel>,
        token: Bytes,
    ) -> impl Future<Output = Result<i64, Status>> + Send {
        let logic = self.logic.clone();
        let req = RefreshReq {
            mid: ch.mid,
            key: ch.key.to_string(),
            server: self.cfg.name.clone(),
            token,
        };
        // Boxed: rare, and its state would otherwise size every connection's task.
        Box::pin(async move { logic.refresh(req).await.map(|r| r.expires) })
    }

    fn token_grace(&self) -> Duration {
        self.cfg.token_grace
    }

    fn change_room(&self, ch: &Arc<Channel>, room: &str) {
        Comet::change_room(self, ch, room);
    }

    fn announce(&self, room: &str) -> impl Future<Output = crate::room_watch::RoomHold> + Send {
        // Boxed: rare, and its state would otherwise size every connection's task.
        Box::pin(Comet::announce_room(self, room))
    }

    fn add_room(&self, ch: &Arc<Channel>, room: &str) -> Result<bool, &'static str> {
        if !is_room_stream(room) {
            return Err("room must be TYPE://ID, at most 256 bytes, not user:// or key://");
        }
        Comet::add_room(self, ch, room)
    }

    fn remove_room(&self, ch: &Arc<Channel>, room: &str) -> bool {
        Comet::remove_room(self, ch, room)
    }

    fn receive(
        &self,
        mut req: ReceiveReq,
    ) -> impl Future<Output = Result<goim_proto::logic::ReceiveReply, Status>> + Send {
        let logic = self.logic.clone();
        req.server = self.cfg.name.clone();
        // Boxed: the request's state inline would size every connection's task.
        Box::pin(async move { logic.receive(req).await })
    }

    fn presence_renew(&self) -> Duration {
        self.cfg.presence_renew
    }

    fn ack_window(&self) -> usize {
        self.cfg.ack_window
    }

    fn renew_presence(&self, ch: &Arc<Channel>) {
        let logic = self.logic.clone();
        let req = HeartbeatReq {
            mid: ch.mid,
            key: ch.key.to_string(),
            server: self.cfg.name.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = logic.heartbeat(req).await {
                tracing::debug!(error = %e, "presence renewal failed");
            }
        });
    }
}
