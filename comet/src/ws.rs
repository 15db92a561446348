//! WebSocket server side, as goim's hand-written one behaves (GOIM.md §2.5): the upgrade only on
//! `GET /sub`, frames of up to 8 KiB, text or binary, masked or not, up to 100 fragments, ping
//! answered. A client's close is answered with a close frame echoing its status code, as RFC
//! 6455 asks (goim sends none; no goim client depends on that). Pure functions over bytes.
//!
//! We keep our own codec rather than tokio-tungstenite: goim's acceptance rules differ from
//! RFC-strict ones (unmasked client frames, exact path), and an idle connection here holds no
//! read buffer at all.

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// Largest upgrade request we read before giving up.
pub const MAX_REQUEST: usize = 8192;
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_CONTINUATION: u8 = 0;
pub const OP_TEXT: u8 = 1;
pub const OP_BINARY: u8 = 2;
pub const OP_CLOSE: u8 = 8;
pub const OP_PING: u8 = 9;
pub const OP_PONG: u8 = 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("upgrade request larger than {MAX_REQUEST} bytes")]
    RequestTooLarge,
    #[error("bad upgrade request: {0}")]
    BadRequest(&'static str),
    #[error("reserved bits set")]
    Reserved,
    #[error("frame payload of {0} bytes over the limit")]
    FrameTooLarge(u64),
    #[error("message over the fragment or size limit")]
    MessageTooLarge,
    #[error("unexpected opcode {0}")]
    Opcode(u8),
    #[error("continuation without a start frame")]
    Continuation,
    #[error("client closed")]
    Closed,
    #[error("too many unanswered pings")]
    Backlog,
    #[error("Origin not allowed")]
    Origin,
}

/// A parsed upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub key: String,
    pub cookie: String,
    /// The `Origin` header (browsers send it; other clients usually do not).
    pub origin: Option<String>,
}

/// Parses the upgrade request at the front of `buf` once its blank line has arrived.
/// `Ok(None)`: incomplete. On success the request bytes are consumed.
pub fn parse_upgrade(buf: &mut BytesMut) -> Result<Option<Upgrade>, WsError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_REQUEST {
            Err(WsError::RequestTooLarge)
        } else {
            Ok(None)
        };
    };
    let head = buf.split_to(end + 4);
    let text = std::str::from_utf8(&head[..end]).map_err(|_| WsError::BadRequest("not utf-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, uri, version) = (parts.next(), parts.next(), parts.next());
    if method != Some("GET") {
        return Err(WsError::BadRequest("method is not GET"));
    }
    if uri != Some("/sub") {
        return Err(WsError::BadRequest("path is not /sub"));
    }
    if !version.is_some_and(|v| v.starts_with("HTTP/")) || parts.next().is_some() {
        return Err(WsError::BadRequest("malformed request line"));
    }
    let (mut upgrade, mut connection, mut version13) = (false, false, false);
    let mut key = String::new();
    let mut cookie = String::new();
    let mut origin = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(WsError::BadRequest("malformed header"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "connection" => connection = value.to_ascii_lowercase().contains("upgrade"),
            "sec-websocket-version" => version13 = value == "13",
            "sec-websocket-key" => key = value.to_string(),
            "cookie" => cookie = value.to_string(),
            "origin" => origin = Some(value.to_string()),
            _ => {}
        }
    }
    if !upgrade {
        return Err(WsError::BadRequest("Upgrade is not websocket"));
    }
    if !connection {
        return Err(WsError::BadRequest("Connection lacks upgrade"));
    }
    if !version13 {
        return Err(WsError::BadRequest("Sec-WebSocket-Version is not 13"));
    }
    if key.is_empty() {
        return Err(WsError::BadRequest("no Sec-WebSocket-Key"));
    }
    Ok(Some(Upgrade {
        key,
        cookie,
        origin,
    }))
}

/// Whether a WebSocket from `origin` may connect: any when `allowed` is empty, and any request
/// without an Origin (not a browser); else an exact match, or a pattern with one `*` for a
/// subdomain (`https://*.example.com`). Compared without case, as hosts are.
pub fn origin_allowed(origin: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    if allowed.is_empty() {
        return true;
    }
    let origin = origin.to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.split_once('*') {
            None => a == origin,
            Some((prefix, suffix)) => {
                origin.len() > prefix.len() + suffix.len()
                    && origin.starts_with(prefix)
                    && origin.ends_with(suffix)
                    // One label: `*` never spans a dot or a port.
                    && !origin[prefix.len()..origin.len() - suffix.len()].contains(['.', ':', '/'])
            }
        }
    })
}

/// The answer to a refused Origin.
pub const FORBIDDEN: &str =
    "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// RFC 6455 accept value for a client key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The byte-exact 101 response goim sends.
pub fn upgrade_response(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    )
}

/// One frame, unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Bytes,
}

/// Decodes the frame at the front of `buf`. `Ok(None)`: incomplete. A payload over `max` is
/// refused from its header alone, before any of it is buffered.
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WsError> {
    let Some(&[b0, b1]) = buf.first_chunk::<2>() else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(WsError::Reserved);
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut off) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (n as u64, 2),
    };
    if len > max as u64 {
        return Err(WsError::FrameTooLarge(len));
    }
    let len = len as usize;
    let mask = if masked {
        let Some(m) = buf.get(off..off + 4) else {
            return Ok(None);
        };
        off += 4;
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    if buf.len() < off + len {
        return Ok(None);
    }
    buf.advance(off);
    let mut payload = buf.split_to(len);
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
    }
    Ok(Some(Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload: payload.freeze(),
    }))
}

/// Header of an unmasked final frame with `len` payload bytes. Returns the buffer and how many
/// of its bytes are used.
pub fn frame_header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// What the connection should do with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete message (one goim packet).
    Message(Bytes),
    /// Answer with a pong carrying this payload.
    Ping(Bytes),
    /// Nothing to do (pong, or a fragment was stored).
    None,
    /// The client closed; answer with a close frame carrying this payload (its status code),
    /// then end the connection.
    Close(Bytes),
}

/// Reassembles fragmented messages within goim's limits. Holds memory only mid-message.
#[derive(Debug, Default)]
pub struct Assembler {
    parts: Option<BytesMut>,
    count: usize,
}

impl Assembler {
    /// Bytes held for a fragmented message in progress.
    pub fn buffered(&self) -> usize {
        self.parts.as_ref().map_or(0, |p| p.capacity())
    }

    pub fn feed(
        &mut self,
        frame: Frame,
        max_message: usize,
        max_fragments: usize,
    ) -> Result<Event, WsError> {
        match frame.opcode {
            OP_TEXT | OP_BINARY => {
                if self.parts.is_some() {
                    return Err(WsError::Continuation);
                }
                if frame.fin {
                    return Ok(Event::Message(frame.payload));
                }
                self.parts = Some(BytesMut::from(&frame.payload[..]));
                self.count = 0;
                Ok(Event::None)
            }
            OP_CONTINUATION => {
                let Some(parts) = self.parts.as_mut() else {
                    return Err(WsError::Continuation);
                };
                self.count += 1;
                if self.count > max_fragments || parts.len() + frame.payload.len() > max_message {
                    return Err(WsError::MessageTooLarge);
                }
                parts.extend_from_slice(&frame.payload);
                if frame.fin {
                    self.count = 0;
                    return Ok(Event::Message(
                        self.parts.take().unwrap_or_default().freeze(),
                    ));
                }
                Ok(Event::None)
            }
            OP_PING => Ok(Event::Ping(frame.payload)),
            OP_PONG => Ok(Event::None),
            // Echo the status code only: a reason could be invalid UTF-8 or too long for us.
            OP_CLOSE => Ok(Event::Close(
                frame.payload.slice(..frame.payload.len().min(2)),
            )),
            other => Err(WsError::Opcode(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(s: &str) -> Result<Option<Upgrade>, WsError> {
        parse_upgrade(&mut BytesMut::from(s))
    }

    const GOOD: &str = "GET /sub HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: a=b\r\n\r\n";

    #[test]
    fn rfc_accept_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            upgrade_response("dGhlIHNhbXBsZSBub25jZQ=="),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn upgrade_checks() {
        assert_eq!(
            req(GOOD).unwrap().unwrap(),
            Upgrade {
                key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
                cookie: "a=b".into(),
                origin: None,
            }
        );
        assert_eq!(req("GET /sub HTTP/1.1\r\n"), Ok(None));
        for bad in [
            GOOD.replace("/sub", "/sub?x=1"),
            GOOD.replace("/sub", "/"),
            GOOD.replace("GET", "POST"),
            GOOD.replace("13", "8"),
            GOOD.replace("WebSocket", "h2c"),
            GOOD.replace("keep-alive, Upgrade", "close"),
            GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", ""),
        ] {
            assert!(req(&bad).is_err(), "{bad}");
        }
        let huge = format!("GET /sub HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST));
        assert_eq!(req(&huge), Err(WsError::RequestTooLarge));
    }

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    #[test]
    fn frames_masked_unmasked_and_partial() {
        let payload = vec![7u8; 300];
        let wire = masked(OP_BINARY, true, &payload);
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert_eq!(decode_frame(&mut buf, 8192), Ok(None));
        buf.extend_from_slice(&wire[wire.len() - 1..]);
        let f = decode_frame(&mut buf, 8192).unwrap().unwrap();
        assert_eq!(
            (f.fin, f.opcode, &f.payload[..]),
            (true, OP_BINARY, &payload[..])
        );
        let (h, n) = frame_header(OP_TEXT, 3);
        let mut buf = BytesMut::from(&h[..n]);
        buf.extend_from_slice(b"abc");
        let f = decode_frame(&mut buf, 8192).unwrap().unwrap();
        assert_eq!(&f.payload[..], b"abc");
        assert!(buf.is_empty());
    }

    #[test]
    fn frame_limits() {
        let mut buf = BytesMut::from(&masked(OP_BINARY, true, &[0u8; 8193])[..4]);
        assert_eq!(
            decode_frame(&mut buf, 8192),
            Err(WsError::FrameTooLarge(8193))
        );
        let mut buf =
            BytesMut::from(&[0x82u8, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode_frame(&mut buf, 8192),
            Err(WsError::FrameTooLarge(_))
        ));
        let mut buf = BytesMut::from(&[0xc2u8, 0][..]);
        assert_eq!(decode_frame(&mut buf, 8192), Err(WsError::Reserved));
    }

    #[test]
    fn header_sizes() {
        assert_eq!(frame_header(OP_BINARY, 125).1, 2);
        assert_eq!(&frame_header(OP_BINARY, 42).0[..2], &[0x82, 0x2a]);
        assert_eq!(frame_header(OP_BINARY, 126).1, 4);
        assert_eq!(frame_header(OP_BINARY, 70000).1, 10);
    }

    fn frame(opcode: u8, fin: bool, p: &[u8]) -> Frame {
        Frame {
            fin,
            opcode,
            payload: Bytes::copy_from_slice(p),
        }
    }

    #[test]
    fn assembly() {
        let mut a = Assembler::default();
        assert_eq!(
            a.feed(frame(OP_TEXT, false, b"ab"), 10, 100),
            Ok(Event::None)
        );
        assert_eq!(
            a.feed(frame(OP_PING, true, b"p"), 10, 100),
            Ok(Event::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(
            a.feed(frame(OP_CONTINUATION, true, b"cd"), 10, 100),
            Ok(Event::Message(Bytes::from_static(b"abcd")))
        );
        assert_eq!(
            a.feed(frame(OP_CONTINUATION, true, b"x"), 10, 100),
            Err(WsError::Continuation)
        );
        assert_eq!(
            a.feed(frame(OP_CLOSE, true, b""), 10, 100),
            Ok(Event::Close(Bytes::new()))
        );
        assert_eq!(
            a.feed(frame(3, true, b""), 10, 100),
            Err(WsError::Opcode(3))
        );
        // Fragment count and total size are bounded.
        let mut a = Assembler::default();
        a.feed(frame(OP_BINARY, false, b""), 10, 2).unwrap();
        a.feed(frame(OP_CONTINUATION, false, b""), 10, 2).unwrap();
        a.feed(frame(OP_CONTINUATION, false, b""), 10, 2).unwrap();
        assert_eq!(
            a.feed(frame(OP_CONTINUATION, false, b""), 10, 2),
            Err(WsError::MessageTooLarge)
        );
        let mut a = Assembler::default();
        a.feed(frame(OP_BINARY, false, b"123456"), 10, 100).unwrap();
        assert_eq!(
            a.feed(frame(OP_CONTINUATION, true, b"123456"), 10, 100),
            Err(WsError::MessageTooLarge)
        );
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..10000)) {
            let mut buf = BytesMut::from(&data[..]);
            let mut a = Assembler::default();
            while let Ok(Some(f)) = decode_frame(&mut buf, 8192) {
                if a.feed(f, 8192, 100).is_err() { break; }
            }
            let _ = parse_upgrade(&mut BytesMut::from(&data[..]));
        }
    }

    #[test]
    fn origins() {
        let allowed = vec![
            "https://app.example.com".to_string(),
            "https://*.example.org".to_string(),
        ];
        assert!(origin_allowed(None, &allowed), "not a browser");
        assert!(origin_allowed(Some("https://evil.test"), &[]), "no list");
        assert!(origin_allowed(Some("https://APP.example.com"), &allowed));
        assert!(origin_allowed(Some("https://chat.example.org"), &allowed));
        for refused in [
            "https://evil.test",
            "http://app.example.com",
            "https://app.example.com.evil.test",
            "https://example.org",
            "https://a.b.example.org",
            "https://x.example.org:8443",
            "null",
        ] {
            assert!(!origin_allowed(Some(refused), &allowed), "{refused}");
        }
        let mut buf = BytesMut::from(
            GOOD.replace("Cookie: a=b", "Origin: https://app.example.com")
                .as_bytes(),
        );
        let up = parse_upgrade(&mut buf).unwrap().unwrap();
        assert_eq!(up.origin.as_deref(), Some("https://app.example.com"));
    }
}
