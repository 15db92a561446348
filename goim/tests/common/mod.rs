//! Shared test support: a standalone server on free ports, a minimal HTTP client, timeouts.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use goim::config::Config;
use goim::standalone::Standalone;
use goim_client::{token, Client, Packet, Transport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any single wait, so a broken server fails the test instead of hanging it.
pub const LIMIT: Duration = Duration::from_secs(10);

pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

pub fn config() -> Config {
    let mut cfg = Config::default();
    cfg.comet.tcp = "127.0.0.1:0".into();
    cfg.comet.ws = "127.0.0.1:0".into();
    cfg.logic.http = "127.0.0.1:0".into();
    cfg.comet.name = "comet-test".into();
    cfg
}

pub async fn start() -> Standalone {
    start_with(config()).await
}

pub async fn start_with(cfg: Config) -> Standalone {
    Standalone::start(cfg).await.expect("standalone starts")
}

pub fn addr(s: &Standalone, t: Transport) -> SocketAddr {
    match t {
        Transport::Tcp => s.tcp,
        Transport::WebSocket => s.ws,
    }
}

/// Connects and authenticates, WebSocket spoken frame by frame by the test client itself (so
/// a test can then send frames no library would).
pub async fn raw_client(s: &Standalone, t: Transport, mid: i64, key: &str) -> Client {
    within(async {
        let mut c = Client::connect_raw(t, addr(s, t)).await.expect("connect");
        c.auth(&token(mid, key, "", &[])).await.expect("auth");
        c
    })
    .await
}

/// Connects and authenticates.
pub async fn client(
    s: &Standalone,
    t: Transport,
    mid: i64,
    key: &str,
    room: &str,
    accepts: &[i32],
) -> Client {
    within(async {
        let mut c = Client::connect(t, addr(s, t), None).await.expect("connect");
        c.auth(&token(mid, key, room, accepts)).await.expect("auth");
        c
    })
    .await
}

pub async fn recv(c: &mut Client) -> Packet {
    within(c.recv()).await.expect("recv")
}

/// One HTTP/1.1 request; returns status and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    http_with_headers(addr, method, path, "", body).await
}

/// As [`http`], with extra header lines (each ending in CRLF).
pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, String) {
    within(async {
        let mut s = TcpStream::connect(addr).await.expect("http connect");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: goim\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text[9..12].parse().unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    })
    .await
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// A goim API call: HTTP 200 and the JSON envelope.
pub async fn api(s: &Standalone, method: &str, path: &str, body: &[u8]) -> Value {
    let (status, body) = http(s.http, method, path, body).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

pub async fn push_ok(s: &Standalone, path: &str, body: &[u8]) {
    let v = api(s, "POST", path, body).await;
    assert_eq!(v["code"], 0, "{path}: {v}");
}
