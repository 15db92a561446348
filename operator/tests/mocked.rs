//! The mocked tier (controller-rs style): the reconciler against a scripted API server, to pin
//! the exact call sequence: finalizer first, the prefix check, server-side apply with the
//! operator's field manager, status last.

use std::sync::Arc;

use goim_operator::controller::{reconcile, Context, FINALIZER};
use goim_operator::crd::PushCluster;
use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn cluster(finalizer: bool) -> PushCluster {
    let mut v = json!({
        "apiVersion": "goim.rs/v1beta1",
        "kind": "PushCluster",
        "metadata": {"name": "test", "namespace": "default", "uid": "u-1", "generation": 1, "resourceVersion": "1"},
        // Port 1 refuses at once: the etcd part fails fast and the cluster goes Degraded.
        "spec": {"image": "goim:test", "etcd": {"endpoints": ["127.0.0.1:1"]}, "auth": {"mode": "json"}, "comet": {"replicas": 2}}
    });
    if finalizer {
        v["metadata"]["finalizers"] = json!([FINALIZER]);
    }
    serde_json::from_value(v).unwrap()
}

fn respond(handle_send: tower_test::mock::SendResponse<Response<Body>>, body: Value) {
    handle_send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

async fn next(
    handle: &mut Handle,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    handle.next_request().await.expect("another API call")
}

#[tokio::test]
async fn finalizer_is_added_before_anything_is_applied() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Arc::new(Context::new(
        Client::new(svc, "default"),
        Default::default(),
    ));
    let verifier = tokio::spawn(async move {
        let (req, send) = next(&mut handle).await;
        assert_eq!(req.method(), http::Method::PATCH);
        assert_eq!(
            req.uri().path(),
            "/apis/goim.rs/v1beta1/namespaces/default/pushclusters/test"
        );
        let body =
            String::from_utf8(req.into_body().collect_bytes().await.unwrap().to_vec()).unwrap();
        assert!(body.contains(FINALIZER), "{body}");
        respond(send, serde_json::to_value(cluster(true)).unwrap());
    });
    reconcile(Arc::new(cluster(false)), ctx).await.unwrap();
    verifier.await.unwrap();
}

#[tokio::test]
async fn objects_are_server_side_applied_and_status_comes_last() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = Arc::new(Context::new(
        Client::new(svc, "default"),
        Default::default(),
    ));
    let verifier = tokio::spawn(async move {
        let mut applied = Vec::new();
        loop {
            let (req, send) = next(&mut handle).await;
            let (method, uri) = (req.method().clone(), req.uri().clone());
            let path = uri.path().to_string();
            let query = uri.query().unwrap_or("").to_string();
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap())
                    .unwrap_or(Value::Null);
            if path.ends_with("/status") {
                // The last call of the reconcile: observedGeneration and a Degraded etcd.
                assert_eq!(method, http::Method::PATCH);
                assert_eq!(body["status"]["observedGeneration"], 1);
                let conds = body["status"]["conditions"].as_array().unwrap();
                assert!(
                    conds.iter().any(|c| c["type"] == "Degraded"
                        && c["status"] == "True"
                        && c["reason"] == "EtcdUnavailable"),
                    "{conds:?}"
                );
                respond(send, serde_json::to_value(cluster(true)).unwrap());
                return applied;
            }
            match method {
                http::Method::PATCH => {
                    // Server-side apply, one field manager, forced.
                    assert!(
                        query.contains("fieldManager=goim-operator"),
                        "{path}?{query}"
                    );
                    assert!(query.contains("force=true"), "{path}?{query}");
                    assert_eq!(
                        body["metadata"]["ownerReferences"][0]["kind"], "PushCluster",
                        "{path}"
                    );
                    applied.push(body["kind"].as_str().unwrap_or("").to_string());
                    respond(send, body);
                }
                // Every PushCluster, to check that no other one claims this prefix.
                http::Method::GET if path == "/apis/goim.rs/v1beta1/pushclusters" => {
                    respond(
                        send,
                        json!({"apiVersion": "goim.rs/v1beta1", "kind": "PushClusterList", "metadata": {}, "items": []}),
                    );
                }
                http::Method::GET if path.ends_with("/pods") => {
                    respond(
                        send,
                        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
                    );
                }
                http::Method::GET => {
                    // The StatefulSet does not exist yet.
                    send.send_response(
                        Response::builder()
                            .status(404)
                            .body(Body::from(serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})).unwrap()))
                            .unwrap(),
                    );
                }
                other => panic!("unexpected {other} {path}"),
            }
        }
    });
    let action = reconcile(Arc::new(cluster(true)), ctx).await;
    let applied = verifier.await.unwrap();
    assert!(action.is_ok(), "{action:?}");
    for kind in [
        "ConfigMap",
        "Service",
        "PodDisruptionBudget",
        "Deployment",
        "StatefulSet",
    ] {
        assert!(
            applied.iter().any(|k| k == kind),
            "{kind} not applied: {applied:?}"
        );
    }
    assert_eq!(
        applied.first().map(String::as_str),
        Some("ConfigMap"),
        "config first, so pods roll on its hash"
    );
}
