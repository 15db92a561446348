//! The protocol half of a client connection after auth (GOIM.md §2.4, §2.8): answers each
//! client packet, keeps the heartbeat and the per-connection op budget, and asks the comet
//! around it (a [`Session`]) for what it cannot do alone. No socket and no server here, so it
//! is tested on packets.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use goim_proto::logic::{ReceiveReply, ReceiveReq};
use goim_proto::op;
use goim_proto::packet::Packet;
use goim_proto::protocol::Proto;
use tokio::time::Instant;
use tonic::Status;

use crate::channel::Channel;

/// What a connection's protocol needs from the comet it runs in.
pub trait Session {
    /// Moves the connection to `room` ("" leaves every room).
    fn change_room(&self, ch: &Arc<Channel>, room: &str);
    /// Holds `room` on this comet once every job routes it here; the connection joins it
    /// while holding, so a message pushed to the room after the reply reaches it.
    fn announce(&self, room: &str) -> impl Future<Output = crate::room_watch::RoomHold> + Send;
    /// Joins `room` beside the connection's goim room: `Ok(false)` if in it already, or why
    /// not.
    fn add_room(&self, ch: &Arc<Channel>, room: &str) -> Result<bool, &'static str>;
    /// Leaves a room joined with `add_room`; `false` if it was not one.
    fn remove_room(&self, ch: &Arc<Channel>, room: &str) -> bool;
    /// Hands a packet of an op the comet does not answer itself to logic; what the business
    /// answered (with forwarding configured) comes back.
    fn receive(&self, req: ReceiveReq)
        -> impl Future<Output = Result<ReceiveReply, Status>> + Send;
    /// Renews the connection's presence (in the background: a heartbeat never waits on it).
    fn renew_presence(&self, ch: &Arc<Channel>);
    /// How often presence is renewed (on average; each renewal is spread at random).
    fn presence_renew(&self) -> Duration;
    /// Pushes waiting for an ack, for a client that acks.
    fn ack_window(&self) -> usize;
    /// An extension `JOIN`: moves the connection to a room and recovers what it missed there;
    /// the reply (and the history) go through the connection's queue, ahead of the room's
    /// next messages.
    fn join(
        &self,
        ch: &Arc<Channel>,
        ver: i16,
        seq: i32,
        body: bytes::Bytes,
    ) -> impl Future<Output = ()> + Send;
    /// An extension `REFRESH`: logic checks the connection's new token; its expiry (Unix
    /// seconds, 0: never) if it was taken.
    fn refresh(
        &self,
        ch: &Arc<Channel>,
        token: bytes::Bytes,
    ) -> impl Future<Output = Result<i64, Status>> + Send;
    /// How long a connection whose token expired has to send a new one.
    fn token_grace(&self) -> Duration;
    /// An extension `RECOVER`: what was pushed to this connection's user and key since the
    /// positions given, ahead of the next pushes, as for `join`.
    fn recover(
        &self,
        ch: &Arc<Channel>,
        ver: i16,
        seq: i32,
        body: bytes::Bytes,
    ) -> impl Future<Output = ()> + Send;
}

/// Where replies go: the connection's write buffer, or a list in tests.
pub trait Replies {
    fn reply(&mut self, ver: i16, op: i32, seq: i32, body: &[u8]);
}

/// How often a connection may send, and how often its presence is renewed.
#[derive(Debug, Clone, Copy)]
pub struct HandlerLimits {
    pub ops_per_sec: u32,
    pub ops_burst: u32,
    pub presence_renew: Duration,
}

/// A client sent more packets than its budget allows; the connection is closed.
#[derive(Debug, PartialEq, Eq)]
pub struct RateLimited;

/// What `HELLO_REPLY` says this server does (docs/PROTOCOL.md).
pub const FEATURES: &[&str] = &["reconnect", "recover", "acks", "refresh", "rooms"];

/// A `HELLO` body; anything else in it is ignored.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Hello {
    acks: bool,
}

/// An `ACK` body: the user's stream, the key's, or both, each up to an offset (in an
/// epoch, when given).
#[derive(Debug, serde::Deserialize)]
struct Ack {
    #[serde(default)]
    user: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
    #[serde(default)]
    key: Option<u64>,
    #[serde(default)]
    key_epoch: Option<String>,
}

/// Packets a read decoded beyond this many leave the queue's memory to be given back.
const IDLE_QUEUE: usize = 16;
/// What a `JOIN` or `RECOVER` costs of the op budget, in packets.
const RECOVERY_COST: f64 = 32.0;
/// Packets answered before the task yields to other connections.
const YIELD_EVERY: u32 = 64;

/// Kept small: it lives in every connection's task (bytes per idle connection are a
/// measured goal), so settings come from the [`Session`] when needed.
pub struct Handler {
    ch: Arc<Channel>,
    heartbeat: Duration,
    /// When the connection is closed unless a heartbeat comes first.
    heartbeat_deadline: Instant,
    /// When the token expires, and whether the client was told. Boxed: goim's tokens never
    /// expire, and an idle connection should not pay for the field.
    expiry: Option<Box<Expiry>>,
    /// When a heartbeat next renews presence.
    next_renew: Instant,
    budget: OpBudget,
    /// Packets read and not answered yet.
    pending: VecDeque<Packet>,
    /// The client asked for acks (the connection then resends what it does not ack).
    acks: bool,
}

/// A renewal period spread at random over one to three times `base`, so connections made
/// together do not renew together.
fn spread(base: Duration) -> Duration {
    base + base.mul_f64(2.0 * fastrand::f64())
}

impl Handler {
    /// `pending`: packets that arrived with the auth packet, answered first. `expires`: the
    /// token's expiry in Unix seconds (0: never).
    pub fn new(
        ch: Arc<Channel>,
        heartbeat: Duration,
        limits: HandlerLimits,
        pending: VecDeque<Packet>,
        expires: i64,
    ) -> Self {
        Handler {
            ch,
            heartbeat,
            heartbeat_deadline: Instant::now() + heartbeat,
            expiry: Expiry::new(expires),
            next_renew: Instant::now() + spread(limits.presence_renew),
            budget: OpBudget::new(limits.ops_per_sec, limits.ops_burst),
            pending,
            acks: false,
        }
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.ch
    }

    /// Where a read puts the packets it decoded.
    pub fn pending_mut(&mut self) -> &mut VecDeque<Packet> {
        &mut self.pending
    }

    /// Whether the client acks numbered pushes to its user.
    pub fn acks(&self) -> bool {
        self.acks
    }

    /// How long the connection lives without a heartbeat.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// When the connection's timer must next fire: its heartbeat deadline, or its token's
    /// expiry (then the end of the grace period).
    pub fn deadline(&self, grace: Duration) -> Instant {
        match &self.expiry {
            Some(e) => {
                let at = if e.warned { e.at + grace } else { e.at };
                at.min(self.heartbeat_deadline)
            }
            None => self.heartbeat_deadline,
        }
    }

    /// The token's expiry in Unix seconds (0: never).
    pub fn expires(&self) -> i64 {
        self.expiry.as_ref().map_or(0, |e| e.unix)
    }

    /// What the timer firing at `now` means.
    pub fn on_deadline(&mut self, now: Instant, grace: Duration) -> Deadline {
        if now >= self.heartbeat_deadline {
            return Deadline::Heartbeat;
        }
        match &mut self.expiry {
            Some(e) if !e.warned && now >= e.at => {
                e.warned = true;
                Deadline::TokenExpiring
            }
            Some(e) if e.warned && now >= e.at + grace => Deadline::TokenExpired,
            _ => Deadline::NotYet,
        }
    }

    /// Bytes of queue this handler holds now: what a burst must give back.
    pub fn buffered(&self) -> usize {
        self.pending.capacity() * std::mem::size_of::<Packet>()
    }

    /// Answers every pending packet in order, replies into `out`; `Ok(true)` when one was
    /// a heartbeat (the connection's deadline moves).
    pub async fn answer<S: Session>(
        &mut self,
        session: &S,
        out: &mut impl Replies,
    ) -> Result<bool, RateLimited> {
        let mut handled = 0u32;
        let mut heartbeat = false;
        while let Some(p) = self.pending.pop_front() {
            // A JOIN or RECOVER costs a history call and can queue a room's whole history:
            // a client gets a few a second, not 64.
            let cost = if matches!(p.op, op::JOIN | op::RECOVER | op::REFRESH) {
                RECOVERY_COST
            } else {
                1.0
            };
            if !self.budget.take(cost) {
                return Err(RateLimited);
            }
            heartbeat |= matches!(p.op, op::HEARTBEAT | op::REFRESH);
            self.handle(session, out, p).await;
            handled += 1;
            // A read can hold thousands of packets: let other connections run between.
            if handled.is_multiple_of(YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
        }
        // After a burst, give the queue's memory back: an idle connection holds none.
        // (`Ok(true)`: a heartbeat or a new token moved the connection's deadline.)
        if self.pending.capacity() > IDLE_QUEUE {
            self.pending = VecDeque::new();
        }
        Ok(heartbeat)
    }

    async fn handle<S: Session>(&mut self, session: &S, out: &mut impl Replies, p: Packet) {
        let ch = &self.ch;
        match p.op {
            op::HEARTBEAT => {
                let now = Instant::now();
                self.heartbeat_deadline = now + self.heartbeat;
                if now >= self.next_renew {
                    self.next_renew = now + spread(session.presence_renew());
                    session.renew_presence(ch);
                }
                let online = ch.online().to_be_bytes();
                out.reply(p.ver, op::HEARTBEAT_REPLY, p.seq, &online);
            }
            op::CHANGE_ROOM => {
                match std::str::from_utf8(&p.body) {
                    // Room ids become etcd records: same bound as logic puts on tokens.
                    Ok(room) if room.len() <= goim_proto::MAX_ID => {
                        let _hold = session.announce(room).await;
                        session.change_room(ch, room);
                    }
                    _ => {
                        tracing::debug!(key = %ch.key, "change room: room id not utf-8 or too long")
                    }
                }
                // goim echoes the body whether or not the change happened.
                out.reply(p.ver, op::CHANGE_ROOM_REPLY, p.seq, &p.body);
            }
            op::HELLO => {
                // Version 1 is the only one, and a client that said HELLO at all understands
                // every extension op this server sends. It may ask for acks.
                ch.set_extended();
                let hello: Hello = serde_json::from_slice(&p.body).unwrap_or_default();
                if hello.acks {
                    ch.enable_acks(session.ack_window());
                    self.acks = true;
                }
                let reply = serde_json::json!({ "v": 1, "features": FEATURES }).to_string();
                out.reply(p.ver, op::HELLO_REPLY, p.seq, reply.as_bytes());
            }
            op::ACK if ch.is_extended() => {
                // No reply: acks must not double the traffic.
                if let Ok(ack) = serde_json::from_slice::<Ack>(&p.body) {
                    if let Some(n) = ack.user {
                        ch.ack("user", n, ack.epoch.as_deref());
                    }
                    if let Some(n) = ack.key {
                        ch.ack("key", n, ack.key_epoch.as_deref());
                    }
                }
            }
            op::JOIN if ch.is_extended() => session.join(ch, p.ver, p.seq, p.body).await,
            op::ROOM_JOIN | op::ROOM_LEAVE if ch.is_extended() => {
                #[derive(serde::Deserialize)]
                struct Room {
                    room: String,
                }
                let reply = match serde_json::from_slice::<Room>(&p.body) {
                    Err(_) => serde_json::json!({ "error": "body must be {\"room\":R}" }),
                    Ok(Room { room }) if p.op == op::ROOM_JOIN => {
                        let _hold = session.announce(&room).await;
                        match session.add_room(ch, &room) {
                            Ok(joined) => serde_json::json!({ "room": room, "joined": joined }),
                            Err(why) => serde_json::json!({ "room": room, "error": why }),
                        }
                    }
                    Ok(Room { room }) => {
                        let left = session.remove_room(ch, &room);
                        serde_json::json!({ "room": room, "left": left })
                    }
                };
                out.reply(p.ver, p.op + 1, p.seq, reply.to_string().as_bytes());
            }
            op::REFRESH if ch.is_extended() => {
                let reply = match session.refresh(ch, p.body).await {
                    Ok(expires) => {
                        self.expiry = Expiry::new(expires);
                        serde_json::json!({ "expires": expires })
                    }
                    Err(e) => serde_json::json!({ "error": e.message() }),
                };
                out.reply(
                    p.ver,
                    op::REFRESH_REPLY,
                    p.seq,
                    reply.to_string().as_bytes(),
                );
            }
            op::RECOVER if ch.is_extended() => session.recover(ch, p.ver, p.seq, p.body).await,
            op::SUB | op::UNSUB => {
                if let Some(ops) = parse_ops(&p.body) {
                    if p.op == op::SUB {
                        ch.watch(&ops);
                    } else {
                        ch.unwatch(&ops);
                    }
                }
                out.reply(p.ver, p.op + 1, p.seq, &p.body);
            }
            other => {
                let req = ReceiveReq {
                    mid: ch.mid,
                    proto: Some(Proto {
                        ver: p.ver as i32,
                        op: other,
                        seq: p.seq,
                        body: p.body,
                    }),
                    key: ch.key.to_string(),
                    server: String::new(),
                };
                // goim echoes the op with an empty body; with forwarding, the business's
                // reply is the body, and an extension client is told about errors. Logic
                // answers conversation requests itself, on their reply ops, errors included.
                let conversation = op::conversation_reply(other);
                let error = |msg: &str, code: i32| {
                    if ch.is_extended() || conversation.is_some() {
                        let e = serde_json::json!({ "error": msg, "code": code });
                        bytes::Bytes::from(e.to_string())
                    } else {
                        bytes::Bytes::new()
                    }
                };
                let fallback = conversation.unwrap_or(other);
                let (op_back, body) = match session.receive(req).await {
                    Ok(r) => {
                        let op_back = if r.op != 0 { r.op } else { fallback };
                        if r.error.is_empty() {
                            (op_back, r.reply)
                        } else {
                            (op_back, error(&r.error, r.code))
                        }
                    }
                    Err(e) => {
                        tracing::debug!(key = %ch.key, error = %e, "receive failed");
                        (fallback, error("unavailable", 503))
                    }
                };
                out.reply(p.ver, op_back, p.seq, &body);
            }
        }
    }
}

/// What a connection's timer firing means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// No heartbeat in time: close.
    Heartbeat,
    /// The token just expired: tell the client to refresh.
    TokenExpiring,
    /// The grace period after expiry ended without a new token: close.
    TokenExpired,
    /// Nothing due yet (the deadline moved since the timer was set).
    NotYet,
}

/// A token's expiry.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    /// On this process's clock.
    at: Instant,
    /// As the token says, in Unix seconds.
    unix: i64,
    /// The client was told it expired.
    warned: bool,
}

impl Expiry {
    /// `None` for 0 (never).
    fn new(unix: i64) -> Option<Box<Expiry>> {
        let secs = u64::try_from(unix).ok().filter(|&e| e > 0)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // A far-future expiry is capped at a year: the timer must not overflow.
        let left = secs.saturating_sub(now).min(365 * 86_400);
        Some(Box::new(Expiry {
            at: Instant::now() + Duration::from_secs(left),
            unix,
            warned: false,
        }))
    }
}

/// A token bucket over the packets a client sends after auth: `per_sec` on average, `burst`
/// at once. A few numbers in the handler, nothing while idle.
struct OpBudget {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    at: Instant,
}

impl OpBudget {
    fn new(per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        OpBudget {
            tokens: burst,
            per_sec: f64::from(per_sec),
            burst,
            at: Instant::now(),
        }
    }

    /// Spends `cost` tokens; `false` when there are not that many (a cost above the burst
    /// is capped at the burst, so it can always be paid eventually).
    fn take(&mut self, cost: f64) -> bool {
        let cost = cost.min(self.burst);
        if self.tokens < cost {
            let now = Instant::now();
            let refill = now.duration_since(self.at).as_secs_f64() * self.per_sec;
            self.tokens = (self.tokens + refill).min(self.burst);
            self.at = now;
        }
        if self.tokens < cost {
            return false;
        }
        self.tokens -= cost;
        true
    }
}

/// goim's `SplitInt32s(body, ",")`: all or nothing; an empty body is an empty list.
fn parse_ops(body: &[u8]) -> Option<Vec<i32>> {
    let s = std::str::from_utf8(body).ok()?;
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(',').map(|t| t.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A comet that records what the handler asked of it.
    #[derive(Default)]
    struct Fake {
        rooms: Mutex<Vec<String>>,
        received: Mutex<Vec<i32>>,
        renewals: Mutex<usize>,
        joins: Mutex<Vec<Vec<u8>>>,
    }

    impl Session for Fake {
        fn change_room(&self, _: &Arc<Channel>, room: &str) {
            self.rooms.lock().unwrap().push(room.to_string());
        }
        async fn announce(&self, _: &str) -> crate::room_watch::RoomHold {
            crate::room_watch::RoomHold::default()
        }
        fn add_room(&self, _: &Arc<Channel>, room: &str) -> Result<bool, &'static str> {
            if room == "bad" {
                return Err("no");
            }
            self.rooms.lock().unwrap().push(format!("+{room}"));
            Ok(true)
        }
        fn remove_room(&self, _: &Arc<Channel>, room: &str) -> bool {
            self.rooms.lock().unwrap().push(format!("-{room}"));
            true
        }
        async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, Status> {
            let op = req.proto.unwrap().op;
            self.received.lock().unwrap().push(op);
            Ok(match op {
                // The business answers 1001 with a body, refuses 1002.
                1001 => ReceiveReply {
                    reply: bytes::Bytes::from_static(b"pong"),
                    ..Default::default()
                },
                1002 => ReceiveReply {
                    error: "no".into(),
                    code: 403,
                    ..Default::default()
                },
                // Logic answers a conversation send on its reply op; a read it refuses.
                op::CONV_SEND => ReceiveReply {
                    reply: bytes::Bytes::from_static(b"{\"seq\":1}"),
                    op: op::CONV_SEND_REPLY,
                    ..Default::default()
                },
                op::CONV_READ => ReceiveReply {
                    error: "not a member".into(),
                    code: 403,
                    op: op::CONV_READ_REPLY,
                    ..Default::default()
                },
                op::CONV_LIST => return Err(Status::unavailable("logic down")),
                _ => ReceiveReply::default(),
            })
        }
        fn renew_presence(&self, _: &Arc<Channel>) {
            *self.renewals.lock().unwrap() += 1;
        }
        fn presence_renew(&self) -> Duration {
            Duration::from_secs(10)
        }
        fn ack_window(&self) -> usize {
            64
        }
        async fn join(&self, _: &Arc<Channel>, _: i16, _: i32, body: bytes::Bytes) {
            self.joins.lock().unwrap().push(body.to_vec());
        }
        async fn recover(&self, _: &Arc<Channel>, _: i16, _: i32, body: bytes::Bytes) {
            self.joins.lock().unwrap().push(body.to_vec());
        }
        async fn refresh(&self, _: &Arc<Channel>, token: bytes::Bytes) -> Result<i64, Status> {
            match &token[..] {
                b"good" => Ok(unix_now() + 3600),
                _ => Err(Status::unauthenticated("token refused")),
            }
        }
        fn token_grace(&self) -> Duration {
            GRACE
        }
    }

    const GRACE: Duration = Duration::from_secs(5);

    fn unix_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// With forwarding, the business's reply is the body of the op's echo; its refusal is
    /// an empty echo for a goim client and an error for an extension client.
    #[tokio::test(start_paused = true)]
    async fn forwarded_messages_carry_the_business_reply() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        let mut out: Vec<Reply> = Vec::new();
        h.pending_mut()
            .extend([packet(1001, 1, b"ping"), packet(1002, 2, b"x")]);
        h.answer(&fake, &mut out).await.unwrap();
        assert_eq!(out[0], (1, 1001, 1, b"pong".to_vec()));
        assert_eq!(out[1], (1, 1002, 2, Vec::new()));
        h.channel().set_extended();
        out.clear();
        h.pending_mut().push_back(packet(1002, 3, b"x"));
        h.answer(&fake, &mut out).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out[0].3).unwrap();
        assert_eq!(
            (v["error"].as_str(), v["code"].as_i64()),
            (Some("no"), Some(403))
        );
    }

    /// Conversation requests come back on their reply ops, with their errors, for goim
    /// clients too (only a client that knows the ops sends them); logic unreachable is an
    /// error on the reply op as well.
    #[tokio::test(start_paused = true)]
    async fn conversation_requests_are_answered_on_their_reply_ops() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        let mut out: Vec<Reply> = Vec::new();
        h.pending_mut().extend([
            packet(op::CONV_SEND, 1, b"{}"),
            packet(op::CONV_READ, 2, b"{}"),
            packet(op::CONV_LIST, 3, b"{}"),
        ]);
        h.answer(&fake, &mut out).await.unwrap();
        assert_eq!(out[0], (1, op::CONV_SEND_REPLY, 1, b"{\"seq\":1}".to_vec()));
        let replies: Vec<(i32, serde_json::Value)> = out[1..]
            .iter()
            .map(|r| (r.1, serde_json::from_slice(&r.3).unwrap()))
            .collect();
        assert_eq!(
            replies,
            [
                (
                    op::CONV_READ_REPLY,
                    serde_json::json!({"error": "not a member", "code": 403})
                ),
                (
                    op::CONV_LIST_REPLY,
                    serde_json::json!({"error": "unavailable", "code": 503})
                ),
            ]
        );
    }

    /// `ROOM_JOIN` and `ROOM_LEAVE` for extension clients; a goim client's op 33 is one of
    /// its app's ops (forwarded).
    #[tokio::test(start_paused = true)]
    async fn rooms_beside_the_goim_room() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        let mut out: Vec<Reply> = Vec::new();
        h.pending_mut()
            .push_back(packet(op::ROOM_JOIN, 1, br#"{"room":"chat://1"}"#));
        h.answer(&fake, &mut out).await.unwrap();
        assert_eq!(*fake.received.lock().unwrap(), vec![op::ROOM_JOIN]);
        h.channel().set_extended();
        out.clear();
        h.pending_mut().extend([
            packet(op::ROOM_JOIN, 2, br#"{"room":"chat://1"}"#),
            packet(op::ROOM_JOIN, 3, br#"{"room":"bad"}"#),
            packet(op::ROOM_LEAVE, 4, br#"{"room":"chat://1"}"#),
            packet(op::ROOM_JOIN, 5, b"not json"),
        ]);
        h.answer(&fake, &mut out).await.unwrap();
        let bodies: Vec<(i32, serde_json::Value)> = out
            .iter()
            .map(|r| (r.1, serde_json::from_slice(&r.3).unwrap()))
            .collect();
        assert_eq!(
            bodies[0],
            (
                op::ROOM_JOIN_REPLY,
                serde_json::json!({"room": "chat://1", "joined": true})
            )
        );
        assert_eq!(
            bodies[1],
            (
                op::ROOM_JOIN_REPLY,
                serde_json::json!({"room": "bad", "error": "no"})
            )
        );
        assert_eq!(
            bodies[2],
            (
                op::ROOM_LEAVE_REPLY,
                serde_json::json!({"room": "chat://1", "left": true})
            )
        );
        assert!(bodies[3].1["error"].is_string());
        assert_eq!(*fake.rooms.lock().unwrap(), vec!["+chat://1", "-chat://1"]);
    }

    /// A token that expires: the client is told at expiry and closed a grace period later,
    /// unless a refresh with a token logic takes moves the expiry; a refused one changes
    /// nothing; a heartbeat keeps the connection but not the token.
    #[tokio::test(start_paused = true)]
    async fn an_expiring_token_is_refreshed_or_closes() {
        let fake = Fake::default();
        let ch = Arc::new(Channel::new(
            "k".into(),
            7,
            "127.0.0.1".parse().unwrap(),
            &[],
        ));
        ch.set_extended();
        let start = Instant::now();
        let mut h = Handler::new(
            ch,
            Duration::from_secs(600),
            LIMITS,
            VecDeque::new(),
            unix_now() + 10,
        );
        let at = h.deadline(GRACE);
        assert!(at >= start + Duration::from_secs(9) && at <= start + Duration::from_secs(10));
        assert_eq!(
            h.on_deadline(at - Duration::from_secs(1), GRACE),
            Deadline::NotYet
        );
        assert_eq!(h.on_deadline(at, GRACE), Deadline::TokenExpiring);
        assert_eq!(h.deadline(GRACE), at + GRACE);

        // A refused token: the reply says why, the grace period runs on.
        let mut out: Vec<Reply> = Vec::new();
        h.pending_mut().push_back(packet(op::REFRESH, 1, b"bad"));
        h.pending_mut().push_back(packet(op::HEARTBEAT, 2, b""));
        assert_eq!(h.answer(&fake, &mut out).await, Ok(true));
        assert_eq!(out[0].1, op::REFRESH_REPLY);
        assert!(String::from_utf8_lossy(&out[0].3).contains("token refused"));
        assert_eq!(h.deadline(GRACE), at + GRACE);
        assert_eq!(h.on_deadline(at + GRACE, GRACE), Deadline::TokenExpired);

        // A good one: a new expiry an hour away, and the warning may come again then.
        out.clear();
        h.pending_mut().push_back(packet(op::REFRESH, 3, b"good"));
        assert_eq!(h.answer(&fake, &mut out).await, Ok(true));
        let v: serde_json::Value = serde_json::from_slice(&out[0].3).unwrap();
        assert_eq!(v["expires"].as_i64(), Some(h.expires()));
        assert_eq!(h.on_deadline(at + GRACE, GRACE), Deadline::NotYet);
        // The heartbeat's deadline (600 s) now comes before the token's (an hour).
        assert!(h.expires() >= unix_now() + 3599);
        assert!(h.deadline(GRACE) >= start + Duration::from_secs(599));
    }

    /// A token without expiry (goim's) only ever has the heartbeat deadline; a client that
    /// did not say HELLO cannot refresh (the op goes to logic like any other).
    #[tokio::test(start_paused = true)]
    async fn tokens_without_expiry_and_clients_without_extensions() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        let start = Instant::now();
        assert_eq!(h.deadline(GRACE), start + Duration::from_secs(30));
        assert_eq!(
            h.on_deadline(start + Duration::from_secs(30), GRACE),
            Deadline::Heartbeat
        );
        let mut out: Vec<Reply> = Vec::new();
        h.pending_mut().push_back(packet(op::REFRESH, 1, b"good"));
        h.answer(&fake, &mut out).await.unwrap();
        assert_eq!(*fake.received.lock().unwrap(), vec![op::REFRESH]);
        assert_eq!(h.expires(), 0);
    }

    type Reply = (i16, i32, i32, Vec<u8>);

    impl Replies for Vec<Reply> {
        fn reply(&mut self, ver: i16, op: i32, seq: i32, body: &[u8]) {
            self.push((ver, op, seq, body.to_vec()));
        }
    }

    const LIMITS: HandlerLimits = HandlerLimits {
        ops_per_sec: 64,
        ops_burst: 256,
        presence_renew: Duration::from_secs(60),
    };

    fn handler(limits: HandlerLimits) -> Handler {
        let ch = Arc::new(Channel::new(
            "k".into(),
            7,
            "127.0.0.1".parse().unwrap(),
            &[],
        ));
        Handler::new(ch, Duration::from_secs(30), limits, VecDeque::new(), 0)
    }

    fn packet(op: i32, seq: i32, body: &'static [u8]) -> Packet {
        Packet::new(1, op, seq, body)
    }

    #[test]
    fn ops_csv() {
        assert_eq!(parse_ops(b"1000,1001"), Some(vec![1000, 1001]));
        assert_eq!(parse_ops(b""), Some(vec![]));
        assert_eq!(parse_ops(b"1000,x"), None);
        assert_eq!(parse_ops(b"99999999999"), None);
        assert_eq!(parse_ops(&[0xff]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_each_op_as_goim_does() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        let long_room = [b'r'; goim_proto::MAX_ID + 1];
        let long_room: &'static [u8] = Box::leak(Box::new(long_room));
        h.pending_mut().extend([
            packet(op::HEARTBEAT, 1, b""),
            packet(op::CHANGE_ROOM, 2, b"live://2"),
            packet(op::CHANGE_ROOM, 3, long_room),
            packet(op::SUB, 4, b"1000,1001"),
            packet(op::UNSUB, 5, b"1000"),
            packet(1000, 6, b"hello"),
            packet(op::HELLO, 7, b"{\"v\":1}"),
        ]);
        let mut out: Vec<Reply> = Vec::new();
        h.answer(&fake, &mut out).await.unwrap();
        let ops: Vec<(i32, i32)> = out.iter().map(|r| (r.1, r.2)).collect();
        assert_eq!(
            ops,
            vec![
                (op::HEARTBEAT_REPLY, 1),
                (op::CHANGE_ROOM_REPLY, 2),
                (op::CHANGE_ROOM_REPLY, 3),
                (op::SUB_REPLY, 4),
                (op::UNSUB_REPLY, 5),
                (1000, 6),
                (op::HELLO_REPLY, 7),
            ]
        );
        let hello: serde_json::Value = serde_json::from_slice(&out[6].3).unwrap();
        assert_eq!(
            hello,
            serde_json::json!({"v": 1, "features": ["reconnect", "recover", "acks", "refresh", "rooms"]})
        );
        assert!(h.channel().is_extended());
        // The heartbeat reply carries the room's online count (4 bytes); echoes carry bodies.
        assert_eq!(out[0].3.len(), 4);
        assert_eq!(out[3].3, b"1000,1001");
        // Too long a room id is echoed but not joined.
        assert_eq!(*fake.rooms.lock().unwrap(), vec!["live://2".to_string()]);
        assert_eq!(*fake.received.lock().unwrap(), vec![1000]);
        assert!(h.channel().accepts(1001) && !h.channel().accepts(1000));
    }

    /// `JOIN` is an extension op only for a client that said `HELLO`; for a goim client it
    /// is an unknown op like any other (forwarded to logic and echoed).
    #[tokio::test(start_paused = true)]
    async fn join_is_for_clients_that_said_hello() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        let join: &'static [u8] = br#"{"room":"chat://1"}"#;
        h.pending_mut().push_back(packet(op::JOIN, 1, join));
        let mut out: Vec<Reply> = Vec::new();
        h.answer(&fake, &mut out).await.unwrap();
        assert_eq!(*fake.received.lock().unwrap(), vec![op::JOIN]);
        assert!(fake.joins.lock().unwrap().is_empty());
        h.pending_mut()
            .extend([packet(op::HELLO, 2, b"{}"), packet(op::JOIN, 3, join)]);
        h.answer(&fake, &mut out).await.unwrap();
        assert_eq!(*fake.joins.lock().unwrap(), vec![join.to_vec()]);
        // The join's reply comes from the session, through the queue.
        assert_eq!(out.last().unwrap().1, op::HELLO_REPLY);
    }

    /// An ACK names the user's stream, the key's, or both; offsets of one never ack the other.
    #[tokio::test(start_paused = true)]
    async fn an_ack_names_the_user_or_the_key_stream() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        h.pending_mut()
            .push_back(packet(op::HELLO, 1, br#"{"v":1,"acks":true}"#));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        let ch = h.channel().clone();
        let out = crate::channel::Outgoing::Raw(bytes::Bytes::from_static(b"x"));
        let to_key = crate::server::numbered("key", "k", 1, 1);
        ch.offer_numbered(&out, Some(&to_key), Some(1000), 8, false);
        let timeout = Duration::from_secs(5);
        assert!(ch.resend_due(timeout).is_some());
        h.pending_mut()
            .push_back(packet(op::ACK, 2, br#"{"user":1,"epoch":"k"}"#));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        assert!(
            ch.resend_due(timeout).is_some(),
            "a user ack is not the key's"
        );
        h.pending_mut()
            .push_back(packet(op::ACK, 3, br#"{"key":1,"key_epoch":"k"}"#));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        assert!(ch.resend_due(timeout).is_none());
    }

    /// A JOIN or RECOVER costs 32 packets of the budget: a burst of 256 allows 8.
    #[tokio::test(start_paused = true)]
    async fn recoveries_cost_more_of_the_budget() {
        let fake = Fake::default();
        let mut h = handler(LIMITS);
        h.pending_mut().push_back(packet(op::HELLO, 1, b"{}"));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        let join: &'static [u8] = br#"{"room":"chat://1"}"#;
        h.pending_mut()
            .extend((0..7).map(|i| packet(op::JOIN, i, join)));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        h.pending_mut().push_back(packet(op::RECOVER, 8, b"{}"));
        assert_eq!(h.answer(&fake, &mut Vec::new()).await, Err(RateLimited));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_move_the_deadline_and_renew_presence_now_and_then() {
        let fake = Fake::default();
        let limits = HandlerLimits {
            presence_renew: Duration::from_secs(10),
            ..LIMITS
        };
        let mut h = handler(limits);
        tokio::time::advance(Duration::from_secs(5)).await;
        h.pending_mut().push_back(packet(op::HEARTBEAT, 1, b""));
        assert!(
            h.answer(&fake, &mut Vec::new()).await.unwrap(),
            "a heartbeat"
        );
        h.pending_mut().push_back(packet(op::SUB, 2, b"1"));
        assert!(!h.answer(&fake, &mut Vec::new()).await.unwrap(), "not one");
        assert_eq!(*fake.renewals.lock().unwrap(), 0, "renewed too soon");
        // Renewal comes between 1 and 3 periods after the last one.
        tokio::time::advance(Duration::from_secs(30)).await;
        h.pending_mut().push_back(packet(op::HEARTBEAT, 2, b""));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        assert_eq!(*fake.renewals.lock().unwrap(), 1);
    }

    /// A burst of valid packets after auth is answered, and then the handler holds no more
    /// memory than an idle one (issue: a 64 KB burst pinned ~200 KB per connection).
    #[tokio::test(start_paused = true)]
    async fn memory_returns_to_idle_after_a_burst() {
        let fake = Fake::default();
        let limits = HandlerLimits {
            ops_burst: 5000,
            ..LIMITS
        };
        let mut h = handler(limits);
        let idle = h.buffered();
        h.pending_mut()
            .extend((0..4096).map(|i| packet(op::HEARTBEAT, i, b"")));
        assert!(h.buffered() > 100_000, "the burst is queued");
        let mut out: Vec<Reply> = Vec::new();
        h.answer(&fake, &mut out).await.unwrap();
        assert_eq!(out.len(), 4096);
        assert_eq!(h.buffered(), idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_its_op_budget_is_cut_off() {
        let fake = Fake::default();
        let limits = HandlerLimits {
            ops_per_sec: 10,
            ops_burst: 20,
            ..LIMITS
        };
        let mut h = handler(limits);
        h.pending_mut()
            .extend((0..20).map(|i| packet(op::SUB, i, b"1")));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        // A second later the bucket holds 10 more.
        tokio::time::advance(Duration::from_secs(1)).await;
        h.pending_mut()
            .extend((0..10).map(|i| packet(op::SUB, i, b"1")));
        h.answer(&fake, &mut Vec::new()).await.unwrap();
        h.pending_mut().push_back(packet(op::SUB, 99, b"1"));
        assert_eq!(h.answer(&fake, &mut Vec::new()).await, Err(RateLimited));
    }
}
