//! Recovery (distributed mode, real etcd and processes): a client that speaks the extensions
//! (docs/PROTOCOL.md) and reconnects gets every room message it missed exactly once and in
//! order, then the live ones; when that is impossible (the job numbering the room died) it is
//! told "not recovered", never left to miss messages silently.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::net::SocketAddr;

use cluster::*;
use goim_client::{token, Client, Transport};
use goim_proto::op;
use serde_json::{json, Value};

const HISTORY: &str = "[job.history.chat]\nsize = 1000\nttl = \"5m\"";

/// A client that said HELLO, and the room messages it got with their positions.
struct Ext {
    c: Client,
    /// (epoch, offset, body) of each room message, in arrival order.
    got: Vec<(String, u64, String)>,
    /// The position the next `left` packets are numbered from.
    next: Option<(String, u64, u64)>,
}

impl Ext {
    async fn connect(addr: SocketAddr, t: Transport, key: &str) -> Ext {
        let mut c = Client::connect(t, addr, None).await.unwrap();
        // No room at auth: the JOIN below decides what comes first.
        c.auth(&token(1, key, "", &[])).await.unwrap();
        c.send(op::HELLO, br#"{"v":1}"#).await.unwrap();
        let p = common::within(c.recv()).await.unwrap();
        assert_eq!(p.op, op::HELLO_REPLY);
        Ext {
            c,
            got: Vec::new(),
            next: None,
        }
    }

    /// Joins `room`, recovering from `from` when given; returns the JOIN_REPLY.
    async fn join(&mut self, room: &str, from: Option<(&str, u64)>) -> Value {
        let mut body = json!({ "room": room });
        if let Some((epoch, offset)) = from {
            body["recover"] = json!({"epoch": epoch, "offset": offset});
        }
        self.c
            .send(op::JOIN, body.to_string().as_bytes())
            .await
            .unwrap();
        loop {
            let p = self.recv().await;
            if p.op == op::JOIN_REPLY {
                return serde_json::from_slice(&p.body).unwrap();
            }
        }
    }

    async fn recv(&mut self) -> goim_client::Packet {
        let p = common::within(self.c.recv()).await.unwrap();
        match p.op {
            op::POSITION => {
                let v: Value = serde_json::from_slice(&p.body).unwrap();
                self.next = Some((
                    v["epoch"].as_str().unwrap().to_string(),
                    v["offset"].as_u64().unwrap(),
                    v["count"].as_u64().unwrap(),
                ));
            }
            1000 => {
                let (epoch, offset, left) =
                    self.next.take().expect("a room message has a position");
                self.got.push((
                    epoch.clone(),
                    offset,
                    String::from_utf8(p.body.clone()).unwrap(),
                ));
                if left > 1 {
                    self.next = Some((epoch, offset + 1, left - 1));
                }
            }
            _ => {}
        }
        p
    }

    /// Reads until a room message with this body arrives.
    async fn until(&mut self, body: &str) {
        while !self.got.iter().any(|(_, _, b)| b == body) {
            self.recv().await;
        }
    }

    fn last(&self) -> (String, u64) {
        let (e, o, _) = self.got.last().unwrap();
        (e.clone(), *o)
    }
}

async fn push_room(http: SocketAddr, n: u32) {
    push(
        http,
        "/goim/push/room?operation=1000&type=chat&room=1",
        n.to_string().as_bytes(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_gets_what_it_missed_once_and_in_order() {
    let c = tokio::task::spawn_blocking(|| Cluster::start_with(2, 2, HISTORY))
        .await
        .unwrap();
    let http = c.http();
    let mut a = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "a").await;
    assert_eq!(a.join("chat://1", None).await, json!({"room": "chat://1"}));
    for n in 1..=10 {
        push_room(http, n).await;
    }
    a.until("10").await;
    let (epoch, seen) = a.last();
    let offsets: Vec<u64> = a.got.iter().map(|g| g.1).collect();
    assert_eq!(
        offsets,
        (seen - 9..=seen).collect::<Vec<_>>(),
        "numbered by one"
    );
    drop(a);

    // Missed while away, then more pushed while it rejoins (on the other comet, over
    // WebSocket): history and live messages meet during the JOIN.
    for n in 11..=20 {
        push_room(http, n).await;
    }
    let pusher = tokio::spawn(async move {
        for n in 21..=80 {
            push_room(http, n).await;
        }
    });
    let mut b = Ext::connect(c.comet(1, Transport::WebSocket), Transport::WebSocket, "a").await;
    let reply = b.join("chat://1", Some((&epoch, seen))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["epoch"], epoch.as_str());
    pusher.await.unwrap();
    b.until("80").await;
    let bodies: Vec<String> = b.got.iter().map(|g| g.2.clone()).collect();
    let want: Vec<String> = (11..=80).map(|n| n.to_string()).collect();
    assert_eq!(bodies, want, "every missed and live message once, in order");
    let offsets: Vec<u64> = b.got.iter().map(|g| g.1).collect();
    assert_eq!(offsets, (seen + 1..=seen + 70).collect::<Vec<_>>());
    assert!(b.got.iter().all(|g| g.0 == epoch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_rooms_job_dies_a_rejoining_client_is_told_not_recovered() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start_with(1, 2, HISTORY))
        .await
        .unwrap();
    let http = c.http();
    let mut a = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "a").await;
    a.join("chat://1", None).await;
    for n in 1..=5 {
        push_room(http, n).await;
    }
    a.until("5").await;
    let (epoch, seen) = a.last();
    drop(a);
    // The job numbering the room is the one keeping its history.
    let owner = tokio::task::block_in_place(|| {
        c.jobs.iter().position(|j| {
            blocking_get_text(j.addr("http"), "/metrics")
                .lines()
                .any(|l| l.starts_with("goim_job_history_rooms ") && !l.ends_with(" 0"))
        })
    })
    .expect("a job numbers the room");
    c.jobs[owner].kill();
    // The next job on the ring takes the room, under a new epoch.
    let mut probe = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "probe").await;
    probe.join("chat://1", None).await;
    wait_until_async(|| async {
        let (status, body) = raw_http(
            http,
            "POST",
            "/goim/push/room?operation=1000&type=chat&room=1",
            b"after",
        )
        .await
        .unwrap();
        status == 200 && body.contains("\"code\":0")
    })
    .await;
    probe.until("after").await;
    let (new_epoch, _) = probe.last();
    assert_ne!(
        new_epoch, epoch,
        "another job numbers the room under a new epoch"
    );

    let mut b = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "a").await;
    let reply = b.join("chat://1", Some((&epoch, seen))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["epoch"], new_epoch.as_str());
    // Live messages still come, numbered in the new epoch.
    push_room(http, 99).await;
    b.until("99").await;
    assert_eq!(b.last().0, new_epoch);
}
