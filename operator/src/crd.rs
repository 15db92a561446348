//! The `PushCluster` custom resource (`goim.rs/v1alpha1`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
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
    version = "v1alpha1",
    kind = "PushCluster",
    namespaced,
    status = "PushClusterStatus",
    shortname = "pc",
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
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PushClusterSpec {
    /// Container image holding the `goim` binary.
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    pub etcd: EtcdSpec,
    #[serde(default)]
    pub comet: CometSpec,
    #[serde(default)]
    pub logic: RoleSpec,
    #[serde(default)]
    pub job: RoleSpec,
    #[serde(default)]
    pub auth: AuthSpec,
    /// Numbered streams kept for recovery (docs/PROTOCOL.md): off unless named here.
    #[serde(default)]
    pub history: HistorySpec,
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
    /// How clients reach the comets.
    #[serde(default = "default_service_type")]
    pub service_type: ServiceType,
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
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replicas >= 1").message("at least one replica is required"))]
pub struct RoleSpec {
    #[serde(default = "default_role_replicas")]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// `json`: goim's development token, not verified.
    #[serde(default = "default_auth")]
    pub mode: AuthMode,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Json,
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
fn default_auth() -> AuthMode {
    AuthMode::Json
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

impl Default for CometSpec {
    fn default() -> Self {
        CometSpec {
            replicas: default_comets(),
            ports: CometPorts::default(),
            buckets: default_buckets(),
            resources: None,
            service_type: default_service_type(),
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
        }
    }
}

impl Default for RoleSpec {
    fn default() -> Self {
        RoleSpec {
            replicas: default_role_replicas(),
            resources: None,
        }
    }
}

impl Default for AuthSpec {
    fn default() -> Self {
        AuthSpec {
            mode: default_auth(),
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
    /// The etcd prefix this cluster owns, recorded once it first registered there; its
    /// finalizer removes only this prefix, and no other PushCluster may claim it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_prefix: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CometStatus {
    pub replicas: i32,
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

/// The CRD as YAML, as committed under `crds/`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&PushCluster::crd()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/pushcluster.yaml` is generated from these types; regenerate with
    /// `goim operator crd > crds/pushcluster.yaml` when this fails.
    #[test]
    fn committed_crd_matches_types() {
        let committed = include_str!("../../crds/pushcluster.yaml");
        assert_eq!(committed, crd_yaml(), "crds/pushcluster.yaml is stale");
        let chart = include_str!("../../charts/goim/crds/pushcluster.yaml");
        assert_eq!(
            chart,
            crd_yaml(),
            "charts/goim/crds/pushcluster.yaml is stale"
        );
    }

    #[test]
    fn crd_has_scale_printer_columns_and_cel() {
        let y = crd_yaml();
        for needle in [
            "specReplicasPath: .spec.comet.replicas",
            "labelSelectorPath: .status.comet.selector",
            "shortNames:\n    - pc",
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
