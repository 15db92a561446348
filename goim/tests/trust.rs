//! Trust (distributed mode, real etcd and processes): no push reaches the wrong user, presence
//! converges to the connections that exist, one bad input does not fail everyone else's. Each
//! test here reproduced a defect before its fix.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::*;
use goim_client::Transport;

/// A device key that belonged to user A authenticates as user B on the same comet (account
/// switch): A's pushes must not reach B, and etcd must stop mapping A to the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_key_never_receives_the_previous_users_pushes() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(1, 1))
        .await
        .unwrap();
    let http = c.http();
    let addr = c.comet(0, Transport::Tcp);
    let _a = connect(addr, Transport::Tcp, 100, "shared", "").await;
    let mut b = connect(addr, Transport::Tcp, 200, "shared", "").await;
    push(http, "/goim/push/mids?operation=1000&mids=100", b"for-A").await;
    push(
        http,
        "/goim/push/keys?operation=1000&keys=shared",
        b"marker",
    )
    .await;
    // Pushes along one path keep their order: if A's message had reached B it would come first.
    assert_eq!(recv_body(&mut b).await, b"marker");
    let mut etcd = goim_discovery::connect(&[c.etcd.endpoint()]).await.unwrap();
    let left = etcd
        .get(
            "/goim/test/online/mid/100/",
            Some(goim_discovery::etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(
        left.kvs().is_empty(),
        "user 100 still maps to a key it no longer holds"
    );
    // B's own pushes still arrive.
    push(http, "/goim/push/mids?operation=1000&mids=200", b"for-B").await;
    assert_eq!(recv_body(&mut b).await, b"for-B");
}

/// Defence in depth: a comet delivers a push to users only to a connection of that user, even
/// when the caller (a stale lookup) names the key of someone else.
#[tokio::test]
async fn comet_refuses_a_user_push_to_another_users_connection() {
    use goim_proto::comet::PushMsgReq;
    use goim_proto::protocol::Proto;
    use goim_proto::service::CometService;
    let s = common::start().await;
    let mut b = common::client(&s, Transport::Tcp, 200, "k", "", &[1000]).await;
    let req = |mid: i64, body: &'static [u8]| PushMsgReq {
        keys: vec!["k".into()],
        proto_op: 1000,
        proto: Some(Proto {
            ver: 1,
            op: 1000,
            seq: 0,
            body: body.into(),
        }),
        mids: vec![mid],
        ..Default::default()
    };
    s.comet().push_msg(req(100, b"for-A")).await.unwrap();
    s.comet().push_msg(req(200, b"for-B")).await.unwrap();
    assert_eq!(common::recv(&mut b).await.body, b"for-B");
    let (_, metrics) = common::http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_comet_pushes_dropped_total{reason=\"wrong_user\"} 1"),
        "{metrics}"
    );
    // Malformed: mids not parallel to keys.
    let mut bad = req(200, b"x");
    bad.mids.push(1);
    assert!(s.comet().push_msg(bad).await.is_err());
}

/// Presence that no connection backs (a Disconnect that never arrived, a handshake that timed
/// out after logic stored it) is removed by the comet's sweep; live presence stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_no_connection_backs_is_swept() {
    use goim_discovery::etcd_client::PutOptions;
    let mut c = tokio::task::spawn_blocking(|| Cluster::start(0, 1))
        .await
        .unwrap();
    let logic = c.logic.addr("grpc").to_string();
    let comet = tokio::task::block_in_place(|| {
        let sweep = "presence_sweep = \"200ms\"";
        start_comet_with(&c.etcd, c.dir.path(), "comet-0", &logic, sweep)
    });
    let ready = comet.addr("http");
    tokio::task::block_in_place(|| {
        wait_until("comet holds its lease", || {
            http_status(ready, "/readyz") == 200
        })
    });
    c.comets.push(comet);
    let mut live = connect(c.comet(0, Transport::Tcp), Transport::Tcp, 1, "live", "").await;
    let mut etcd = goim_discovery::connect(&[c.etcd.endpoint()]).await.unwrap();
    let lease = etcd
        .get("/goim/test/load/comet-0", None)
        .await
        .unwrap()
        .kvs()
        .first()
        .map(|kv| kv.lease())
        .expect("the comet reports its load on its lease");
    let opts = Some(PutOptions::new().with_lease(lease));
    let rec = r#"{"mid":9,"comet":"comet-0","room":""}"#;
    etcd.put("/goim/test/online/key/ghost", rec, opts.clone())
        .await
        .unwrap();
    etcd.put("/goim/test/online/mid/9/ghost", "comet-0", opts)
        .await
        .unwrap();
    wait_until_async(|| {
        let mut etcd = etcd.clone();
        async move {
            let get = |k: &'static str| {
                let mut etcd = etcd.clone();
                async move { etcd.get(k, None).await.unwrap().kvs().is_empty() }
            };
            let gone = get("/goim/test/online/key/ghost").await
                && get("/goim/test/online/mid/9/ghost").await;
            gone && etcd
                .get("/goim/test/online/key/live", None)
                .await
                .unwrap()
                .count()
                == 1
        }
    })
    .await;
    let http = c.http();
    push(http, "/goim/push/mids?operation=1000&mids=1", b"still here").await;
    assert_eq!(recv_body(&mut live).await, b"still here");
}

/// A comet in a cluster takes no client before it holds its etcd lease: the presence would
/// hang on a lease nobody renews.
#[tokio::test]
async fn no_client_is_taken_before_the_comet_holds_a_lease() {
    let s = common::start().await;
    s.comet().require_lease();
    let mut c = goim_client::Client::connect(Transport::Tcp, s.tcp, None)
        .await
        .unwrap();
    c.send(7, &goim_client::token(1, "early", "", &[1000]))
        .await
        .unwrap();
    assert_eq!(common::within(c.read_to_close()).await.unwrap(), 0);
    let (_, metrics) = common::http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_comet_closed_total{reason=\"no_lease\"} 1"),
        "{metrics}"
    );
}

/// A job's SIGTERM (a rollout) loses no accepted push: it leaves the ring, refuses what still
/// arrives (logic hands it to the other job) and delivers what it holds before exiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_rollout_loses_no_accepted_push() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start(1, 2))
        .await
        .unwrap();
    let http = c.http();
    let mut a = connect(
        c.comet(0, Transport::Tcp),
        Transport::Tcp,
        1,
        "a",
        "live://9",
    )
    .await;
    let path = "/goim/push/room?operation=1000&type=live&room=9";
    let mut sent = Vec::new();
    for i in 0..200 {
        if i == 100 {
            // The job that owns the room on the ring.
            let ids = ["job-0".to_string(), "job-1".to_string()];
            let owner = goim_logic::etcd::ring_pick(&ids, "live://9").unwrap();
            let at = ids.iter().position(|j| j == owner).unwrap();
            let mut job = c.jobs.remove(at);
            // Terminated in the background while pushes keep coming.
            tokio::task::spawn_blocking(move || assert!(job.terminate(), "job exits cleanly"));
        }
        let body = format!("m{i}");
        push(http, path, body.as_bytes()).await;
        sent.push(body.into_bytes());
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        got.push(recv_body(&mut a).await);
    }
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
}

/// Defect 5: a registration etcd refuses (here: a lease etcd does not know) is retried after
/// a growing delay, not in a hot loop (it retried at once, hundreds of times a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_is_retried_with_backoff() {
    use goim_comet::registry::Registrar;
    use goim_comet::{Comet, CometConfig, CometMetrics};
    use goim_discovery::{CometRecord, Keys, LeaseHandle};
    use std::sync::Arc;
    use std::time::Duration;

    let etcd = tokio::task::spawn_blocking(goim_testkit::Etcd::start)
        .await
        .unwrap();
    let client = goim_discovery::connect(&[etcd.endpoint()]).await.unwrap();
    // No client ever connects: logic is never called.
    let logic =
        goim_proto::grpc::RemoteLogic::new(goim_proto::grpc::channel("127.0.0.1:9").unwrap());
    let metrics = Arc::new(CometMetrics::default());
    let comet = Comet::new(CometConfig::default(), Arc::new(logic), metrics.clone());
    let registrar = Arc::new(Registrar {
        comet,
        client,
        keys: Keys::new("backoff"),
        record: CometRecord::default(),
        self_register: true,
        lease: LeaseHandle::fixed(0x5eed),
        load_interval: Duration::from_secs(5),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(registrar.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(30), async {
        while metrics.registry_failures.get() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the registration fails");
    // Over the next second: delays of 100 ms doubling (with jitter) allow a handful of tries;
    // a hot loop against a local etcd makes hundreds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tries = metrics.registry_failures.get();
    stop.cancel();
    assert!(
        (2..=20).contains(&tries),
        "{tries} failed registrations in about a second"
    );
}
