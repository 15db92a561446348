//! One client must not lock out, starve or bloat everyone else (standalone, real sockets).
//! Each test reproduced a defect before its fix.

mod common;

use std::time::Duration;

use common::*;
use goim_client::{Client, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the socket; returns what it sent.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    within(s.read_to_end(&mut out)).await.unwrap_or_default();
    out
}

/// Silent or half-sent HTTP connections are closed after the header deadline, connections over
/// the cap are closed at once (counted), and the API keeps answering throughout.
#[tokio::test]
async fn silent_http_connections_cannot_lock_out_the_api() {
    let mut cfg = config();
    cfg.http.header_timeout = Duration::from_millis(300);
    cfg.http.max_connections = 3;
    let s = start_with(cfg).await;
    let mut silent = TcpStream::connect(s.http).await.unwrap();
    let mut half = TcpStream::connect(s.http).await.unwrap();
    half.write_all(b"POST /goim/push/all?operation=1 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(s.http).await.unwrap();
    // Over the cap while the three are open: closed without a reply. (The server accepts in
    // order, so the fourth is refused once the first three hold their permits.)
    let mut over = TcpStream::connect(s.http).await.unwrap();
    assert!(until_closed(&mut over).await.is_empty());
    for c in [&mut silent, &mut half, &mut idle] {
        assert!(
            until_closed(c).await.is_empty(),
            "closed at the header deadline"
        );
    }
    let v = api(&s, "POST", "/goim/push/all?operation=1000", b"x").await;
    assert_eq!(v["code"], 0);
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_http_refused_connections_total 1"),
        "{metrics}"
    );
    s.shutdown().await;
}

/// SIGTERM's shutdown completes while an HTTP request is half sent.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_half_sent_request() {
    let mut cfg = config();
    cfg.http.shutdown_grace = Duration::from_millis(200);
    let s = start_with(cfg).await;
    let mut half = TcpStream::connect(s.http).await.unwrap();
    half.write_all(b"POST /goim/push/all?operation=1 HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    within(s.shutdown()).await;
}

/// A client flooding SUB/UNSUB with large bodies is closed (`rate_limited`); the others keep
/// receiving.
#[tokio::test]
async fn a_flooding_client_is_closed_and_others_keep_receiving() {
    let s = start().await;
    let mut normal = client(&s, Transport::Tcp, 1, "normal", "live://1", &[1000]).await;
    let mut flood = client(&s, Transport::Tcp, 2, "flood", "", &[1000]).await;
    let ops: Vec<String> = (0..600).map(|i| (10_000 + i).to_string()).collect();
    let body = ops.join(",");
    assert!(body.len() > 3500 && body.len() + 16 <= 4096);
    let mut packets = Vec::new();
    for i in 0..600 {
        let op = if i % 2 == 0 { 14 } else { 16 }; // SUB, UNSUB
        packets.extend(goim_client::encode(1, op, i, body.as_bytes()));
    }
    // The server closes the connection part way through, so writing may fail: that is fine.
    let _ = flood.send_bytes(&packets).await;
    // Closed by the server (a reset is a close too).
    let _ = within(flood.read_to_close()).await;
    push_ok(&s, "/goim/push/room?operation=1000&type=live&room=1", b"hi").await;
    assert_eq!(recv(&mut normal).await.body, b"hi");
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_comet_closed_total{reason=\"rate_limited\"} 1"),
        "{metrics}"
    );
    s.shutdown().await;
}

/// Room names are bounded on the HTTP path as on the client path.
#[tokio::test]
async fn long_room_names_are_refused() {
    let s = start().await;
    let long = "r".repeat(300);
    let v = api(
        &s,
        "POST",
        &format!("/goim/push/room?operation=1000&type=live&room={long}"),
        b"x",
    )
    .await;
    assert_eq!(v["code"], -400, "{v}");
    s.shutdown().await;
}

/// A client that keeps within the op budget is never cut off.
#[tokio::test]
async fn a_client_within_the_budget_stays() {
    let s = start().await;
    let mut c: Client = client(&s, Transport::Tcp, 1, "k", "", &[1000]).await;
    for _ in 0..100 {
        within(c.heartbeat()).await.unwrap();
    }
    push_ok(&s, "/goim/push/keys?operation=1000&keys=k", b"ok").await;
    assert_eq!(recv(&mut c).await.body, b"ok");
    s.shutdown().await;
}
