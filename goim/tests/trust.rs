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
