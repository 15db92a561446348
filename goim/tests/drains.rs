//! Drains (distributed mode, real etcd and processes): a comet that is stopped does not drop
//! its clients at once. It turns not-ready, is no longer offered, tells clients that speak
//! the extensions (docs/PROTOCOL.md) when to reconnect elsewhere, closes everyone over its
//! drain period and exits.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::HashSet;

use cluster::*;
use goim_client::{token, Client, Transport};
use goim_proto::op;
use serde_json::Value;

/// Every packet until the server closes the connection.
async fn until_closed(c: &mut Client) -> Vec<goim_client::Packet> {
    let mut got = Vec::new();
    while let Ok(p) = common::within(c.recv()).await {
        got.push(p);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_comet_drains_its_clients_instead_of_dropping_them() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let logic_grpc = c.logic.addr("grpc").to_string();
    let mut drainer = tokio::task::block_in_place(|| {
        start_comet_with(
            &c.etcd,
            c.dir.path(),
            "drainer",
            &logic_grpc,
            "drain_period = \"3s\"",
        )
    });
    let http = c.http();
    wait_until_async(|| async {
        api(http, "GET", "/goim/nodes/instances", b"").await["data"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    })
    .await;

    // Four goim clients and four that say HELLO, on both transports.
    let mut plain = Vec::new();
    let mut extended = Vec::new();
    for i in 0..8 {
        let t = if i % 2 == 0 {
            Transport::Tcp
        } else {
            Transport::WebSocket
        };
        let addr = drainer.addr(if i % 2 == 0 { "tcp" } else { "ws" });
        let mut cl = Client::connect(t, addr, None).await.unwrap();
        cl.auth(&token(i + 1, &format!("d{i}"), "live://1", &[1000]))
            .await
            .unwrap();
        if i < 4 {
            plain.push(cl);
        } else {
            let seq = cl.send(op::HELLO, br#"{"v":1}"#).await.unwrap();
            let reply = common::within(cl.recv()).await.unwrap();
            assert_eq!((reply.op, reply.seq), (op::HELLO_REPLY, seq));
            let v: Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(v["v"], 1);
            extended.push(cl);
        }
    }

    drainer.signal_term();
    let ops = drainer.addr("http");
    // Not ready at once (the Service stops sending it clients), and no longer offered.
    wait_until_async(|| async {
        raw_http(ops, "GET", "/readyz", b"")
            .await
            .is_ok_and(|(status, _)| status != 200)
    })
    .await;
    wait_until_async(|| async {
        api(http, "GET", "/goim/nodes/instances", b"").await["data"]
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["hostname"] != "drainer")
    })
    .await;
    // A new client is refused meanwhile.
    let mut late = Client::connect(Transport::Tcp, drainer.addr("tcp"), None)
        .await
        .unwrap();
    assert!(late.auth(&token(99, "late", "", &[])).await.is_err());

    // Each extension client is told when to go, at a moment of its own within the drain
    // period, and then closed; goim's clients are simply closed.
    let mut advised = HashSet::new();
    for cl in &mut extended {
        let got = until_closed(cl).await;
        let advice: Vec<_> = got.iter().filter(|p| p.op == op::RECONNECT).collect();
        assert_eq!(advice.len(), 1, "{got:?}");
        let v: Value = serde_json::from_slice(&advice[0].body).unwrap();
        assert_eq!(v["reason"], "drain");
        let after = v["after_ms"].as_u64().unwrap();
        assert!(after < 3000, "after {after} ms");
        advised.insert(after);
    }
    assert_eq!(advised.len(), 4, "spread over the drain: {advised:?}");
    for cl in &mut plain {
        let got = until_closed(cl).await;
        assert!(got.iter().all(|p| p.op != op::RECONNECT), "{got:?}");
    }
    let clean = tokio::task::spawn_blocking(move || drainer.wait_exit())
        .await
        .unwrap();
    assert!(clean, "the drained comet exits 0");
    drop(c);
}
