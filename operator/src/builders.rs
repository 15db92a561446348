//! Pure builders: a `PushCluster` in, the objects it owns out. No API calls, so every rule
//! here is unit-tested from fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    Probe, ResourceRequirements, SecretVolumeSource, Service, ServicePort, ServiceSpec,
    SleepAction, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::{Digest, Sha256};

use std::time::Duration;

use goim_config::{Config, HistoryConfig};

use crate::crd::{
    AuthMode, HistoryLimits, PodSettings, PushCluster, ServiceType, TrafficPolicy, WebhookSpec,
};

pub const CONFIG_HASH: &str = "goim.rs/config-hash";
/// The comet revision a pod runs: [`comet_revision`] of the spec it was created from.
pub const REVISION: &str = "goim.rs/revision";
const CONFIG_PATH: &str = "/etc/goim/goim.toml";
/// Where the etcd TLS secret is mounted in every role's pod.
pub const ETCD_TLS_PATH: &str = "/etc/goim-etcd-tls";
/// Where logic's pods mount the JWT keys Secret (`spec.auth.jwt.secretRef`).
pub const JWT_KEYS_PATH: &str = "/etc/goim-jwt";
/// Where logic's pods mount the API keys Secret (`spec.auth.apiKeys.secretRef`).
pub const API_KEYS_PATH: &str = "/etc/goim-api-keys";
/// Where logic's pods mount the business webhooks' signing Secrets, one directory each.
pub const WEBHOOK_SECRETS_PATH: &str = "/etc/goim-webhooks";
/// Where logic's pods mount the Secret holding the conversation store's URL.
pub const CONVERSATIONS_STORE_PATH: &str = "/etc/goim-conversations";
/// Where comet's pods mount the clients' TLS Secret (`spec.tls.clients`).
pub const CLIENT_TLS_PATH: &str = "/etc/goim-client-tls";
/// Where logic's pods mount the API's TLS Secret (`spec.tls.api`).
pub const API_TLS_PATH: &str = "/etc/goim-api-tls";
/// Where every role's pods mount the gRPC mutual TLS Secret (`spec.tls.internal`).
pub const GRPC_TLS_PATH: &str = "/etc/goim-grpc-tls";

/// Everything one PushCluster owns.
#[derive(Debug, Clone)]
pub struct Objects {
    pub config: ConfigMap,
    pub comet: StatefulSet,
    pub comet_headless: Service,
    pub comet_service: Service,
    pub comet_pdb: PodDisruptionBudget,
    pub logic: Deployment,
    pub logic_service: Service,
    pub job: Deployment,
    pub job_service: Service,
}

pub fn name(pc: &PushCluster, part: &str) -> String {
    format!("{}-{part}", pc.metadata.name.as_deref().unwrap_or("goim"))
}

fn meta(pc: &PushCluster, part: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name(pc, part)),
        namespace: pc.metadata.namespace.clone(),
        labels: Some(pc.labels(component)),
        owner_references: pc.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

fn selector(pc: &PushCluster, component: &str) -> BTreeMap<String, String> {
    let mut l = pc.labels(component);
    l.remove("app.kubernetes.io/managed-by");
    l
}

/// The selector string the scale subresource reports.
pub fn comet_selector(pc: &PushCluster) -> String {
    selector(pc, "comet")
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The roles' config for this cluster: the spec's settings over the roles' own defaults.
/// Built as the type the roles parse, so what is written is what they read.
pub fn config(pc: &PushCluster) -> Config {
    let s = &pc.spec;
    let ns = pc.metadata.namespace.as_deref().unwrap_or("default");
    let secs = |n: u32| Duration::from_secs(u64::from(n));
    let mut c = Config::default();

    let comet = &mut c.comet;
    comet.tcp = format!("0.0.0.0:{}", s.comet.ports.tcp);
    comet.ws = format!("0.0.0.0:{}", s.comet.ports.ws);
    comet.buckets = s.comet.buckets as usize;
    comet.drain_period = secs(s.comet.drain_seconds.max(1) as u32);
    set(&mut comet.max_connections, s.comet.max_connections, |n| {
        n as usize
    });
    set(&mut comet.push_queue, s.comet.push_queue, |n| n as usize);
    set(&mut comet.bucket_queue, s.comet.bucket_queue, |n| {
        n as usize
    });
    set(
        &mut comet.handshake_timeout,
        s.comet.handshake_timeout_seconds,
        secs,
    );
    set(
        &mut comet.write_timeout,
        s.comet.write_timeout_seconds,
        secs,
    );
    comet.ws_origins = s.comet.ws_origins.clone();
    set(
        &mut comet.max_connections_per_ip,
        s.comet.max_connections_per_ip,
        |n| n as usize,
    );
    set(
        &mut comet.handshakes_per_ip_per_sec,
        s.comet.handshakes_per_ip_per_second,
        |n| n,
    );
    set(
        &mut comet.handshakes_per_ip_burst,
        s.comet.handshakes_per_ip_burst,
        |n| n,
    );
    comet.proxy_protocol = s.comet.proxy_protocol;
    set(&mut comet.token_grace, s.comet.token_grace_seconds, secs);

    let logic = &mut c.logic;
    let l = &s.logic;
    set(&mut logic.heartbeat, l.heartbeat_seconds, secs);
    set(&mut logic.heartbeat_max, l.heartbeat_max, |n| n);
    set(&mut logic.max_message, l.max_message_bytes, |n| n as usize);
    // In-cluster names unless the spec gives public ones: the client Service, and each comet
    // pod under the headless Service (goim's example domains would send clients elsewhere).
    let node = &mut logic.node;
    node.default_domain = l
        .nodes
        .domain
        .clone()
        .unwrap_or_else(|| format!("{}.{ns}.svc", name(pc, "comet")));
    node.host_domain = l
        .nodes
        .host_domain
        .clone()
        .unwrap_or_else(|| format!(".{}.{ns}.svc", name(pc, "comet-headless")));
    node.tcp_port = l.nodes.tcp_port.unwrap_or(s.comet.ports.tcp);
    node.ws_port = l.nodes.ws_port.unwrap_or(s.comet.ports.ws);
    node.wss_port = l.nodes.wss_port.unwrap_or(s.comet.ports.wss);
    set(&mut node.region_weight, l.nodes.region_weight, |n| n);
    logic.user_streams = s.history.users.is_some();
    match s.auth.mode {
        AuthMode::Json => logic.auth = goim_config::AuthMode::Json,
        AuthMode::Hook => logic.auth = goim_config::AuthMode::Hook,
        AuthMode::Jwt => {
            logic.auth = goim_config::AuthMode::Jwt;
            logic.jwt.key_dir = JWT_KEYS_PATH.into();
            if let Some(j) = &s.auth.jwt {
                logic.jwt.audience = j.audience.clone();
                logic.jwt.issuer = j.issuer.clone();
            }
        }
    }
    if let Some(k) = &s.auth.api_keys {
        logic.api_keys_file = format!("{API_KEYS_PATH}/{}", k.key);
        logic.protect_reads = k.protect_reads;
    }
    // The business's endpoints; each signing Secret is mounted under its own name.
    let hook = |w: &WebhookSpec,
                what: &str,
                url: &mut String,
                timeout: &mut Duration,
                secret: &mut String| {
        *url = w.url.clone();
        set(timeout, w.timeout_seconds, secs);
        if w.signing_secret_ref.is_some() {
            *secret = format!("{WEBHOOK_SECRETS_PATH}/{what}/secret");
        }
    };
    if let Some(w) = &s.auth.hook {
        let h = &mut logic.hook;
        hook(w, "hook", &mut h.url, &mut h.timeout, &mut h.secret_file);
    }
    if let Some(w) = &l.forward {
        let f = &mut logic.forward;
        hook(w, "forward", &mut f.url, &mut f.timeout, &mut f.secret_file);
    }
    if let Some(w) = &l.events {
        let e = &mut logic.events;
        hook(w, "events", &mut e.url, &mut e.timeout, &mut e.secret_file);
        // Room joins and leaves are events too: comets tell logic of them.
        c.comet.room_events = true;
    }
    if let Some(cv) = &l.conversations {
        let chat = &mut logic.conversations;
        chat.store_file = format!("{CONVERSATIONS_STORE_PATH}/{}", cv.store_secret_ref.key);
        set(&mut chat.max_members, cv.max_members, |n| n as usize);
        if let Some(w) = &cv.notify {
            let n = &mut chat.notify;
            hook(w, "notify", &mut n.url, &mut n.timeout, &mut n.secret_file);
        }
    }

    if let Some(t) = &s.tls.clients {
        let p = &s.comet.ports;
        c.comet.tls_dir = CLIENT_TLS_PATH.into();
        c.comet.wss = format!("0.0.0.0:{}", p.wss);
        if t.tcp {
            c.comet.tcp_tls = format!("0.0.0.0:{}", p.tcp_tls);
        }
    }
    if s.tls.api.is_some() {
        c.logic.http_tls_dir = API_TLS_PATH.into();
    }
    if let Some(t) = &s.tls.internal {
        c.cluster.grpc_tls_dir = GRPC_TLS_PATH.into();
        c.cluster.grpc_tls_server_name = t.server_name.clone().unwrap_or_default();
    }

    let job = &mut c.job;
    let j = &s.job;
    set(&mut job.room_batch, j.room_batch, |n| n as usize);
    set(&mut job.room_linger, j.room_linger_milliseconds, |n| {
        Duration::from_millis(u64::from(n))
    });
    set(&mut job.comet_queue, j.comet_queue, |n| n as usize);
    set(&mut job.max_rooms, j.max_rooms, |n| n as usize);
    let limits = |h: &HistoryLimits| HistoryConfig {
        size: h.size as usize,
        ttl: secs(h.ttl_seconds),
    };
    job.history = s
        .history
        .rooms
        .iter()
        .map(|(t, h)| (t.clone(), limits(h)))
        .chain(s.history.users.as_ref().map(|h| ("user".into(), limits(h))))
        .collect();

    let cluster = &mut c.cluster;
    cluster.etcd = s.etcd.endpoints.clone();
    cluster.etcd_tls_dir = if s.etcd.tls_secret_ref.is_some() {
        ETCD_TLS_PATH.into()
    } else {
        String::new()
    };
    cluster.name = pc.etcd_prefix();
    cluster.logic = vec![format!("{}.{ns}.svc:3119", name(pc, "logic"))];
    cluster.comet_grpc = format!("0.0.0.0:{}", s.comet.ports.grpc);
    cluster.comet_http = format!("0.0.0.0:{}", s.comet.ports.metrics);
    cluster.logic_grpc = "0.0.0.0:3119".into();
    cluster.job_grpc = "0.0.0.0:3129".into();
    cluster.job_http = "0.0.0.0:3128".into();
    cluster.operator_managed = true;
    c
}

/// Sets `field` from an optional spec value; unset keeps the role's default.
fn set<T, U>(field: &mut U, value: Option<T>, f: impl FnOnce(T) -> U) {
    if let Some(v) = value {
        *field = f(v);
    }
}

/// goim.toml for every role: [`config`], serialized.
pub fn config_toml(pc: &PushCluster) -> String {
    config(pc).to_toml()
}

fn hash(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn port(name: &str, p: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: p,
        ..Default::default()
    }
}

fn svc_port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::String(name.into())),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container(
    pc: &PushCluster,
    role: &str,
    ports: Vec<ContainerPort>,
    metrics_port: &str,
) -> Container {
    Container {
        name: role.into(),
        image: Some(pc.spec.image.clone()),
        image_pull_policy: pc.spec.image_pull_policy.clone(),
        args: Some(vec!["--config".into(), CONFIG_PATH.into(), role.into()]),
        env: Some(vec![
            field_env("POD_IP", "status.podIP"),
            field_env("GOIM_NAME", "metadata.name"),
            field_env("GOIM_JOB_ID", "metadata.name"),
        ]),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/readyz", metrics_port, 5)),
        liveness_probe: Some(http_probe("/healthz", metrics_port, 10)),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: "config".into(),
                mount_path: "/etc/goim".into(),
                read_only: Some(true),
                ..Default::default()
            })
            .chain(pc.spec.etcd.tls_secret_ref.as_ref().map(|_| VolumeMount {
                name: "etcd-tls".into(),
                mount_path: ETCD_TLS_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            }))
            .collect(),
        ),
        ..Default::default()
    }
}

fn pod(
    pc: &PushCluster,
    component: &str,
    settings: &PodSettings,
    mut c: Container,
    config_hash: &str,
    grace: Option<i64>,
) -> PodTemplateSpec {
    // The user's labels and annotations first: the operator's own keys win.
    let mut labels = settings.labels.clone();
    labels.extend(selector(pc, component));
    labels.extend(pc.labels(component));
    let mut annotations = settings.annotations.clone();
    // A config change rolls the pods.
    annotations.insert(CONFIG_HASH.into(), config_hash.into());
    c.security_context = settings.container_security_context.clone();
    let mut t = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![c],
            termination_grace_period_seconds: grace,
            node_selector: Some(settings.node_selector.clone()).filter(|m| !m.is_empty()),
            tolerations: non_empty(&settings.tolerations),
            affinity: settings.affinity.clone(),
            topology_spread_constraints: non_empty(&settings.topology_spread_constraints),
            priority_class_name: settings.priority_class_name.clone(),
            security_context: settings.security_context.clone(),
            image_pull_secrets: non_empty(&pc.spec.image_pull_secrets),
            volumes: Some(
                std::iter::once(Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: name(pc, "config"),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .chain(pc.spec.etcd.tls_secret_ref.as_ref().map(|r| Volume {
                    name: "etcd-tls".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(r.name.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }))
                .collect(),
            ),
            ..Default::default()
        }),
    };
    if let Some(i) = &pc.spec.tls.internal {
        mount_secret(&mut t, "grpc-tls", &i.secret_ref.name, GRPC_TLS_PATH);
    }
    t
}

/// Mounts Secret `secret` read-only at `path` in the pod's (only) container.
fn mount_secret(t: &mut PodTemplateSpec, volume: &str, secret: &str, path: &str) {
    let Some(spec) = t.spec.as_mut() else {
        return;
    };
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    for c in &mut spec.containers {
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: volume.into(),
                mount_path: path.into(),
                read_only: Some(true),
                ..Default::default()
            });
    }
}

/// An optional list field: absent rather than empty, as the apiserver returns it.
fn non_empty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

fn label_selector(pc: &PushCluster, component: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector(pc, component)),
        ..Default::default()
    }
}

/// A Deployment and its Service for logic or job.
#[allow(clippy::too_many_arguments)]
fn stateless_role(
    pc: &PushCluster,
    role: &str,
    replicas: i32,
    resources: &Option<ResourceRequirements>,
    settings: &PodSettings,
    ports: &[(&str, i32)],
    metrics_port: &str,
    config_hash: &str,
) -> (Deployment, Service) {
    let mut c = container(
        pc,
        role,
        ports.iter().map(|(n, p)| port(n, *p)).collect(),
        metrics_port,
    );
    c.resources = resources.clone();
    let deployment = Deployment {
        metadata: meta(pc, role, role),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: label_selector(pc, role),
            template: pod(pc, role, settings, c, config_hash, None),
            ..Default::default()
        }),
        ..Default::default()
    };
    let service = Service {
        metadata: meta(pc, role, role),
        spec: Some(ServiceSpec {
            selector: Some(selector(pc, role)),
            ports: Some(ports.iter().map(|(n, p)| svc_port(n, *p)).collect()),
            ..Default::default()
        }),
        ..Default::default()
    };
    (deployment, service)
}

/// The spec with the settings running comets take live (through their etcd record) set to
/// fixed values, so that changing them changes no hash and restarts nothing.
fn without_live_settings(pc: &PushCluster) -> PushCluster {
    let mut n = pc.clone();
    n.spec.comet.drain_seconds = 0;
    n.spec.comet.weight = 0;
    n
}

/// What a running comet can only take by restarting: a hash of its pod template built from
/// the spec without the live settings. Pods whose `goim.rs/revision` differs are replaced by
/// the operator's rolling update; a change of drain time or weight replaces none.
pub fn comet_revision(pc: &PushCluster) -> String {
    let n = without_live_settings(pc);
    let template = comet_template(&n, &hash(&config_toml(&n)));
    hash(&serde_json::to_string(&template).unwrap_or_default())
}

fn comet_template(pc: &PushCluster, config_hash: &str) -> PodTemplateSpec {
    let s = &pc.spec;
    let p = &s.comet.ports;
    let mut comet_c = container(
        pc,
        "comet",
        [
            port("tcp", p.tcp),
            port("ws", p.ws),
            port("grpc", p.grpc),
            port("metrics", p.metrics),
        ]
        .into_iter()
        .chain(client_tls_ports(pc).map(|(n, p)| port(n, p)))
        .collect(),
        "metrics",
    );
    comet_c.resources = s.comet.resources.clone();
    // Safety net for evictions the operator did not plan: on SIGTERM comet drains its clients
    // and tells logic; the short sleep lets endpoints drop the pod first.
    comet_c.lifecycle = Some(Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction { seconds: 5 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut t = pod(
        pc,
        "comet",
        &s.comet.pod,
        comet_c,
        config_hash,
        Some(grace_seconds(pc)),
    );
    if let Some(c) = &s.tls.clients {
        mount_secret(&mut t, "client-tls", &c.secret_ref.name, CLIENT_TLS_PATH);
    }
    t
}

/// The comet's TLS client ports the spec asks for: `wss`, and `tcp-tls`.
fn client_tls_ports(pc: &PushCluster) -> impl Iterator<Item = (&'static str, i32)> {
    let p = &pc.spec.comet.ports;
    let c = pc.spec.tls.clients.as_ref();
    c.map(|_| ("wss", p.wss))
        .into_iter()
        .chain(c.filter(|c| c.tcp).map(|_| ("tcp-tls", p.tcp_tls)))
}

/// How long a comet pod may take to stop: its drain, the pre-stop sleep and a margin.
pub fn grace_seconds(pc: &PushCluster) -> i64 {
    i64::from(pc.spec.comet.drain_seconds) + 15
}

pub fn build(pc: &PushCluster) -> Objects {
    let s = &pc.spec;
    let toml = config_toml(pc);
    // Hashed without the live settings: changing them rolls neither comets nor logic and job.
    let config_hash = hash(&config_toml(&without_live_settings(pc)));
    let config = ConfigMap {
        metadata: meta(pc, "config", "config"),
        data: Some(BTreeMap::from([("goim.toml".into(), toml)])),
        ..Default::default()
    };

    let p = &s.comet.ports;
    let mut template = comet_template(pc, &config_hash);
    if let Some(m) = template.metadata.as_mut() {
        m.annotations
            .get_or_insert_with(Default::default)
            .insert(REVISION.into(), comet_revision(pc));
    }
    let comet = StatefulSet {
        metadata: meta(pc, "comet", "comet"),
        spec: Some(StatefulSetSpec {
            replicas: Some(s.comet.replicas),
            service_name: Some(name(pc, "comet-headless")),
            selector: label_selector(pc, "comet"),
            pod_management_policy: Some("Parallel".into()),
            // The operator replaces outdated comets itself, drained first and one at a time
            // (`maxUnavailable`); the StatefulSet only recreates the pods it deletes.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            template,
            ..Default::default()
        }),
        ..Default::default()
    };
    let comet_headless = Service {
        metadata: meta(pc, "comet-headless", "comet"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(pc, "comet")),
            ports: Some(vec![
                svc_port("grpc", p.grpc),
                svc_port("metrics", p.metrics),
            ]),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let client = &s.comet.service;
    let mut comet_service_meta = meta(pc, "comet", "comet");
    if !client.annotations.is_empty() {
        comet_service_meta.annotations = Some(client.annotations.clone());
    }
    let comet_service = Service {
        metadata: comet_service_meta,
        spec: Some(ServiceSpec {
            type_: Some(
                match client.type_.as_ref().unwrap_or(&s.comet.service_type) {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(selector(pc, "comet")),
            ports: Some(
                [svc_port("tcp", p.tcp), svc_port("ws", p.ws)]
                    .into_iter()
                    .chain(client_tls_ports(pc).map(|(n, p)| svc_port(n, p)))
                    .collect(),
            ),
            external_traffic_policy: client.external_traffic_policy.as_ref().map(|t| {
                match t {
                    TrafficPolicy::Cluster => "Cluster",
                    TrafficPolicy::Local => "Local",
                }
                .into()
            }),
            load_balancer_class: client.load_balancer_class.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let comet_pdb = PodDisruptionBudget {
        metadata: meta(pc, "comet", "comet"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(s.comet.max_unavailable.max(1))),
            selector: Some(label_selector(pc, "comet")),
            ..Default::default()
        }),
        ..Default::default()
    };

    let (mut logic, logic_service) = stateless_role(
        pc,
        "logic",
        s.logic.replicas,
        &s.logic.resources,
        &s.logic.pod,
        &[("http", 3111), ("grpc", 3119)],
        "http",
        &config_hash,
    );
    // Only logic checks tokens and API keys: only its pods see those Secrets.
    if let Some(t) = logic.spec.as_mut().map(|s| &mut s.template) {
        if let Some(j) = &s.auth.jwt {
            mount_secret(t, "jwt-keys", &j.secret_ref.name, JWT_KEYS_PATH);
        }
        if let Some(k) = &s.auth.api_keys {
            mount_secret(t, "api-keys", &k.secret_ref.name, API_KEYS_PATH);
        }
        if let Some(cv) = &s.logic.conversations {
            let name = &cv.store_secret_ref.name;
            mount_secret(t, "conversations-store", name, CONVERSATIONS_STORE_PATH);
        }
        let notify = s
            .logic
            .conversations
            .as_ref()
            .and_then(|c| c.notify.clone());
        for (what, w) in [
            ("hook", &s.auth.hook),
            ("forward", &s.logic.forward),
            ("events", &s.logic.events),
            ("notify", &notify),
        ] {
            if let Some(r) = w.as_ref().and_then(|w| w.signing_secret_ref.as_ref()) {
                let path = format!("{WEBHOOK_SECRETS_PATH}/{what}");
                mount_secret(t, &format!("{what}-signing"), &r.name, &path);
            }
        }
        if let Some(a) = &s.tls.api {
            mount_secret(t, "api-tls", &a.secret_ref.name, API_TLS_PATH);
            // The API (and its probes) speak HTTPS only; kubelet does not check the
            // certificate.
            for c in t.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
                for p in [&mut c.readiness_probe, &mut c.liveness_probe]
                    .into_iter()
                    .flatten()
                {
                    if let Some(h) = p.http_get.as_mut() {
                        h.scheme = Some("HTTPS".into());
                    }
                }
            }
        }
    }
    let (job, job_service) = stateless_role(
        pc,
        "job",
        s.job.replicas,
        &s.job.resources,
        &s.job.pod,
        &[("grpc", 3129), ("metrics", 3128)],
        "metrics",
        &config_hash,
    );
    Objects {
        config,
        comet,
        comet_headless,
        comet_service,
        comet_pdb,
        logic,
        logic_service,
        job,
        job_service,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn fixture() -> PushCluster {
        let mut pc: PushCluster = serde_yaml::from_str(
            r#"
apiVersion: goim.rs/v1beta1
kind: PushCluster
metadata: {name: chat, namespace: prod, uid: "1234", generation: 3}
spec:
  image: goim:test
  etcd: {endpoints: ["etcd:2379"]}
  auth: {mode: json}
  comet: {replicas: 3, drainSeconds: 60, serviceType: LoadBalancer}
"#,
        )
        .unwrap();
        pc.metadata.uid = Some("1234".into());
        pc
    }

    #[test]
    fn defaults_fill_the_spec() {
        let pc = fixture();
        assert_eq!(pc.spec.comet.buckets, 32);
        assert_eq!(pc.spec.comet.ports.tcp, 3101);
        assert_eq!(pc.spec.logic.replicas, 1);
        assert_eq!(pc.etcd_prefix(), "prod.chat");
    }

    #[test]
    fn every_object_is_owned_and_labelled() {
        let o = build(&fixture());
        let metas = [
            &o.config.metadata,
            &o.comet.metadata,
            &o.comet_headless.metadata,
            &o.comet_service.metadata,
            &o.comet_pdb.metadata,
            &o.logic.metadata,
            &o.logic_service.metadata,
            &o.job.metadata,
            &o.job_service.metadata,
        ];
        for m in metas {
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.controller),
                ("PushCluster", "chat", Some(true))
            );
            assert_eq!(m.namespace.as_deref(), Some("prod"));
            assert_eq!(
                m.labels.as_ref().unwrap()["app.kubernetes.io/instance"],
                "chat"
            );
        }
    }

    #[test]
    fn comet_statefulset() {
        let o = build(&fixture());
        let sts = o.comet.spec.unwrap();
        assert_eq!(sts.replicas, Some(3));
        assert_eq!(sts.service_name.as_deref(), Some("chat-comet-headless"));
        let pod = sts.template.spec.unwrap();
        // Drain plus margin: the grace period is the safety net for unplanned evictions.
        assert_eq!(pod.termination_grace_period_seconds, Some(75));
        let c = &pod.containers[0];
        assert_eq!(c.args.as_ref().unwrap().last().unwrap(), "comet");
        assert!(c.lifecycle.as_ref().unwrap().pre_stop.is_some());
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
        let template_labels = sts
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in sts.selector.match_labels.as_ref().unwrap() {
            assert_eq!(
                template_labels.get(k),
                Some(v),
                "selector must match the template"
            );
        }
        assert_eq!(
            o.comet_service.spec.unwrap().type_.as_deref(),
            Some("LoadBalancer")
        );
        assert_eq!(
            o.comet_headless.spec.unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        assert_eq!(
            o.comet_pdb.spec.unwrap().max_unavailable,
            Some(IntOrString::Int(1))
        );
    }

    fn template_annotations(t: &PodTemplateSpec) -> BTreeMap<String, String> {
        t.metadata.clone().unwrap().annotations.unwrap()
    }

    #[test]
    fn config_hash_follows_config() {
        let a = build(&fixture());
        let mut changed = fixture();
        changed.spec.etcd.endpoints.push("etcd-2:2379".into());
        let b = build(&changed);
        let h = |o: &Objects| {
            template_annotations(&o.logic.spec.as_ref().unwrap().template)[CONFIG_HASH].clone()
        };
        assert_ne!(h(&a), h(&b));
        assert_eq!(h(&a), h(&build(&fixture())));
        let toml = &a.config.data.as_ref().unwrap()["goim.toml"];
        assert!(toml.contains("name = \"prod.chat\""));
        assert!(toml.contains("operator_managed = true"));
        assert!(toml.contains("chat-logic.prod.svc:3119"));
    }

    #[test]
    fn only_settings_a_comet_cannot_take_live_change_its_revision() {
        let base = fixture();
        let rev = comet_revision(&base);
        let annotations =
            |o: &Objects| template_annotations(&o.comet.spec.as_ref().unwrap().template);
        let o = build(&base);
        assert_eq!(annotations(&o)[REVISION], rev);
        assert_eq!(
            o.comet
                .spec
                .as_ref()
                .unwrap()
                .update_strategy
                .as_ref()
                .unwrap()
                .type_
                .as_deref(),
            Some("OnDelete")
        );
        // Drain time and weight reach comets through etcd: no new revision, no new config
        // hash for logic and job either.
        let mut live = fixture();
        live.spec.comet.drain_seconds = 5;
        live.spec.comet.weight = 40;
        assert_eq!(comet_revision(&live), rev);
        let l = build(&live);
        assert_eq!(annotations(&l)[CONFIG_HASH], annotations(&o)[CONFIG_HASH]);
        // The new drain time is still what new pods get as their grace period.
        assert_eq!(
            l.comet
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .termination_grace_period_seconds,
            Some(20)
        );
        // Buckets, image, resources: a restart.
        let mut b = fixture();
        b.spec.comet.buckets = 64;
        assert_ne!(comet_revision(&b), rev);
        let mut i = fixture();
        i.spec.image = "goim:next".into();
        assert_ne!(comet_revision(&i), rev);
    }

    #[test]
    fn etcd_tls_secret_is_mounted_and_configured() {
        let mut pc = fixture();
        pc.spec.etcd.tls_secret_ref = Some(crate::crd::SecretRef {
            name: "etcd-client".into(),
        });
        let o = build(&pc);
        let pod = o.comet.spec.unwrap().template.spec.unwrap();
        let vol = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "etcd-tls")
            .unwrap();
        assert_eq!(
            vol.secret.unwrap().secret_name.as_deref(),
            Some("etcd-client")
        );
        assert!(pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.mount_path == ETCD_TLS_PATH));
        assert!(o.config.data.unwrap()["goim.toml"]
            .contains(&format!("etcd_tls_dir = {ETCD_TLS_PATH:?}")));
        let plain = build(&fixture());
        assert!(plain.config.data.unwrap()["goim.toml"].contains("etcd_tls_dir = \"\""));
    }

    /// The operator's goim.toml parses as the roles' config, with what the spec asked for.
    #[test]
    fn what_the_operator_writes_is_what_the_roles_read() {
        let pc: PushCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "goim.rs/v1beta1", "kind": "PushCluster",
            "metadata": {"name": "chat", "namespace": "prod"},
            "spec": {"image": "i", "etcd": {"endpoints": ["etcd:2379"]}, "auth": {"mode": "json"},
                "comet": {"drainSeconds": 7, "buckets": 16},
                "history": {"rooms": {"chat": {"size": 50, "ttlSeconds": 60},
                    "a\"b]\n[x": {"size": 1, "ttlSeconds": 1}},
                    "users": {"size": 20, "ttlSeconds": 30}}}
        }))
        .unwrap();
        let text = config_toml(&pc);
        let c: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.comet.drain_period, Duration::from_secs(7));
        assert_eq!(c.comet.buckets, 16);
        assert_eq!(c.cluster.name, "prod.chat");
        assert!(c.cluster.operator_managed);
        assert!(c.logic.user_streams);
        let h = &c.job.history;
        assert_eq!(
            (h["chat"].size, h["chat"].ttl),
            (50, Duration::from_secs(60))
        );
        assert_eq!(h["user"].size, 20);
        // A hostile type name stays a key (the schema refuses it; the writer never breaks).
        assert_eq!(h["a\"b]\n[x"].size, 1);
        // Without history: no streams, nothing kept.
        let mut plain = pc.clone();
        plain.spec.history = Default::default();
        let c: Config = toml::from_str(&config_toml(&plain)).unwrap();
        assert!(!c.logic.user_streams && c.job.history.is_empty());
    }

    /// Every string of the spec that reaches goim.toml is serialized, never formatted: control
    /// characters, quotes and brackets come back as they went in, and nothing else moves.
    #[test]
    fn hostile_strings_round_trip_through_the_config() {
        let mut pc = fixture();
        let evil = "a\"b]\n[comet]\ntcp = \"1\"\u{1}\u{7f}'''";
        pc.spec.etcd.endpoints = vec![evil.into()];
        pc.spec.logic.nodes.domain = Some(evil.into());
        pc.spec.logic.nodes.host_domain = Some(format!(".{evil}"));
        pc.spec.history.rooms.insert(
            evil.into(),
            crate::crd::HistoryLimits {
                size: 3,
                ttl_seconds: 4,
            },
        );
        let text = config_toml(&pc);
        let back: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, config(&pc));
        assert_eq!(back.cluster.etcd, vec![evil.to_string()]);
        assert_eq!(back.logic.node.default_domain, evil);
        assert_eq!(back.comet.tcp, "0.0.0.0:3101");
        assert_eq!(back.job.history[evil].size, 3);
    }

    #[test]
    fn role_settings_reach_the_config_and_unset_ones_keep_the_roles_defaults() {
        let pc: PushCluster = serde_yaml::from_str(
            r#"
apiVersion: goim.rs/v1beta1
kind: PushCluster
metadata: {name: chat, namespace: prod}
spec:
  image: goim:test
  etcd: {endpoints: ["etcd:2379"]}
  auth: {mode: json}
  comet: {maxConnections: 5000, pushQueue: 8, bucketQueue: 16, handshakeTimeoutSeconds: 3, writeTimeoutSeconds: 4}
  logic:
    heartbeatSeconds: 30
    heartbeatMax: 3
    maxMessageBytes: 1000
    nodes: {domain: push.example.com, hostDomain: .push.example.com, tcpPort: 443, wsPort: 80, wssPort: 8443, regionWeight: 2.5}
  job: {roomBatch: 40, roomLingerMilliseconds: 1000, cometQueue: 100, maxRooms: 7}
"#,
        )
        .unwrap();
        let c = config(&pc);
        let d = Config::default();
        assert_eq!(c.comet.max_connections, 5000);
        assert_eq!((c.comet.push_queue, c.comet.bucket_queue), (8, 16));
        assert_eq!(c.comet.handshake_timeout, Duration::from_secs(3));
        assert_eq!(c.comet.write_timeout, Duration::from_secs(4));
        assert_eq!(c.comet.ack_window, d.comet.ack_window);
        assert_eq!(c.logic.heartbeat, Duration::from_secs(30));
        assert_eq!((c.logic.heartbeat_max, c.logic.max_message), (3, 1000));
        let n = &c.logic.node;
        assert_eq!(
            (n.default_domain.as_str(), n.host_domain.as_str()),
            ("push.example.com", ".push.example.com")
        );
        assert_eq!((n.tcp_port, n.ws_port, n.wss_port), (443, 80, 8443));
        assert_eq!(n.region_weight, 2.5);
        assert_eq!(
            (c.job.room_batch, c.job.comet_queue, c.job.max_rooms),
            (40, 100, 7)
        );
        assert_eq!(c.job.room_linger, Duration::from_secs(1));
        assert_eq!(c.job.room_idle, d.job.room_idle);
        // Unset: the roles' defaults, except the nodes, which point inside the cluster rather
        // than at goim's example domains.
        let plain = config(&fixture());
        assert_eq!(plain.logic.heartbeat, d.logic.heartbeat);
        assert_eq!(plain.job.room_batch, d.job.room_batch);
        assert_eq!(plain.logic.node.default_domain, "chat-comet.prod.svc");
        assert_eq!(
            plain.logic.node.host_domain,
            ".chat-comet-headless.prod.svc"
        );
        assert_eq!(
            (plain.logic.node.tcp_port, plain.logic.node.ws_port),
            (3101, 3102)
        );
    }

    #[test]
    fn pod_settings_and_the_client_service() {
        let pc: PushCluster = serde_yaml::from_str(
            r#"
apiVersion: goim.rs/v1beta1
kind: PushCluster
metadata: {name: chat, namespace: prod}
spec:
  image: goim:test
  imagePullSecrets: [{name: regcred}]
  etcd: {endpoints: ["etcd:2379"]}
  auth: {mode: json}
  comet:
    serviceType: NodePort
    service:
      type: LoadBalancer
      annotations: {service.beta.kubernetes.io/aws-load-balancer-type: nlb}
      externalTrafficPolicy: Local
      loadBalancerClass: example.com/lb
    pod:
      nodeSelector: {pool: edge}
      tolerations: [{key: edge, operator: Exists, effect: NoSchedule}]
      affinity: {podAntiAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: 100, podAffinityTerm: {topologyKey: kubernetes.io/hostname}}]}}
      topologySpreadConstraints: [{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway}]
      priorityClassName: push-critical
      annotations: {example.com/scrape: "true", goim.rs/config-hash: mine}
      labels: {team: push}
      securityContext: {runAsNonRoot: true, runAsUser: 65532}
      containerSecurityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
  logic: {pod: {nodeSelector: {pool: core}}}
  job: {pod: {priorityClassName: batch}}
"#,
        )
        .unwrap();
        let o = build(&pc);
        let t = o.comet.spec.unwrap().template;
        let meta = t.metadata.unwrap();
        let spec = t.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["pool"], "edge");
        assert_eq!(spec.tolerations.unwrap()[0].key.as_deref(), Some("edge"));
        assert!(spec.affinity.unwrap().pod_anti_affinity.is_some());
        assert_eq!(spec.topology_spread_constraints.unwrap()[0].max_skew, 1);
        assert_eq!(spec.priority_class_name.as_deref(), Some("push-critical"));
        assert_eq!(spec.security_context.unwrap().run_as_user, Some(65532));
        assert_eq!(
            spec.containers[0]
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
        let labels = meta.labels.unwrap();
        assert_eq!(labels["team"], "push");
        assert_eq!(labels["app.kubernetes.io/component"], "comet");
        let ann = meta.annotations.unwrap();
        assert_eq!(ann["example.com/scrape"], "true");
        // The operator's own key wins over a user's.
        assert_ne!(ann[CONFIG_HASH], "mine");
        let svc = o.comet_service;
        assert_eq!(
            svc.metadata.annotations.unwrap()["service.beta.kubernetes.io/aws-load-balancer-type"],
            "nlb"
        );
        let svc = svc.spec.unwrap();
        assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(svc.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(svc.load_balancer_class.as_deref(), Some("example.com/lb"));
        let logic = o.logic.spec.unwrap().template.spec.unwrap();
        assert_eq!(logic.node_selector.unwrap()["pool"], "core");
        assert_eq!(logic.image_pull_secrets.unwrap()[0].name, "regcred");
        let job = o.job.spec.unwrap().template.spec.unwrap();
        assert_eq!(job.priority_class_name.as_deref(), Some("batch"));
        assert!(job.node_selector.is_none() && job.tolerations.is_none());
        // Scheduling is a restart for comets: a new revision.
        assert_ne!(comet_revision(&pc), comet_revision(&fixture()));
    }

    /// JWT keys and API keys: Secrets mounted into logic's pods only, and named in its config.
    #[test]
    fn auth_secrets_reach_logic_only() {
        let mut pc = fixture();
        pc.spec.auth = serde_json::from_value(serde_json::json!({
            "mode": "jwt",
            "jwt": {"secretRef": {"name": "jwt-keys"}, "audience": ["chat"]},
            "apiKeys": {"secretRef": {"name": "api"}, "protectReads": true}
        }))
        .unwrap();
        let c = config(&pc);
        assert_eq!(c.logic.auth, goim_config::AuthMode::Jwt);
        assert_eq!(c.logic.jwt.key_dir, JWT_KEYS_PATH);
        assert_eq!(c.logic.jwt.audience, ["chat"]);
        assert_eq!(c.logic.api_keys_file, format!("{API_KEYS_PATH}/keys"));
        assert!(c.logic.protect_reads);
        let o = build(&pc);
        let logic = o.logic.spec.unwrap().template.spec.unwrap();
        assert_eq!(secret_names(&logic), ["jwt-keys", "api"]);
        let mounts: Vec<_> = logic.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| m.mount_path)
            .collect();
        assert!(mounts.contains(&JWT_KEYS_PATH.to_string()));
        for other in [
            o.comet.spec.unwrap().template.spec.unwrap(),
            o.job.spec.unwrap().template.spec.unwrap(),
        ] {
            assert!(other
                .volumes
                .unwrap_or_default()
                .iter()
                .all(|v| v.secret.is_none()));
        }
        // json: goim's token, chosen explicitly; nothing mounted.
        let plain = config(&fixture());
        assert_eq!(plain.logic.auth, goim_config::AuthMode::Json);
    }

    /// The Secrets a pod mounts, in order.
    fn secret_names(pod: &k8s_openapi::api::core::v1::PodSpec) -> Vec<String> {
        pod.volumes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.secret.and_then(|s| s.secret_name))
            .collect()
    }

    /// TLS Secrets: each mounted where it is used and named in the config; the client ports
    /// exposed; logic's probes switch to HTTPS with its API.
    #[test]
    fn tls_secrets_reach_the_roles_that_use_them() {
        let mut pc = fixture();
        pc.spec.tls = serde_json::from_value(serde_json::json!({
            "clients": {"secretRef": {"name": "clients"}, "tcp": true},
            "api": {"secretRef": {"name": "api-cert"}},
            "internal": {"secretRef": {"name": "mesh"}, "serverName": "goim.internal"}
        }))
        .unwrap();
        let c = config(&pc);
        assert_eq!(c.comet.tls_dir, CLIENT_TLS_PATH);
        assert_eq!(c.comet.wss, "0.0.0.0:3103");
        assert_eq!(c.comet.tcp_tls, "0.0.0.0:3104");
        assert_eq!(c.logic.http_tls_dir, API_TLS_PATH);
        assert_eq!(c.logic.node.wss_port, 3103);
        assert_eq!(c.cluster.grpc_tls_dir, GRPC_TLS_PATH);
        assert_eq!(c.cluster.grpc_tls_server_name, "goim.internal");
        let o = build(&pc);
        let comet = o.comet.spec.unwrap().template.spec.unwrap();
        assert_eq!(secret_names(&comet), ["mesh", "clients"]);
        let ports: Vec<_> = comet.containers[0]
            .ports
            .clone()
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.container_port))
            .collect();
        assert!(ports.contains(&("wss".into(), 3103)) && ports.contains(&("tcp-tls".into(), 3104)));
        let logic = o.logic.spec.unwrap().template.spec.unwrap();
        assert_eq!(secret_names(&logic), ["mesh", "api-cert"]);
        let probe = logic.containers[0].readiness_probe.clone().unwrap();
        assert_eq!(probe.http_get.unwrap().scheme.as_deref(), Some("HTTPS"));
        let job = o.job.spec.unwrap().template.spec.unwrap();
        assert_eq!(secret_names(&job), ["mesh"]);
        let svc: Vec<_> = o
            .comet_service
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .map(|p| p.name.unwrap())
            .collect();
        assert_eq!(svc, ["tcp", "ws", "wss", "tcp-tls"]);
        // A certificate renewal needs no restart, but turning TLS on does.
        assert_ne!(comet_revision(&pc), comet_revision(&fixture()));
        // Without TLS nothing of it shows.
        let plain = config(&fixture());
        assert!(plain.comet.tls_dir.is_empty() && plain.logic.http_tls_dir.is_empty());
        assert!(plain.cluster.grpc_tls_dir.is_empty());
    }

    /// The business's endpoints and the comet's edge settings reach the config; each
    /// signing Secret is mounted into logic only.
    #[test]
    fn business_hooks_and_edge_settings() {
        let mut pc = fixture();
        pc.spec.auth = serde_json::from_value(serde_json::json!({
            "mode": "hook",
            "hook": {"url": "http://auth.biz/connect", "timeoutSeconds": 3,
                     "signingSecretRef": {"name": "hook-key"}}
        }))
        .unwrap();
        pc.spec.logic.forward = Some(
            serde_json::from_value(serde_json::json!({"url": "https://biz/messages"})).unwrap(),
        );
        pc.spec.logic.events = Some(
            serde_json::from_value(serde_json::json!({
                "url": "https://biz/events", "signingSecretRef": {"name": "events-key"}
            }))
            .unwrap(),
        );
        pc.spec.logic.conversations = Some(
            serde_json::from_value(serde_json::json!({
                "storeSecretRef": {"name": "chat-db-app"},
                "maxMembers": 5000,
                "notify": {"url": "https://biz/notify", "signingSecretRef": {"name": "notify-key"}}
            }))
            .unwrap(),
        );
        pc.spec.comet.ws_origins = vec!["https://app.example.com".into()];
        pc.spec.comet.max_connections_per_ip = Some(50);
        pc.spec.comet.handshakes_per_ip_per_second = Some(5);
        pc.spec.comet.proxy_protocol = true;
        pc.spec.comet.token_grace_seconds = Some(45);
        let c = config(&pc);
        assert_eq!(c.logic.auth, goim_config::AuthMode::Hook);
        assert_eq!(c.logic.hook.url, "http://auth.biz/connect");
        assert_eq!(c.logic.hook.timeout, Duration::from_secs(3));
        assert_eq!(
            c.logic.hook.secret_file,
            format!("{WEBHOOK_SECRETS_PATH}/hook/secret")
        );
        assert_eq!(c.logic.forward.url, "https://biz/messages");
        assert!(c.logic.forward.secret_file.is_empty());
        assert_eq!(
            c.logic.events.secret_file,
            format!("{WEBHOOK_SECRETS_PATH}/events/secret")
        );
        // Conversations: the store's URL from CloudNativePG's Secret entry, the sink signed.
        let chat = &c.logic.conversations;
        assert_eq!(chat.store_file, format!("{CONVERSATIONS_STORE_PATH}/uri"));
        assert!(chat.store.is_empty());
        assert_eq!(chat.max_members, 5000);
        assert_eq!(chat.notify.url, "https://biz/notify");
        assert_eq!(
            chat.notify.secret_file,
            format!("{WEBHOOK_SECRETS_PATH}/notify/secret")
        );
        assert_eq!(c.comet.ws_origins, ["https://app.example.com"]);
        assert_eq!(c.comet.max_connections_per_ip, 50);
        assert_eq!(c.comet.handshakes_per_ip_per_sec, 5);
        assert!(c.comet.proxy_protocol);
        assert_eq!(c.comet.token_grace, Duration::from_secs(45));
        let o = build(&pc);
        let logic = o.logic.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            secret_names(&logic),
            ["chat-db-app", "hook-key", "events-key", "notify-key"]
        );
        assert!(o
            .comet
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .volumes
            .unwrap_or_default()
            .iter()
            .all(|v| v.secret.is_none()));
    }

    #[test]
    fn selector_string() {
        let s = comet_selector(&fixture());
        assert!(s.contains("app.kubernetes.io/component=comet"));
        assert!(s.contains("app.kubernetes.io/instance=chat"));
    }
}
