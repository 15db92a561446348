//! One client connection, from accept to close, in one task: the handshake (WebSocket upgrade
//! and auth through logic), then a loop that reads client packets, answers them and writes
//! queued pushes in one vectored write. An idle connection holds no read or write buffer.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use goim_proto::logic::{ConnectReq, DisconnectReq, HeartbeatReq, ReceiveReq};
use goim_proto::op;
use goim_proto::packet::{DecodeError, Header, Packet, HEADER_LEN, SERVER_VER};
use goim_proto::protocol::Proto;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

use crate::channel::{Channel, Outgoing};
use crate::server::Comet;
use crate::ws;

/// Bytes read per readiness event before the loop yields to other work.
const READ_BUDGET: usize = 64 * 1024;
const READ_CHUNK: usize = 4096;
/// Pushes per vectored write (each takes up to two slices; Linux allows 1024). Kept small
/// enough for the fast path's stack buffers.
const WRITE_BATCH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    WebSocket,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("client closed")]
    Eof,
    #[error("bad packet: {0}")]
    Packet(#[from] DecodeError),
    #[error("websocket: {0}")]
    Ws(#[from] ws::WsError),
    #[error("write timed out")]
    WriteTimeout,
}

impl ConnError {
    fn reason(&self) -> &'static str {
        match self {
            ConnError::Io(_) => "io_error",
            ConnError::Eof => "client_closed",
            ConnError::Packet(_) => "bad_packet",
            ConnError::Ws(ws::WsError::Closed) => "client_closed",
            ConnError::Ws(_) => "bad_websocket",
            ConnError::WriteTimeout => "write_timeout",
        }
    }
}

struct Conn {
    stream: TcpStream,
    transport: Transport,
    upgraded: bool,
    eof: bool,
    rbuf: BytesMut,
    asm: ws::Assembler,
    /// Replies waiting for the next write.
    out: BytesMut,
    max_frame: usize,
    max_fragments: usize,
    write_timeout: Duration,
}

impl Conn {
    /// Waits until the socket is readable, reads what is there and appends the complete
    /// packets to `packets`. Cancel-safe: the only await is the readiness wait.
    async fn read(&mut self, packets: &mut VecDeque<Packet>) -> Result<(), ConnError> {
        if self.eof {
            return Err(ConnError::Eof);
        }
        self.stream.readable().await?;
        self.read_ready(packets)
    }

    /// Reads what the socket has now (it was reported readable) and decodes it.
    fn read_ready(&mut self, packets: &mut VecDeque<Packet>) -> Result<(), ConnError> {
        if self.eof {
            return Err(ConnError::Eof);
        }
        let mut got = 0;
        while got < READ_BUDGET {
            self.rbuf.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        self.decode(packets)?;
        if self.rbuf.is_empty() {
            // Give the buffer back while idle.
            self.rbuf = BytesMut::new();
        }
        if self.eof && packets.is_empty() {
            return Err(ConnError::Eof);
        }
        Ok(())
    }

    fn decode(&mut self, packets: &mut VecDeque<Packet>) -> Result<(), ConnError> {
        match self.transport {
            Transport::Tcp => {
                while let Some(p) = Packet::decode_stream(&mut self.rbuf)? {
                    packets.push_back(p);
                }
            }
            Transport::WebSocket => {
                if !self.upgraded {
                    return Ok(());
                }
                while let Some(frame) = ws::decode_frame(&mut self.rbuf, self.max_frame)? {
                    match self.asm.feed(frame, self.max_frame, self.max_fragments)? {
                        ws::Event::Message(m) => packets.push_back(Packet::decode_frame(m)?),
                        ws::Event::Ping(p) => {
                            // Pongs wait for the next write; a client that pings faster than
                            // it reads is cut off instead of growing this buffer.
                            if self.out.len() + p.len() > 2 * self.max_frame {
                                return Err(ws::WsError::Backlog.into());
                            }
                            let (h, n) = ws::frame_header(ws::OP_PONG, p.len());
                            self.out.put_slice(&h[..n]);
                            self.out.put_slice(&p);
                        }
                        ws::Event::None => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the HTTP upgrade request and answers 101. A bad request closes the socket without
    /// an HTTP error, as goim does.
    async fn upgrade(&mut self) -> Result<ws::Upgrade, ConnError> {
        loop {
            if let Some(up) = ws::parse_upgrade(&mut self.rbuf)? {
                self.out.put_slice(ws::upgrade_response(&up.key).as_bytes());
                self.upgraded = true;
                self.flush(VecDeque::new()).await?;
                return Ok(up);
            }
            if self.eof {
                return Err(ConnError::Eof);
            }
            let mut none = VecDeque::new();
            self.read(&mut none).await?;
        }
    }

    /// Queues a reply packet.
    fn reply(&mut self, ver: i16, op: i32, seq: i32, body: &[u8]) {
        let header = Header::new(body.len(), ver, op, seq).encode();
        if self.transport == Transport::WebSocket {
            let (h, n) = ws::frame_header(ws::OP_BINARY, HEADER_LEN + body.len());
            self.out.put_slice(&h[..n]);
        }
        self.out.put_slice(&header);
        self.out.put_slice(body);
    }

    /// Writes pending replies and `pushes` with as few syscalls as the kernel allows.
    async fn flush(&mut self, mut pushes: VecDeque<Outgoing>) -> Result<(), ConnError> {
        let items = pushes.make_contiguous();
        let mut done = 0;
        loop {
            let batch = &items[done..(done + WRITE_BATCH).min(items.len())];
            // Fast path: one non-blocking writev from stack buffers, no allocation.
            let (written, total) = self.write_now(batch)?;
            if written < total {
                self.write_rest(batch, written).await?;
            }
            if !self.out.is_empty() {
                self.out = BytesMut::new();
            }
            done += batch.len();
            if done >= items.len() {
                return Ok(());
            }
        }
    }

    /// One `writev` of the replies and `batch` (at most [`WRITE_BATCH`] items); returns the
    /// bytes the kernel took (0 if the socket is full) and the bytes there were.
    fn write_now(&self, batch: &[Outgoing]) -> io::Result<(usize, usize)> {
        let mut prefixes = [([0u8; 26], 0usize); WRITE_BATCH];
        for (p, item) in prefixes.iter_mut().zip(batch) {
            *p = prefix(self.transport, item);
        }
        let mut slices = [IoSlice::new(&[]); 2 * WRITE_BATCH + 1];
        let mut n = 0;
        if !self.out.is_empty() {
            slices[n] = IoSlice::new(&self.out);
            n += 1;
        }
        for ((p, len), item) in prefixes.iter().zip(batch) {
            if *len > 0 {
                slices[n] = IoSlice::new(&p[..*len]);
                n += 1;
            }
            if !body(item).is_empty() {
                slices[n] = IoSlice::new(body(item));
                n += 1;
            }
        }
        let total = slices[..n].iter().map(|s| s.len()).sum();
        if total == 0 {
            return Ok((0, 0));
        }
        match self.stream.try_write_vectored(&slices[..n]) {
            Ok(w) => Ok((w, total)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((0, total)),
            Err(e) => Err(e),
        }
    }

    /// The slow path for a client that is not keeping up: the rest of the batch, waiting for
    /// the socket within the write timeout.
    async fn write_rest(&self, batch: &[Outgoing], skip: usize) -> Result<(), ConnError> {
        let prefixes: Vec<([u8; 26], usize)> =
            batch.iter().map(|i| prefix(self.transport, i)).collect();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + 2 * batch.len());
        if !self.out.is_empty() {
            slices.push(IoSlice::new(&self.out));
        }
        for ((p, len), item) in prefixes.iter().zip(batch) {
            if *len > 0 {
                slices.push(IoSlice::new(&p[..*len]));
            }
            if !body(item).is_empty() {
                slices.push(IoSlice::new(body(item)));
            }
        }
        let mut bufs = &mut slices[..];
        IoSlice::advance_slices(&mut bufs, skip);
        write_all(&self.stream, bufs, self.write_timeout).await
    }
}

fn body(item: &Outgoing) -> &Bytes {
    match item {
        Outgoing::Raw(b) | Outgoing::Packet { body: b, .. } => b,
    }
}

/// What goes before a push's body on this transport: nothing for a raw batch on TCP, the
/// packet header for a single packet, plus the frame header (and for raw, goim's op-9 wrapper)
/// on WebSocket.
fn prefix(transport: Transport, item: &Outgoing) -> ([u8; 26], usize) {
    let mut p = [0u8; 26];
    let (packet_header, body_len) = match item {
        Outgoing::Raw(b) => (
            (transport == Transport::WebSocket)
                .then(|| Header::new(b.len(), SERVER_VER, op::RAW, 0).encode()),
            b.len(),
        ),
        Outgoing::Packet { header, body } => (Some(*header), body.len()),
    };
    let mut n = 0;
    if transport == Transport::WebSocket {
        let total = body_len + packet_header.map_or(0, |_| HEADER_LEN);
        let (h, hn) = ws::frame_header(ws::OP_BINARY, total);
        p[..hn].copy_from_slice(&h[..hn]);
        n = hn;
    }
    if let Some(h) = packet_header {
        p[n..n + HEADER_LEN].copy_from_slice(&h);
        n += HEADER_LEN;
    }
    (p, n)
}

/// Writes every slice. The common case completes in one non-blocking call with no timer; only
/// a stalled client pays for the timeout.
async fn write_all(
    stream: &TcpStream,
    mut bufs: &mut [IoSlice<'_>],
    timeout: Duration,
) -> Result<(), ConnError> {
    let deadline = Instant::now() + timeout;
    while !bufs.is_empty() {
        match stream.try_write_vectored(bufs) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::timeout_at(deadline, stream.writable())
                    .await
                    .map_err(|_| ConnError::WriteTimeout)??;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How a connection ended.
enum Exit {
    Error(ConnError),
    Timeout,
    Kicked,
    Shutdown,
    RateLimited,
}

/// A token bucket over the packets a client sends after auth: `per_sec` on average, `burst`
/// at once. Two numbers on the connection task's stack, nothing while idle.
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

    /// Spends one token; `false` when there is none.
    fn take(&mut self) -> bool {
        if self.tokens < 1.0 {
            let now = Instant::now();
            let refill = now.duration_since(self.at).as_secs_f64() * self.per_sec;
            self.tokens = (self.tokens + refill).min(self.burst);
            self.at = now;
        }
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Serves one accepted socket to the end.
pub(crate) async fn serve(
    comet: &Arc<Comet>,
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
) {
    let cfg = &comet.cfg;
    let mut conn = Conn {
        stream,
        transport,
        upgraded: false,
        eof: false,
        rbuf: BytesMut::new(),
        asm: ws::Assembler::default(),
        out: BytesMut::new(),
        max_frame: cfg.ws_max_frame,
        max_fragments: cfg.ws_max_fragments,
        write_timeout: cfg.write_timeout,
    };
    let mut pending = VecDeque::new();
    let deadline = Instant::now() + cfg.handshake_timeout;
    let handshake = tokio::select! {
        _ = comet.shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, handshake(comet, &mut conn, &mut pending)) => r,
    };
    let (ch, heartbeat) = match handshake {
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
    let exit = match conn.flush(VecDeque::new()).await {
        Ok(()) => run(comet, &mut conn, &ch, heartbeat, pending).await,
        Err(e) => Exit::Error(e),
    };
    comet.metrics.connections.dec();
    comet.unregister(&ch);
    match &exit {
        Exit::Error(e) => {
            tracing::debug!(%peer, key = %ch.key, error = %e, "connection closed");
            if !matches!(e, ConnError::Eof | ConnError::Ws(ws::WsError::Closed)) {
                comet.metrics.closed(e.reason());
            }
        }
        Exit::Timeout => comet.metrics.closed("heartbeat_timeout"),
        Exit::Kicked => comet.metrics.closed("duplicate_key"),
        Exit::Shutdown => comet.metrics.closed("shutdown"),
        Exit::RateLimited => comet.metrics.closed("rate_limited"),
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
        };
        if let Err(e) = comet.logic.disconnect(req).await {
            tracing::warn!(key = %ch.key, error = %e, "disconnect failed");
        }
    }
}

/// Upgrade (WebSocket), then read until `OpAuth`, ignoring anything before it; authenticate
/// through logic and register. `Ok(None)`: logic refused (closed without a reply, as goim does).
async fn handshake(
    comet: &Arc<Comet>,
    conn: &mut Conn,
    pending: &mut VecDeque<Packet>,
) -> Result<Option<(Arc<Channel>, Duration)>, ConnError> {
    let cookie = if conn.transport == Transport::WebSocket {
        conn.upgrade().await?.cookie
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
    let peer_ip = conn.stream.peer_addr()?.ip();
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
    comet.register(&ch, &reply.room_id);
    // Registration is the last step under the handshake deadline and has no await after it:
    // a timeout can never leave a registered channel behind. The reply is written by the
    // caller, whose teardown unregisters on any failure.
    conn.reply(auth.ver, op::AUTH_REPLY, auth.seq, &[]);
    // goim sends nanoseconds; a zero or negative value would close at once, so fall back.
    let hb = u64::try_from(reply.heartbeat)
        .ok()
        .filter(|&n| n > 0)
        .map_or(Duration::from_secs(480), Duration::from_nanos);
    Ok(Some((ch, hb)))
}

async fn run(
    comet: &Arc<Comet>,
    conn: &mut Conn,
    ch: &Arc<Channel>,
    heartbeat: Duration,
    mut pending: VecDeque<Packet>,
) -> Exit {
    let timer = sleep_until(Instant::now() + heartbeat);
    tokio::pin!(timer);
    let notified = ch.notify.notified();
    tokio::pin!(notified);
    let renew_every = {
        let base = comet.cfg.presence_renew;
        base + base.mul_f64(2.0 * fastrand::f64())
    };
    let mut last_renew = Instant::now();
    let mut budget = OpBudget::new(comet.cfg.client_ops_per_sec, comet.cfg.client_ops_burst);
    loop {
        if !pending.is_empty() {
            let mut handled = 0u32;
            while let Some(p) = pending.pop_front() {
                if !budget.take() {
                    return Exit::RateLimited;
                }
                if p.op == op::HEARTBEAT {
                    timer.as_mut().reset(Instant::now() + heartbeat);
                    if last_renew.elapsed() >= renew_every {
                        last_renew = Instant::now();
                        renew_presence(comet, ch);
                    }
                }
                handle(comet, conn, ch, p).await;
                handled += 1;
                // A read can hold thousands of packets: let other connections run between.
                if handled.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            // After a burst, give the queue's memory back: an idle connection holds none.
            if pending.capacity() > 16 {
                pending = VecDeque::new();
            }
        }
        // Replies, and pongs the WebSocket reader queued.
        if !conn.out.is_empty() {
            if let Err(e) = conn.flush(VecDeque::new()).await {
                return Exit::Error(e);
            }
        }
        // One hand-rolled poll instead of `select!`: the notification future lives across
        // iterations and read readiness is polled directly, so a delivery costs no waiter
        // registration on shared structures (shutdown closes channels one by one instead).
        let event = std::future::poll_fn(|cx| {
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Notified);
            }
            if let Poll::Ready(r) = conn.stream.poll_read_ready(cx) {
                return Poll::Ready(Event::Readable(r));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timeout);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Notified => {
                notified.set(ch.notify.notified());
                if ch.is_closed() {
                    return if ch.was_kicked() {
                        Exit::Kicked
                    } else {
                        Exit::Shutdown
                    };
                }
                let items = ch.take_queue();
                if !items.is_empty() {
                    if let Err(e) = conn.flush(items).await {
                        return Exit::Error(e);
                    }
                    comet.metrics.writes.inc();
                }
            }
            Event::Readable(r) => {
                if let Err(e) = r
                    .map_err(ConnError::from)
                    .and_then(|()| conn.read_ready(&mut pending))
                {
                    return Exit::Error(e);
                }
            }
            Event::Timeout => return Exit::Timeout,
        }
    }
}

enum Event {
    Notified,
    Readable(io::Result<()>),
    Timeout,
}

fn renew_presence(comet: &Arc<Comet>, ch: &Arc<Channel>) {
    let logic = comet.logic.clone();
    let req = HeartbeatReq {
        mid: ch.mid,
        key: ch.key.to_string(),
        server: comet.cfg.name.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = logic.heartbeat(req).await {
            tracing::debug!(error = %e, "presence renewal failed");
        }
    });
}

/// Answers one client packet after auth (GOIM.md §2.4, §2.8).
async fn handle(comet: &Arc<Comet>, conn: &mut Conn, ch: &Arc<Channel>, p: Packet) {
    match p.op {
        op::HEARTBEAT => {
            let online = ch.online().to_be_bytes();
            conn.reply(p.ver, op::HEARTBEAT_REPLY, p.seq, &online);
        }
        op::CHANGE_ROOM => {
            match std::str::from_utf8(&p.body) {
                // Room ids become etcd records: same bound as logic puts on tokens.
                Ok(room) if room.len() <= goim_proto::MAX_ID => comet.change_room(ch, room),
                _ => tracing::debug!(key = %ch.key, "change room: room id not utf-8 or too long"),
            }
            // goim echoes the body whether or not the change happened.
            conn.reply(p.ver, op::CHANGE_ROOM_REPLY, p.seq, &p.body);
        }
        op::SUB | op::UNSUB => {
            if let Some(ops) = parse_ops(&p.body) {
                if p.op == op::SUB {
                    ch.watch(&ops);
                } else {
                    ch.unwatch(&ops);
                }
            }
            conn.reply(p.ver, p.op + 1, p.seq, &p.body);
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
            };
            if let Err(e) = comet.logic.receive(req).await {
                tracing::debug!(key = %ch.key, error = %e, "receive failed");
            }
            conn.reply(p.ver, other, p.seq, &[]);
        }
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

    #[test]
    fn ops_csv() {
        assert_eq!(parse_ops(b"1000,1001"), Some(vec![1000, 1001]));
        assert_eq!(parse_ops(b""), Some(vec![]));
        assert_eq!(parse_ops(b"1000,x"), None);
        assert_eq!(parse_ops(b"99999999999"), None);
        assert_eq!(parse_ops(&[0xff]), None);
    }

    #[test]
    fn prefixes_per_transport() {
        let raw = Outgoing::Raw(Bytes::from_static(&[0u8; 26]));
        assert_eq!(prefix(Transport::Tcp, &raw).1, 0);
        let (p, n) = prefix(Transport::WebSocket, &raw);
        // Frame header 82 2a, then goim's outer packet header with op 9 (GOIM.md §2.2).
        assert_eq!(
            &p[..n],
            &[0x82, 0x2a, 0, 0, 0, 0x2a, 0, 0x10, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0]
        );
        let pkt = Outgoing::Packet {
            header: Header::new(2, 1, 5, 0).encode(),
            body: Bytes::from_static(b"hi"),
        };
        assert_eq!(prefix(Transport::Tcp, &pkt).1, 16);
        assert_eq!(prefix(Transport::WebSocket, &pkt).1, 18);
    }
}
