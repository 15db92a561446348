//! The goim packet: a 16-byte big-endian header and a body.
//!
//! ```text
//! packLen:i32 | headerLen:i16 (=16) | ver:i16 | op:i32 | seq:i32 | body
//! ```
//!
//! Pure functions over bytes, no I/O. Decoding splits the input buffer, so bodies share the
//! allocation they were read into.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Largest body a client may send (goim `MaxBodySize`).
pub const MAX_BODY: usize = 4096;
/// Largest packet a client may send.
pub const MAX_PACK: usize = MAX_BODY + HEADER_LEN;
/// `ver` on packets the server originates.
pub const SERVER_VER: i16 = 1;

/// Why a packet was refused. Every variant closes the connection, as in goim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet length {0} outside 16..={max}", max = MAX_PACK)]
    PackLen(i32),
    #[error("header length {0}, expected 16")]
    HeaderLen(i16),
    #[error("packet length {pack_len} differs from frame length {frame_len}")]
    FrameLen { pack_len: i32, frame_len: usize },
}

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub pack_len: i32,
    pub header_len: i16,
    pub ver: i16,
    pub op: i32,
    pub seq: i32,
}

impl Header {
    /// A header for a body of `body_len` bytes.
    pub fn new(body_len: usize, ver: i16, op: i32, seq: i32) -> Self {
        Header {
            pack_len: (HEADER_LEN + body_len) as i32,
            header_len: HEADER_LEN as i16,
            ver,
            op,
            seq,
        }
    }

    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let mut s = &b[..];
        Header {
            pack_len: s.get_i32(),
            header_len: s.get_i16(),
            ver: s.get_i16(),
            op: s.get_i32(),
            seq: s.get_i32(),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut w = &mut out[..];
        w.put_i32(self.pack_len);
        w.put_i16(self.header_len);
        w.put_i16(self.ver);
        w.put_i32(self.op);
        w.put_i32(self.seq);
        out
    }

    /// Checks what goim checks, plus a lower bound on `packLen` (goim accepts negative lengths on
    /// TCP). Returns the body length.
    pub fn validate(&self) -> Result<usize, DecodeError> {
        if self.pack_len < HEADER_LEN as i32 || self.pack_len > MAX_PACK as i32 {
            return Err(DecodeError::PackLen(self.pack_len));
        }
        if self.header_len != HEADER_LEN as i16 {
            return Err(DecodeError::HeaderLen(self.header_len));
        }
        Ok(self.pack_len as usize - HEADER_LEN)
    }
}

/// One decoded packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub ver: i16,
    pub op: i32,
    pub seq: i32,
    pub body: Bytes,
}

impl Packet {
    pub fn new(ver: i16, op: i32, seq: i32, body: impl Into<Bytes>) -> Self {
        Packet {
            ver,
            op,
            seq,
            body: body.into(),
        }
    }

    pub fn header(&self) -> Header {
        Header::new(self.body.len(), self.ver, self.op, self.seq)
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Appends header and body to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.reserve(self.encoded_len());
        out.put_slice(&self.header().encode());
        out.put_slice(&self.body);
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Decodes the packet at the front of a TCP byte stream and removes it from `buf`.
    /// `Ok(None)` means more bytes are needed; the caller never has to hold more than
    /// [`MAX_PACK`] bytes for one packet.
    pub fn decode_stream(buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::parse(head);
        let body_len = header.validate()?;
        if buf.len() < HEADER_LEN + body_len {
            return Ok(None);
        }
        let mut packet = buf.split_to(HEADER_LEN + body_len);
        packet.advance(HEADER_LEN);
        Ok(Some(Packet {
            ver: header.ver,
            op: header.op,
            seq: header.seq,
            body: packet.freeze(),
        }))
    }

    /// Decodes one WebSocket message, which must hold exactly one packet. Unlike goim, a
    /// `packLen` that differs from the message length is refused (goim read stale bytes).
    pub fn decode_frame(frame: Bytes) -> Result<Packet, DecodeError> {
        let Some(head) = frame.first_chunk::<HEADER_LEN>() else {
            return Err(DecodeError::PackLen(frame.len() as i32));
        };
        let header = Header::parse(head);
        header.validate()?;
        if header.pack_len as usize != frame.len() {
            return Err(DecodeError::FrameLen {
                pack_len: header.pack_len,
                frame_len: frame.len(),
            });
        }
        Ok(Packet {
            ver: header.ver,
            op: header.op,
            seq: header.seq,
            body: frame.slice(HEADER_LEN..),
        })
    }
}

/// Iterates the packets inside an `OpRaw` body (concatenated packets, no outer header).
/// Stops at the first malformed packet; output packets are not bounded by [`MAX_PACK`].
pub fn raw_packets(mut raw: Bytes) -> impl Iterator<Item = Packet> {
    std::iter::from_fn(move || {
        let head = raw.first_chunk::<HEADER_LEN>()?;
        let header = Header::parse(head);
        let len = usize::try_from(header.pack_len).ok()?;
        if len < HEADER_LEN || len > raw.len() {
            return None;
        }
        let packet = raw.split_to(len);
        Some(Packet {
            ver: header.ver,
            op: header.op,
            seq: header.seq,
            body: packet.slice(HEADER_LEN..),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const AUTH_TOKEN: &str =
        r#"{"mid":123, "room_id":"live://1000", "platform":"web", "accepts":[1000,1001,1002]}"#;

    #[test]
    fn golden_auth_request() {
        assert_eq!(AUTH_TOKEN.len(), 82);
        let mut want = hex("00 00 00 62 | 00 10 | 00 01 | 00 00 00 07 | 00 00 00 01");
        want.extend_from_slice(AUTH_TOKEN.as_bytes());
        let p = Packet::new(1, op::AUTH, 1, AUTH_TOKEN.as_bytes().to_vec());
        assert_eq!(&p.encode()[..], &want[..]);
        let mut buf = BytesMut::from(&want[..]);
        assert_eq!(Packet::decode_stream(&mut buf).unwrap(), Some(p));
        assert!(buf.is_empty());
    }

    #[test]
    fn golden_replies() {
        let cases = [
            (
                Packet::new(1, op::AUTH_REPLY, 1, Bytes::new()),
                "00 00 00 10 | 00 10 | 00 01 | 00 00 00 08 | 00 00 00 01",
            ),
            (
                Packet::new(1, op::HEARTBEAT, 1, Bytes::new()),
                "00 00 00 10 | 00 10 | 00 01 | 00 00 00 02 | 00 00 00 01",
            ),
            (
                Packet::new(1, op::HEARTBEAT_REPLY, 1, 5i32.to_be_bytes().to_vec()),
                "00 00 00 14 | 00 10 | 00 01 | 00 00 00 03 | 00 00 00 01 | 00 00 00 05",
            ),
            (
                Packet::new(1, 1000, 0, &b"{\"test\":1}"[..]),
                "00 00 00 1a | 00 10 | 00 01 | 00 00 03 e8 | 00 00 00 00 | 7b 22 74 65 73 74 22 3a 31 7d",
            ),
        ];
        for (p, h) in cases {
            assert_eq!(&p.encode()[..], &hex(h)[..], "{p:?}");
            assert_eq!(Packet::decode_frame(Bytes::from(hex(h))).unwrap(), p);
        }
    }

    #[test]
    fn golden_websocket_raw_wrapper() {
        let inner = Packet::new(1, 1000, 0, &b"{\"test\":1}"[..]).encode();
        let outer = Packet::new(1, op::RAW, 0, inner.clone()).encode();
        let want = hex("00 00 00 2a | 00 10 | 00 01 | 00 00 00 09 | 00 00 00 00");
        assert_eq!(&outer[..16], &want[..]);
        assert_eq!(&outer[16..], &inner[..]);
        let got: Vec<_> = raw_packets(outer.slice(16..)).collect();
        assert_eq!(got, vec![Packet::new(1, 1000, 0, &b"{\"test\":1}"[..])]);
    }

    #[test]
    fn stream_waits_for_whole_packet_and_pipelines() {
        let a = Packet::new(1, op::HEARTBEAT, 7, Bytes::new()).encode();
        let b = Packet::new(1, op::SEND_MSG, 8, &b"hi"[..]).encode();
        let mut all = BytesMut::new();
        all.extend_from_slice(&a);
        all.extend_from_slice(&b[..10]);
        assert_eq!(Packet::decode_stream(&mut all).unwrap().unwrap().seq, 7);
        assert_eq!(Packet::decode_stream(&mut all).unwrap(), None);
        all.extend_from_slice(&b[10..]);
        let p = Packet::decode_stream(&mut all).unwrap().unwrap();
        assert_eq!((p.op, &p.body[..]), (op::SEND_MSG, &b"hi"[..]));
        assert!(all.is_empty());
    }

    #[test]
    fn refuses_bad_lengths() {
        let mut h = Header::new(0, 1, 2, 1);
        h.header_len = 17;
        let mut buf = BytesMut::from(&h.encode()[..]);
        assert_eq!(
            Packet::decode_stream(&mut buf),
            Err(DecodeError::HeaderLen(17))
        );
        for bad in [-1, 0, 15, 4113, i32::MAX, i32::MIN] {
            let mut h = Header::new(0, 1, 2, 1);
            h.pack_len = bad;
            let mut buf = BytesMut::from(&h.encode()[..]);
            assert_eq!(
                Packet::decode_stream(&mut buf),
                Err(DecodeError::PackLen(bad))
            );
        }
        // The largest legal packet passes.
        let big = Packet::new(1, 4, 1, vec![0u8; MAX_BODY]).encode();
        assert!(Packet::decode_frame(big).is_ok());
    }

    #[test]
    fn websocket_frame_length_must_match() {
        let mut p = Packet::new(1, op::AUTH, 1, &b"{}"[..]).encode().to_vec();
        p.extend_from_slice(b"stale");
        assert_eq!(
            Packet::decode_frame(Bytes::from(p)),
            Err(DecodeError::FrameLen {
                pack_len: 18,
                frame_len: 23
            })
        );
        let mut h = Header::new(100, 1, 7, 1).encode().to_vec();
        h.extend_from_slice(b"short");
        assert!(matches!(
            Packet::decode_frame(Bytes::from(h)),
            Err(DecodeError::FrameLen { .. })
        ));
        assert_eq!(
            Packet::decode_frame(Bytes::from_static(b"tiny")),
            Err(DecodeError::PackLen(4))
        );
    }

    proptest! {
        #[test]
        fn round_trip(ver: i16, op: i32, seq: i32, body in proptest::collection::vec(any::<u8>(), 0..=MAX_BODY)) {
            let p = Packet::new(ver, op, seq, body);
            let enc = p.encode();
            let mut buf = BytesMut::from(&enc[..]);
            prop_assert_eq!(Packet::decode_stream(&mut buf).unwrap(), Some(p.clone()));
            prop_assert_eq!(Packet::decode_frame(enc).unwrap(), p);
        }

        #[test]
        fn any_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = Packet::decode_stream(&mut buf) {}
            let _ = Packet::decode_frame(Bytes::from(data.clone()));
            let _ = raw_packets(Bytes::from(data)).count();
        }
    }
}
