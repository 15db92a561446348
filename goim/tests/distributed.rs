//! Distributed mode: separate comet, logic and job processes, real etcd, real clients.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::*;
use common::within;
use goim_client::{token, Client, Transport};

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
    // A push to the dead comet's key is answered at once, delivers nothing, and says so.
    let v = api(
        http,
        "POST",
        "/goim/push/keys?operation=1000&keys=b&keys=a",
        b"lost",
    )
    .await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["data"]["keys_found"], 1, "{v}");
    assert_eq!(v["data"]["keys_offline"], serde_json::json!(["b"]), "{v}");
    assert_eq!(recv_body(&mut a).await, b"lost");
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
            presence_revision: 0,
            reason: String::new(),
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

/// `[cluster] grpc_tls_dir` on every role: comet → logic (auth), logic → job and job → comet
/// (a push) all run over mutual TLS; a plain client, and one whose certificate another CA
/// signed, get no answer from a role's gRPC port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_talk_over_mutual_tls() {
    use goim_proto::logic::NodesReq;
    use goim_proto::service::LogicService;
    use goim_testkit::pki::TestCa;
    let (ca, other) = (TestCa::new("cluster-ca"), TestCa::new("other-ca"));
    let certs = tempfile::tempdir().unwrap();
    let (ours, theirs) = (certs.path().join("ours"), certs.path().join("theirs"));
    ca.issue(&ours, "goim-role", &["DNS:goim.internal"]);
    other.issue(&theirs, "stranger", &["DNS:goim.internal"]);
    std::fs::copy(ca.cert(), theirs.join("ca.crt")).unwrap();
    let tls = format!(
        "\n[cluster]\ngrpc_tls_dir = \"{}\"\ngrpc_tls_server_name = \"goim.internal\"\n",
        ours.display()
    );
    let c = {
        let tls = tls.clone();
        tokio::task::spawn_blocking(move || Cluster::start_configured(1, 1, &tls, &tls, &tls))
            .await
            .unwrap()
    };
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        5,
        "tls-a",
        "live://5",
    )
    .await;
    push(c.http(), "/goim/push/mids?operation=1000&mids=5", b"sealed").await;
    assert_eq!(recv_body(&mut a).await, b"sealed");
    push(
        c.http(),
        "/goim/push/room?operation=1000&type=live&room=5",
        b"room",
    )
    .await;
    assert_eq!(recv_body(&mut a).await, b"room");

    let logic_grpc = c.logic.addr("grpc").to_string();
    let plain = goim_proto::grpc::RemoteLogic::new(goim_proto::grpc::channel(&logic_grpc).unwrap());
    assert!(within(plain.nodes(NodesReq::default())).await.is_err());
    let stranger = goim::tls::dialer(&goim_config::ClusterConfig {
        grpc_tls_dir: theirs.display().to_string(),
        grpc_tls_server_name: "goim.internal".into(),
        ..Default::default()
    })
    .unwrap();
    let stranger = goim_proto::grpc::RemoteLogic::new(stranger.channel(&logic_grpc).unwrap());
    assert!(within(stranger.nodes(NodesReq::default())).await.is_err());
    // The same call with the cluster's certificate is answered.
    let member = goim::tls::dialer(&goim_config::ClusterConfig {
        grpc_tls_dir: ours.display().to_string(),
        grpc_tls_server_name: "goim.internal".into(),
        ..Default::default()
    })
    .unwrap();
    let member = goim_proto::grpc::RemoteLogic::new(member.channel(&logic_grpc).unwrap());
    within(member.nodes(NodesReq::default())).await.unwrap();
}

/// A counter's value in a Prometheus text page (0 when absent).
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Moves a client to `room` and waits for the reply.
async fn change_room(c: &mut Client, room: &str) {
    use goim_proto::op;
    c.send(op::CHANGE_ROOM, room.as_bytes()).await.unwrap();
    within(async {
        loop {
            let p = c.recv().await.unwrap();
            if p.op == op::CHANGE_ROOM_REPLY {
                return;
            }
            assert_eq!(p.op, op::HEARTBEAT_REPLY, "unexpected {p:?}");
        }
    })
    .await;
}

/// Job sends a room's batches only to comets with members there, and a client told it
/// joined a room gets the very next message pushed to it, on a comet the room just reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_batches_go_only_to_comets_with_members() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(2, 1))
        .await
        .unwrap();
    let http = c.http();
    let job = c.jobs[0].addr("http");
    let room1 = "/goim/push/room?operation=1000&type=live&room=1";
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        1,
        "a",
        "live://1",
    )
    .await;
    let mut b = connect(
        c.comet(1, Transport::Tcp),
        Transport::Tcp,
        2,
        "b",
        "live://2",
    )
    .await;
    push_until_received(http, room1, &mut a).await;
    // Once job knows comet 1's rooms, room 1's batches skip it.
    let skipped = || async {
        let m = raw_http(job, "GET", "/metrics", b"").await.unwrap().1;
        counter(&m, "goim_job_room_deliveries_skipped_total")
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while skipped().await == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never skipped comet 1"
        );
        push(http, room1, b"probe").await;
        assert_eq!(recv_body(&mut a).await, b"probe");
    }
    let metrics = || async { raw_http(job, "GET", "/metrics", b"").await.unwrap().1 };
    let before = metrics().await;
    for i in 0..10 {
        push(http, room1, format!("r{i}").as_bytes()).await;
        assert_eq!(recv_body(&mut a).await, format!("r{i}").into_bytes());
    }
    let after = metrics().await;
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    let batches = delta("goim_job_room_batches_total");
    assert!(batches >= 1.0);
    assert_eq!(
        delta(r#"goim_job_comet_calls_total{reason="room"}"#),
        batches,
        "one call per batch, to comet 0 only"
    );
    assert_eq!(delta("goim_job_room_deliveries_skipped_total"), batches);

    // b comes and goes: each time room 1 appears on comet 1 anew, and the first message
    // pushed after the reply reaches it.
    for i in 0..20 {
        change_room(&mut b, "live://1").await;
        let body = format!("join-{i}");
        push(http, room1, body.as_bytes()).await;
        assert_eq!(recv_body(&mut b).await, body.as_bytes());
        assert_eq!(recv_body(&mut a).await, body.as_bytes());
        change_room(&mut b, "live://2").await;
    }
    // A new connection into a room new to its comet: the push right after auth reaches it.
    let mut n = connect(
        c.comet(1, Transport::Tcp),
        Transport::Tcp,
        3,
        "n",
        "live://3",
    )
    .await;
    push(
        http,
        "/goim/push/room?operation=1000&type=live&room=3",
        b"first",
    )
    .await;
    assert_eq!(recv_body(&mut n).await, b"first");
    drop(c);
}

/// A comet no job knows yet (here the operator has not written its record, so no job sends
/// it a room batch) holds a new room's first member until every job in etcd watches it, at
/// most `ACK_TIMEOUT`; a room let in without that is counted. Before, the member was let in
/// at once and the room's pushes skipped the comet without a trace. Once the job knows the
/// comet, joins wait no more and pushes reach its members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comet_no_job_knows_holds_new_rooms_and_counts_them() {
    use goim_discovery::{CometRecord, CometState};
    let c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let (http, logic) = (c.http(), c.logic.addr("grpc").to_string());
    let managed = "[cluster]\noperator_managed = true";
    let comet = tokio::task::block_in_place(|| {
        start_comet_with(&c.etcd, c.dir.path(), "late", &logic, managed)
    });
    let probe = comet.addr("http");
    tokio::task::block_in_place(|| {
        wait_until("comet ready", || http_status(probe, "/readyz") == 200)
    });
    let unwatched = || async {
        let m = raw_http(probe, "GET", "/metrics", b"").await.unwrap().1;
        counter(&m, "goim_comet_rooms_unwatched_total")
    };
    let mut a = connect(comet.addr("tcp"), Transport::Tcp, 100, "a", "live://early").await;
    assert_eq!(unwatched().await, 1.0, "let in without the job's watch");

    // The operator writes the record: the job learns the comet.
    let record = CometRecord {
        name: "late".into(),
        grpc: comet.addr("grpc").to_string(),
        tcp: comet.addr("tcp").to_string(),
        ws: comet.addr("ws").to_string(),
        weight: 10,
        state: CometState::Active,
        ..Default::default()
    };
    let mut etcd = goim_discovery::connect(&[c.etcd.endpoint()]).await.unwrap();
    let value = serde_json::to_vec(&record).unwrap();
    etcd.put("/goim/test/comets/late", value, None)
        .await
        .unwrap();
    let job = c.jobs[0].addr("http");
    tokio::task::block_in_place(|| {
        wait_until("the job knows the comet", || {
            blocking_get_json(job, "/comets")
                .as_array()
                .is_some_and(|a| a.len() == 2)
        })
    });
    let mut b = connect(comet.addr("tcp"), Transport::Tcp, 101, "b", "live://later").await;
    push(
        http,
        "/goim/push/room?operation=1000&type=live&room=later",
        b"b",
    )
    .await;
    assert_eq!(recv_body(&mut b).await, b"b");
    push(
        http,
        "/goim/push/room?operation=1000&type=live&room=early",
        b"a",
    )
    .await;
    assert_eq!(recv_body(&mut a).await, b"a");
    assert_eq!(unwatched().await, 1.0, "waited for once");
}

/// Clients leaving together (their Disconnects go to logic in shared calls) each leave no
/// presence behind, and logic counts every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_together_each_leave_no_presence() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let http = c.http();
    const N: usize = 200;
    let mut clients = Vec::new();
    for i in 0..N {
        let key = format!("gone{i}");
        clients.push(
            connect(
                c.comet(0, Transport::Tcp),
                Transport::Tcp,
                i as i64 + 1,
                &key,
                "",
            )
            .await,
        );
    }
    let keys: String = (0..N).map(|i| format!("&keys=gone{i}")).collect();
    let path = format!("/goim/push/keys?operation=1000{keys}");
    let v = api(http, "POST", &path, b"here").await;
    assert_eq!(v["data"]["keys_found"], N, "{v}");
    for cl in &mut clients {
        assert_eq!(recv_body(cl).await, b"here");
    }
    drop(clients);
    wait_until_async(|| async {
        let v = api(http, "POST", &path, b"gone").await;
        v["data"]["keys_found"] == 0
    })
    .await;
    let v = api(http, "POST", &path, b"gone").await;
    assert_eq!(
        v["data"]["keys_offline"].as_array().map(Vec::len),
        Some(N),
        "{v}"
    );
    let metrics = tokio::task::spawn_blocking(move || blocking_get_text(http, "/metrics"))
        .await
        .unwrap();
    let disconnects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("goim_logic_disconnects_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(disconnects, Some(N as f64), "{metrics}");
    drop(c);
}
