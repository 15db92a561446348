//! Bad input from clients and HTTP callers gets a close or a clear error; one bad client never
//! affects another.

mod common;

use std::time::Duration;

use common::*;
use goim_client::{encode, token, Client, Transport};

/// A header with chosen lengths and no body.
fn header(pack_len: i32, header_len: i16, op: i32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&pack_len.to_be_bytes());
    v.extend_from_slice(&header_len.to_be_bytes());
    v.extend_from_slice(&1i16.to_be_bytes());
    v.extend_from_slice(&op.to_be_bytes());
    v.extend_from_slice(&1i32.to_be_bytes());
    v
}

async fn closed_without_reply(c: &mut Client) {
    assert_eq!(
        within(c.read_to_close()).await.unwrap(),
        0,
        "server answered before closing"
    );
}

#[tokio::test]
async fn bad_headers_close_the_connection_before_and_after_auth() {
    let s = start().await;
    let mut good = client(&s, Transport::Tcp, 1, "good", "live://1", &[1000]).await;
    let bad = [
        header(16, 17, 2),   // headerLen != 16
        header(4113, 16, 2), // packLen over 4112
        header(15, 16, 2),   // packLen under 16
        header(-1, 16, 2),   // negative packLen (goim accepts it on TCP)
    ];
    for t in [Transport::Tcp, Transport::WebSocket] {
        for b in &bad {
            let mut c = Client::connect(t, addr(&s, t), None).await.unwrap();
            c.send_bytes(b).await.unwrap();
            closed_without_reply(&mut c).await;
            let mut c = client(&s, t, 2, "victim", "", &[]).await;
            c.send_bytes(b).await.unwrap();
            closed_without_reply(&mut c).await;
        }
    }
    // The well-behaved client is untouched.
    push_ok(
        &s,
        "/goim/push/keys?operation=1000&keys=good",
        b"still here",
    )
    .await;
    assert_eq!(recv(&mut good).await.body, b"still here");
    assert_eq!(within(good.heartbeat()).await.unwrap(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn websocket_pack_len_must_match_frame() {
    let s = start().await;
    // packLen says 18 but the frame carries 23 bytes: goim would read stale bytes.
    let mut c = raw_client(&s, Transport::WebSocket, 1, "a").await;
    let mut p = encode(1, 4, 1, b"hi");
    p.extend_from_slice(b"stale");
    c.send_frame(true, 2, &p, true).await.unwrap();
    closed_without_reply(&mut c).await;
    // packLen larger than the frame.
    let mut c = raw_client(&s, Transport::WebSocket, 1, "b").await;
    let mut p = header(100, 16, 4);
    p.extend_from_slice(b"short");
    c.send_frame(true, 2, &p, true).await.unwrap();
    closed_without_reply(&mut c).await;
    s.shutdown().await;
}

#[tokio::test]
async fn websocket_frame_rules() {
    let s = start().await;
    // A frame over 8 KiB is refused from its header, before the payload is read.
    let mut c = raw_client(&s, Transport::WebSocket, 1, "big").await;
    c.send_frame(true, 2, &vec![0u8; 8193], true).await.unwrap();
    closed_without_reply(&mut c).await;

    // Text frames, unmasked frames and fragments all carry packets.
    let mut c = raw_client(&s, Transport::WebSocket, 1, "frames").await;
    c.send_frame(true, 1, &encode(1, 4, 5, b""), false)
        .await
        .unwrap();
    assert_eq!(recv(&mut c).await.seq, 5);
    let p = encode(1, 4, 6, b"fragmented body");
    c.send_frame(false, 2, &p[..5], true).await.unwrap();
    c.send_frame(false, 0, &p[5..20], true).await.unwrap();
    c.send_frame(true, 0, &p[20..], true).await.unwrap();
    assert_eq!(recv(&mut c).await.seq, 6);

    // Ping is answered with the same payload.
    c.send_frame(true, 9, b"are you there", true).await.unwrap();
    let (fin, opcode, payload) = within(c.recv_frame()).await.unwrap();
    assert_eq!(
        (fin, opcode, payload.as_slice()),
        (true, 10, &b"are you there"[..])
    );

    // Close is answered with a close frame echoing the status code (RFC 6455), then the
    // connection ends.
    c.send_frame(true, 8, &[0x03, 0xe8, b'b', b'y', b'e'], true)
        .await
        .unwrap();
    let (fin, opcode, payload) = within(c.recv_frame()).await.unwrap();
    assert_eq!(
        (fin, opcode, payload.as_slice()),
        (true, 8, &[0x03, 0xe8][..])
    );
    closed_without_reply(&mut c).await;

    // More than 100 continuation frames.
    let mut c = raw_client(&s, Transport::WebSocket, 1, "many").await;
    c.send_frame(false, 2, b"", true).await.unwrap();
    for _ in 0..101 {
        c.send_frame(false, 0, b"", true).await.unwrap();
    }
    closed_without_reply(&mut c).await;

    // Reserved bits and unknown opcodes.
    let mut c = raw_client(&s, Transport::WebSocket, 1, "rsv").await;
    c.send_frame(true, 0x40 | 2, b"", true).await.unwrap();
    closed_without_reply(&mut c).await;
    let mut c = raw_client(&s, Transport::WebSocket, 1, "opcode").await;
    c.send_frame(true, 3, b"", true).await.unwrap();
    closed_without_reply(&mut c).await;
    s.shutdown().await;
}

#[tokio::test]
async fn pings_without_reading_are_cut_off() {
    let s = start().await;
    // Before auth nothing is written back, so pongs would pile up: the server gives up.
    let mut c = Client::connect_raw(Transport::WebSocket, s.ws)
        .await
        .unwrap();
    for _ in 0..200 {
        if c.send_frame(true, 9, &[7u8; 125], true).await.is_err() {
            break;
        }
    }
    closed_without_reply(&mut c).await;
    s.shutdown().await;
}

#[tokio::test]
async fn websocket_upgrade_is_exact() {
    let s = start().await;
    for path in ["/sub?x=1", "/", "/subscribe"] {
        let mut c = Client::connect_plain(Transport::WebSocket, s.ws)
            .await
            .unwrap();
        assert!(within(c.upgrade(path, "")).await.is_err(), "{path}");
    }
    // Not HTTP at all: closed, no HTTP error response.
    let mut c = Client::connect_plain(Transport::Tcp, s.ws).await.unwrap();
    c.send_bytes(b"hello\r\n\r\n").await.unwrap();
    closed_without_reply(&mut c).await;
    // A cookie is accepted and the connection works.
    let mut c = Client::connect_plain(Transport::WebSocket, s.ws)
        .await
        .unwrap();
    within(c.upgrade("/sub", "sid=1")).await.unwrap();
    within(c.auth(&token(1, "cookie", "", &[]))).await.unwrap();
    s.shutdown().await;
}

#[tokio::test]
async fn bad_tokens_close_without_reply() {
    let s = start().await;
    for t in [Transport::Tcp, Transport::WebSocket] {
        for tok in [
            &b"not json"[..],
            br#"{"mid":"1"}"#,
            br#"{"accepts":"1000"}"#,
            b"[]",
            b"",
        ] {
            let mut c = Client::connect(t, addr(&s, t), None).await.unwrap();
            c.send(7, tok).await.unwrap();
            closed_without_reply(&mut c).await;
        }
    }
    assert_eq!(s.comet().load().conn_count, 0);
    s.shutdown().await;
}

#[tokio::test]
async fn handshake_and_heartbeat_timeouts() {
    let mut cfg = config();
    cfg.comet.handshake_timeout = Duration::from_millis(200);
    cfg.logic.heartbeat = Duration::from_millis(150);
    cfg.logic.heartbeat_max = 2;
    let s = start_with(cfg).await;
    // Never finishes the handshake: no upgrade, or upgrade but no auth.
    let mut c = Client::connect_plain(Transport::WebSocket, s.ws)
        .await
        .unwrap();
    closed_without_reply(&mut c).await;
    let mut c = Client::connect(Transport::WebSocket, s.ws, None)
        .await
        .unwrap();
    closed_without_reply(&mut c).await;
    let mut c = Client::connect(Transport::Tcp, s.tcp, None).await.unwrap();
    c.send(2, b"").await.unwrap();
    closed_without_reply(&mut c).await;
    // Authenticated but silent: closed after heartbeat x heartbeatMax.
    let mut c = client(&s, Transport::Tcp, 1, "quiet", "", &[]).await;
    within(c.read_to_close()).await.unwrap();
    assert_eq!(s.comet().load().conn_count, 0);
    s.shutdown().await;
}

#[tokio::test]
async fn http_errors_are_clear() {
    let s = start().await;
    let cases = [
        ("/goim/push/keys?operation=1000", "keys"),
        ("/goim/push/keys?operation=abc&keys=a", "operation"),
        ("/goim/push/mids?operation=1000", "mids"),
        ("/goim/push/mids?mids=1&mids=x", "mids"),
        ("/goim/push/room?operation=1000&type=live", "room"),
        ("/goim/push/room?type=live&room=1", "operation"),
        ("/goim/push/room?operation=0&type=live&room=1", "operation"),
        ("/goim/push/all", "operation"),
        ("/goim/push/all?operation=1&speed=-1", "speed"),
    ];
    for (path, field) in cases {
        let v = api(&s, "POST", path, b"x").await;
        assert_eq!(v["code"], -400, "{path}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains(field),
            "{path}: {v}"
        );
    }
    for path in [
        "/goim/online/top?type=live",
        "/goim/online/top?limit=1",
        "/goim/online/room?type=live",
    ] {
        let v = api(&s, "GET", path, b"").await;
        assert_eq!(v["code"], -400, "{path}: {v}");
    }
    // Unknown targets are not an error: nothing is sent, and the reply names the keys that
    // were not online.
    let v = api(&s, "POST", "/goim/push/keys?operation=1&keys=nobody", b"x").await;
    assert_eq!(
        v,
        serde_json::json!({"code": 0, "message": "", "data": {"keys_found": 0, "presence_complete": true, "keys_offline": ["nobody"]}})
    );
    // A body goim clients could not read is refused.
    let v = api(
        &s,
        "POST",
        "/goim/push/room?operation=1&type=live&room=1",
        &[b'a'; 4097],
    )
    .await;
    assert_eq!(v["code"], -400);
    let (status, body) = http(s.http, "GET", "/nope", b"").await;
    assert_eq!((status, body.as_str()), (404, "404 page not found"));
    s.shutdown().await;
}
