//! The control-plane tier: a real kube-apiserver (built by tools/build.sh) on a real etcd,
//! the chart installed with a real helm, the operator reconciling against it. There is no
//! kubelet or controller-manager: tests play their part (pods, their readiness) where needed.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use goim_discovery::etcd_client::GetOptions;
use goim_operator::crd::PushCluster;
use goim_testkit::{kubeconfig_text, ControlPlane, Etcd, ADMIN_TOKEN};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt as _};
use serde_json::json;

/// One control plane per test binary, with the chart installed once.
fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        // Secrets readable in "tls" only: the least-privilege RBAC is what the tests run under.
        ControlPlane::start_with(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/goim"),
            &["tls"],
            &["--set", "operator.secretNamespaces={tls}"],
        )
    })
}

async fn client_for(cp: &ControlPlane, token: &str, name: &str) -> Client {
    let kc = Kubeconfig::from_yaml(&kubeconfig_text(cp.port, token, name)).unwrap();
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

/// A client acting as the chart's ServiceAccount (so the chart's RBAC is what is tested).
async fn operator_client(cp: &ControlPlane, admin: &Client) -> Client {
    service_account_client(cp, admin, "goim-system", "goim-goim").await
}

async fn service_account_client(cp: &ControlPlane, admin: &Client, ns: &str, sa: &str) -> Client {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let tr: TokenRequest = serde_json::from_value(json!({"spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}})).unwrap();
    let tr: TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &tr)
        .await
        .unwrap();
    client_for(cp, &tr.status.unwrap().token, sa).await
}

async fn admin() -> Client {
    client_for(control_plane(), ADMIN_TOKEN, "admin").await
}

async fn namespace(c: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    let _ = Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await;
}

fn cluster(name: &str, etcd: &str, comets: i32) -> PushCluster {
    serde_json::from_value(json!({
        "apiVersion": "goim.rs/v1beta1",
        "kind": "PushCluster",
        "metadata": {"name": name},
        "spec": {"image": "goim:test", "etcd": {"endpoints": [etcd]}, "auth": {"mode": "json"}, "comet": {"replicas": comets, "drainSeconds": 600}}
    }))
    .unwrap()
}

/// Polls an async condition every 50 ms for up to 60 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_and_crd_is_established() {
    let c = admin().await;
    goim_operator::controller::check_crd(&c).await.unwrap();
    let out = Command::new(&control_plane().helm)
        .arg("--kubeconfig")
        .arg(control_plane().dir.path().join("admin.kubeconfig"))
        .args(["status", "goim", "-n", "goim-system"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("STATUS: deployed"));
    // The documented CRD upgrade: helm never upgrades CRDs, and this one is too large for
    // client-side apply's annotation, so it is applied server-side.
    let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/pushcluster.yaml");
    let (ok, _, err) = control_plane().kubectl(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            crd.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "server-side apply of the CRD: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_by_schema_and_cel() {
    let c = admin().await;
    namespace(&c, "invalid").await;
    let api: Api<PushCluster> = Api::namespaced(c.clone(), "invalid");
    // As a user would: kubectl apply, refused by the schema and CEL with the reason shown.
    let (ok, _, err) = control_plane().kubectl(
        &["apply", "-n", "invalid", "-f", "-"],
        "apiVersion: goim.rs/v1alpha1\nkind: PushCluster\nmetadata: {name: viakubectl}\nspec:\n  image: \"\"\n  etcd: {endpoints: []}\n  auth: {mode: json}\n  logic: {replicas: 0}\n",
    );
    assert!(!ok, "kubectl apply accepted an invalid spec");
    for reason in [
        "image must not be empty",
        "at least one replica is required",
        "spec.etcd.endpoints",
    ] {
        assert!(err.contains(reason), "{reason:?} not in: {err}");
    }
    // No auth mode is chosen for the user: goim's unverified token only when asked for.
    let (ok, _, err) = control_plane().kubectl(
        &["apply", "-n", "invalid", "-f", "-"],
        "apiVersion: goim.rs/v1beta1\nkind: PushCluster\nmetadata: {name: noauth}\nspec:\n  image: goim:1\n  etcd: {endpoints: [\"etcd:2379\"]}\n",
    );
    assert!(!ok && err.contains("spec.auth: Required value"), "{err}");
    let base = serde_json::to_value(cluster("bad", "127.0.0.1:1", 1)).unwrap();
    let cases: Vec<(&str, serde_json::Value)> = vec![
        ("empty image", json!({"image": ""})),
        ("no etcd endpoints", json!({"etcd": {"endpoints": []}})),
        ("negative comets", json!({"comet": {"replicas": -1}})),
        ("zero logic", json!({"logic": {"replicas": 0}})),
        (
            "autoscale max < min",
            json!({"comet": {"autoscale": {"min": 3, "max": 2, "targetConnectionsPerPod": 10}}}),
        ),
        (
            "unknown service type",
            json!({"comet": {"serviceType": "Ingress"}}),
        ),
        (
            "no comet out of service",
            json!({"comet": {"maxUnavailable": 0}}),
        ),
        (
            "history for the reserved type user",
            json!({"history": {"rooms": {"user": {"size": 1, "ttlSeconds": 1}}}}),
        ),
        (
            "a room type that is no name",
            json!({"history": {"rooms": {"a\"]\n[x": {"size": 1, "ttlSeconds": 1}}}}),
        ),
        (
            "history of no messages",
            json!({"history": {"users": {"size": 0, "ttlSeconds": 1}}}),
        ),
        (
            "pod labels the operator selects by",
            json!({"comet": {"pod": {"labels": {"app.kubernetes.io/component": "x"}}}}),
        ),
        (
            "a traffic policy on a ClusterIP Service",
            json!({"comet": {"service": {"externalTrafficPolicy": "Local"}}}),
        ),
        (
            "a load balancer class on a NodePort Service",
            json!({"comet": {"serviceType": "NodePort", "service": {"loadBalancerClass": "x/y"}}}),
        ),
        ("no push queue", json!({"comet": {"pushQueue": 0}})),
        ("no heartbeat", json!({"logic": {"heartbeatSeconds": 0}})),
        (
            "a port beyond 65535",
            json!({"logic": {"nodes": {"tcpPort": 70000}}}),
        ),
        (
            "a push body goim clients refuse",
            json!({"logic": {"maxMessageBytes": 5000}}),
        ),
        ("jwt without keys", json!({"auth": {"mode": "jwt"}})),
        ("no auth mode", json!({"auth": {}})),
    ];
    for (what, patch) in cases {
        let mut obj = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            obj["spec"][k] = v.clone();
        }
        let pc: Result<PushCluster, _> = serde_json::from_value(obj.clone());
        // Some cases cannot even be typed; send them raw.
        let created = match pc {
            Ok(pc) => api.create(&PostParams::default(), &pc).await.map(|_| ()),
            Err(_) => Api::<kube::core::DynamicObject>::namespaced_with(
                c.clone(),
                "invalid",
                &kube::core::ApiResource::erase::<PushCluster>(&()),
            )
            .create(
                &PostParams::default(),
                &serde_json::from_value(obj).unwrap(),
            )
            .await
            .map(|_| ()),
        };
        let err = created.expect_err(what);
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 422),
            "{what}: {err}"
        );
    }
    // etcd.prefix cannot change once set.
    let mut pc = cluster("fixed", "127.0.0.1:1", 1);
    pc.spec.etcd.prefix = Some("one".into());
    api.create(&PostParams::default(), &pc).await.unwrap();
    let err = api
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"etcd": {"prefix": "two"}}})),
        )
        .await
        .expect_err("prefix change");
    assert!(err.to_string().contains("immutable"), "{err}");
}

async fn owned_by(c: &Client, ns: &str, pc: &str) -> bool {
    let owner = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.owner_references.as_ref().is_some_and(|o| {
            o.iter()
                .any(|r| r.kind == "PushCluster" && r.name == pc && r.controller == Some(true))
        })
    };
    let sts = Api::<StatefulSet>::namespaced(c.clone(), ns)
        .get_opt(&format!("{pc}-comet"))
        .await
        .ok()
        .flatten();
    let logic = Api::<Deployment>::namespaced(c.clone(), ns)
        .get_opt(&format!("{pc}-logic"))
        .await
        .ok()
        .flatten();
    let job = Api::<Deployment>::namespaced(c.clone(), ns)
        .get_opt(&format!("{pc}-job"))
        .await
        .ok()
        .flatten();
    let cm = Api::<ConfigMap>::namespaced(c.clone(), ns)
        .get_opt(&format!("{pc}-config"))
        .await
        .ok()
        .flatten();
    let pdb = Api::<PodDisruptionBudget>::namespaced(c.clone(), ns)
        .get_opt(&format!("{pc}-comet"))
        .await
        .ok()
        .flatten();
    let svcs = Api::<Service>::namespaced(c.clone(), ns);
    let mut ok = sts.is_some_and(|o| owner(&o.metadata))
        && logic.is_some_and(|o| owner(&o.metadata))
        && job.is_some_and(|o| owner(&o.metadata))
        && cm.is_some_and(|o| owner(&o.metadata))
        && pdb.is_some_and(|o| owner(&o.metadata));
    for s in ["comet", "comet-headless", "logic", "job"] {
        ok &= svcs
            .get_opt(&format!("{pc}-{s}"))
            .await
            .ok()
            .flatten()
            .is_some_and(|o| owner(&o.metadata));
    }
    ok
}

/// Plays the StatefulSet controller: comet pod `i` as the StatefulSet's template says (its
/// labels and annotations, the revision among them). `node`: scheduled there, so that a
/// deletion is graceful (the pod stays, terminating, until the "kubelet" removes it).
async fn sts_pod(c: &Client, ns: &str, pc: &str, i: usize, node: Option<&str>) -> Pod {
    let stss = Api::<StatefulSet>::namespaced(c.clone(), ns);
    let sts = format!("{pc}-comet");
    eventually("the comet StatefulSet", || async {
        stss.get_opt(&sts).await.unwrap().is_some()
    })
    .await;
    let meta = stss
        .get(&sts)
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap_or_default();
    serde_json::from_value(json!({
        "metadata": {"name": format!("{pc}-comet-{i}"), "labels": meta.labels,
            "annotations": meta.annotations},
        "spec": {"nodeName": node, "containers": [{"name": "comet", "image": "goim:test"}]}
    }))
    .unwrap()
}

/// Plays the kubelet: the pod's readiness (and its IP).
async fn set_ready(c: &Client, ns: &str, name: &str, i: usize, ready: bool) {
    let status = json!({"status": {"phase": "Running", "podIP": format!("10.1.0.{}", i + 1),
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
    Api::<Pod>::namespaced(c.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

async fn ready_pod(c: &Client, ns: &str, pc: &str, i: usize) {
    let pod = sts_pod(c, ns, pc, i, None).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    set_ready(c, ns, &pod.name_any(), i, true).await;
}

async fn etcd_get(endpoint: &str, key: &str, prefix: bool) -> Vec<(String, serde_json::Value)> {
    let mut e = goim_discovery::connect(&[endpoint.to_string()])
        .await
        .unwrap();
    let opts = prefix.then(|| GetOptions::new().with_prefix());
    let r = e.get(key, opts).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                serde_json::from_slice(kv.value()).unwrap_or(json!(null)),
            )
        })
        .collect()
}

async fn sts_replicas(c: &Client, ns: &str, name: &str) -> Option<i32> {
    Api::<StatefulSet>::namespaced(c.clone(), ns)
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.spec.and_then(|s| s.replicas))
}

/// Reconcile, status, scale subresource, drain, etcd registration and the finalizer, with the
/// operator running as the chart's ServiceAccount (so the chart's RBAC is what is tested).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_scales_drains_and_cleans_up_with_chart_rbac() {
    let cp = control_plane();
    let c = admin().await;
    let ns = "lifecycle";
    namespace(&c, ns).await;
    let sa_client = operator_client(cp, &c).await;
    let op = tokio::spawn(goim_operator::controller::run(sa_client, opts(None)));

    let etcd = cp.etcd.endpoint();
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    pcs.create(&PostParams::default(), &cluster("demo", &etcd, 2))
        .await
        .unwrap();
    eventually("every object created and owned", || {
        owned_by(&c, ns, "demo")
    })
    .await;
    eventually("status follows generation", || async {
        let pc = pcs.get("demo").await.unwrap();
        let st = pc.status.clone().unwrap_or_default();
        st.observed_generation == pc.metadata.generation
            && st
                .conditions
                .iter()
                .any(|c| c.type_ == "EtcdRegistered" && c.status == "True")
            && st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False")
            && pc
                .finalizers()
                .iter()
                .any(|f| f == goim_operator::controller::FINALIZER)
    })
    .await;
    // A spec change moves observedGeneration.
    pcs.patch(
        "demo",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"logic": {"replicas": 2}}})),
    )
    .await
    .unwrap();
    eventually("observedGeneration follows the change", || async {
        let pc = pcs.get("demo").await.unwrap();
        pc.status.and_then(|s| s.observed_generation) == pc.metadata.generation
    })
    .await;
    let logic = Api::<Deployment>::namespaced(c.clone(), ns)
        .get("demo-logic")
        .await
        .unwrap();
    assert_eq!(logic.spec.unwrap().replicas, Some(2));

    // Ready comet pods get registered in etcd.
    ready_pod(&c, ns, "demo", 0).await;
    ready_pod(&c, ns, "demo", 1).await;
    eventually("both comets registered", || async {
        etcd_get(&etcd, "/goim/lifecycle.demo/comets/", true)
            .await
            .len()
            == 2
    })
    .await;

    // kubectl scale through the scale subresource; comet-1 still has clients, so it drains.
    let mut e = goim_discovery::connect(std::slice::from_ref(&etcd))
        .await
        .unwrap();
    e.put(
        "/goim/lifecycle.demo/load/demo-comet-1",
        r#"{"conn_count":5}"#,
        None,
    )
    .await
    .unwrap();
    let (ok, _, err) = cp.kubectl(&["scale", "-n", ns, "pushcluster/demo", "--replicas=1"], "");
    assert!(ok, "kubectl scale: {err}");
    eventually("comet-1 marked draining, replicas held", || async {
        let rec = etcd_get(&etcd, "/goim/lifecycle.demo/comets/demo-comet-1", false).await;
        let st = pcs.get("demo").await.unwrap().status.unwrap_or_default();
        rec.first().is_some_and(|(_, v)| v["state"] == "draining")
            && st.comet.draining == vec!["demo-comet-1".to_string()]
            && sts_replicas(&c, ns, "demo-comet").await == Some(2)
    })
    .await;
    // `kubectl describe` says what the drain waits for; `-o wide` shows the connections and
    // where clients connect.
    eventually("describe explains the drain", || async {
        let (ok, out, _) = cp.kubectl(&["describe", "-n", ns, "pushcluster/demo"], "");
        ok && out.contains("connections left: demo-comet-1 5")
    })
    .await;
    let (ok, wide, err) = cp.kubectl(&["get", "-n", ns, "pushc", "demo", "-o", "wide"], "");
    assert!(ok, "{err}");
    for needle in [
        "CONNECTIONS",
        "demo-comet.lifecycle.svc:3101",
        "ws://demo-comet.lifecycle.svc:3102/sub",
        "goim:test",
    ] {
        assert!(wide.contains(needle), "{needle:?} missing from:\n{wide}");
    }
    // What a HorizontalPodAutoscaler reads: the scale subresource with the pod selector.
    let (ok, scale, err) = cp.kubectl(
        &[
            "get",
            "--raw",
            &format!("/apis/goim.rs/v1beta1/namespaces/{ns}/pushclusters/demo/scale"),
        ],
        "",
    );
    assert!(ok, "{err}");
    let scale: serde_json::Value = serde_json::from_str(&scale).unwrap();
    assert_eq!(scale["spec"]["replicas"], 1);
    assert!(scale["status"]["selector"]
        .as_str()
        .unwrap()
        .contains("app.kubernetes.io/component=comet"));
    // Its clients have left: the StatefulSet shrinks.
    e.put(
        "/goim/lifecycle.demo/load/demo-comet-1",
        r#"{"conn_count":0}"#,
        None,
    )
    .await
    .unwrap();
    eventually("scaled down after the drain", || async {
        sts_replicas(&c, ns, "demo-comet").await == Some(1)
    })
    .await;

    // Delete: the finalizer clears the etcd prefix, then lets the object go.
    pcs.delete("demo", &DeleteParams::default()).await.unwrap();
    eventually("PushCluster gone", || async {
        pcs.get_opt("demo").await.unwrap().is_none()
    })
    .await;
    assert!(etcd_get(&etcd, "/goim/lifecycle.demo/", true)
        .await
        .is_empty());
    op.abort();
}

fn opts(namespace: Option<String>) -> goim_operator::controller::Options {
    goim_operator::controller::Options {
        namespace,
        metrics: Default::default(),
        election: None,
    }
}

/// Two candidates, one lease: only one leads; after it releases, the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_operator_leads() {
    let c = admin().await;
    let ns = "leader";
    namespace(&c, ns).await;
    let d = Duration::from_secs(30);
    let a = goim_operator::leader::Election::new(c.clone(), ns, "goim-operator", "a", d);
    let b = goim_operator::leader::Election::new(c.clone(), ns, "goim-operator", "b", d);
    assert!(a.try_acquire().await.unwrap());
    assert!(!b.try_acquire().await.unwrap());
    assert!(a.try_acquire().await.unwrap(), "the holder renews");
    a.release().await;
    assert!(b.try_acquire().await.unwrap());
    assert!(!a.try_acquire().await.unwrap());
}

/// Leader election with clocks that disagree: a holder whose clock is an hour behind keeps
/// its lease while it renews (a standby used to take over at once: its renewTime looked an
/// hour old), and a dead holder whose clock is an hour ahead loses it after the duration (a
/// standby used to wait for an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_does_not_trust_other_clocks() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let c = admin().await;
    let ns = "skew";
    namespace(&c, ns).await;
    let leases: Api<Lease> = Api::namespaced(c.clone(), ns);
    let hour = jiff::SignedDuration::from_hours(1);
    let held_by = |name: &str, holder: &str, renew: jiff::Timestamp| -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 2,
                "renewTime": MicroTime(renew), "acquireTime": MicroTime(renew)}
        }))
        .unwrap()
    };
    let d = Duration::from_secs(2);
    // Behind by an hour, alive: it renews (with its own clock) and keeps the lease.
    let behind = || jiff::Timestamp::now() - hour;
    leases
        .create(
            &PostParams::default(),
            &held_by("slow", "slow-clock", behind()),
        )
        .await
        .unwrap();
    let b = goim_operator::leader::Election::new(c.clone(), ns, "slow", "b", d);
    assert!(!b.try_acquire().await.unwrap(), "the holder is alive");
    for _ in 0..3 {
        let mut l = leases.get("slow").await.unwrap();
        l.spec.as_mut().unwrap().renew_time = Some(MicroTime(behind()));
        leases
            .replace("slow", &PostParams::default(), &l)
            .await
            .unwrap();
        assert!(
            !b.try_acquire().await.unwrap(),
            "renewed: still the holder's"
        );
    }
    // Ahead by an hour, dead: taken over once it has not changed for its duration.
    leases
        .create(
            &PostParams::default(),
            &held_by("fast", "fast-clock", jiff::Timestamp::now() + hour),
        )
        .await
        .unwrap();
    let b = goim_operator::leader::Election::new(c.clone(), ns, "fast", "b", d);
    assert!(!b.try_acquire().await.unwrap());
    eventually("the dead holder's lease is taken over", || async {
        b.try_acquire().await.unwrap()
    })
    .await;
    let l = leases.get("fast").await.unwrap();
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("b"));
}

fn condition(pc: &PushCluster, type_: &str) -> Option<(String, String)> {
    pc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Problems the schema cannot catch set Degraded with a reason and a Warning event, and one
/// bad PushCluster does not hold up the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problems_degrade_one_cluster_without_blocking_others() {
    let cp = control_plane();
    let c = admin().await;
    let ns = "degraded";
    namespace(&c, ns).await;
    let op = tokio::spawn(goim_operator::controller::run(
        c.clone(),
        opts(Some(ns.into())),
    ));
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    let etcd = cp.etcd.endpoint();
    pcs.create(
        &PostParams::default(),
        &cluster("no-etcd", "127.0.0.1:1", 1),
    )
    .await
    .unwrap();
    let mut no_secret = cluster("no-secret", &etcd, 1);
    no_secret.spec.etcd.tls_secret_ref = Some(goim_operator::crd::SecretRef {
        name: "absent".into(),
    });
    pcs.create(&PostParams::default(), &no_secret)
        .await
        .unwrap();
    pcs.create(&PostParams::default(), &cluster("good", &etcd, 1))
        .await
        .unwrap();
    pcs.create(&PostParams::default(), &cluster("bad-image", &etcd, 1))
        .await
        .unwrap();
    // Play the kubelet: bad-image's comet cannot pull its image.
    let pod = sts_pod(&c, ns, "bad-image", 0, None).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let waiting = json!({"status": {"phase": "Pending", "containerStatuses": [{
        "name": "comet", "image": "goim:test", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}}}]}});
    pods.patch_status(
        "bad-image-comet-0",
        &PatchParams::default(),
        &Patch::Merge(waiting),
    )
    .await
    .unwrap();
    eventually("each cluster reports its own state", || async {
        let get = |n: &'static str| {
            let pcs = pcs.clone();
            async move { pcs.get(n).await.unwrap() }
        };
        let (a, b, g) = (
            get("no-etcd").await,
            get("no-secret").await,
            get("good").await,
        );
        let i = get("bad-image").await;
        condition(&a, "Degraded") == Some(("True".into(), "EtcdUnavailable".into()))
            && condition(&b, "Degraded") == Some(("True".into(), "MissingSecret".into()))
            && condition(&g, "Degraded") == Some(("False".into(), "AsExpected".into()))
            && condition(&g, "EtcdRegistered") == Some(("True".into(), "Registered".into()))
            && condition(&i, "Degraded") == Some(("True".into(), "ImagePullError".into()))
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.clone(), ns);
    eventually("a Warning event on the broken cluster", || async {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("no-etcd")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("EtcdUnavailable"))
            })
    })
    .await;
    op.abort();
}

/// etcd over TLS with client certificates: the operator reaches it with the CA and client
/// certificate from the PushCluster's secret, and registers comets there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_tls_through_the_secret() {
    let tls_etcd = tokio::task::spawn_blocking(Etcd::start_tls).await.unwrap();
    let c = admin().await;
    let ns = "tls";
    namespace(&c, ns).await;
    let dir = tls_etcd.tls_dir();
    let read = |f: &str| k8s_openapi::ByteString(std::fs::read(dir.join(f)).unwrap());
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("etcd-client".into()),
            ..Default::default()
        },
        data: Some(
            [
                ("ca.crt", read("ca.crt")),
                ("tls.crt", read("tls.crt")),
                ("tls.key", read("tls.key")),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ),
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // The operator as the chart's ServiceAccount: it may read Secrets in "tls" only.
    let sa = operator_client(control_plane(), &c).await;
    let op = tokio::spawn(goim_operator::controller::run(
        sa.clone(),
        opts(Some(ns.into())),
    ));
    let mut pc = cluster("secure", &tls_etcd.endpoint(), 1);
    pc.spec.etcd.tls_secret_ref = Some(goim_operator::crd::SecretRef {
        name: "etcd-client".into(),
    });
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    pcs.create(&PostParams::default(), &pc).await.unwrap();

    // Elsewhere the same secret cannot be read: Degraded with the fix in its message, never
    // a crash loop, and no Secret read outside the listed namespaces.
    let denied = "tls-denied";
    namespace(&c, denied).await;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), denied)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    assert!(
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(sa.clone(), denied)
            .get("etcd-client")
            .await
            .is_err(),
        "the chart must not grant Secrets outside operator.secretNamespaces"
    );
    let op_denied = tokio::spawn(goim_operator::controller::run(
        sa.clone(),
        opts(Some(denied.into())),
    ));
    let denied_pcs: Api<PushCluster> = Api::namespaced(c.clone(), denied);
    denied_pcs
        .create(&PostParams::default(), &pc)
        .await
        .unwrap();
    eventually("SecretForbidden", || async {
        let pc = denied_pcs.get("secure").await.unwrap();
        condition(&pc, "Degraded").is_some_and(|(s, r)| s == "True" && r == "SecretForbidden")
    })
    .await;
    op_denied.abort();

    ready_pod(&c, ns, "secure", 0).await;
    let tls = goim_discovery::Tls::from_dir(&dir).unwrap();
    eventually("comet registered in the TLS etcd", || async {
        let Ok(mut e) =
            goim_discovery::connect_tls(std::slice::from_ref(&tls_etcd.endpoint()), Some(&tls))
                .await
        else {
            return false;
        };
        let registered = e
            .get("/goim/tls.secure/comets/secure-comet-0", None)
            .await
            .is_ok_and(|r| r.kvs().len() == 1);
        let pc = pcs.get("secure").await.unwrap();
        registered && condition(&pc, "EtcdRegistered") == Some(("True".into(), "Registered".into()))
    })
    .await;
    // Without the client certificate etcd refuses.
    let plain = goim_discovery::connect(std::slice::from_ref(&tls_etcd.endpoint())).await;
    if let Ok(mut p) = plain {
        assert!(p.get("/goim/", None).await.is_err());
    }
    op.abort();
}

/// Two PushClusters named alike in two namespaces on one etcd get two prefixes; a third that
/// names one of them as its prefix is refused (Degraded, PrefixConflict) and its deletion
/// removes none of the owner's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_never_share_an_etcd_prefix() {
    let cp = control_plane();
    let c = admin().await;
    let etcd = cp.etcd.endpoint();
    let mut ops = Vec::new();
    for ns in ["twin-a", "twin-b"] {
        namespace(&c, ns).await;
        ops.push(tokio::spawn(goim_operator::controller::run(
            c.clone(),
            opts(Some(ns.into())),
        )));
        let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
        pcs.create(&PostParams::default(), &cluster("twin", &etcd, 1))
            .await
            .unwrap();
        ready_pod(&c, ns, "twin", 0).await;
    }
    for ns in ["twin-a", "twin-b"] {
        let key = format!("/goim/{ns}.twin/comets/twin-comet-0");
        let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
        eventually("each twin registers under its own prefix", || async {
            let owned = pcs
                .get("twin")
                .await
                .unwrap()
                .status
                .and_then(|s| s.etcd_prefix);
            etcd_get(&etcd, &key, false).await.len() == 1
                && owned.as_deref() == Some(&format!("{ns}.twin")[..])
        })
        .await;
    }
    let mut thief = cluster("thief", &etcd, 1);
    thief.spec.etcd.prefix = Some("twin-a.twin".into());
    let pcs_b: Api<PushCluster> = Api::namespaced(c.clone(), "twin-b");
    pcs_b.create(&PostParams::default(), &thief).await.unwrap();
    eventually("the thief is refused", || async {
        let t = pcs_b.get("thief").await.unwrap();
        condition(&t, "Degraded") == Some(("True".into(), "PrefixConflict".into()))
    })
    .await;
    // Nothing of the thief's was created, and deleting it leaves the owner's keys.
    assert!(sts_replicas(&c, "twin-b", "thief-comet").await.is_none());
    pcs_b.delete("thief", &Default::default()).await.unwrap();
    eventually("the thief is gone", || async {
        pcs_b.get_opt("thief").await.unwrap().is_none()
    })
    .await;
    assert_eq!(
        etcd_get(&etcd, "/goim/twin-a.twin/comets/", true)
            .await
            .len(),
        1
    );
    for op in ops {
        op.abort();
    }
}

fn pod_state(p: &Pod) -> (Option<String>, bool) {
    (
        p.annotations()
            .get(goim_operator::builders::REVISION)
            .cloned(),
        p.metadata.deletion_timestamp.is_some(),
    )
}

/// The operator's rolling update, with the chart's RBAC: drain time and weight reach the
/// comets through etcd without replacing any pod; a change that needs a restart replaces one
/// comet at a time, highest ordinal first, each marked draining in etcd and then deleted with
/// a grace period that covers its drain; the next goes only once the replacement is ready
/// and its comet serves (reports its load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_replaces_one_drained_comet_at_a_time() {
    let cp = control_plane();
    let c = admin().await;
    let ns = "rolling";
    namespace(&c, ns).await;
    let sa_client = operator_client(cp, &c).await;
    let op = tokio::spawn(goim_operator::controller::run(
        sa_client,
        opts(Some(ns.into())),
    ));
    let etcd = cp.etcd.endpoint();
    let mut e = goim_discovery::connect(std::slice::from_ref(&etcd))
        .await
        .unwrap();
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    pcs.create(&PostParams::default(), &cluster("roll", &etcd, 3))
        .await
        .unwrap();
    let load = |i: usize| format!("/goim/rolling.roll/load/roll-comet-{i}");
    let record = |i: usize| format!("/goim/rolling.roll/comets/roll-comet-{i}");
    // Three comets up: pods scheduled on a node (graceful deletion), ready, serving.
    for i in 0..3 {
        let pod = sts_pod(&c, ns, "roll", i, Some("node-a")).await;
        pods.create(&PostParams::default(), &pod).await.unwrap();
        set_ready(&c, ns, &pod.name_any(), i, true).await;
        e.put(load(i), r#"{"conn_count":10}"#, None).await.unwrap();
    }
    let updated = |n: i32| {
        let pcs = pcs.clone();
        async move {
            let st = pcs.get("roll").await.unwrap().status.unwrap_or_default();
            st.comet.updated_replicas == n && st.comet.registered == 3
        }
    };
    eventually("three comets registered at the spec's revision", || {
        updated(3)
    })
    .await;
    let uids: Vec<_> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.metadata.uid.clone())
        .collect();

    // Live settings: into every record, no pod replaced.
    pcs.patch(
        "roll",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"comet": {"drainSeconds": 20, "weight": 3}}})),
    )
    .await
    .unwrap();
    eventually("drain time and weight in every record", || async {
        let recs = etcd_get(&etcd, "/goim/rolling.roll/comets/", true).await;
        recs.len() == 3
            && recs
                .iter()
                .all(|(_, v)| v["drain_ms"] == 20_000 && v["weight"] == 3)
    })
    .await;
    let now: Vec<_> = pods.list(&Default::default()).await.unwrap().items;
    assert!(now.iter().all(|p| !pod_state(p).1), "nothing is replaced");
    assert_eq!(
        now.iter()
            .map(|p| p.metadata.uid.clone())
            .collect::<Vec<_>>(),
        uids
    );
    assert!(updated(3).await);

    // A restart setting: one comet at a time, from the highest ordinal.
    pcs.patch(
        "roll",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"comet": {"buckets": 64}}})),
    )
    .await
    .unwrap();
    let want = goim_operator::builders::comet_revision(&pcs.get("roll").await.unwrap());
    for i in (0..3).rev() {
        let name = format!("roll-comet-{i}");
        eventually("the next comet is draining and terminating", || async {
            let p = pods.get(&name).await.unwrap();
            let rec = etcd_get(&etcd, &record(i), false).await;
            pod_state(&p).1 && rec.first().is_some_and(|(_, v)| v["state"] == "draining")
        })
        .await;
        let p = pods.get(&name).await.unwrap();
        // The grace period covers the drain (20 s) and the pre-stop pause.
        assert_eq!(p.metadata.deletion_grace_period_seconds, Some(35));
        let others = pods.list(&Default::default()).await.unwrap().items;
        assert_eq!(
            others.iter().filter(|p| pod_state(p).1).count(),
            1,
            "one comet at a time"
        );
        // Its comet drains: the kubelet marks it unready; while it still serves, its record
        // stays (draining), so its remaining clients still get pushes.
        set_ready(&c, ns, &name, i, false).await;
        let pc = pcs.get("roll").await.unwrap();
        assert_eq!(
            condition(&pc, "Progressing").map(|c| c.1).as_deref(),
            Some("RollingUpdate")
        );
        eventually("the status names the comet being replaced", || async {
            let st = pcs.get("roll").await.unwrap().status.unwrap_or_default();
            st.comet.rolling == vec![name.clone()]
        })
        .await;
        assert_eq!(etcd_get(&etcd, &record(i), false).await.len(), 1);
        // The comet exits (its load report goes with its lease), the kubelet removes the
        // pod, the StatefulSet recreates it from the new template.
        e.delete(load(i), None).await.unwrap();
        eventually("the exited comet is unregistered", || async {
            etcd_get(&etcd, &record(i), false).await.is_empty()
        })
        .await;
        pods.delete(&name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        eventually("the old pod is gone", || async {
            pods.get_opt(&name).await.unwrap().is_none()
        })
        .await;
        let pod = sts_pod(&c, ns, "roll", i, Some("node-a")).await;
        assert_eq!(pod_state(&pod).0.as_deref(), Some(want.as_str()));
        pods.create(&PostParams::default(), &pod).await.unwrap();
        set_ready(&c, ns, &name, i, true).await;
        // Ready, not yet serving: the operator has seen it (it counts as updated) and still
        // replaces no other comet.
        let n = 3 - i as i32;
        eventually("the replacement is seen", || async {
            let st = pcs.get("roll").await.unwrap().status.unwrap_or_default();
            st.comet.updated_replicas == n && st.comet.rolling.is_empty()
        })
        .await;
        let now = pods.list(&Default::default()).await.unwrap().items;
        assert!(
            now.iter().all(|p| !pod_state(p).1),
            "waits for the comet to serve"
        );
        e.put(load(i), r#"{"conn_count":0}"#, None).await.unwrap();
    }
    eventually("rolled out", || async {
        let pc = pcs.get("roll").await.unwrap();
        let st = pc.status.clone().unwrap_or_default();
        st.comet.updated_replicas == 3
            && st.comet.registered == 3
            && condition(&pc, "Progressing").map(|c| c.0).as_deref() == Some("False")
    })
    .await;
    op.abort();
}

/// Autoscaling on the comets' load reports: up in steps as load rises; a swinging load makes
/// no comet flap; when load falls the count goes down only after the stabilization window,
/// one comet at a time, each drained first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_follows_load_without_flapping() {
    let cp = control_plane();
    let c = admin().await;
    let ns = "autoscale";
    namespace(&c, ns).await;
    let op = tokio::spawn(goim_operator::controller::run(
        c.clone(),
        opts(Some(ns.into())),
    ));
    let etcd = cp.etcd.endpoint();
    let mut e = goim_discovery::connect(std::slice::from_ref(&etcd))
        .await
        .unwrap();
    let mut pc = cluster("auto", &etcd, 1);
    pc.spec.comet.autoscale = Some(
        serde_json::from_value(json!({"min": 1, "max": 4, "targetConnectionsPerPod": 10,
            "scaleDownStabilizationSeconds": 10, "maxScaleUpStep": 2, "maxScaleDownStep": 1,
            "syncSeconds": 1}))
        .unwrap(),
    );
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    pcs.create(&PostParams::default(), &pc).await.unwrap();
    let load = |i: usize| format!("/goim/autoscale.auto/load/auto-comet-{i}");
    let replicas = || sts_replicas(&c, ns, "auto-comet");
    // The autoscaler's latest change of recommendation, once made at or after `after` (unix s).
    let recommended = |after: i64| {
        let pcs = pcs.clone();
        async move {
            let st = pcs.get("auto").await.unwrap().status.unwrap_or_default();
            st.comet
                .recommendations
                .iter()
                .max_by_key(|r| r.at)
                .filter(|r| r.at >= after)
                .map(|r| r.replicas)
        }
    };
    let now = || jiff::Timestamp::now().as_second();
    e.put(load(0), r#"{"conn_count":5}"#, None).await.unwrap();
    eventually("one comet for little load", || async {
        replicas().await == Some(1)
    })
    .await;
    // Load rises: up to four, at most two at a time.
    e.put(load(0), r#"{"conn_count":35}"#, None).await.unwrap();
    let counts = std::sync::Mutex::new(Vec::new());
    eventually("four comets for the load", || async {
        let n = replicas().await;
        let mut counts = counts.lock().unwrap();
        if counts.last() != Some(&n) {
            counts.push(n);
        }
        n == Some(4)
    })
    .await;
    let counts = counts.into_inner().unwrap();
    assert!(
        counts
            .windows(2)
            .all(|w| w[1].unwrap() - w[0].unwrap() <= 2),
        "steps of at most two: {counts:?}"
    );
    // Swinging load: every other reading asks for one comet; none is removed.
    for i in 0..6 {
        let (conns, want) = if i % 2 == 0 { (5, 1) } else { (35, 4) };
        let t = now();
        e.put(load(0), format!(r#"{{"conn_count":{conns}}}"#), None)
            .await
            .unwrap();
        eventually("the autoscaler read the load", || async {
            recommended(t).await == Some(want)
        })
        .await;
        let st = pcs.get("auto").await.unwrap().status.unwrap_or_default();
        assert_eq!(
            replicas().await,
            Some(4),
            "no flapping: {i} {:?} now {}",
            st.comet,
            now()
        );
    }
    // Load falls for good: after the window, down one at a time, the leaving comet drained
    // first (it still holds clients).
    e.put(load(3), r#"{"conn_count":5}"#, None).await.unwrap();
    e.put(load(0), r#"{"conn_count":0}"#, None).await.unwrap();
    let fell = now();
    eventually("auto-comet-3 drains", || async {
        let st = pcs.get("auto").await.unwrap().status.unwrap_or_default();
        st.comet.draining == vec!["auto-comet-3".to_string()]
    })
    .await;
    assert!(now() - fell >= 9, "not before the window");
    assert_eq!(replicas().await, Some(4), "held while it drains");
    e.delete(load(3), None).await.unwrap();
    eventually("down to one comet", || async {
        replicas().await == Some(1)
    })
    .await;
    op.abort();
}

/// Every chart value and every PushCluster field at once: the chart renders objects the
/// apiserver accepts, the production example passes the CRD's schema and CEL, and every
/// object the operator builds from it passes the apiserver's validation (server-side dry run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_and_field_renders_objects_the_apiserver_accepts() {
    let cp = control_plane();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(&cp.helm)
        .arg("template")
        .arg("goim")
        .arg(root.join("charts/goim"))
        .args(["--namespace", "goim-system", "-f"])
        .arg(root.join("charts/goim/ci/full-values.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "kind: Role\n",
        "namespace: default",
        "priorityClassName: \"system-cluster-critical\"",
        "name: regcred",
        "topologySpreadConstraints",
    ] {
        assert!(rendered.contains(needle), "{needle:?} not rendered");
    }
    let (ok, applied, err) = cp.kubectl(&["apply", "--dry-run=server", "-f", "-"], &rendered);
    assert!(ok, "the apiserver refused the rendered chart: {err}");
    assert!(applied.contains("(server dry run)"), "{applied}");

    let c = admin().await;
    let ns = "production";
    namespace(&c, ns).await;
    let example =
        std::fs::read_to_string(root.join("examples/pushcluster-production.yaml")).unwrap();
    let (ok, _, err) = cp.kubectl(&["create", "-n", ns, "-f", "-"], &example);
    assert!(ok, "the CRD refused the production example: {err}");
    let pc = Api::<PushCluster>::namespaced(c.clone(), ns)
        .get("chat")
        .await
        .unwrap();
    assert_eq!(
        pc.spec.comet.pod.priority_class_name.as_deref(),
        Some("push-critical")
    );
    let chat = pc.spec.logic.conversations.as_ref().unwrap();
    assert_eq!(
        (chat.store_secret_ref.name.as_str(), chat.max_members),
        ("chat-db-app", Some(10_000))
    );
    let o = goim_operator::builders::build(&pc);
    let dry = PatchParams::apply("dry-run-test").dry_run().force();
    async fn check<K>(c: &Client, ns: &str, obj: &K, dry: &PatchParams)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let name = obj.meta().name.clone().unwrap();
        Api::<K>::namespaced(c.clone(), ns)
            .patch(&name, dry, &Patch::Apply(obj))
            .await
            .unwrap_or_else(|e| panic!("the apiserver refused {name}: {e}"));
    }
    check(&c, ns, &o.config, &dry).await;
    check(&c, ns, &o.comet, &dry).await;
    for s in [
        &o.comet_headless,
        &o.comet_service,
        &o.logic_service,
        &o.job_service,
    ] {
        check(&c, ns, s, &dry).await;
    }
    check(&c, ns, &o.comet_pdb, &dry).await;
    check(&c, ns, &o.logic, &dry).await;
    check(&c, ns, &o.job, &dry).await;
    // The config it writes is what the roles parse.
    let toml = &o.config.data.as_ref().unwrap()["goim.toml"];
    let parsed: goim_config::Config = toml::from_str(toml).unwrap();
    assert_eq!(parsed.logic.node.default_domain, "push.example.com");
    assert_eq!(parsed.logic.auth, goim_config::AuthMode::Jwt);
    assert_eq!(parsed.logic.jwt.audience, ["chat"]);
    assert!(parsed.logic.protect_reads);
    assert_eq!(parsed.comet.max_connections, 200_000);
}

/// v1alpha1 is still served beside the stored v1beta1: an object written as one reads back
/// as the other with the same spec, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1alpha1_and_v1beta1_round_trip() {
    let cp = control_plane();
    let c = admin().await;
    let ns = "versions";
    namespace(&c, ns).await;
    let old = "apiVersion: goim.rs/v1alpha1\nkind: PushCluster\nmetadata: {name: old}\nspec:\n  image: goim:1\n  etcd: {endpoints: [\"etcd:2379\"]}\n  auth: {mode: json}\n  comet: {replicas: 3, pod: {nodeSelector: {pool: edge}}, service: {annotations: {a: b}}}\n  logic: {nodes: {domain: push.example.com}}\n";
    let (ok, _, err) = cp.kubectl(&["create", "-n", ns, "-f", "-"], old);
    assert!(ok, "{err}");
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    let beta = pcs.get("old").await.unwrap();
    assert_eq!(beta.spec.comet.replicas, 3);
    assert_eq!(beta.spec.comet.pod.node_selector["pool"], "edge");
    assert_eq!(
        beta.spec.logic.nodes.domain.as_deref(),
        Some("push.example.com")
    );
    let as_alpha = |name: &'static str| {
        let (ok, out, err) = cp.kubectl(
            &[
                "get",
                "-n",
                ns,
                "pushclusters.v1alpha1.goim.rs",
                name,
                "-o",
                "json",
            ],
            "",
        );
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let alpha = as_alpha("old");
    assert_eq!(alpha["apiVersion"], "goim.rs/v1alpha1");
    assert_eq!(alpha["spec"], serde_json::to_value(&beta.spec).unwrap());
    // Written as v1beta1, read as v1alpha1.
    let mut new = beta.clone();
    new.metadata = kube::api::ObjectMeta {
        name: Some("new".into()),
        ..Default::default()
    };
    new.status = None;
    new.spec.job.room_batch = Some(40);
    let created = pcs.create(&PostParams::default(), &new).await.unwrap();
    assert_eq!(
        as_alpha("new")["spec"],
        serde_json::to_value(&created.spec).unwrap()
    );
    // Stored as v1beta1.
    let (ok, out, _) = cp.kubectl(&["get", "crd", "pushclusters.goim.rs", "-o", "json"], "");
    assert!(ok);
    let crd: serde_json::Value = serde_json::from_str(&out).unwrap();
    let storage: Vec<&str> = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["storage"] == true)
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(storage, ["v1beta1"]);
}

/// A value the CRD schema lets through but the apiserver refuses on the object built from it
/// (here: an annotation key that is no qualified name) marks the cluster Degraded with the
/// apiserver's reason; fixing the spec clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_apiserver_refuses_is_degraded() {
    let cp = control_plane();
    let c = admin().await;
    let ns = "refused";
    namespace(&c, ns).await;
    let op = tokio::spawn(goim_operator::controller::run(
        c.clone(),
        opts(Some(ns.into())),
    ));
    let mut pc = cluster("bad", &cp.etcd.endpoint(), 1);
    pc.spec
        .comet
        .service
        .annotations
        .insert("not a key!".into(), "x".into());
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    pcs.create(&PostParams::default(), &pc).await.unwrap();
    eventually("InvalidSpec", || async {
        let pc = pcs.get("bad").await.unwrap();
        let message = pc
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.type_ == "Degraded")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        condition(&pc, "Degraded").is_some_and(|(s, r)| s == "True" && r == "InvalidSpec")
            && message.contains("metadata.annotations")
    })
    .await;
    pcs.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"comet": {"service": {"annotations": {"not a key!": null, "example.com/ok": "x"}}}}})),
    )
    .await
    .unwrap();
    eventually("fixed", || async {
        let pc = pcs.get("bad").await.unwrap();
        condition(&pc, "Degraded").is_some_and(|(s, _)| s == "False")
    })
    .await;
    op.abort();
}

/// With `operator.watchNamespace`, the chart grants the workloads in that namespace only (a
/// Role): the operator reconciles there as its ServiceAccount and cannot touch workloads
/// elsewhere; cluster-wide it only reads PushClusters (for the prefix check) and its CRD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaced_operator_needs_no_cluster_wide_workload_rights() {
    let cp = control_plane();
    let c = admin().await;
    let ns = "scoped";
    namespace(&c, ns).await;
    let out = Command::new(&cp.helm)
        .arg("--kubeconfig")
        .arg(cp.dir.path().join("admin.kubeconfig"))
        .args(["install", "scoped"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/goim"))
        .args([
            "--namespace",
            "scoped-ops",
            "--create-namespace",
            "--set",
            "operator.watchNamespace=scoped",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sa = service_account_client(cp, &c, "scoped-ops", "scoped-goim").await;
    let op = tokio::spawn(goim_operator::controller::run(
        sa.clone(),
        opts(Some(ns.into())),
    ));
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), ns);
    pcs.create(
        &PostParams::default(),
        &cluster("narrow", &cp.etcd.endpoint(), 1),
    )
    .await
    .unwrap();
    eventually("reconciled with namespaced rights", || async {
        let pc = pcs.get("narrow").await.unwrap();
        owned_by(&c, ns, "narrow").await
            && condition(&pc, "EtcdRegistered").is_some_and(|(s, _)| s == "True")
    })
    .await;
    let forbidden = |r: Result<kube::core::ObjectList<StatefulSet>, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    assert!(forbidden(
        Api::<StatefulSet>::all(sa.clone())
            .list(&Default::default())
            .await
    ));
    assert!(forbidden(
        Api::<StatefulSet>::namespaced(sa.clone(), "lifecycle")
            .list(&Default::default())
            .await
    ));
    op.abort();
}
