//! Pure builders: a `PushCluster` in, the objects it owns out. No API calls, so every rule
//! here is unit-tested from fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    Probe, SecretVolumeSource, Service, ServicePort, ServiceSpec, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::{Digest, Sha256};

use crate::crd::{PushCluster, ServiceType};

pub const CONFIG_HASH: &str = "goim.rs/config-hash";
/// The comet revision a pod runs: [`comet_revision`] of the spec it was created from.
pub const REVISION: &str = "goim.rs/revision";
const CONFIG_PATH: &str = "/etc/goim/goim.toml";
/// Where the etcd TLS secret is mounted in every role's pod.
pub const ETCD_TLS_PATH: &str = "/etc/goim-etcd-tls";

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

/// goim.toml for every role: etcd, prefix, ports and the logic Service comets call.
pub fn config_toml(pc: &PushCluster) -> String {
    let s = &pc.spec;
    let ns = pc.metadata.namespace.as_deref().unwrap_or("default");
    let endpoints: Vec<String> = s.etcd.endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[comet]\ntcp = \"0.0.0.0:{tcp}\"\nws = \"0.0.0.0:{ws}\"\nbuckets = {buckets}\ndrain_period = \"{drain}s\"\n\n[cluster]\netcd = [{etcd}]\netcd_tls_dir = {tls:?}\nname = {prefix:?}\nlogic = [\"{logic}.{ns}.svc:3119\"]\ncomet_grpc = \"0.0.0.0:{grpc}\"\ncomet_http = \"0.0.0.0:{metrics}\"\nlogic_grpc = \"0.0.0.0:3119\"\njob_grpc = \"0.0.0.0:3129\"\njob_http = \"0.0.0.0:3128\"\noperator_managed = true\n",
        tcp = s.comet.ports.tcp,
        ws = s.comet.ports.ws,
        buckets = s.comet.buckets,
        drain = s.comet.drain_seconds.max(1),
        etcd = endpoints.join(", "),
        tls = if s.etcd.tls_secret_ref.is_some() { ETCD_TLS_PATH } else { "" },
        prefix = pc.etcd_prefix(),
        logic = name(pc, "logic"),
        grpc = s.comet.ports.grpc,
        metrics = s.comet.ports.metrics,
    ) + "\n" + &history_toml(pc)
}

/// The history sections, serialized (room types are user input: never formatted into TOML).
fn history_toml(pc: &PushCluster) -> String {
    let h = &pc.spec.history;
    let limits = |l: &crate::crd::HistoryLimits| {
        toml::Table::from_iter([
            ("size".to_string(), toml::Value::from(i64::from(l.size))),
            (
                "ttl".to_string(),
                toml::Value::from(format!("{}s", l.ttl_seconds)),
            ),
        ])
    };
    let mut history: toml::Table = h
        .rooms
        .iter()
        .map(|(t, l)| (t.clone(), toml::Value::Table(limits(l))))
        .collect();
    if let Some(u) = &h.users {
        history.insert("user".into(), toml::Value::Table(limits(u)));
    }
    let mut root = toml::Table::new();
    if h.users.is_some() {
        root.insert(
            "logic".into(),
            toml::Value::Table(toml::Table::from_iter([(
                "user_streams".to_string(),
                toml::Value::Boolean(true),
            )])),
        );
    }
    if !history.is_empty() {
        root.insert(
            "job".into(),
            toml::Value::Table(toml::Table::from_iter([(
                "history".to_string(),
                toml::Value::Table(history),
            )])),
        );
    }
    toml::to_string(&root).unwrap_or_default()
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
    c: Container,
    config_hash: &str,
    grace: Option<i64>,
) -> PodTemplateSpec {
    let mut labels = selector(pc, component);
    labels.extend(pc.labels(component));
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            // A config change rolls the pods.
            annotations: Some(BTreeMap::from([(CONFIG_HASH.into(), config_hash.into())])),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![c],
            termination_grace_period_seconds: grace,
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
    }
}

fn label_selector(pc: &PushCluster, component: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector(pc, component)),
        ..Default::default()
    }
}

/// A Deployment and its Service for logic or job.
fn stateless_role(
    pc: &PushCluster,
    role: &str,
    spec: &crate::crd::RoleSpec,
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
    c.resources = spec.resources.clone();
    let deployment = Deployment {
        metadata: meta(pc, role, role),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: label_selector(pc, role),
            template: pod(pc, role, c, config_hash, None),
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
        vec![
            port("tcp", p.tcp),
            port("ws", p.ws),
            port("grpc", p.grpc),
            port("metrics", p.metrics),
        ],
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
    pod(pc, "comet", comet_c, config_hash, Some(grace_seconds(pc)))
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
    let comet_service = Service {
        metadata: meta(pc, "comet", "comet"),
        spec: Some(ServiceSpec {
            type_: Some(
                match s.comet.service_type {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(selector(pc, "comet")),
            ports: Some(vec![svc_port("tcp", p.tcp), svc_port("ws", p.ws)]),
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

    let (logic, logic_service) = stateless_role(
        pc,
        "logic",
        &s.logic,
        &[("http", 3111), ("grpc", 3119)],
        "http",
        &config_hash,
    );
    let (job, job_service) = stateless_role(
        pc,
        "job",
        &s.job,
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
apiVersion: goim.rs/v1alpha1
kind: PushCluster
metadata: {name: chat, namespace: prod, uid: "1234", generation: 3}
spec:
  image: goim:test
  etcd: {endpoints: ["etcd:2379"]}
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

    #[test]
    fn selector_string() {
        let s = comet_selector(&fixture());
        assert!(s.contains("app.kubernetes.io/component=comet"));
        assert!(s.contains("app.kubernetes.io/instance=chat"));
    }
}
