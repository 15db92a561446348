//! The reconcile loop: build, server-side apply, drain before scale-down, register comet pods
//! in etcd, report status. Shaped after kube-rs's controller-rs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use goim_discovery::etcd_client::{DeleteOptions, GetOptions, Txn, TxnOp};
use goim_discovery::{CometRecord, Keys, LoadRecord};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;

use crate::builders::{build, comet_revision, comet_selector, grace_seconds, name, REVISION};
use crate::crd::PushCluster;
use crate::leader::Election;
use crate::metrics::{ErrorKind, Metrics};
use crate::plan::{self, CometPod};

pub const MANAGER: &str = "goim-operator";
pub const FINALIZER: &str = "pushclusters.goim.rs/etcd-cleanup";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    #[error("invalid PushCluster: {0}")]
    Invalid(String),
}

/// Endpoints and TLS material identify an etcd client.
type EtcdKey = (Vec<String>, Option<goim_discovery::Tls>);

pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    /// One etcd client per endpoint list and TLS material, reused across reconciles.
    etcd: Mutex<HashMap<EtcdKey, goim_discovery::Client>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Context {
            client,
            metrics,
            reporter: Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
            etcd: Mutex::new(HashMap::new()),
        }
    }

    async fn etcd(
        &self,
        endpoints: &[String],
        tls: Option<goim_discovery::Tls>,
    ) -> Result<goim_discovery::Client, Error> {
        let key = (endpoints.to_vec(), tls);
        if let Some(c) = self
            .etcd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(c.clone());
        }
        let c = goim_discovery::connect_tls(endpoints, key.1.as_ref())
            .await
            .map_err(|e| Error::Etcd(e.to_string()))?;
        self.etcd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, c.clone());
        Ok(c)
    }
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Serialize + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl Error {
    fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kubernetes",
            Error::Etcd(_) => "etcd",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
        }
    }
}

/// The etcd TLS material `spec.etcd.tlsSecretRef` names: `Ok(None)` without one, and the
/// Degraded reason when the secret is missing or has no CA.
async fn etcd_tls(
    client: &Client,
    ns: &str,
    pc: &PushCluster,
) -> Result<Result<Option<goim_discovery::Tls>, (&'static str, String)>, Error> {
    let Some(r) = &pc.spec.etcd.tls_secret_ref else {
        return Ok(Ok(None));
    };
    let sec = match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&r.name)
        .await
    {
        // Least privilege: the operator reads Secrets only where the chart grants it.
        Err(kube::Error::Api(e)) if e.code == 403 => {
            return Ok(Err((
                "SecretForbidden",
                format!(
                    "the operator may not read Secrets in namespace {ns:?}: add it to the chart's operator.secretNamespaces"
                ),
            )))
        }
        other => other?,
    };
    let Some(sec) = sec else {
        return Ok(Err((
            "MissingSecret",
            format!("etcd TLS secret {:?} not found", r.name),
        )));
    };
    let data = sec.data.unwrap_or_default();
    let get = |k: &str| data.get(k).map(|b| b.0.clone());
    Ok(match get("ca.crt") {
        Some(ca) => Ok(Some(goim_discovery::Tls {
            ca,
            cert: get("tls.crt"),
            key: get("tls.key"),
        })),
        None => Err((
            "InvalidSecret",
            format!("etcd TLS secret {:?} has no ca.crt", r.name),
        )),
    })
}

/// Entry point per PushCluster: the finalizer wraps apply and cleanup.
pub async fn reconcile(pc: Arc<PushCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let r = reconcile_inner(pc, ctx.clone()).await;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    r
}

async fn reconcile_inner(pc: Arc<PushCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pc.namespace().unwrap_or_else(|| "default".into());
    let api: Api<PushCluster> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, pc, |event| async {
        match event {
            Finalizer::Apply(pc) => apply_cluster(&pc, &ctx).await,
            Finalizer::Cleanup(pc) => cleanup(&pc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn load_records(etcd: &goim_discovery::Client, keys: &Keys) -> Result<Registry, Error> {
    let mut etcd = etcd.clone();
    let comets = etcd
        .get(keys.comets(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| Error::Etcd(e.to_string()))?;
    let mut actual = BTreeMap::new();
    for kv in comets.kvs() {
        let Some(name) = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(keys.comets().as_str()))
            .map(str::to_string)
        else {
            continue;
        };
        // An unreadable record is replaced on the next put, or deleted as stale.
        actual.insert(name, serde_json::from_slice(kv.value()).unwrap_or_default());
    }
    let loads = etcd
        .get(keys.loads(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| Error::Etcd(e.to_string()))?;
    let mut conns = HashMap::new();
    for kv in loads.kvs() {
        let Some(name) = kv
            .key_str()
            .ok()
            .and_then(|k| k.strip_prefix(keys.loads().as_str()))
            .map(str::to_string)
        else {
            continue;
        };
        if let Ok(l) = serde_json::from_slice::<LoadRecord>(kv.value()) {
            conns.insert(name, l.conn_count);
        }
    }
    Ok((actual, conns))
}

async fn apply_cluster(pc: &PushCluster, ctx: &Context) -> Result<Action, Error> {
    let client = ctx.client.clone();
    let ns = pc.namespace().unwrap_or_else(|| "default".into());
    if pc.spec.etcd.endpoints.is_empty() {
        return Err(Error::Invalid("spec.etcd.endpoints is empty".into()));
    }
    // Before anything is applied: a cluster whose pods would share another cluster's etcd
    // prefix would mix their presence and registries, so it gets nothing but its status.
    let others = Api::<PushCluster>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    if let Some(problem) = plan::prefix_problem(pc, &others.items) {
        return refuse_prefix(pc, ctx, problem).await;
    }
    let (tls, secret_problem) = match etcd_tls(&client, &ns, pc).await? {
        Ok(tls) => (tls, None),
        Err(problem) => (None, Some(problem)),
    };
    let objs = build(pc);
    let (client_service, logic, job) = match apply_owned(&client, &ns, &objs).await {
        Ok(applied) => applied,
        Err(e) => return rejected_or(pc, ctx, e).await,
    };

    // etcd: read what is registered and the comets' load, plan the drain.
    let keys_prefix = pc.etcd_prefix();
    let keys = Keys::new(&keys_prefix);
    let mut status = pc.status.clone().unwrap_or_default();
    let now = Time(jiff::Timestamp::now());
    let gen = pc.metadata.generation;
    let etcd = if secret_problem.is_some() {
        Err(Error::Etcd("no usable etcd TLS secret".into()))
    } else {
        ctx.etcd(&pc.spec.etcd.endpoints, tls).await
    };
    let registry = match &etcd {
        Ok(c) => load_records(c, &keys).await,
        Err(e) => Err(Error::Etcd(e.to_string())),
    };
    let stss = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let current = stss
        .get_opt(&name(pc, "comet"))
        .await?
        .and_then(|s| s.spec.and_then(|s| s.replicas))
        .unwrap_or(0);
    let (plan, etcd_error) = match &registry {
        Ok((_, conns)) => {
            let total = conns.values().fold(0u64, |a, &n| a.saturating_add(n));
            let desired = match &pc.spec.comet.autoscale {
                Some(a) => {
                    let (replicas, kept) = plan::autoscale(
                        a,
                        current,
                        total,
                        &status.comet.recommendations,
                        now_secs(),
                    );
                    status.comet.recommendations = kept;
                    replicas
                }
                None => {
                    status.comet.recommendations.clear();
                    pc.spec.comet.replicas.max(0)
                }
            };
            let since = status
                .comet
                .draining_since
                .as_deref()
                .and_then(|s| s.parse::<jiff::Timestamp>().ok())
                .map(|t| t.as_second());
            let p = plan::drain(
                &name(pc, "comet"),
                current,
                desired,
                since,
                now_secs(),
                i64::from(pc.spec.comet.drain_seconds),
                |pod| conns.get(pod).copied(),
            );
            (p, None)
        }
        // Without etcd no drain can be observed: grow if asked, never shrink.
        Err(e) => (
            plan::DrainPlan {
                replicas: current.max(pc.spec.comet.replicas),
                draining: Vec::new(),
                since: None,
            },
            Some(e.to_string()),
        ),
    };
    let mut sts = objs.comet.clone();
    if let Some(spec) = sts.spec.as_mut() {
        spec.replicas = Some(plan.replicas);
    }
    let sts = match apply(&stss, &sts).await {
        Ok(sts) => sts,
        Err(e) => return rejected_or(pc, ctx, e).await,
    };

    // Comet pods as the registry and the rolling update see them.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&comet_selector(pc)))
        .await?;
    let comet_pods: Vec<CometPod> = pods
        .items
        .iter()
        .map(|p| comet_pod(p, registry.as_ref().ok()))
        .collect();
    // Replace outdated comets, drained first, while a drain-free budget allows.
    let revision = comet_revision(pc);
    let roll = plan::roll(
        &name(pc, "comet"),
        plan.replicas - plan.draining.len() as i32,
        &revision,
        pc.spec.comet.max_unavailable,
        &comet_pods,
    );
    // Without a view of etcd, nothing can be seen to serve: roll nothing.
    let replace: Vec<String> = if registry.is_ok() {
        roll.replace.clone()
    } else {
        Vec::new()
    };

    // Register ready comet pods, draining ones marked, stale ones removed, in one transaction.
    let draining: Vec<String> = plan.draining.iter().chain(&replace).cloned().collect();
    let desired_records = plan::desired_records(pc, &comet_pods, &draining);
    let mut etcd_error = etcd_error;
    if let (Ok(c), Ok((actual, _))) = (&etcd, &registry) {
        let diff = plan::etcd_diff(&desired_records, actual);
        etcd_error = write_registry(c, &keys, &diff).await.err();
    }
    // Only once etcd says they are draining (logic stops offering them at once), delete the
    // pods being replaced; their comets drain on SIGTERM within the grace period.
    if etcd_error.is_none() {
        replace_pods(pc, ctx, &ns, &comet_pods, &replace, &revision).await?;
    }

    // Status.
    let sts_status = sts.status.clone().unwrap_or_default();
    let ready = sts_status.ready_replicas.unwrap_or(0);
    let rollout_done = roll.outdated == 0;
    let ready_of = |d: &Deployment| {
        d.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    };
    status.observed_generation = gen;
    status.comet.replicas = sts_status.replicas;
    status.comet.ready_replicas = ready;
    status.comet.selector = comet_selector(pc);
    status.comet.connections = match &registry {
        Ok((_, conns)) => conns.values().fold(0u64, |a, &n| a.saturating_add(n)),
        Err(_) => status.comet.connections,
    };
    status.endpoints = Some(plan::endpoints(
        &client_service,
        pc.spec.comet.ports.tcp,
        pc.spec.comet.ports.ws,
    ));
    status.comet.registered = desired_records.len() as i32;
    status.comet.draining = plan.draining.clone();
    status.comet.revision = revision.clone();
    status.comet.updated_replicas = roll.updated;
    status.comet.rolling = comet_pods
        .iter()
        .filter(|p| p.terminating)
        .map(|p| p.name.clone())
        .chain(replace.iter().cloned())
        .collect();
    status.comet.draining_since = plan
        .since
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| t.to_string());
    ctx.metrics.registered.set(desired_records.len() as i64);
    ctx.metrics.draining.set(plan.draining.len() as i64);
    if etcd_error.is_none() && registry.is_ok() {
        // Registered there: the prefix is this cluster's from now on.
        status.etcd_prefix = Some(keys_prefix.clone());
    }
    status.logic.ready_replicas = ready_of(&logic);
    status.job.ready_replicas = ready_of(&job);
    // What the schema cannot catch, first one wins: etcd, the TLS secret, images.
    let image_error = pods.items.iter().find_map(|p| {
        p.status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .find_map(|c| {
                let w = c.state.as_ref()?.waiting.as_ref()?;
                let reason = w.reason.as_deref()?;
                matches!(
                    reason,
                    "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName"
                )
                .then(|| {
                    format!(
                        "{}: {reason}: {}",
                        p.name_any(),
                        w.message.clone().unwrap_or_default()
                    )
                })
            })
    });
    let problem: Option<(&str, String)> = secret_problem
        .or_else(|| etcd_error.clone().map(|e| ("EtcdUnavailable", e)))
        .or_else(|| image_error.map(|e| ("ImagePullError", e)));
    let all_ready = ready >= plan.replicas
        && status.logic.ready_replicas >= 1
        && status.job.ready_replicas >= 1
        && problem.is_none();
    let conns_of = |pod: &str| {
        registry
            .as_ref()
            .ok()
            .and_then(|(_, conns)| conns.get(pod).copied())
    };
    let progress = plan::progress_message(
        &plan,
        now_secs(),
        i64::from(pc.spec.comet.drain_seconds),
        conns_of,
        &roll,
        &revision,
        &comet_pods,
    );
    let mut changed = Vec::new();
    let conds = &mut status.conditions;
    if plan::set_condition(
        conds,
        "EtcdRegistered",
        etcd_error.is_none(),
        if etcd_error.is_none() {
            "Registered"
        } else {
            "EtcdUnavailable"
        },
        etcd_error.as_deref().unwrap_or(""),
        gen,
        &now,
    ) {
        changed.push(("EtcdRegistered", etcd_error.is_none()));
    }
    let progressing = !rollout_done || !plan.draining.is_empty();
    plan::set_condition(
        conds,
        "Progressing",
        progressing,
        if !plan.draining.is_empty() {
            "Draining"
        } else if !rollout_done {
            "RollingUpdate"
        } else {
            "AsExpected"
        },
        &progress,
        gen,
        &now,
    );
    if plan::set_condition(
        conds,
        "Degraded",
        problem.is_some(),
        problem.as_ref().map_or("AsExpected", |p| p.0),
        problem.as_ref().map_or("", |p| p.1.as_str()),
        gen,
        &now,
    ) {
        changed.push(("Degraded", problem.is_some()));
    }
    if plan::set_condition(
        conds,
        "Ready",
        all_ready,
        if all_ready { "AllReady" } else { "NotReady" },
        &format!("comets {ready}/{}", plan.replicas),
        gen,
        &now,
    ) {
        changed.push(("Ready", all_ready));
    }
    // Retry a degraded cluster with backoff: half the time it has been degraded, 2 s to 60 s.
    let degraded_for = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| (now.0.as_second() - c.last_transition_time.0.as_second()).max(0) as u64);
    let api: Api<PushCluster> = Api::namespaced(client.clone(), &ns);
    api.patch_status(
        &pc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    let recorder = Recorder::new(client.clone(), ctx.reporter.clone());
    let oref = pc.object_ref(&());
    for (cond, value) in changed {
        let warn = (cond == "Degraded" && value) || (cond != "Degraded" && !value);
        let ev = Event {
            type_: if warn {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: format!("{cond}{}", if value { "True" } else { "False" }),
            note: problem
                .as_ref()
                .map(|p| format!("{}: {}", p.0, p.1))
                .filter(|_| warn),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &oref).await {
            tracing::warn!(error = %e, "event publish failed");
        }
    }
    // etcd is outside the watch: resync periodically; faster while draining or degraded.
    Ok(if let Some(age) = degraded_for {
        Action::requeue(Duration::from_secs((age / 2).clamp(2, 60)))
    } else if !plan.draining.is_empty() || !rollout_done {
        Action::requeue(Duration::from_secs(2))
    } else if let Some(a) = &pc.spec.comet.autoscale {
        Action::requeue(Duration::from_secs(u64::from(a.sync_seconds.max(1))))
    } else {
        Action::requeue(Duration::from_secs(30))
    })
}

type Registry = (BTreeMap<String, CometRecord>, HashMap<String, u64>);

fn comet_pod(p: &Pod, registry: Option<&Registry>) -> CometPod {
    let name = p.name_any();
    // A record the operator wrote for an earlier pod of this name (a StatefulSet recreates
    // pods under their names) is not this pod's: the new pod must not inherit its drain.
    let own =
        |r: &&CometRecord| r.pod_uid.is_empty() || Some(&r.pod_uid) == p.metadata.uid.as_ref();
    let record = registry.and_then(|(records, _)| records.get(&name).filter(own));
    CometPod {
        serving: registry.is_some_and(|(_, loads)| loads.contains_key(&name)),
        recorded: record.is_some(),
        registered: record.is_some_and(|r| r.state == goim_discovery::CometState::Active),
        uid: p.metadata.uid.clone(),
        ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        ready: p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        terminating: p.metadata.deletion_timestamp.is_some(),
        revision: p.annotations().get(REVISION).cloned(),
        name,
    }
}

/// Puts and deletes comet records in transactions of at most etcd's operation limit.
async fn write_registry(
    etcd: &goim_discovery::Client,
    keys: &Keys,
    diff: &plan::EtcdDiff,
) -> Result<(), String> {
    let mut ops: Vec<TxnOp> = diff
        .put
        .iter()
        .map(|(k, v)| {
            TxnOp::put(
                keys.comet(k),
                serde_json::to_vec(v).unwrap_or_default(),
                None,
            )
        })
        .collect();
    ops.extend(
        diff.delete
            .iter()
            .map(|k| TxnOp::delete(keys.comet(k), None)),
    );
    for chunk in ops.chunks(goim_discovery::MAX_TXN_OPS) {
        etcd.clone()
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Deletes the comet pods the rolling update replaces, each with a grace period that covers
/// the drain, and only the pod that was looked at (a precondition on its uid), never a
/// replacement created since. An event says which revision replaces which.
async fn replace_pods(
    pc: &PushCluster,
    ctx: &Context,
    ns: &str,
    pods: &[CometPod],
    replace: &[String],
    revision: &str,
) -> Result<(), Error> {
    let api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    for pod in pods.iter().filter(|p| replace.contains(&p.name)) {
        let dp = DeleteParams {
            grace_period_seconds: u32::try_from(grace_seconds(pc)).ok(),
            preconditions: Some(Preconditions {
                uid: pod.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&pod.name, &dp).await {
            Ok(_) => {}
            // Gone already, or replaced since it was listed: nothing to do.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
        ctx.metrics.replaced.inc();
        tracing::info!(cluster = %pc.name_any(), pod = %pod.name, from = ?pod.revision, to = revision, "replacing comet");
        let ev = Event {
            type_: EventType::Normal,
            reason: "ReplacingComet".into(),
            note: Some(format!(
                "{}: revision {} -> {revision}, drained first",
                pod.name,
                pod.revision.as_deref().unwrap_or("none")
            )),
            action: "RollingUpdate".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &pc.object_ref(&())).await {
            tracing::warn!(error = %e, "event publish failed");
        }
    }
    Ok(())
}

/// A prefix this cluster may not use: Degraded, nothing applied.
async fn refuse_prefix(
    pc: &PushCluster,
    ctx: &Context,
    problem: plan::PrefixProblem,
) -> Result<Action, Error> {
    let (reason, message) = match problem {
        plan::PrefixProblem::Invalid(m) => ("InvalidPrefix", m),
        plan::PrefixProblem::Conflict(other) => (
            "PrefixConflict",
            format!(
                "etcd prefix {:?} belongs to PushCluster {other} on the same etcd; set spec.etcd.prefix to another one",
                pc.etcd_prefix()
            ),
        ),
    };
    degrade(pc, ctx, reason, message).await
}

/// Everything but the comet StatefulSet (whose replicas wait for the drain plan): the client
/// Service, logic and job as the apiserver returned them.
async fn apply_owned(
    client: &Client,
    ns: &str,
    objs: &crate::builders::Objects,
) -> Result<(Service, Deployment, Deployment), Error> {
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        &objs.config,
    )
    .await?;
    let services = Api::<Service>::namespaced(client.clone(), ns);
    for s in [&objs.comet_headless, &objs.logic_service, &objs.job_service] {
        apply(&services, s).await?;
    }
    let client_service = apply(&services, &objs.comet_service).await?;
    apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        &objs.comet_pdb,
    )
    .await?;
    let deploys = Api::<Deployment>::namespaced(client.clone(), ns);
    let logic = apply(&deploys, &objs.logic).await?;
    let job = apply(&deploys, &objs.job).await?;
    Ok((client_service, logic, job))
}

/// An apply failed: Degraded (`InvalidSpec`) when the spec is what the apiserver refused,
/// else the error, for the error policy to retry.
async fn rejected_or(pc: &PushCluster, ctx: &Context, e: Error) -> Result<Action, Error> {
    match spec_rejected(&e) {
        Some(message) => degrade(pc, ctx, "InvalidSpec", message).await,
        None => Err(e),
    }
}

/// What the apiserver refused of the objects built from the spec (a value its schema let
/// through that the owned object's validation does not): the spec is wrong, so retrying the
/// same apply cannot help. Other errors are the cluster's, retried by the error policy.
fn spec_rejected(e: &Error) -> Option<String> {
    match e {
        Error::Kube(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
            Some(s.message.clone())
        }
        _ => None,
    }
}

/// Degraded with the reason, a Warning event on the transition, nothing else touched.
async fn degrade(
    pc: &PushCluster,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let ns = pc.namespace().unwrap_or_else(|| "default".into());
    let now = Time(jiff::Timestamp::now());
    let gen = pc.metadata.generation;
    let mut status = pc.status.clone().unwrap_or_default();
    status.observed_generation = gen;
    let changed = plan::set_condition(
        &mut status.conditions,
        "Degraded",
        true,
        reason,
        &message,
        gen,
        &now,
    );
    plan::set_condition(
        &mut status.conditions,
        "Ready",
        false,
        reason,
        &message,
        gen,
        &now,
    );
    Api::<PushCluster>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &pc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    if changed {
        let ev = Event {
            type_: EventType::Warning,
            reason: "DegradedTrue".into(),
            note: Some(format!("{reason}: {message}")),
            action: "Reconcile".into(),
            secondary: None,
        };
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        if let Err(e) = recorder.publish(&ev, &pc.object_ref(&())).await {
            tracing::warn!(error = %e, "event publish failed");
        }
    }
    tracing::warn!(cluster = %pc.name_any(), reason, %message, "degraded; nothing applied");
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// On delete: remove the cluster's etcd prefix, if it owns one; Kubernetes garbage-collects
/// the owned objects. A cluster that never registered (refused prefix, etcd never reached)
/// owns no keys and removes none.
async fn cleanup(pc: &PushCluster, ctx: &Context) -> Result<Action, Error> {
    let Some(prefix) = pc.owned_prefix() else {
        tracing::info!(cluster = %pc.name_any(), "owns no etcd prefix; nothing to remove");
        return Ok(Action::await_change());
    };
    // Another cluster on the same etcd owning the same prefix (its endpoints were edited
    // onto ours since) keeps its keys.
    let others = Api::<PushCluster>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?;
    if plan::co_owner(pc, &others.items).is_some() {
        tracing::warn!(cluster = %pc.name_any(), prefix, "another PushCluster owns this prefix too; leaving its keys");
        return Ok(Action::await_change());
    }
    let keys = Keys::new(prefix);
    let ns = pc.namespace().unwrap_or_else(|| "default".into());
    // The secret may already be gone (a namespace being deleted): try plain text then, and
    // let a failure retry with backoff.
    let tls = etcd_tls(&ctx.client, &ns, pc).await?.unwrap_or(None);
    let mut etcd = ctx.etcd(&pc.spec.etcd.endpoints, tls).await?;
    etcd.delete(keys.cluster(), Some(DeleteOptions::new().with_prefix()))
        .await
        .map_err(|e| Error::Etcd(e.to_string()))?;
    tracing::info!(cluster = %pc.name_any(), prefix = %keys.cluster(), "etcd prefix removed");
    Ok(Action::await_change())
}

pub fn error_policy(pc: Arc<PushCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(cluster = %pc.name_any(), error = %err, "reconcile failed");
    ctx.metrics
        .failures
        .get_or_create(&ErrorKind { kind: err.kind() })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

/// Fails fast (with a clear message) unless the CRD is installed and established.
pub async fn check_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.get_opt("pushclusters.goim.rs").await?.ok_or_else(|| {
        anyhow::anyhow!(
            "CRD pushclusters.goim.rs is not installed (helm install the chart, or apply crds/)"
        )
    })?;
    let established = crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
        cs.iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    });
    anyhow::ensure!(
        established,
        "CRD pushclusters.goim.rs is not established yet"
    );
    Ok(())
}

/// How the controller runs.
pub struct Options {
    /// Watch one namespace (default: all).
    pub namespace: Option<String>,
    pub metrics: Arc<Metrics>,
    /// Lease-based leader election; `None` runs unconditionally (tests, single replica).
    pub election: Option<Election>,
}

async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs the controller until SIGTERM/SIGINT or, with an election, until leadership is lost
/// (then it returns an error so the process exits and restarts clean).
pub async fn run(client: Client, opts: Options) -> anyhow::Result<()> {
    check_crd(&client).await?;
    if let Some(e) = &opts.election {
        e.acquire().await;
        opts.metrics.leader.set(1);
    }
    let lost = Arc::new(tokio::sync::Notify::new());
    // The controller wants a Sync shutdown future; the watching happens in a task.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    {
        let (lost, election) = (lost.clone(), opts.election.clone());
        tokio::spawn(async move {
            match election {
                Some(e) => {
                    tokio::select! {
                        _ = signal() => e.release().await,
                        _ = e.hold() => lost.notify_one(),
                    }
                }
                None => signal().await,
            }
            let _ = tx.send(());
        });
    }
    let stop = async move {
        let _ = rx.await;
    };
    let namespace = opts.namespace;
    let (pcs, stss, deps, svcs, cms, pdbs, pods) = match &namespace {
        Some(ns) => (
            Api::<PushCluster>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=goim-operator");
    let ctx = Arc::new(Context::new(client, opts.metrics.clone()));
    Controller::new(pcs, watcher::Config::default())
        .owns(stss, managed.clone())
        .owns(deps, managed.clone())
        .owns(svcs, managed.clone())
        .owns(cms, managed.clone())
        .owns(pdbs, managed.clone())
        // Comet pods belong to the StatefulSet; map them back to their PushCluster so
        // readiness changes re-register them in etcd.
        .watches(
            pods,
            watcher::Config::default()
                .labels("app.kubernetes.io/component=comet,app.kubernetes.io/name=goim"),
            |pod: Pod| {
                let name = pod.labels().get("app.kubernetes.io/instance").cloned();
                let ns = pod.namespace();
                name.into_iter().map(move |n| {
                    let r = ObjectRef::<PushCluster>::new(&n);
                    match &ns {
                        Some(ns) => r.within(ns),
                        None => r,
                    }
                })
            },
        )
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(cluster = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    opts.metrics.leader.set(0);
    // The stop future has finished: either a signal (fine) or lost leadership.
    if tokio::time::timeout(Duration::ZERO, lost.notified())
        .await
        .is_ok()
    {
        anyhow::bail!("lost leadership");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_discovery::CometState;

    fn pod(uid: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "c-comet-2", "uid": uid},
            "status": {"podIP": "10.0.0.3", "conditions": [{"type": "Ready", "status": "False"}]}
        }))
        .unwrap()
    }

    /// A StatefulSet recreates a pod under its name: the new pod must not inherit the
    /// draining record its predecessor left, or it reads "draining", never turns ready, and
    /// keeps the record draining (a rollout that never ends).
    #[test]
    fn a_record_left_by_an_earlier_pod_of_the_name_is_not_the_new_pods() {
        let record = CometRecord {
            name: "c-comet-2".into(),
            state: CometState::Draining,
            pod_uid: "old".into(),
            ..Default::default()
        };
        let registry: Registry = (
            BTreeMap::from([("c-comet-2".to_string(), record)]),
            HashMap::from([("c-comet-2".to_string(), 0)]),
        );
        let new = comet_pod(&pod("new"), Some(&registry));
        assert!(new.serving && !new.recorded && !new.registered);
        // Not ready, not recorded: its stale record goes, and the comet finds no drain.
        let pc: PushCluster = serde_json::from_value(json!({
            "apiVersion": "goim.rs/v1beta1", "kind": "PushCluster",
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"image": "i", "etcd": {"endpoints": ["e"]}, "auth": {"mode": "json"}}
        }))
        .unwrap();
        assert!(plan::desired_records(&pc, std::slice::from_ref(&new), &[]).is_empty());
        // The same pod's record is its own.
        let same = comet_pod(&pod("old"), Some(&registry));
        assert!(same.recorded && !same.registered);
        // Records from before pods were named in them count as the pod's own.
        let mut registry = registry;
        registry.0.get_mut("c-comet-2").unwrap().pod_uid.clear();
        assert!(comet_pod(&pod("new"), Some(&registry)).recorded);
    }
}
