//! Distributed mode: separate comet, logic and job processes, real etcd, real clients.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cluster::{wait_until, Etcd, Role};
use common::within;
use goim_client::{token, Client, Transport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Cluster {
    etcd: Etcd,
    dir: tempfile::TempDir,
    logic: Role,
    jobs: Vec<Role>,
    comets: Vec<Role>,
}

fn etcd_args(etcd: &Etcd) -> Vec<String> {
    vec![
        "--etcd".into(),
        etcd.endpoint(),
        "--cluster".into(),
        "test".into(),
        "--lease-ttl".into(),
        "2".into(),
    ]
}

fn args(etcd: &Etcd, role: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![role.to_string()];
    a.extend(etcd_args(etcd));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn start_logic(etcd: &Etcd, dir: &std::path::Path, grpc: &str) -> Role {
    Role::start(
        dir,
        "logic",
        &args(etcd, "logic", &["--http", "127.0.0.1:0", "--grpc", grpc]),
    )
}

fn start_job(etcd: &Etcd, dir: &std::path::Path, id: &str) -> Role {
    Role::start(
        dir,
        id,
        &args(
            etcd,
            "job",
            &["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--id", id],
        ),
    )
}

fn start_comet(etcd: &Etcd, dir: &std::path::Path, name: &str, logic: &str) -> Role {
    let a = [
        "--name",
        name,
        "--tcp",
        "127.0.0.1:0",
        "--ws",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--logic",
        logic,
    ];
    Role::start(dir, name, &args(etcd, "comet", &a))
}

impl Cluster {
    fn start(comets: usize, jobs: usize) -> Cluster {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let logic = start_logic(&etcd, dir.path(), "127.0.0.1:0");
        let logic_grpc = logic.addr("grpc").to_string();
        let jobs = (0..jobs)
            .map(|i| start_job(&etcd, dir.path(), &format!("job-{i}")))
            .collect();
        let comets = (0..comets)
            .map(|i| start_comet(&etcd, dir.path(), &format!("comet-{i}"), &logic_grpc))
            .collect();
        let c = Cluster {
            etcd,
            dir,
            logic,
            jobs,
            comets,
        };
        let n = c.comets.len();
        wait_until("logic sees every comet", || {
            c.get("/goim/nodes/instances")["data"]
                .as_array()
                .is_some_and(|a| a.len() == n)
        });
        wait_until("logic ready", || {
            http_status(c.logic.addr("http"), "/readyz") == 200
        });
        // Every job must know every comet before pushes are expected to reach them.
        for j in &c.jobs {
            let addr = j.addr("http");
            wait_until("job sees every comet", || {
                blocking_get_json(addr, "/comets")
                    .as_array()
                    .is_some_and(|a| a.len() == n)
            });
        }
        c
    }

    fn http(&self) -> SocketAddr {
        self.logic.addr("http")
    }

    fn get(&self, path: &str) -> Value {
        blocking_api(self.http(), "GET", path, b"")
    }

    fn comet(&self, i: usize, t: Transport) -> SocketAddr {
        self.comets[i].addr(match t {
            Transport::Tcp => "tcp",
            Transport::WebSocket => "ws",
        })
    }
}

fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match raw_http(addr, "GET", path, b"").await {
            Ok((s, _)) => s,
            Err(_) => 0,
        }
    })
}

async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn blocking_get_json(addr: SocketAddr, path: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match raw_http(addr, "GET", path, b"").await {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    })
}

fn blocking_api(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(api(addr, method, path, body))
}

async fn api(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Value {
    let (status, body) = within(raw_http(addr, method, path, body)).await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

async fn push(addr: SocketAddr, path: &str, body: &[u8]) {
    let v = api(addr, "POST", path, body).await;
    assert_eq!(v["code"], 0, "{path}: {v}");
}

async fn connect(addr: SocketAddr, t: Transport, mid: i64, key: &str, room: &str) -> Client {
    within(async {
        let mut c = Client::connect(t, addr, None).await.unwrap();
        c.auth(&token(mid, key, room, &[1000])).await.unwrap();
        c
    })
    .await
}

async fn recv_body(c: &mut Client) -> Vec<u8> {
    within(c.recv()).await.unwrap().body
}

/// Pushes until a message arrives (the path may be warming up: a job or comet restarting).
async fn push_until_received(http: SocketAddr, path: &str, c: &mut Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = raw_http(http, "POST", path, b"probe").await.unwrap();
        assert_eq!(status, 200);
        let ok = serde_json::from_str::<Value>(&body).is_ok_and(|v| v["code"] == 0);
        if ok {
            if let Ok(Ok(p)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
                assert_eq!(p.body, b"probe");
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no push got through {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_kind_crosses_comets() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(2, 2))
        .await
        .unwrap();
    let http = c.http();
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        1,
        "a",
        "live://1",
    )
    .await;
    let mut b = connect(
        c.comet(1, Transport::WebSocket),
        Transport::WebSocket,
        2,
        "b",
        "live://1",
    )
    .await;
    let mut b2 = connect(
        c.comet(1, Transport::Tcp),
        Transport::Tcp,
        1,
        "a2",
        "live://2",
    )
    .await;

    push(
        http,
        "/goim/push/keys?operation=1000&keys=a&keys=b",
        b"keys",
    )
    .await;
    assert_eq!(recv_body(&mut a).await, b"keys");
    assert_eq!(recv_body(&mut b).await, b"keys");
    push(http, "/goim/push/mids?operation=1000&mids=1", b"mid-1").await;
    assert_eq!(recv_body(&mut a).await, b"mid-1");
    assert_eq!(recv_body(&mut b2).await, b"mid-1");
    for i in 0..20 {
        push(
            http,
            "/goim/push/room?operation=1000&type=live&room=1",
            format!("room-{i}").as_bytes(),
        )
        .await;
    }
    for i in 0..20 {
        assert_eq!(recv_body(&mut a).await, format!("room-{i}").into_bytes());
        assert_eq!(recv_body(&mut b).await, format!("room-{i}").into_bytes());
    }
    push(http, "/goim/push/all?operation=1000", b"all").await;
    for cl in [&mut a, &mut b, &mut b2] {
        assert_eq!(recv_body(cl).await, b"all");
    }

    // Online state is cluster-wide (load reports come every few seconds).
    wait_until_async(|| async {
        api(http, "GET", "/goim/online/total", b"").await["data"]["conn_count"] == 3
    })
    .await;
    wait_until_async(|| async {
        api(http, "GET", "/goim/online/room?type=live&rooms=1", b"").await["data"]["1"] == 2
    })
    .await;
    drop(c);
}

/// Polls an async condition every 50 ms for up to 30 s.
async fn wait_until_async<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_comet_vanishes_within_its_lease() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start(2, 1))
        .await
        .unwrap();
    let http = c.http();
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        1,
        "a",
        "live://1",
    )
    .await;
    let _b = connect(
        c.comet(1, Transport::Tcp),
        Transport::Tcp,
        2,
        "b",
        "live://1",
    )
    .await;
    wait_until_async(|| async {
        api(http, "GET", "/goim/online/total", b"").await["data"]["conn_count"] == 2
    })
    .await;
    c.comets[1].kill();
    // Lease TTL is 2 s: its load record, room counts and presence go by themselves.
    wait_until_async(|| async {
        api(http, "GET", "/goim/online/total", b"").await["data"]["conn_count"] == 1
    })
    .await;
    wait_until_async(|| async {
        api(http, "GET", "/goim/online/room?type=live&rooms=1", b"").await["data"]["1"] == 1
    })
    .await;
    // A push to the dead comet's key is answered at once and delivers nothing.
    push(http, "/goim/push/keys?operation=1000&keys=b", b"lost").await;
    // comet A's clients keep receiving.
    push(
        http,
        "/goim/push/room?operation=1000&type=live&room=1",
        b"after",
    )
    .await;
    assert_eq!(recv_body(&mut a).await, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_keeps_clients_and_recovers() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let http = c.http();
    let addr = c.comet(0, Transport::Tcp);
    let mut a = connect(addr, Transport::Tcp, 1, "a", "live://1").await;
    c.etcd.stop();
    // Connected clients stay connected; heartbeats are answered.
    within(a.heartbeat()).await.unwrap();
    // A new client cannot be registered while etcd is down: it is closed.
    let mut refused = Client::connect(Transport::Tcp, addr, None).await.unwrap();
    refused
        .send(7, &token(3, "late", "", &[1000]))
        .await
        .unwrap();
    assert_eq!(within(refused.read_to_close()).await.unwrap(), 0);
    c.etcd.restart();
    // Presence comes back and pushes flow to the old client and to new ones.
    push_until_received(http, "/goim/push/keys?operation=1000&keys=a", &mut a).await;
    let mut late = connect(addr, Transport::Tcp, 3, "late", "").await;
    push(http, "/goim/push/keys?operation=1000&keys=late", b"welcome").await;
    assert_eq!(recv_body(&mut late).await, b"welcome");
    within(a.heartbeat()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logic_restart_keeps_clients() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        1,
        "a",
        "live://1",
    )
    .await;
    let grpc = c.logic.addr("grpc").to_string();
    c.logic.kill();
    within(a.heartbeat()).await.unwrap();
    let etcd = &c.etcd;
    let dir = c.dir.path().to_path_buf();
    c.logic = tokio::task::spawn_blocking({
        let endpoint = etcd.endpoint();
        move || {
            let a = [
                "logic",
                "--etcd",
                &endpoint,
                "--cluster",
                "test",
                "--lease-ttl",
                "2",
                "--http",
                "127.0.0.1:0",
                "--grpc",
                &grpc,
            ];
            Role::start(&dir, "logic2", &a.map(String::from))
        }
    })
    .await
    .unwrap();
    let http = c.http();
    push_until_received(http, "/goim/push/keys?operation=1000&keys=a", &mut a).await;
    // The comet reaches the new logic: a new client authenticates.
    let mut b = connect(c.comet(0, Transport::Tcp), Transport::Tcp, 2, "b", "").await;
    push(http, "/goim/push/keys?operation=1000&keys=b", b"hello").await;
    assert_eq!(recv_body(&mut b).await, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_come_and_go_and_pushes_keep_flowing() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start(1, 2))
        .await
        .unwrap();
    let http = c.http();
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        1,
        "a",
        "live://1",
    )
    .await;
    c.jobs[0].kill();
    push_until_received(
        http,
        "/goim/push/room?operation=1000&type=live&room=1",
        &mut a,
    )
    .await;
    c.jobs[1].kill();
    let (etcd, dir) = (c.etcd.endpoint(), c.dir.path().to_path_buf());
    let j = tokio::task::spawn_blocking(move || {
        let a = [
            "job",
            "--etcd",
            &etcd,
            "--cluster",
            "test",
            "--lease-ttl",
            "2",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--id",
            "job-new",
        ];
        Role::start(&dir, "job-new", &a.map(String::from))
    })
    .await
    .unwrap();
    c.jobs.push(j);
    push_until_received(
        http,
        "/goim/push/room?operation=1000&type=live&room=1",
        &mut a,
    )
    .await;
    push_until_received(http, "/goim/push/keys?operation=1000&keys=a", &mut a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_etcd_values_are_skipped() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let mut etcd = goim_discovery::connect(&[c.etcd.endpoint()]).await.unwrap();
    for key in [
        "/goim/test/comets/bad",
        "/goim/test/jobs/bad",
        "/goim/test/load/bad",
        "/goim/test/rooms/bad",
    ] {
        etcd.put(key, "{not json", None).await.unwrap();
    }
    let http = c.http();
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        1,
        "a",
        "live://1",
    )
    .await;
    push(
        http,
        "/goim/push/room?operation=1000&type=live&room=1",
        b"fine",
    )
    .await;
    assert_eq!(recv_body(&mut a).await, b"fine");
    let v = api(http, "GET", "/goim/nodes/instances", b"").await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_write_nothing_to_etcd() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let mut a = connect(c.comet(0, Transport::Tcp), Transport::Tcp, 1, "hb", "").await;
    let mut etcd = goim_discovery::connect(&[c.etcd.endpoint()]).await.unwrap();
    let rev =
        |r: goim_discovery::etcd_client::GetResponse| r.kvs().first().map(|kv| kv.mod_revision());
    let before = rev(etcd.get("/goim/test/online/key/hb", None).await.unwrap());
    assert!(before.is_some());
    for _ in 0..50 {
        within(a.heartbeat()).await.unwrap();
    }
    let after = rev(etcd.get("/goim/test/online/key/hb", None).await.unwrap());
    assert_eq!(before, after);
}

/// A comet speaking only goim's `goim.logic.Logic` (no etcd, no lease, as goim's own comet):
/// logic holds a lease for it, so its clients' presence and room counts work and vanish
/// when it stops renewing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goim_comet_can_use_our_logic() {
    use goim_proto::logic::logic_client::LogicClient;
    use goim_proto::logic::{ConnectReq, DisconnectReq, OnlineReq};
    let c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let http = c.http();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.logic.addr("grpc")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Exactly what goim's comet sends: no lease field, RenewOnline gzip-compressed.
    let mut logic = LogicClient::new(ch).send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let reply = logic
        .connect(ConnectReq {
            server: "goim-comet-1".into(),
            cookie: String::new(),
            token: token(7, "go-key", "live://7", &[1000]).into(),
            lease: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.key.as_str(), reply.room_id.as_str()),
        ("go-key", "live://7")
    );
    let mut etcd = goim_discovery::connect(&[c.etcd.endpoint()]).await.unwrap();
    let kv = etcd
        .get("/goim/test/online/key/go-key", None)
        .await
        .unwrap();
    assert!(
        kv.kvs()[0].lease() != 0,
        "presence hangs on a lease logic holds"
    );
    logic
        .renew_online(OnlineReq {
            server: "goim-comet-1".into(),
            room_count: [("live://7".to_string(), 3)].into(),
            lease: 0,
        })
        .await
        .unwrap();
    wait_until_async(|| async {
        api(http, "GET", "/goim/online/room?type=live&rooms=7", b"").await["data"]["7"] == 3
    })
    .await;
    let gone = logic
        .disconnect(DisconnectReq {
            mid: 7,
            key: "go-key".into(),
            server: "goim-comet-1".into(),
            lease: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.has);
    assert!(etcd
        .get("/goim/test/online/key/go-key", None)
        .await
        .unwrap()
        .kvs()
        .is_empty());
}
