//! The comet's WebSocket frame decoder and fragment assembler, run as a connection runs them.
#![no_main]

use bytes::{Bytes, BytesMut};
use goim_comet::ws::{decode_frame, frame_header, Assembler, Event, Frame, WsError};
use goim_proto::Packet;
use libfuzzer_sys::fuzz_target;

// The server's limits (CometConfig defaults `ws_max_frame`, `ws_max_fragments`).
const MAX_FRAME: usize = 8192;
const MAX_FRAGMENTS: usize = 100;

#[derive(Debug, PartialEq)]
enum Step {
    Frame(Frame),
    Event(Event),
}

/// Decodes and assembles what `buf` holds, as the connection's read loop does. `Ok(())`:
/// waiting for more bytes.
fn drain(buf: &mut BytesMut, asm: &mut Assembler, steps: &mut Vec<Step>) -> Result<(), WsError> {
    while let Some(frame) = decode_frame(buf, MAX_FRAME)? {
        assert!(frame.payload.len() <= MAX_FRAME);
        assert!(frame.opcode <= 0x0f);
        steps.push(Step::Frame(frame.clone()));
        let event = asm.feed(frame, MAX_FRAME, MAX_FRAGMENTS)?;
        match &event {
            Event::Message(m) => {
                assert!(m.len() <= MAX_FRAME);
                // Whatever a message holds, the packet decoder refuses or accepts it cleanly.
                let _ = Packet::decode_frame(m.clone());
            }
            Event::Ping(p) => assert!(p.len() <= MAX_FRAME),
            Event::None => {}
            Event::Close(code) => assert!(code.len() <= 2),
        }
        // A close ends the connection, as in the server.
        let closed = matches!(event, Event::Close(_));
        steps.push(Step::Event(event));
        if closed {
            return Err(WsError::Closed);
        }
    }
    Ok(())
}

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, data)) = input.split_first() else {
        return;
    };

    // All bytes in one read.
    let mut buf = BytesMut::from(data);
    let mut steps = Vec::new();
    let end = drain(&mut buf, &mut Assembler::default(), &mut steps);

    // Reads of `chunk` bytes reach the same frames, events and ending.
    let step = usize::from(chunk).max(1);
    let mut buf2 = BytesMut::new();
    let mut asm = Assembler::default();
    let mut steps2 = Vec::new();
    let mut end2 = Ok(());
    for piece in data.chunks(step) {
        buf2.extend_from_slice(piece);
        end2 = drain(&mut buf2, &mut asm, &mut steps2);
        if end2.is_err() {
            break;
        }
    }
    assert_eq!(steps2, steps);
    assert_eq!(end2, end);
    if end.is_ok() {
        assert_eq!(buf2, buf);
    }

    // Every decoded frame, written back the way the server writes frames, reads back alike.
    for s in &steps {
        let Step::Frame(f) = s else { continue };
        let (h, n) = frame_header(f.opcode, f.payload.len());
        let mut wire = BytesMut::from(&h[..n]);
        wire.extend_from_slice(&f.payload);
        let back = decode_frame(&mut wire, MAX_FRAME).unwrap().unwrap();
        assert!(wire.is_empty());
        assert_eq!(
            back,
            Frame {
                fin: true,
                opcode: f.opcode,
                payload: Bytes::clone(&f.payload),
            }
        );
    }
});
