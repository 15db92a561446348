//! CI smoke run of the harness against `goim standalone`: 1,000 connections, a few seconds of
//! each scenario. It checks that messages arrived, never how fast.

use std::net::SocketAddr;

use goim::config::Config;
use goim::standalone::Standalone;
use goim_bench::scenario::{self, Target};
use goim_bench::{raw, Conns};
use goim_client::Transport;

fn conns(addr: SocketAddr, t: Transport, prefix: &str, rooms: usize) -> Conns {
    Conns {
        addr,
        also: Vec::new(),
        transport: t,
        count: 500,
        parallel: 100,
        rooms,
        room_type: "smoke".into(),
        key_prefix: prefix.into(),
        source_base: None,
        tls: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_delivers() {
    let mut cfg = Config::default();
    cfg.comet.tcp = "127.0.0.1:0".into();
    cfg.comet.ws = "127.0.0.1:0".into();
    cfg.logic.http = "127.0.0.1:0".into();
    let s = Standalone::start(cfg).await.unwrap();
    let pid = Some(std::process::id());

    let (v, idle_clients) = scenario::idle(&conns(s.tcp, Transport::Tcp, "idle-", 0), pid)
        .await
        .unwrap();
    assert_eq!(v["connections"], 500);
    drop(idle_clients);

    for (t, addr) in [(Transport::Tcp, s.tcp), (Transport::WebSocket, s.ws)] {
        let v = scenario::fanout(
            &conns(addr, t, &format!("room-{t:?}-"), 5),
            Some(s.http),
            Target::Rooms,
            50,
            1,
            pid,
        )
        .await
        .unwrap();
        assert_eq!(v["delivered"], v["expected"], "{v}");
        assert_eq!(v["expected"], 50 * 100);
    }
    let v = scenario::fanout(
        &conns(s.tcp, Transport::Tcp, "key-", 0),
        Some(s.http),
        Target::Keys,
        200,
        1,
        pid,
    )
    .await
    .unwrap();
    assert_eq!(v["delivered"], 200, "{v}");
    assert!(v["latency_us"]["samples"].as_u64().unwrap() > 0);
    let v = scenario::fanout(
        &conns(s.tcp, Transport::Tcp, "all-", 0),
        Some(s.http),
        Target::All { speed: 0 },
        5,
        1,
        pid,
    )
    .await
    .unwrap();
    assert_eq!(v["delivered"], 5 * 500, "{v}");
    s.shutdown().await;
}

async fn raw_run(transport: raw::RawTransport, writer: raw::RawWriter) -> serde_json::Value {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = raw::RawConfig {
        rate: 20,
        shards: 2,
        transport,
        writer,
    };
    let server = tokio::spawn(raw::serve(l, cfg));
    let t = match transport {
        raw::RawTransport::Tcp => Transport::Tcp,
        raw::RawTransport::Ws => Transport::WebSocket,
    };
    let v = scenario::fanout(
        &conns(addr, t, "raw-", 0),
        None,
        Target::ServerDriven { rate: 20 },
        20,
        1,
        None,
    )
    .await
    .unwrap();
    server.abort();
    v
}

/// Both transports through `writer` get pushes, with latency samples.
async fn raw_delivers_on_every_transport(writer: raw::RawWriter) {
    for t in [raw::RawTransport::Tcp, raw::RawTransport::Ws] {
        let v = raw_run(t, writer).await;
        assert!(
            v["delivered"].as_u64().unwrap() > 0,
            "{t:?} {writer:?}: {v}"
        );
        let samples = v["latency_us"]["samples"].as_u64().unwrap();
        assert!(samples > 0, "{t:?} {writer:?}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_baseline_delivers_on_every_transport() {
    raw_delivers_on_every_transport(raw::RawWriter::Epoll).await;
}

/// Where io_uring works (this project's CI machine) its writer delivers on both transports;
/// where it does not, the server refuses to start with an error saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_baseline_io_uring_delivers_or_says_why_not() {
    let Err(e) = raw::io_uring_available() else {
        return raw_delivers_on_every_transport(raw::RawWriter::IoUring).await;
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = raw::RawConfig {
        rate: 20,
        shards: 1,
        transport: raw::RawTransport::Tcp,
        writer: raw::RawWriter::IoUring,
    };
    let err = format!("{:#}", raw::serve(l, cfg).await.unwrap_err());
    assert!(err.contains("io_uring is not available"), "{err} ({e:#})");
}

/// The conversations scenario against standalone on SQLite, with the sink it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_scenario_delivers_and_notifies() {
    let dir = tempfile::tempdir().unwrap();
    let sink: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = Config::default();
    cfg.comet.tcp = "127.0.0.1:0".into();
    cfg.comet.ws = "127.0.0.1:0".into();
    cfg.logic.http = "127.0.0.1:0".into();
    let chat = &mut cfg.logic.conversations;
    chat.store = format!("sqlite://{}", dir.path().join("chat.db").display());
    chat.notify.url = format!("http://{sink}/notify");
    chat.notify.linger = std::time::Duration::from_millis(5);
    // The sink is served by the scenario, after the server starts: the first batches may
    // find nobody and are notified again.
    chat.renotify_after = std::time::Duration::from_millis(200);
    let s = Standalone::start(cfg).await.unwrap();
    let args = goim_bench::chat::ChatArgs {
        http: s.http,
        comet: s.tcp,
        members: 40,
        online: 20,
        messages: 20,
        senders: 2,
        sink: Some(sink),
        inbox_conversations: 10,
        inbox_queries: 5,
        pid: Some(std::process::id()),
    };
    let v = goim_bench::chat::chat(&args).await.unwrap();
    assert_eq!(v["pushes_received"], v["pushes_expected"], "{v}");
    assert_eq!(v["pushes_expected"], 20 * 20);
    assert!(
        v["notifications_received"].as_u64().unwrap() >= 20 * 20,
        "{v}"
    );
    assert_eq!(v["list_latency_us"]["limit_100"]["samples"], 5);
    s.shutdown().await;
}
