//! The I/O half of a client connection: owns the socket and its buffers, reads and decodes
//! packets (goim's TCP framing, or WebSocket after the upgrade), queues replies and writes
//! them with pushes in one vectored write. Knows nothing of the comet around it. An idle
//! connection holds no read or write buffer.
//!
//! TLS (WSS, TCP over TLS) runs inside the connection on rustls's own state machine rather
//! than as a wrapping stream: the readiness-driven reads and the non-blocking write fast path
//! stay the same for plain sockets, and a plain connection pays one pointer for it (bytes per
//! idle connection are a measured goal).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use goim_proto::op;
use goim_proto::packet::{DecodeError, Header, Packet, HEADER_LEN, SERVER_VER};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::channel::Outgoing;
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
pub enum ConnError {
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
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Proxy(#[from] crate::proxy::ProxyError),
}

impl ConnError {
    /// The `goim_comet_closed_total` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnError::Io(_) => "io_error",
            ConnError::Eof => "client_closed",
            ConnError::Packet(_) => "bad_packet",
            ConnError::Ws(ws::WsError::Closed) => "client_closed",
            ConnError::Ws(ws::WsError::Origin) => "origin",
            ConnError::Ws(_) => "bad_websocket",
            ConnError::WriteTimeout => "write_timeout",
            ConnError::Tls(_) => "tls_error",
            ConnError::Proxy(_) => "proxy_header",
        }
    }
}

/// Limits a connection reads under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame: usize,
    pub max_fragments: usize,
    pub write_timeout: Duration,
}

pub struct Connection {
    /// Shared with the connection's [`crate::channel::Channel`] (see [`Socket`]) once it is
    /// registered, so pushes can be written from the fan-out without waking this task.
    stream: Arc<TcpStream>,
    /// The TLS session on a WSS or TCP-over-TLS listener.
    tls: Option<Box<rustls::ServerConnection>>,
    transport: Transport,
    upgraded: bool,
    eof: bool,
    rbuf: BytesMut,
    asm: ws::Assembler,
    /// Replies waiting for the next write.
    out: BytesMut,
    limits: Limits,
}

impl Connection {
    pub fn new(stream: TcpStream, transport: Transport, limits: Limits) -> Self {
        Connection {
            stream: Arc::new(stream),
            tls: None,
            transport,
            upgraded: false,
            eof: false,
            rbuf: BytesMut::new(),
            asm: ws::Assembler::default(),
            out: BytesMut::new(),
            limits,
        }
    }

    /// Reads the PROXY protocol header a load balancer sends first; the client's address
    /// it gives (`None`: the balancer's own connection). Comes before TLS.
    pub async fn read_proxy_header(&mut self) -> Result<Option<std::net::SocketAddr>, ConnError> {
        loop {
            if let Some(h) = crate::proxy::parse(&self.rbuf)? {
                let _ = self.rbuf.split_to(h.len);
                return Ok(h.source);
            }
            if self.eof {
                return Err(ConnError::Eof);
            }
            self.stream.readable().await?;
            // Raw bytes: the header is outside any TLS session.
            self.rbuf.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Speaks TLS from now on, with `config`; [`Connection::tls_handshake`] comes next.
    /// Bytes already read (after a PROXY header) are the session's first.
    pub fn start_tls(&mut self, config: Arc<rustls::ServerConfig>) -> Result<(), ConnError> {
        let mut tls = rustls::ServerConnection::new(config)?;
        // What is written is bounded by the caller (a batch of queued pushes at a time);
        // rustls must take it whole so a flush never stops halfway through a packet.
        tls.set_buffer_limit(None);
        let mut early = &self.rbuf[..];
        while !early.is_empty() {
            tls.read_tls(&mut early)?;
            tls.process_new_packets()?;
        }
        self.rbuf = BytesMut::new();
        self.tls = Some(Box::new(tls));
        Ok(())
    }

    /// Whether this connection speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Runs the TLS handshake to its end (nothing to do without TLS). Application data the
    /// client sent right behind it stays buffered for the first read.
    pub async fn tls_handshake(&mut self) -> Result<(), ConnError> {
        while self.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
            if self.tls.as_ref().is_some_and(|t| t.wants_write()) {
                self.write_tls().await?;
                continue;
            }
            if self.eof {
                return Err(ConnError::Eof);
            }
            self.stream.readable().await?;
            self.fill()?;
        }
        // Session tickets and the like, sent after the handshake.
        self.write_tls().await
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The socket for writes from outside this connection's task, on a plain socket (a TLS
    /// session's state is this task's alone, so TLS connections have none).
    pub fn socket(&self) -> Option<Socket> {
        self.tls.is_none().then(|| Socket {
            stream: self.stream.clone(),
            transport: self.transport,
        })
    }

    /// Bytes of buffer this connection holds now (0 when idle): what a burst must give back.
    pub fn buffered(&self) -> usize {
        self.rbuf.capacity() + self.out.capacity() + self.asm.buffered()
    }

    /// Replies (or pongs, or TLS records) are waiting for a write.
    pub fn has_replies(&self) -> bool {
        !self.out.is_empty() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Waits until the socket is readable, reads what is there and appends the complete
    /// packets to `packets`. Cancel-safe: the only await is the readiness wait.
    pub async fn read(&mut self, packets: &mut VecDeque<Packet>) -> Result<(), ConnError> {
        if self.eof {
            return Err(ConnError::Eof);
        }
        self.stream.readable().await?;
        self.read_ready(packets)
    }

    /// Reads what the socket has now (it was reported readable) and decodes it.
    pub fn read_ready(&mut self, packets: &mut VecDeque<Packet>) -> Result<(), ConnError> {
        if self.eof {
            return Err(ConnError::Eof);
        }
        self.fill()?;
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

    /// Appends what the socket has now (decrypted, with TLS) to the read buffer, up to the
    /// read budget.
    fn fill(&mut self) -> Result<(), ConnError> {
        let mut got = 0;
        while got < READ_BUDGET && !self.eof {
            let n = match &mut self.tls {
                None => {
                    self.rbuf.reserve(READ_CHUNK);
                    self.stream.try_read_buf(&mut self.rbuf)
                }
                Some(tls) => tls.read_tls(&mut SocketIo(&self.stream)),
            };
            match n {
                Ok(0) => self.eof = true,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
            if let Some(tls) = &mut self.tls {
                let state = match tls.process_new_packets() {
                    Ok(s) => s,
                    Err(e) => {
                        // The alert telling the client why, if the socket takes it now.
                        let _ = tls.write_tls(&mut SocketIo(&self.stream));
                        return Err(e.into());
                    }
                };
                let plain = state.plaintext_bytes_to_read();
                if state.peer_has_closed() {
                    self.eof = true;
                }
                if plain > 0 {
                    let start = self.rbuf.len();
                    self.rbuf.resize(start + plain, 0);
                    tls.reader().read_exact(&mut self.rbuf[start..])?;
                }
            }
        }
        Ok(())
    }

    pub fn decode(&mut self, packets: &mut VecDeque<Packet>) -> Result<(), ConnError> {
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
                while let Some(frame) = ws::decode_frame(&mut self.rbuf, self.limits.max_frame)? {
                    match self
                        .asm
                        .feed(frame, self.limits.max_frame, self.limits.max_fragments)?
                    {
                        ws::Event::Message(m) => packets.push_back(Packet::decode_frame(m)?),
                        ws::Event::Ping(p) => {
                            // Pongs wait for the next write; a client that pings faster than
                            // it reads is cut off instead of growing this buffer.
                            if self.out.len() + p.len() > 2 * self.limits.max_frame {
                                return Err(ws::WsError::Backlog.into());
                            }
                            let (h, n) = ws::frame_header(ws::OP_PONG, p.len());
                            self.out.put_slice(&h[..n]);
                            self.out.put_slice(&p);
                        }
                        ws::Event::None => {}
                        ws::Event::Close(code) => {
                            let (h, n) = ws::frame_header(ws::OP_CLOSE, code.len());
                            self.out.put_slice(&h[..n]);
                            self.out.put_slice(&code);
                            return Err(ws::WsError::Closed.into());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the HTTP upgrade request and answers 101. A bad request closes the socket without
    /// an HTTP error, as goim does; an Origin not in `origins` gets a 403.
    pub async fn upgrade(&mut self, origins: &[String]) -> Result<ws::Upgrade, ConnError> {
        loop {
            if let Some(up) = ws::parse_upgrade(&mut self.rbuf)? {
                if !ws::origin_allowed(up.origin.as_deref(), origins) {
                    self.out.put_slice(ws::FORBIDDEN.as_bytes());
                    let _ = self.flush(VecDeque::new()).await;
                    return Err(ws::WsError::Origin.into());
                }
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
    pub fn reply(&mut self, ver: i16, op: i32, seq: i32, body: &[u8]) {
        let header = Header::new(body.len(), ver, op, seq).encode();
        if self.transport == Transport::WebSocket {
            let (h, n) = ws::frame_header(ws::OP_BINARY, HEADER_LEN + body.len());
            self.out.put_slice(&h[..n]);
        }
        self.out.put_slice(&header);
        self.out.put_slice(body);
    }

    /// Writes pending replies and `pushes` with as few syscalls as the kernel allows.
    pub async fn flush(&mut self, mut pushes: VecDeque<Outgoing>) -> Result<(), ConnError> {
        if self.tls.is_some() {
            return self.flush_tls(pushes).await;
        }
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

    /// [`Connection::flush`] over TLS: each batch is encrypted whole, then written out.
    async fn flush_tls(&mut self, mut pushes: VecDeque<Outgoing>) -> Result<(), ConnError> {
        let items = pushes.make_contiguous();
        let mut chunks = items.chunks(WRITE_BATCH);
        loop {
            let batch = chunks.next().unwrap_or_default();
            if let Some(tls) = &mut self.tls {
                let mut w = tls.writer();
                w.write_all(&self.out)?;
                for item in batch {
                    let (p, n) = prefix(self.transport, item);
                    w.write_all(&p[..n])?;
                    w.write_all(body(item))?;
                }
            }
            if !self.out.is_empty() {
                self.out = BytesMut::new();
            }
            self.write_tls().await?;
            if chunks.len() == 0 {
                return Ok(());
            }
        }
    }

    /// Writes the TLS records rustls holds, waiting for the socket within the write timeout.
    async fn write_tls(&mut self) -> Result<(), ConnError> {
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        let deadline = Instant::now() + self.limits.write_timeout;
        while tls.wants_write() {
            match tls.write_tls(&mut SocketIo(&self.stream)) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::timeout_at(deadline, self.stream.writable())
                        .await
                        .map_err(|_| ConnError::WriteTimeout)??;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// One `writev` of the replies and `batch` (at most [`WRITE_BATCH`] items); returns the
    /// bytes the kernel took (0 if the socket is full) and the bytes there were.
    fn write_now(&self, batch: &[Outgoing]) -> io::Result<(usize, usize)> {
        try_writev::<WRITE_BATCH, { 2 * WRITE_BATCH + 1 }>(
            &self.stream,
            self.transport,
            &self.out,
            batch,
        )
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
        write_all(&self.stream, bufs, self.limits.write_timeout).await
    }
}

/// Most items of a direct write (a push, after its position when numbered): its stack buffers
/// are sized for them, not for a whole [`WRITE_BATCH`], since it runs once per delivery.
const DIRECT_ITEMS: usize = 2;

/// One non-blocking `writev` of `head` and `batch` (at most `B` items, with `S` = 2B + 1
/// slices) from stack buffers: the bytes the kernel took (0 if the socket is full) and the
/// bytes there were.
fn try_writev<const B: usize, const S: usize>(
    stream: &TcpStream,
    transport: Transport,
    head: &[u8],
    batch: &[Outgoing],
) -> io::Result<(usize, usize)> {
    debug_assert!(batch.len() <= B && S > 2 * B);
    let mut prefixes = [([0u8; 26], 0usize); B];
    for (p, item) in prefixes.iter_mut().zip(batch) {
        *p = prefix(transport, item);
    }
    let mut slices = [IoSlice::new(&[]); S];
    let mut n = 0;
    if !head.is_empty() {
        slices[n] = IoSlice::new(head);
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
    match stream.try_write_vectored(&slices[..n]) {
        Ok(w) => Ok((w, total)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((0, total)),
        Err(e) => Err(e),
    }
}

/// A connection's plain socket as the push paths see it: they may write a push straight to
/// it when nothing else is queued or being written (the channel's lock decides that), which
/// saves waking the connection's task for each delivery.
#[derive(Debug)]
pub struct Socket {
    stream: Arc<TcpStream>,
    transport: Transport,
}

impl Socket {
    /// One non-blocking write of `items` (a few): how many bytes went and how many there
    /// were. Never waits: a full socket takes 0 bytes.
    pub fn try_write(&self, items: &[Outgoing]) -> io::Result<(usize, usize)> {
        if items.len() <= DIRECT_ITEMS {
            try_writev::<DIRECT_ITEMS, { 2 * DIRECT_ITEMS + 1 }>(
                &self.stream,
                self.transport,
                &[],
                items,
            )
        } else {
            try_writev::<WRITE_BATCH, { 2 * WRITE_BATCH + 1 }>(
                &self.stream,
                self.transport,
                &[],
                items,
            )
        }
    }

    /// What is left of `items` after the first `written` bytes went out (see [`rest`]).
    pub fn rest(&self, items: &[Outgoing], written: usize) -> Outgoing {
        rest(self.transport, items, written)
    }
}

/// What is left of `items` after the first `written` bytes of their framing on `transport`
/// went out: the remaining bytes, framed already, and the messages they hold (those not
/// wholly written).
fn rest(transport: Transport, items: &[Outgoing], mut written: usize) -> Outgoing {
    let mut rest = BytesMut::new();
    let mut messages = 0;
    for item in items {
        let (p, n) = prefix(transport, item);
        let len = n + body(item).len();
        if written >= len {
            written -= len;
            continue;
        }
        messages += crate::channel::messages(item);
        for part in [&p[..n], &body(item)[..]] {
            let skip = written.min(part.len());
            rest.put_slice(&part[skip..]);
            written -= skip;
        }
    }
    Outgoing::Rest {
        bytes: rest.freeze(),
        messages: u32::try_from(messages).unwrap_or(u32::MAX),
    }
}

/// The socket as blocking-style I/O for rustls: a full socket reads as `WouldBlock`.
struct SocketIo<'a>(&'a TcpStream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn body(item: &Outgoing) -> &Bytes {
    match item {
        Outgoing::Raw(b) | Outgoing::Packet { body: b, .. } | Outgoing::Rest { bytes: b, .. } => b,
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
        // Framed already.
        Outgoing::Rest { .. } => return (p, 0),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        max_frame: 64 * 1024,
        max_fragments: 16,
        write_timeout: Duration::from_secs(10),
    };

    /// A connected pair of real sockets: the connection's end, and the client's.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (server, client)
    }

    /// Over TLS: packets the client sends in one write with its handshake's end are read,
    /// and a flush larger than the socket takes at once waits for the client and arrives
    /// whole and in order; a client that sends something other than TLS is a TLS error.
    #[tokio::test]
    async fn tls_reads_and_flushes_through_the_session() {
        use goim_testkit::pki::TestCa;
        let ca = TestCa::new("comet-test");
        let dir = tempfile::tempdir().unwrap();
        ca.issue(dir.path(), "comet", &["DNS:comet.test"]);
        let server_tls = goim_tls::server(dir.path(), Default::default()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        {
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca.cert()).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
        }
        let client_cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );

        let (server, client) = pair().await;
        let mut conn = Connection::new(server, Transport::Tcp, LIMITS);
        conn.start_tls(server_tls.config()).unwrap();
        let handshake = tokio::spawn(async move { conn.tls_handshake().await.map(|()| conn) });
        let name = rustls::pki_types::ServerName::try_from("comet.test").unwrap();
        let mut client = tokio_rustls::TlsConnector::from(client_cfg.clone())
            .connect(name.clone(), client)
            .await
            .unwrap();
        let hb: Vec<u8> = (0..3)
            .flat_map(|seq| Packet::new(1, op::HEARTBEAT, seq, Bytes::new()).encode())
            .collect();
        client.write_all(&hb).await.unwrap();
        let mut conn = handshake.await.unwrap().unwrap();
        let mut packets = VecDeque::new();
        while packets.len() < 3 {
            conn.read(&mut packets).await.unwrap();
        }
        assert_eq!(packets.iter().map(|p| p.seq).collect::<Vec<_>>(), [0, 1, 2]);

        // 4 MB in 1 KB pushes: far more than the socket buffers hold.
        let pushes: VecDeque<Outgoing> = (0..4096u32)
            .map(|i| Outgoing::Raw(Bytes::from(vec![(i % 251) as u8; 1024])))
            .collect();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4096 * 1024];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        conn.flush(pushes).await.unwrap();
        let got = reader.await.unwrap();
        for (i, chunk) in got.chunks(1024).enumerate() {
            assert!(
                chunk.iter().all(|&b| b == (i % 251) as u8),
                "push {i} garbled"
            );
        }

        // Not TLS at all.
        let (server, mut client) = pair().await;
        let mut conn = Connection::new(server, Transport::Tcp, LIMITS);
        conn.start_tls(server_tls.config()).unwrap();
        client.write_all(&hb).await.unwrap();
        let e = conn.tls_handshake().await.unwrap_err();
        assert_eq!(e.reason(), "tls_error", "{e}");
    }

    /// A 64 KB burst of valid packets is read and answered, and then the connection holds no
    /// buffer, as before it (issue: one burst pinned ~200 KB per connection for its life).
    #[tokio::test]
    async fn a_burst_leaves_no_buffer_behind() {
        let (server, mut client) = pair().await;
        let mut conn = Connection::new(server, Transport::Tcp, LIMITS);
        assert_eq!(conn.buffered(), 0);
        let burst: Vec<u8> = (0..4096)
            .flat_map(|seq| Packet::new(1, op::HEARTBEAT, seq, Bytes::new()).encode())
            .collect();
        assert_eq!(burst.len(), 64 * 1024);
        client.write_all(&burst).await.unwrap();
        let mut packets = VecDeque::new();
        while packets.len() < 4096 {
            conn.read(&mut packets).await.unwrap();
        }
        for p in &packets {
            conn.reply(p.ver, op::HEARTBEAT_REPLY, p.seq, &[0; 4]);
        }
        assert!(conn.buffered() >= 4096 * 20, "the replies are queued");
        let reader = tokio::spawn(async move {
            let mut replies = vec![0u8; 4096 * 20];
            client.read_exact(&mut replies).await.unwrap();
            replies
        });
        conn.flush(VecDeque::new()).await.unwrap();
        let replies = reader.await.unwrap();
        // The last reply answers the last heartbeat.
        let at = replies.len() - 20;
        let last = Header::parse(replies[at..at + HEADER_LEN].try_into().unwrap());
        assert_eq!((last.op, last.seq), (op::HEARTBEAT_REPLY, 4095));
        assert_eq!(conn.buffered(), 0);
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

    /// What a partial direct write leaves: the framing's unwritten tail, byte for byte, and
    /// the messages of every push not wholly written, for each cut and both transports.
    #[test]
    fn the_rest_is_the_unwritten_tail_of_the_framing() {
        let one = Outgoing::Packet {
            header: Header::new(3, SERVER_VER, 1000, 0).encode(),
            body: Bytes::from_static(b"abc"),
        };
        let packet = |b: &[u8]| {
            let mut v = Header::new(b.len(), SERVER_VER, 1000, 0).encode().to_vec();
            v.extend_from_slice(b);
            v
        };
        let two = Outgoing::Raw(Bytes::from([packet(b"x"), packet(b"yz")].concat()));
        let items = [one, two];
        for transport in [Transport::Tcp, Transport::WebSocket] {
            let mut framed = Vec::new();
            let mut ends = Vec::new();
            for item in &items {
                let (p, n) = prefix(transport, item);
                framed.extend_from_slice(&p[..n]);
                framed.extend_from_slice(body(item));
                ends.push(framed.len());
            }
            for written in 0..framed.len() {
                let Outgoing::Rest { bytes, messages } = rest(transport, &items, written) else {
                    panic!("not a rest");
                };
                assert_eq!(&bytes[..], &framed[written..], "{transport:?} at {written}");
                let expected = if written < ends[0] { 3 } else { 2 };
                assert_eq!(messages, expected, "{transport:?} at {written}");
            }
        }
    }
}
