//! The `PushCluster` custom resource: `goim.rs/v1beta1`, stored, and `goim.rs/v1alpha1`,
//! still served with the same schema (so the apiserver converts between them by renaming the
//! version, and objects round-trip unchanged).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext,
    Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A goim-rs cluster: comets (StatefulSet), logic and job (Deployments), registered in etcd.
// Two print columns of one type read to clippy as a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "goim.rs",
    version = "v1beta1",
    kind = "PushCluster",
    namespaced,
    status = "PushClusterStatus",
    // Not `pc`: that is PriorityClass's, and kubectl resolves it there.
    shortname = "pushc",
    category = "push",
    scale(
        spec_replicas_path = ".spec.comet.replicas",
        status_replicas_path = ".status.comet.replicas",
        label_selector_path = ".status.comet.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Comets",
        type_ = "integer",
        json_path = ".status.comet.readyReplicas"
    ),
    printcolumn(
        name = "Updated",
        type_ = "integer",
        json_path = ".status.comet.updatedReplicas"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.comet.connections",
        priority = 1
    ),
    printcolumn(
        name = "TCP",
        type_ = "string",
        json_path = ".status.endpoints.tcp",
        priority = 1
    ),
    printcolumn(
        name = "WebSocket",
        type_ = "string",
        json_path = ".status.endpoints.ws",
        priority = 1
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        json_path = ".spec.image",
        priority = 1
    ),
    printcolumn(
        name = "Revision",
        type_ = "string",
        json_path = ".status.comet.revision",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PushClusterSpec {
    /// Container image holding the `goim` binary.
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Secrets for pulling the image, on every pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    pub etcd: EtcdSpec,
    #[serde(default)]
    pub comet: CometSpec,
    #[serde(default)]
    pub logic: LogicSpec,
    #[serde(default)]
    pub job: JobSpec,
    /// How clients are authenticated. Required: goim's unverified JSON token is never chosen
    /// for you.
    pub auth: AuthSpec,
    /// Numbered streams kept for recovery (docs/PROTOCOL.md): off unless named here.
    #[serde(default)]
    pub history: HistorySpec,
    /// TLS for clients, the HTTP API and between the roles, from Secrets laid out as
    /// cert-manager writes them (`tls.crt`, `tls.key`, `ca.crt`). Renewed certificates
    /// apply to new connections without a restart.
    #[serde(default)]
    pub tls: TlsSpec,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// WebSocket over TLS on comet's `wss` port (goim 3103), and with `tcp` goim's TCP
    /// protocol over TLS on `tcpTls`. The Secret needs `tls.crt` and `tls.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<ClientTls>,
    /// HTTPS only for logic's HTTP API (`tls.crt`, `tls.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiTls>,
    /// Mutual TLS on the gRPC between comet, logic and job: every role presents `tls.crt`
    /// and accepts only peers whose certificate chains to `ca.crt` (use a CA of this
    /// cluster's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal: Option<InternalTls>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientTls {
    pub secret_ref: SecretRef,
    /// Also serve goim's TCP protocol over TLS.
    #[serde(default)]
    pub tcp: bool,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiTls {
    pub secret_ref: SecretRef,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InternalTls {
    pub secret_ref: SecretRef,
    /// A DNS name the certificate carries, checked by every role it dials. Unset: only the
    /// chain to `ca.crt` is checked (roles dial pod IPs, which certificates rarely name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Which streams are numbered and kept, so clients that reconnect recover what they missed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.rooms.all(t, t.matches('^[A-Za-z0-9._-]{1,64}$') && t != 'user')").message("history.rooms keys are room types (letters, digits, '.', '_', '-'; 'user' is reserved)"))]
pub struct HistorySpec {
    /// Per room type (the part of a room id before `://`, e.g. `chat`).
    #[serde(default)]
    pub rooms: BTreeMap<String, HistoryLimits>,
    /// Number and keep each user's pushes (`/goim/push/mids`) too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<HistoryLimits>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HistoryLimits {
    /// Messages kept per stream.
    #[schemars(range(min = 1, max = 100000))]
    pub size: u32,
    /// How long a message is kept.
    #[schemars(range(min = 1, max = 86400))]
    pub ttl_seconds: u32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EtcdSpec {
    /// etcd client endpoints (`host:port`).
    #[schemars(length(min = 1))]
    pub endpoints: Vec<String>,
    /// Key prefix (`/goim/{prefix}/`): letters, digits, `.`, `_` and `-`; default
    /// `{namespace}.{name}`, so clusters of one name in two namespaces never share keys. A
    /// prefix another PushCluster on the same etcd already claims is refused (Degraded,
    /// `PrefixConflict`). Immutable: changing it would orphan every key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("etcd.prefix is immutable"))]
    pub prefix: Option<String>,
    /// Secret with `ca.crt`, `tls.crt` and `tls.key` for etcd client TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_ref: Option<SecretRef>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretRef {
    pub name: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.autoscale) || self.autoscale.max >= self.autoscale.min").message("autoscale.max must be >= autoscale.min"))]
#[x_kube(validation = Rule::new("!has(self.service) || !has(self.service.externalTrafficPolicy) || (has(self.service.type) ? self.service.type : self.serviceType) != 'ClusterIP'").message("service.externalTrafficPolicy needs a NodePort or LoadBalancer Service"))]
#[x_kube(validation = Rule::new("!has(self.service) || !has(self.service.loadBalancerClass) || (has(self.service.type) ? self.service.type : self.serviceType) == 'LoadBalancer'").message("service.loadBalancerClass needs a LoadBalancer Service"))]
pub struct CometSpec {
    #[serde(default = "default_comets")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    #[serde(default)]
    pub ports: CometPorts,
    /// Connection shards per comet (goim 32).
    #[serde(default = "default_buckets")]
    #[schemars(range(min = 1, max = 4096))]
    pub buckets: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// How clients reach the comets: the Service type. `service.type` wins when both are set.
    #[serde(default = "default_service_type")]
    pub service_type: ServiceType,
    /// The client Service (TCP and WebSocket ports): its type, annotations for a load
    /// balancer controller, traffic policy.
    #[serde(default)]
    pub service: ClientService,
    /// Where and how comet pods run.
    #[serde(default)]
    pub pod: PodSettings,
    /// Connections held per comet at once; beyond it new ones are closed at accept (default
    /// 1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u64>,
    /// Pushes queued per connection before further ones are dropped for it (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub push_queue: Option<u32>,
    /// Room and broadcast jobs queued per bucket (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub bucket_queue: Option<u32>,
    /// From accept to the auth reply, WebSocket upgrade included (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600))]
    pub handshake_timeout_seconds: Option<u32>,
    /// How long one write to a client may stall before it is closed (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600))]
    pub write_timeout_seconds: Option<u32>,
    /// Origins allowed to open a WebSocket (`https://app.example.com`, or
    /// `https://*.example.com`); empty: any. Others get HTTP 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ws_origins: Vec<String>,
    /// Connections per client address at once (default: no limit; users behind one NAT
    /// share an address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections_per_ip: Option<u32>,
    /// New connections per client address per second (default: no limit) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub handshakes_per_ip_per_second: Option<u32>,
    /// ... and at once (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub handshakes_per_ip_burst: Option<u32>,
    /// Every client connection starts with a PROXY protocol header (v1 or v2) from the load
    /// balancer in front; the client's address is taken from it. Only when every
    /// connection comes through such a balancer: one without the header is closed.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// How long a connection whose token expired may take to send a new one (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub token_grace_seconds: Option<u32>,
    /// How long a comet being removed may take to hand its clients over.
    #[serde(default = "default_drain")]
    #[schemars(range(min = 0, max = 3600))]
    pub drain_seconds: i32,
    /// Share of new clients each comet is offered (goim's node weight). Like `drainSeconds`,
    /// applied through etcd without restarting any comet.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: i64,
    /// Comets the operator's rolling update may have out of service at once: each one is
    /// drained, then replaced, and the next goes only once the replacement is ready and
    /// registered.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
    /// Scale on connections per pod, read from the comets' load reports in etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Autoscale {
    #[schemars(range(min = 1))]
    pub min: i32,
    #[schemars(range(min = 1))]
    pub max: i32,
    #[schemars(range(min = 1))]
    pub target_connections_per_pod: i64,
    /// A scale-down goes only to the highest count recommended over this window (as the
    /// HorizontalPodAutoscaler does), so load that swings does not make comets flap.
    #[serde(default = "default_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: u32,
    /// Comets added at most per step.
    #[serde(default = "default_up_step")]
    #[schemars(range(min = 1))]
    pub max_scale_up_step: i32,
    /// Comets removed (drained) at most per step; the next step waits for the drain.
    #[serde(default = "default_down_step")]
    #[schemars(range(min = 1))]
    pub max_scale_down_step: i32,
    /// How often the load reports in etcd are read (they are not watched).
    #[serde(default = "default_sync")]
    #[schemars(range(min = 1, max = 300))]
    pub sync_seconds: u32,
}

fn default_sync() -> u32 {
    15
}

fn default_down_window() -> u32 {
    300
}
fn default_up_step() -> i32 {
    4
}
fn default_down_step() -> i32 {
    1
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CometPorts {
    #[serde(default = "p3101")]
    pub tcp: i32,
    #[serde(default = "p3102")]
    pub ws: i32,
    #[serde(default = "p3109")]
    pub grpc: i32,
    #[serde(default = "p3108")]
    pub metrics: i32,
    /// WebSocket over TLS, with `tls.clients`.
    #[serde(default = "p3103")]
    pub wss: i32,
    /// goim's TCP protocol over TLS, with `tls.clients.tcp`.
    #[serde(default = "p3104")]
    pub tcp_tls: i32,
}

/// The client Service in front of the comets.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientService {
    /// Overrides `comet.serviceType`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<ServiceType>,
    /// For the load balancer's controller (e.g. an NLB, an internal address).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `Local` keeps clients' source addresses (NodePort and LoadBalancer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<TrafficPolicy>,
    /// Which load balancer implementation serves it (LoadBalancer only; immutable once set
    /// on the Service, as Kubernetes rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

/// Scheduling and metadata of one role's pods, passed to the pod template as given.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.labels) || self.labels.all(k, !k.startsWith('app.kubernetes.io/'))").message("pod.labels may not set app.kubernetes.io/ labels: the operator selects pods by them"))]
pub struct PodSettings {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Added to the pods' annotations (the operator's own keys win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Added to the pods' labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The pod's security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// The container's security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_security_context: Option<SecurityContext>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replicas >= 1").message("at least one replica is required"))]
pub struct LogicSpec {
    #[serde(default = "default_role_replicas")]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub pod: PodSettings,
    /// What `/goim/nodes/weighted` offers clients.
    #[serde(default)]
    pub nodes: NodesSpec,
    /// Heartbeat interval advertised to clients (default 240).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub heartbeat_seconds: Option<u32>,
    /// Missed heartbeats before a comet closes a connection (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub heartbeat_max: Option<u32>,
    /// Largest push body the HTTP API accepts, in bytes (default and most 4096: goim clients
    /// refuse larger packets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_message_bytes: Option<u32>,
    /// Client messages of ops the comet does not answer go to the business here; its reply
    /// goes back to the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<WebhookSpec>,
    /// Connection lifecycle events (connect, disconnect with its reason) are POSTed here in
    /// batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<WebhookSpec>,
    /// Group and direct conversations with offline delivery, stored in PostgreSQL (every
    /// logic replica shares it). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversations: Option<ConversationsSpec>,
}

/// Conversations: where they are stored and where offline members' notifications go.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConversationsSpec {
    /// A Secret holding the PostgreSQL URL (`postgresql://user:password@host:5432/db`),
    /// mounted into logic only. CloudNativePG's `<cluster>-app` Secret has it as `uri`.
    pub store_secret_ref: StoreSecretRef,
    /// Members per conversation at most (default 100000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1000000))]
    pub max_members: Option<u32>,
    /// The notification sink: offline members' notifications are POSTed here in batches,
    /// at least once, each with an idempotency id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<WebhookSpec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoreSecretRef {
    pub name: String,
    /// The Secret's entry holding the URL (default `uri`).
    #[serde(default = "default_store_key")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_store_key() -> String {
    "uri".into()
}

/// The nodes logic offers clients. Defaults reach the comets inside the cluster: the client
/// Service's DNS name, and each pod's name under the headless Service for web clients.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodesSpec {
    /// The domain every client may fall back to (e.g. `push.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Web clients are offered `{comet pod name}{hostDomain}` (e.g. `.push.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_domain: Option<String>,
    /// Ports clients are told to use (defaults: the comet ports; WSS 3103).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub tcp_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub ws_port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub wss_port: Option<i32>,
    /// How much nodes in the client's region are preferred (goim 1.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub region_weight: Option<f64>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replicas >= 1").message("at least one replica is required"))]
pub struct JobSpec {
    #[serde(default = "default_role_replicas")]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub pod: PodSettings,
    /// Most messages in one room batch (default 20, as goim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub room_batch: Option<u32>,
    /// How long a room batch may wait for more messages (default 0: no added latency; goim
    /// waits 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub room_linger_milliseconds: Option<u32>,
    /// Deliveries queued per comet before they are dropped and counted (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub comet_queue: Option<u32>,
    /// Rooms with messages in flight at once (default 100,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_rooms: Option<u64>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'jwt' || has(self.jwt)").message("auth.mode jwt needs auth.jwt.secretRef"))]
#[x_kube(validation = Rule::new("self.mode != 'hook' || has(self.hook)").message("auth.mode hook needs auth.hook.url"))]
pub struct AuthSpec {
    /// `jwt`: signed client tokens (HS256, RS256, ES256) checked against the keys in
    /// `jwt.secretRef`. `json`: goim's development token, not verified, so any client can
    /// claim any user: only where every client is trusted.
    pub mode: AuthMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSpec>,
    /// Keys the HTTP push API requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeysSpec>,
    /// With `mode: hook`: where the business admits clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<WebhookSpec>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Json,
    Jwt,
    /// The business admits each client: logic POSTs the token to `hook.url`.
    Hook,
}

/// Where the business is asked (the connect hook, forwarded messages, lifecycle events).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// `http://` or `https://`.
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: Option<u32>,
    /// A Secret whose entry `secret` keys an HMAC-SHA256 signature of each body
    /// (`X-Goim-Signature: sha256=<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_ref: Option<SecretRef>,
}

/// Where logic finds its JWT keys: a Secret mounted as a directory, each entry a key (`*.json`
/// a JWKS, PEM a public key, anything else an HS256 secret of 32 bytes or more). Keys
/// changed, added or removed in the Secret apply without a restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JwtSpec {
    pub secret_ref: SecretRef,
    /// Accepted `aud` values (empty: not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
    /// Accepted `iss` values (empty: not checked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issuer: Vec<String>,
}

/// The push API's keys: one per line in a Secret's entry (read again when it changes: keys rotate without a
/// restart).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeysSpec {
    pub secret_ref: SecretRef,
    /// The Secret's entry holding the keys.
    #[serde(default = "default_api_keys_entry")]
    pub key: String,
    /// The read-only routes (online counts, nodes) need a key too.
    #[serde(default)]
    pub protect_reads: bool,
}

fn default_api_keys_entry() -> String {
    "keys".into()
}

fn default_comets() -> i32 {
    2
}
fn default_buckets() -> u32 {
    32
}
fn default_service_type() -> ServiceType {
    ServiceType::ClusterIP
}
fn default_drain() -> i32 {
    30
}
fn default_weight() -> i64 {
    10
}
fn default_max_unavailable() -> i32 {
    1
}
fn default_role_replicas() -> i32 {
    1
}
fn p3101() -> i32 {
    3101
}
fn p3102() -> i32 {
    3102
}
fn p3109() -> i32 {
    3109
}
fn p3108() -> i32 {
    3108
}
fn p3103() -> i32 {
    3103
}
fn p3104() -> i32 {
    3104
}

impl Default for CometSpec {
    fn default() -> Self {
        CometSpec {
            replicas: default_comets(),
            ports: CometPorts::default(),
            buckets: default_buckets(),
            resources: None,
            service_type: default_service_type(),
            service: ClientService::default(),
            pod: PodSettings::default(),
            max_connections: None,
            push_queue: None,
            bucket_queue: None,
            handshake_timeout_seconds: None,
            write_timeout_seconds: None,
            ws_origins: Vec::new(),
            max_connections_per_ip: None,
            handshakes_per_ip_per_second: None,
            handshakes_per_ip_burst: None,
            proxy_protocol: false,
            token_grace_seconds: None,
            drain_seconds: default_drain(),
            weight: default_weight(),
            max_unavailable: default_max_unavailable(),
            autoscale: None,
        }
    }
}

impl Default for CometPorts {
    fn default() -> Self {
        CometPorts {
            tcp: 3101,
            ws: 3102,
            grpc: 3109,
            metrics: 3108,
            wss: 3103,
            tcp_tls: 3104,
        }
    }
}

impl Default for LogicSpec {
    fn default() -> Self {
        LogicSpec {
            replicas: default_role_replicas(),
            resources: None,
            pod: PodSettings::default(),
            nodes: NodesSpec::default(),
            heartbeat_seconds: None,
            heartbeat_max: None,
            max_message_bytes: None,
            forward: None,
            events: None,
            conversations: None,
        }
    }
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            replicas: default_role_replicas(),
            resources: None,
            pod: PodSettings::default(),
            room_batch: None,
            room_linger_milliseconds: None,
            comet_queue: None,
            max_rooms: None,
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PushClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub comet: CometStatus,
    #[serde(default)]
    pub logic: RoleStatus,
    #[serde(default)]
    pub job: RoleStatus,
    /// Where clients connect: the client Service's load balancer address once it has one,
    /// else its name inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// The etcd prefix this cluster owns, recorded once it first registered there; its
    /// finalizer removes only this prefix, and no other PushCluster may claim it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_prefix: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// `host:port` for goim's TCP protocol.
    pub tcp: String,
    /// `ws://host:port/sub`.
    pub ws: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CometStatus {
    pub replicas: i32,
    /// Client connections the comets reported in their last load reports.
    #[serde(default)]
    pub connections: u64,
    pub ready_replicas: i32,
    /// Label selector of the comet pods, for the scale subresource and HPA.
    pub selector: String,
    /// Comet pods currently registered in etcd.
    pub registered: i32,
    /// Pods being drained before a scale-down.
    #[serde(default)]
    pub draining: Vec<String>,
    /// When the current drain started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<String>,
    /// The comet revision the spec asks for (a hash of what only a restart applies).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
    /// Comet pods running that revision.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Pods the rolling update is replacing now.
    #[serde(default)]
    pub rolling: Vec<String>,
    /// The autoscaler's recent recommendations (the latest time each count was recommended,
    /// within the scale-down window).
    #[serde(default)]
    pub recommendations: Vec<Recommendation>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// Unix seconds.
    pub at: i64,
    pub replicas: i32,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RoleStatus {
    pub ready_replicas: i32,
}

/// Conditions as a list-map keyed by `type` (the upstream shape).
fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string"},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "observedGeneration": {"type": "integer", "format": "int64"},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "reason": {"type": "string"},
                "message": {"type": "string"}
            }
        }
    })
}

impl PushCluster {
    /// etcd key prefix of this cluster: the one it owns (recorded in status), else the spec's,
    /// else `{namespace}.{name}`.
    pub fn etcd_prefix(&self) -> String {
        if let Some(p) = self.owned_prefix() {
            return p.to_string();
        }
        // Registered by a version that kept no record of its prefix: that was the bare name,
        // and moving it would orphan the cluster's keys.
        let legacy = self.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "EtcdRegistered" && c.status == "True")
        });
        if legacy && self.spec.etcd.prefix.is_none() {
            return self.metadata.name.clone().unwrap_or_default();
        }
        self.spec.etcd.prefix.clone().unwrap_or_else(|| {
            format!(
                "{}.{}",
                self.metadata.namespace.as_deref().unwrap_or("default"),
                self.metadata.name.as_deref().unwrap_or_default()
            )
        })
    }

    /// The prefix this cluster has registered under and so owns, if any.
    pub fn owned_prefix(&self) -> Option<&str> {
        self.status.as_ref()?.etcd_prefix.as_deref()
    }

    /// Labels shared by everything of this cluster.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".into(), "goim".into()),
            (
                "app.kubernetes.io/instance".into(),
                self.metadata.name.clone().unwrap_or_default(),
            ),
            ("app.kubernetes.io/component".into(), component.into()),
            (
                "app.kubernetes.io/managed-by".into(),
                "goim-operator".into(),
            ),
        ])
    }
}

/// The version served beside [`PushCluster`]'s own, with the same schema.
pub const OLD_VERSION: &str = "v1alpha1";

/// Fields whose schemas are Kubernetes' own types: their upstream descriptions are left out
/// of the CRD, which would otherwise pass half a megabyte (`kubectl explain` on the pod
/// fields has them).
const UPSTREAM_TYPES: &[&str] = &[
    "affinity",
    "tolerations",
    "topologySpreadConstraints",
    "securityContext",
    "containerSecurityContext",
    "resources",
    "imagePullSecrets",
];

/// The CRD: `v1beta1` stored, `v1alpha1` served (deprecated) with the same schema. No
/// conversion webhook is needed while the schemas are equal: the apiserver's `None`
/// strategy only rewrites `apiVersion`.
pub fn crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = PushCluster::crd();
    for v in &mut crd.spec.versions {
        if let Some(schema) = v.schema.as_mut().and_then(|s| s.open_api_v3_schema.take()) {
            let mut value = serde_json::to_value(schema).unwrap_or_default();
            trim_upstream(&mut value, false);
            v.schema.as_mut().unwrap().open_api_v3_schema = serde_json::from_value(value).ok();
        }
    }
    let mut old = crd.spec.versions[0].clone();
    old.name = OLD_VERSION.into();
    old.storage = false;
    old.deprecated = Some(true);
    old.deprecation_warning = Some(
        "goim.rs/v1alpha1 PushCluster is deprecated; use goim.rs/v1beta1 (the same fields)".into(),
    );
    crd.spec.versions.push(old);
    crd
}

/// Drops `description` below the upstream fields (inside: `strip`).
fn trim_upstream(v: &mut serde_json::Value, strip: bool) {
    match v {
        serde_json::Value::Object(map) => {
            if strip {
                map.remove("description");
            }
            let props = map.contains_key("properties");
            for (k, child) in map.iter_mut() {
                if k == "properties" {
                    if let serde_json::Value::Object(fields) = child {
                        for (name, field) in fields.iter_mut() {
                            let upstream = strip || UPSTREAM_TYPES.contains(&name.as_str());
                            if upstream {
                                // The field keeps its own line; what is inside loses theirs.
                                if let serde_json::Value::Object(f) = field {
                                    for (_, inner) in f.iter_mut() {
                                        trim_upstream(inner, true);
                                    }
                                }
                            } else {
                                trim_upstream(field, false);
                            }
                        }
                    }
                } else if !props || k != "description" {
                    trim_upstream(child, strip);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for i in items {
                trim_upstream(i, strip);
            }
        }
        _ => {}
    }
}

/// The CRD as YAML, as committed under `crds/`.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/pushcluster.yaml` is generated from these types; regenerate with
    /// `goim operator crd > crds/pushcluster.yaml` when this fails.
    #[test]
    fn committed_crd_matches_types() {
        let committed = include_str!("../../crds/pushcluster.yaml");
        // Not assert_eq: the whole CRD in a failure message buries the hint.
        assert!(committed == crd_yaml(), "crds/pushcluster.yaml is stale");
        let chart = include_str!("../../charts/goim/crds/pushcluster.yaml");
        assert!(
            chart == crd_yaml(),
            "charts/goim/crds/pushcluster.yaml is stale"
        );
    }

    #[test]
    fn crd_has_scale_printer_columns_and_cel() {
        let y = crd_yaml();
        for needle in [
            "specReplicasPath: .spec.comet.replicas",
            "labelSelectorPath: .status.comet.selector",
            "shortNames:\n    - pushc",
            "- push",
            "jsonPath: .status.comet.readyReplicas",
            "rule: self == oldSelf",
            "rule: self.replicas >= 1",
            "x-kubernetes-list-type: map",
        ] {
            assert!(y.contains(needle), "missing {needle:?}");
        }
    }
}
