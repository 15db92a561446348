//! goim's packet codec: TCP stream decoding, WebSocket message decoding and `OpRaw` bodies.
#![no_main]

use bytes::{Bytes, BytesMut};
use goim_proto::packet::{raw_packets, HEADER_LEN, MAX_BODY, MAX_PACK};
use goim_proto::{DecodeError, Packet};
use libfuzzer_sys::fuzz_target;

/// Decodes a whole TCP stream: the packets, then how it ended (`Ok(())`: waiting for more).
fn decode_all(buf: &mut BytesMut) -> (Vec<Packet>, Result<(), DecodeError>) {
    let mut out = Vec::new();
    loop {
        match Packet::decode_stream(buf) {
            Ok(Some(p)) => out.push(p),
            Ok(None) => return (out, Ok(())),
            Err(e) => return (out, Err(e)),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, data)) = input.split_first() else {
        return;
    };

    // The stream in one read.
    let mut buf = BytesMut::from(data);
    let (packets, end) = decode_all(&mut buf);
    let mut consumed = 0;
    for p in &packets {
        assert!(p.body.len() <= MAX_BODY);
        // A decoded packet is exactly the bytes it was read from, and encodes back to them.
        let enc = p.encode();
        assert_eq!(&enc[..], &data[consumed..consumed + enc.len()]);
        consumed += enc.len();
        assert_eq!(Packet::decode_frame(enc.clone()).as_ref(), Ok(p));
        let mut again = BytesMut::from(&enc[..]);
        assert_eq!(
            Packet::decode_stream(&mut again).as_ref(),
            Ok(&Some(p.clone()))
        );
        assert!(again.is_empty());
    }
    assert_eq!(&buf[..], &data[consumed..]);
    if end.is_ok() {
        // Waiting for more never holds more than one packet's worth.
        assert!(buf.len() < MAX_PACK);
    }

    // The same stream arriving in reads of `chunk` bytes gives the same packets and ending.
    let step = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    let mut packets2 = Vec::new();
    let mut end2 = Ok(());
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        let (mut got, e) = decode_all(&mut buf);
        packets2.append(&mut got);
        end2 = e;
        if end2.is_err() {
            break;
        }
    }
    assert_eq!(packets2, packets);
    assert_eq!(end2, end);

    // One WebSocket message.
    let frame = Bytes::copy_from_slice(data);
    if let Ok(p) = Packet::decode_frame(frame) {
        assert_eq!(&p.encode()[..], data);
        assert_eq!(decode_all(&mut BytesMut::from(data)), (vec![p], Ok(())));
    }

    // An `OpRaw` body: each inner packet re-encoded reads back as itself.
    for p in raw_packets(Bytes::copy_from_slice(data)) {
        let enc = p.encode();
        assert_eq!(enc.len(), HEADER_LEN + p.body.len());
        assert_eq!(
            raw_packets(enc.clone()).collect::<Vec<_>>(),
            vec![p.clone()]
        );
        if enc.len() <= MAX_PACK {
            assert_eq!(Packet::decode_frame(enc), Ok(p));
        }
    }
});
