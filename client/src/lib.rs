//! A goim client (TCP and WebSocket) written from the protocol description alone, sharing no
//! code with the server, so tests check the server against the spec rather than against itself.
//! WebSocket goes through tokio-tungstenite, an implementation independent of the server's
//! own codec; `connect_raw` speaks it frame by frame instead, for tests of bad frames. Also the
//! load generator's and `goim watch`'s connection.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

mod stream;
pub use stream::Stream;
pub use tokio_rustls::rustls;

/// A TLS client config that trusts the CA certificates in the PEM file `ca` (and nothing
/// else), for `Client::connect_tls`.
pub fn tls_trusting(ca: &std::path::Path) -> io::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
    {
        let cert = cert.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

pub const OP_HEARTBEAT: i32 = 2;
pub const OP_HEARTBEAT_REPLY: i32 = 3;
pub const OP_AUTH: i32 = 7;
pub const OP_AUTH_REPLY: i32 = 8;
pub const OP_RAW: i32 = 9;
pub const OP_CHANGE_ROOM: i32 = 12;
pub const OP_SUB: i32 = 14;
pub const OP_UNSUB: i32 = 16;

/// One goim packet as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub ver: i16,
    pub op: i32,
    pub seq: i32,
    pub body: Vec<u8>,
}

/// Encodes a packet: `packLen:i32 headerLen:i16=16 ver:i16 op:i32 seq:i32 body`, big-endian.
pub fn encode(ver: i16, op: i32, seq: i32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + body.len());
    v.extend_from_slice(&(16 + body.len() as i32).to_be_bytes());
    v.extend_from_slice(&16i16.to_be_bytes());
    v.extend_from_slice(&ver.to_be_bytes());
    v.extend_from_slice(&op.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Splits concatenated packets (a TCP stream chunk or an `OpRaw` body).
pub fn split_packets(mut b: &[u8]) -> io::Result<Vec<Packet>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 16 {
            return Err(bad("truncated header"));
        }
        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let hlen = i16::from_be_bytes([b[4], b[5]]);
        if hlen != 16 || len < 16 || len as usize > b.len() {
            return Err(bad(format!("bad packet lengths {len}/{hlen}")));
        }
        let len = len as usize;
        out.push(Packet {
            ver: i16::from_be_bytes([b[6], b[7]]),
            op: i32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            seq: i32::from_be_bytes([b[12], b[13], b[14], b[15]]),
            body: b[16..len].to_vec(),
        });
        b = &b[len..];
    }
    Ok(out)
}

/// Lets the kernel pick the source port at connect time, per destination, instead of at bind
/// time: binding port 0 otherwise scans for a port free for every destination, slows down as
/// sockets pile up and trips over TIME_WAIT.
fn bind_address_no_port(s: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    WebSocket,
}

pub struct Client {
    pub transport: Transport,
    io: Io,
    /// Read but not yet parsed (raw mode).
    buf: Vec<u8>,
    queued: VecDeque<Packet>,
    seq: i32,
}

enum Io {
    /// TCP, or WebSocket spoken frame by frame by this file.
    Raw(Stream),
    /// WebSocket through tokio-tungstenite.
    Ws(Box<WebSocketStream<Stream>>),
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => io::ErrorKind::UnexpectedEof.into(),
        e => io::Error::other(e),
    }
}

/// `{"mid","key","room_id","platform","accepts"}`, as goim's clients send it.
pub fn token(mid: i64, key: &str, room: &str, accepts: &[i32]) -> Vec<u8> {
    let accepts: Vec<String> = accepts.iter().map(|a| a.to_string()).collect();
    format!(
        r#"{{"mid":{mid},"key":"{key}","room_id":"{room}","platform":"test","accepts":[{}]}}"#,
        accepts.join(",")
    )
    .into_bytes()
}

impl Client {
    /// Connects, optionally from a chosen local address (the bench spreads sources over
    /// 127.0.0.x to pass the per-address port limit).
    pub async fn connect(
        transport: Transport,
        addr: SocketAddr,
        local: Option<SocketAddr>,
    ) -> io::Result<Client> {
        let stream = match local {
            Some(l) => {
                let s = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                bind_address_no_port(&s)?;
                s.bind(l)?;
                s.connect(addr).await?
            }
            None => TcpStream::connect(addr).await?,
        };
        stream.set_nodelay(true)?;
        Client::over(transport, addr, Stream::Plain(stream)).await
    }

    /// Connects over TLS (WSS, or goim's TCP protocol over TLS), checking the server's
    /// certificate for `server_name` with `config`.
    pub async fn connect_tls(
        transport: Transport,
        addr: SocketAddr,
        config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
        server_name: &str,
    ) -> io::Result<Client> {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        Client::over(transport, addr, Stream::Tls(Box::new(tls))).await
    }

    async fn over(transport: Transport, addr: SocketAddr, stream: Stream) -> io::Result<Client> {
        let io = match transport {
            Transport::Tcp => Io::Raw(stream),
            Transport::WebSocket => {
                // Small buffers: the load generator holds thousands of these.
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (ws, _) = tokio_tungstenite::client_async_with_config(
                    format!("ws://{addr}/sub"),
                    stream,
                    Some(config),
                )
                .await
                .map_err(ws_error)?;
                Io::Ws(Box::new(ws))
            }
        };
        Ok(Client {
            transport,
            io,
            buf: Vec::new(),
            queued: VecDeque::new(),
            seq: 0,
        })
    }

    /// Connects and, for WebSocket, upgrades with this file's own frames, which
    /// [`Client::send_frame`] can then bend (tests of bad input).
    pub async fn connect_raw(transport: Transport, addr: SocketAddr) -> io::Result<Client> {
        let mut c = Client::connect_plain(transport, addr).await?;
        c.stream()?.tcp().set_nodelay(true)?;
        if transport == Transport::WebSocket {
            c.upgrade("/sub", "").await?;
        }
        Ok(c)
    }

    /// Connects without any handshake (for tests of bad input).
    pub async fn connect_plain(transport: Transport, addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        Ok(Client {
            transport,
            io: Io::Raw(Stream::Plain(stream)),
            buf: Vec::new(),
            queued: VecDeque::new(),
            seq: 0,
        })
    }

    /// The socket of a raw connection.
    fn stream(&mut self) -> io::Result<&mut Stream> {
        match &mut self.io {
            Io::Raw(s) => Ok(s),
            Io::Ws(_) => Err(io::Error::other(
                "a tungstenite connection: use Client::connect_raw for frame-level access",
            )),
        }
    }

    /// Sends a WebSocket upgrade request and checks the 101 response.
    pub async fn upgrade(&mut self, path: &str, cookie: &str) -> io::Result<()> {
        let key =
            base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_be_bytes());
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: goim\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        );
        if !cookie.is_empty() {
            req.push_str(&format!("Cookie: {cookie}\r\n"));
        }
        req.push_str("\r\n");
        self.stream()?.write_all(req.as_bytes()).await?;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                self.buf.drain(..end + 4);
                if !head.starts_with("HTTP/1.1 101 ") {
                    return Err(bad(format!("upgrade refused: {head}")));
                }
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16384];
        let n = self.stream()?.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Writes bytes as they are (TCP) or as one masked binary frame (WebSocket).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        match (&mut self.io, self.transport) {
            (Io::Ws(ws), _) => ws
                .send(Message::Binary(bytes.to_vec().into()))
                .await
                .map_err(ws_error),
            (Io::Raw(s), Transport::Tcp) => s.write_all(bytes).await,
            (Io::Raw(_), Transport::WebSocket) => self.send_frame(true, 2, bytes, true).await,
        }
    }

    /// Writes one WebSocket frame.
    pub async fn send_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        masked: bool,
    ) -> io::Result<()> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = fastrand::u32(..).to_be_bytes();
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.stream()?.write_all(&f).await
    }

    /// Sends one packet with the next sequence number and returns that number.
    pub async fn send(&mut self, op: i32, body: &[u8]) -> io::Result<i32> {
        self.seq += 1;
        let seq = self.seq;
        self.send_bytes(&encode(1, op, seq, body)).await?;
        Ok(seq)
    }

    /// Reads one WebSocket frame: (fin, opcode, payload). Server frames are unmasked. Over
    /// tungstenite, one message as the frame that carried it (the server does not fragment).
    pub async fn recv_frame(&mut self) -> io::Result<(bool, u8, Vec<u8>)> {
        if let Io::Ws(ws) = &mut self.io {
            let msg = ws
                .next()
                .await
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?
                .map_err(ws_error)?;
            return Ok(match msg {
                Message::Binary(b) => (true, 2, b.to_vec()),
                Message::Text(t) => (true, 1, t.as_bytes().to_vec()),
                Message::Ping(p) => (true, 9, p.to_vec()),
                Message::Pong(p) => (true, 10, p.to_vec()),
                Message::Close(c) => {
                    let mut b = Vec::new();
                    if let Some(c) = c {
                        b.extend_from_slice(&u16::from(c.code).to_be_bytes());
                        b.extend_from_slice(c.reason.as_bytes());
                    }
                    (true, 8, b)
                }
                Message::Frame(f) => (true, 0, f.into_payload().to_vec()),
            });
        }
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                if b1 & 0x80 != 0 {
                    return Err(bad("server frame is masked"));
                }
                let (len, off) = match b1 & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut l = [0u8; 8];
                        l.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(l) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= off + len {
                    let payload = self.buf[off..off + len].to_vec();
                    self.buf.drain(..off + len);
                    return Ok((b0 & 0x80 != 0, b0 & 0x0f, payload));
                }
            }
            self.fill().await?;
        }
    }

    /// Reads one WebSocket message carrying a goim packet and returns that packet as sent,
    /// without unwrapping `OpRaw`.
    pub async fn recv_ws_packet(&mut self) -> io::Result<Packet> {
        let (_, opcode, payload) = self.recv_frame().await?;
        if opcode != 2 {
            return Err(bad(format!("expected a binary frame, got opcode {opcode}")));
        }
        let mut ps = split_packets(&payload)?;
        if ps.len() != 1 {
            return Err(bad("frame does not hold exactly one packet"));
        }
        Ok(ps.remove(0))
    }

    /// Next packet from the server. On WebSocket an `OpRaw` wrapper is opened and its packets
    /// returned one by one, as goim's JavaScript client does.
    pub async fn recv(&mut self) -> io::Result<Packet> {
        if let Some(p) = self.queued.pop_front() {
            return Ok(p);
        }
        match self.transport {
            Transport::Tcp => loop {
                if self.buf.len() >= 16 {
                    let len =
                        i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                    if len < 16 {
                        return Err(bad("bad packLen"));
                    }
                    if self.buf.len() >= len as usize {
                        let mut ps = split_packets(&self.buf[..len as usize])?;
                        self.buf.drain(..len as usize);
                        return Ok(ps.remove(0));
                    }
                }
                self.fill().await?;
            },
            Transport::WebSocket => {
                let p = self.recv_ws_packet().await?;
                if p.op != OP_RAW {
                    return Ok(p);
                }
                self.queued.extend(split_packets(&p.body)?);
                self.queued
                    .pop_front()
                    .ok_or_else(|| bad("empty raw batch"))
            }
        }
    }

    /// Authenticates with a token and waits for the auth reply.
    pub async fn auth(&mut self, token: &[u8]) -> io::Result<Packet> {
        let seq = self.send(OP_AUTH, token).await?;
        let p = self.recv().await?;
        if p.op != OP_AUTH_REPLY || p.seq != seq {
            return Err(bad(format!("expected auth reply, got {p:?}")));
        }
        Ok(p)
    }

    /// Sends a heartbeat and returns the room online count from the reply.
    pub async fn heartbeat(&mut self) -> io::Result<i32> {
        let seq = self.send(OP_HEARTBEAT, &[]).await?;
        loop {
            let p = self.recv().await?;
            if p.op == OP_HEARTBEAT_REPLY && p.seq == seq {
                let b: [u8; 4] = p
                    .body
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad("heartbeat body is not 4 bytes"))?;
                return Ok(i32::from_be_bytes(b));
            }
        }
    }

    /// Reads until the server closes; `Ok(n)` is how many bytes came first.
    pub async fn read_to_close(&mut self) -> io::Result<usize> {
        let mut n = self.buf.len();
        self.buf.clear();
        if let Io::Ws(ws) = &mut self.io {
            // Over tungstenite: the bytes of the messages that came first (a close frame
            // carries none).
            use tokio_tungstenite::tungstenite::Error as E;
            loop {
                match ws.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(n),
                    Some(Ok(m)) => n += m.len(),
                    Some(Err(E::ConnectionClosed | E::AlreadyClosed)) => return Ok(n),
                    Some(Err(E::Protocol(_))) => return Ok(n),
                    Some(Err(E::Io(e))) if e.kind() == io::ErrorKind::ConnectionReset => {
                        return Ok(n)
                    }
                    Some(Err(e)) => return Err(ws_error(e)),
                }
            }
        }
        let mut chunk = [0u8; 4096];
        let stream = self.stream()?;
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(n),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.io {
            Io::Raw(s) => s.tcp().local_addr(),
            Io::Ws(ws) => ws.get_ref().tcp().local_addr(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_spec_example() {
        // Heartbeat from GOIM.md §2.2.
        assert_eq!(
            encode(1, OP_HEARTBEAT, 1, &[]),
            [0, 0, 0, 0x10, 0, 0x10, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1]
        );
        let two = [encode(1, 5, 0, b"a"), encode(1, 6, 0, b"")].concat();
        let ps = split_packets(&two).unwrap();
        assert_eq!((ps[0].op, ps[1].op), (5, 6));
        assert!(split_packets(&two[..20]).is_err());
    }
}
