//! goim's client protocol and HTTP API against `goim standalone`, with real TCP and WebSocket
//! clients on free ports.

mod common;

use common::*;
use goim_client::{encode, token, Client, Transport, OP_CHANGE_ROOM, OP_RAW, OP_SUB, OP_UNSUB};

const BOTH: [Transport; 2] = [Transport::Tcp, Transport::WebSocket];

#[tokio::test]
async fn auth_heartbeat_and_key_push_on_both_transports() {
    let s = start().await;
    for t in BOTH {
        let key = format!("k-{t:?}");
        let mut c = client(&s, t, 7, &key, "live://1", &[1000]).await;
        assert_eq!(within(c.heartbeat()).await.unwrap(), 1, "local room count");
        push_ok(
            &s,
            &format!("/goim/push/keys?operation=1000&keys={key}"),
            b"{\"test\":1}",
        )
        .await;
        let p = recv(&mut c).await;
        assert_eq!((p.ver, p.op, p.seq), (1, 1000, 0));
        assert_eq!(p.body, b"{\"test\":1}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn auth_reply_echoes_ver_and_seq_and_key_defaults_to_uuid() {
    let s = start().await;
    let mut keep = Vec::new();
    for t in BOTH {
        let mut c = Client::connect(t, addr(&s, t), None).await.unwrap();
        c.send_bytes(&encode(3, 7, 41, &token(0, "", "", &[])))
            .await
            .unwrap();
        let p = recv(&mut c).await;
        assert_eq!((p.ver, p.op, p.seq, p.body.len()), (3, 8, 41, 0));
        keep.push(c);
    }
    // Two key-less clients got distinct generated keys: both are counted.
    let v = api(&s, "GET", "/goim/online/total", b"").await;
    assert_eq!(v["data"]["conn_count"], 2);
    s.shutdown().await;
}

#[tokio::test]
async fn raw_batch_layout_per_transport() {
    let s = start().await;
    let mut tcp = client(&s, Transport::Tcp, 1, "tcp", "", &[1000]).await;
    let mut ws = client(&s, Transport::WebSocket, 1, "ws", "", &[1000]).await;
    push_ok(
        &s,
        "/goim/push/keys?operation=1000&keys=tcp&keys=ws",
        b"{\"test\":1}",
    )
    .await;
    // TCP: the bare inner packet, exactly GOIM.md §2.2's 26 bytes.
    let p = recv(&mut tcp).await;
    assert_eq!(
        encode(p.ver, p.op, p.seq, &p.body),
        encode(1, 1000, 0, b"{\"test\":1}")
    );
    // WebSocket: one binary frame holding an op-9 packet that wraps the inner packet.
    let (fin, opcode, payload) = within(ws.recv_frame()).await.unwrap();
    assert!(fin);
    assert_eq!(opcode, 2);
    let mut want = vec![0, 0, 0, 0x2a, 0, 0x10, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0];
    want.extend(encode(1, 1000, 0, b"{\"test\":1}"));
    assert_eq!(payload, want);
    s.shutdown().await;
}

#[tokio::test]
async fn room_push_batches_keep_order_and_ignore_accepts() {
    let s = start().await;
    let mut a = client(&s, Transport::Tcp, 1, "a", "live://9", &[]).await;
    let mut b = client(&s, Transport::WebSocket, 2, "b", "live://9", &[]).await;
    let mut other = client(&s, Transport::Tcp, 3, "o", "live://8", &[]).await;
    for i in 0..30 {
        push_ok(
            &s,
            "/goim/push/room?operation=1001&type=live&room=9",
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    push_ok(
        &s,
        "/goim/push/room?operation=1001&type=live&room=8",
        b"for-other",
    )
    .await;
    for c in [&mut a, &mut b] {
        for i in 0..30 {
            let p = recv(c).await;
            assert_eq!((p.op, p.body), (1001, format!("m{i}").into_bytes()));
        }
    }
    // The other room's client sees only its own room's message.
    assert_eq!(recv(&mut other).await.body, b"for-other");
    // Raw batches on WebSocket really are op 9 wrappers.
    push_ok(&s, "/goim/push/room?operation=1001&type=live&room=9", b"x").await;
    let p = within(b.recv_ws_packet()).await.unwrap();
    assert_eq!(p.op, OP_RAW);
    s.shutdown().await;
}

#[tokio::test]
async fn mids_reach_every_connection_of_a_user() {
    let s = start().await;
    let mut a = client(&s, Transport::Tcp, 42, "phone", "", &[1000]).await;
    let mut b = client(&s, Transport::WebSocket, 42, "web", "", &[1000]).await;
    let mut c = client(&s, Transport::Tcp, 43, "else", "", &[1000]).await;
    push_ok(&s, "/goim/push/mids?operation=1000&mids=42", b"to-42").await;
    push_ok(
        &s,
        "/goim/push/mids?operation=1000&mids=43&mids=44",
        b"to-43",
    )
    .await;
    assert_eq!(recv(&mut a).await.body, b"to-42");
    assert_eq!(recv(&mut b).await.body, b"to-42");
    assert_eq!(recv(&mut c).await.body, b"to-43");
    s.shutdown().await;
}

#[tokio::test]
async fn broadcast_filters_by_accepts() {
    let s = start().await;
    let mut yes = client(&s, Transport::Tcp, 1, "yes", "", &[1000]).await;
    let mut no = client(&s, Transport::WebSocket, 2, "no", "", &[2000]).await;
    push_ok(&s, "/goim/push/all?operation=1000", b"all-1000").await;
    push_ok(&s, "/goim/push/all?operation=2000", b"all-2000").await;
    assert_eq!(recv(&mut yes).await.body, b"all-1000");
    // If the first broadcast had reached `no`, it would arrive before this one.
    assert_eq!(recv(&mut no).await.body, b"all-2000");
    // Paced broadcast still arrives.
    push_ok(&s, "/goim/push/all?operation=1000&speed=1000", b"paced").await;
    assert_eq!(recv(&mut yes).await.body, b"paced");
    s.shutdown().await;
}

#[tokio::test]
async fn sub_and_unsub_change_what_key_pushes_reach() {
    let s = start().await;
    for t in BOTH {
        let key = format!("sub-{t:?}");
        let mut c = client(&s, t, 1, &key, "", &[1000]).await;
        let push = |op: i32, body: &'static str| {
            let path = format!("/goim/push/keys?operation={op}&keys={key}");
            let s = &s;
            async move { push_ok(s, &path, body.as_bytes()).await }
        };
        push(2000, "filtered").await;
        let seq = c.send(OP_SUB, b"2000,2001").await.unwrap();
        let p = recv(&mut c).await;
        assert_eq!(
            (p.op, p.seq, p.body.as_slice()),
            (15, seq, &b"2000,2001"[..])
        );
        push(2000, "watched").await;
        assert_eq!(recv(&mut c).await.body, b"watched");
        let seq = c.send(OP_UNSUB, b"2000").await.unwrap();
        let p = recv(&mut c).await;
        assert_eq!((p.op, p.seq, p.body.as_slice()), (17, seq, &b"2000"[..]));
        // A malformed list changes nothing and is still echoed.
        c.send(OP_SUB, b"2000,nope").await.unwrap();
        assert_eq!(recv(&mut c).await.body, b"2000,nope");
        push(2000, "filtered-again").await;
        push(2001, "still-watched").await;
        assert_eq!(recv(&mut c).await.body, b"still-watched");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn change_room_moves_the_connection() {
    let s = start().await;
    for t in BOTH {
        let key = format!("mover-{t:?}");
        let mut c = client(&s, t, 1, &key, "live://1", &[]).await;
        let seq = c.send(OP_CHANGE_ROOM, b"live://2").await.unwrap();
        let p = recv(&mut c).await;
        assert_eq!(
            (p.op, p.seq, p.body.as_slice()),
            (13, seq, &b"live://2"[..])
        );
        push_ok(&s, "/goim/push/room?operation=5&type=live&room=1", b"old").await;
        push_ok(&s, "/goim/push/room?operation=5&type=live&room=2", b"new").await;
        assert_eq!(recv(&mut c).await.body, b"new");
        // Empty body leaves the room: heartbeat count drops to 0.
        c.send(OP_CHANGE_ROOM, b"").await.unwrap();
        assert_eq!(recv(&mut c).await.op, 13);
        assert_eq!(within(c.heartbeat()).await.unwrap(), 0);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn other_ops_are_echoed_with_empty_body() {
    let s = start().await;
    for t in BOTH {
        let mut c = client(&s, t, 1, &format!("echo-{t:?}"), "", &[]).await;
        for op in [4, 7, 99] {
            let seq = c.send(op, b"hello").await.unwrap();
            let p = recv(&mut c).await;
            assert_eq!((p.op, p.seq, p.body.len()), (op, seq, 0));
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn online_counts_over_http_and_heartbeat() {
    let s = start().await;
    let mut a = client(&s, Transport::Tcp, 1, "a", "live://1000", &[]).await;
    let _b = client(&s, Transport::WebSocket, 2, "b", "live://1000", &[]).await;
    let _c = client(&s, Transport::Tcp, 3, "c", "live://2000", &[]).await;
    let _d = client(&s, Transport::Tcp, 4, "d", "chat://1", &[]).await;
    s.comet().renew_online().await.unwrap();
    assert_eq!(within(a.heartbeat()).await.unwrap(), 2);
    let v = api(
        &s,
        "GET",
        "/goim/online/room?type=live&rooms=1000&rooms=2000&rooms=3000",
        b"",
    )
    .await;
    assert_eq!(
        v["data"],
        serde_json::json!({"1000": 2, "2000": 1, "3000": 0})
    );
    let v = api(&s, "GET", "/goim/online/top?type=live&limit=1", b"").await;
    assert_eq!(
        v["data"],
        serde_json::json!([{"room_id": "1000", "count": 2}])
    );
    let v = api(&s, "GET", "/goim/online/top?type=live&limit=5", b"").await;
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let v = api(&s, "GET", "/goim/online/total", b"").await;
    assert_eq!(
        v["data"],
        serde_json::json!({"ip_count": 1, "conn_count": 4})
    );
    let v = api(&s, "GET", "/goim/nodes/instances", b"").await;
    assert_eq!(v["data"][0]["hostname"], "comet-test");
    assert_eq!(v["data"][0]["metadata"]["conn_count"], "4");
    let v = api(&s, "GET", "/goim/nodes/weighted?platform=web", b"").await;
    assert_eq!(
        v["data"]["nodes"],
        serde_json::json!(["comet-test.goim.io"])
    );
    assert_eq!(v["data"]["heartbeat"], 240);
    assert_eq!(v["data"]["backoff"]["factor"], 1.8);
    s.shutdown().await;
}

#[tokio::test]
async fn duplicate_key_kicks_the_older_connection() {
    let s = start().await;
    let mut old = client(&s, Transport::Tcp, 1, "dup", "live://1", &[1000]).await;
    let mut new = client(&s, Transport::WebSocket, 1, "dup", "live://1", &[1000]).await;
    within(old.read_to_close()).await.unwrap();
    push_ok(&s, "/goim/push/keys?operation=1000&keys=dup", b"to-new").await;
    assert_eq!(recv(&mut new).await.body, b"to-new");
    assert_eq!(within(new.heartbeat()).await.unwrap(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn packets_before_auth_are_ignored() {
    let s = start().await;
    for t in BOTH {
        let mut c = Client::connect(t, addr(&s, t), None).await.unwrap();
        c.send(2, b"").await.unwrap();
        c.send(4, b"hi").await.unwrap();
        // The first thing the server answers is the auth reply.
        within(c.auth(&token(1, &format!("pre-{t:?}"), "", &[])))
            .await
            .unwrap();
        assert_eq!(within(c.heartbeat()).await.unwrap(), 0);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn pipelined_packets_are_all_answered() {
    let s = start().await;
    let mut c = Client::connect(Transport::Tcp, s.tcp, None).await.unwrap();
    let mut burst = encode(1, 7, 1, &token(1, "pipe", "", &[]));
    for seq in 2..12 {
        burst.extend(encode(1, 2, seq, b""));
    }
    c.send_bytes(&burst).await.unwrap();
    assert_eq!(recv(&mut c).await.op, 8);
    for seq in 2..12 {
        let p = recv(&mut c).await;
        assert_eq!((p.op, p.seq), (3, seq));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_clients_and_forgets_them() {
    let s = start().await;
    let mut a = client(&s, Transport::Tcp, 1, "a", "", &[]).await;
    let mut b = client(&s, Transport::WebSocket, 1, "b", "", &[]).await;
    let comet = s.comet().clone();
    s.shutdown().await;
    within(a.read_to_close()).await.unwrap();
    within(b.read_to_close()).await.unwrap();
    assert_eq!(comet.load().conn_count, 0);
}

#[tokio::test]
async fn overlong_room_ids_are_refused() {
    let s = start().await;
    let mut c = client(&s, Transport::Tcp, 1, "long", "live://1", &[]).await;
    let long = vec![b'r'; 300];
    let seq = c.send(OP_CHANGE_ROOM, &long).await.unwrap();
    let p = recv(&mut c).await;
    // Echoed as goim does, but the connection stays where it was.
    assert_eq!((p.op, p.seq, p.body.len()), (13, seq, 300));
    assert_eq!(within(c.heartbeat()).await.unwrap(), 1);
    // A token naming such a room is refused outright.
    let mut t = Client::connect(Transport::Tcp, s.tcp, None).await.unwrap();
    let room = "r".repeat(300);
    t.send(7, &token(2, "x", &room, &[])).await.unwrap();
    assert_eq!(within(t.read_to_close()).await.unwrap(), 0);
    s.shutdown().await;
}

/// A room's first member on a comet is answered only once every job watching the comet's
/// rooms has the room (goim-rs: job sends a room's batches only to comets with members), so
/// the first message pushed after the reply reaches it. Here the test is such a watcher.
#[tokio::test]
async fn a_rooms_first_member_is_answered_once_every_watcher_has_the_room() {
    use goim_proto::comet::RoomsAck;
    use goim_proto::service::CometService;
    let s = start().await;
    let (acks, rx) = tokio::sync::mpsc::channel(8);
    let mut updates = s.comet().watch_rooms(rx).await.unwrap();
    assert!(within(updates.recv()).await.unwrap().snapshot);
    let ack = |seq| {
        let acks = acks.clone();
        async move {
            let ack = RoomsAck {
                job: String::new(),
                seq,
                ping: 0,
                lease_ms: 3000,
            };
            acks.send(ack).await.unwrap();
        }
    };
    let mut kept = Vec::new();
    for (t, room) in [
        (Transport::Tcp, "live://a"),
        (Transport::WebSocket, "live://b"),
    ] {
        let addr = common::addr(&s, t);
        let tok = token(1, room, room, &[1000]);
        let mut auth = tokio::spawn(async move {
            let mut c = Client::connect(t, addr, None).await.unwrap();
            c.auth(&tok).await.unwrap();
            c
        });
        let u = within(updates.recv()).await.unwrap();
        assert_eq!(u.added, [room]);
        // Not acknowledged: the reply is held (until the watcher is dropped after 1 s).
        let held = tokio::time::timeout(std::time::Duration::from_millis(300), &mut auth).await;
        assert!(held.is_err(), "answered before the watcher had the room");
        ack(u.seq).await;
        let mut c = within(auth).await.unwrap();
        let (kind, id) = room.split_once("://").unwrap();
        let path = format!("/goim/push/room?operation=1000&type={kind}&room={id}");
        push_ok(&s, &path, b"first").await;
        assert_eq!(recv(&mut c).await.body, b"first");
        kept.push(c);
    }
    // CHANGE_ROOM into a new room waits the same way (live://a is there: no wait to join).
    let mut c = client(&s, Transport::Tcp, 2, "mover", "live://a", &[1000]).await;
    c.send(OP_CHANGE_ROOM, b"live://c").await.unwrap();
    let u = within(updates.recv()).await.unwrap();
    assert_eq!(u.added, ["live://c"]);
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), c.recv()).await;
    assert!(
        early.is_err(),
        "CHANGE_ROOM answered before the watcher had the room"
    );
    ack(u.seq).await;
    assert_eq!(recv(&mut c).await.body, b"live://c");
    s.shutdown().await;
}
