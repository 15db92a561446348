//! Pure decisions: how many comets, which ones drain before a scale-down, what etcd should
//! hold, and the status conditions. Tested without any API server or etcd.

use std::collections::BTreeMap;

use goim_discovery::{CometRecord, CometState};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{Endpoints, PushCluster, Recommendation};

/// Most recommendations kept (changes within the window).
const MAX_RECOMMENDATIONS: usize = 64;

/// The autoscaler's step: the count the load asks for, moved toward by at most a step, a
/// scale-down only to the highest count in force within the stabilization window.
/// Returns the replicas and the recommendations to keep.
pub fn autoscale(
    a: &crate::crd::Autoscale,
    current: i32,
    total_connections: u64,
    history: &[Recommendation],
    now: i64,
) -> (i32, Vec<Recommendation>) {
    let (lo, hi) = (a.min, a.max.max(a.min));
    let per = a.target_connections_per_pod.max(1) as u64;
    let want = i64::try_from(total_connections.div_ceil(per))
        .unwrap_or(i64::MAX)
        .clamp(i64::from(lo), i64::from(hi)) as i32;
    let window = i64::from(a.scale_down_stabilization_seconds);
    // The counts recommended as change points (oldest first): a count holds from its point
    // until the next one, so only changes are kept, and of those before the window only the
    // one in force when it began.
    let mut kept: Vec<Recommendation> = history.to_vec();
    kept.sort_by_key(|r| r.at);
    if kept.last().map(|r| r.replicas) != Some(want) {
        kept.push(Recommendation {
            at: now,
            replicas: want,
        });
    }
    if let Some(i) = kept.iter().rposition(|r| r.at <= now - window) {
        kept.drain(..i);
    }
    if kept.len() > MAX_RECOMMENDATIONS {
        kept.drain(..kept.len() - MAX_RECOMMENDATIONS);
    }
    let replicas = if current < lo {
        lo
    } else if want > current {
        want.min(current.saturating_add(a.max_scale_up_step.max(1)))
    } else {
        let stable = kept.iter().map(|r| r.replicas).max().unwrap_or(want);
        stable
            .min(current)
            .max(current.saturating_sub(a.max_scale_down_step.max(1)))
    };
    (replicas.clamp(lo, hi), kept)
}

/// The drain protocol's decision for this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainPlan {
    /// Replicas to give the StatefulSet now.
    pub replicas: i32,
    /// Pods marked draining in etcd (never offered to clients).
    pub draining: Vec<String>,
    /// When the drain started (unix seconds), while one is under way.
    pub since: Option<i64>,
}

/// A StatefulSet removes its highest ordinals, so those drain first: marked `draining`,
/// and the replicas drop only once they hold no connections or `drain_seconds` have passed.
/// `conns(pod)`: the pod's connection count from its load report (`None`: no report, gone).
pub fn drain(
    sts: &str,
    current: i32,
    desired: i32,
    since: Option<i64>,
    now: i64,
    drain_seconds: i64,
    conns: impl Fn(&str) -> Option<u64>,
) -> DrainPlan {
    if desired >= current {
        return DrainPlan {
            replicas: desired,
            draining: Vec::new(),
            since: None,
        };
    }
    let draining: Vec<String> = (desired..current).map(|i| format!("{sts}-{i}")).collect();
    let started = since.unwrap_or(now);
    let empty = draining.iter().all(|p| conns(p).unwrap_or(0) == 0);
    if empty || now - started >= drain_seconds {
        DrainPlan {
            replicas: desired,
            draining: Vec::new(),
            since: None,
        }
    } else {
        DrainPlan {
            replicas: current,
            draining,
            since: Some(started),
        }
    }
}

/// What etcd must change: puts of missing or different records, deletes of stale ones.
#[derive(Debug, Default, PartialEq)]
pub struct EtcdDiff {
    pub put: BTreeMap<String, CometRecord>,
    pub delete: Vec<String>,
}

pub fn etcd_diff(
    desired: &BTreeMap<String, CometRecord>,
    actual: &BTreeMap<String, CometRecord>,
) -> EtcdDiff {
    EtcdDiff {
        put: desired
            .iter()
            .filter(|(k, v)| actual.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        delete: actual
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// A comet pod as the registry and the rolling update see it.
#[derive(Debug, Clone, Default)]
pub struct CometPod {
    pub name: String,
    pub uid: Option<String>,
    pub ip: Option<String>,
    pub ready: bool,
    pub terminating: bool,
    /// Its `goim.rs/revision` annotation.
    pub revision: Option<String>,
    /// The comet holds a lease and reports its load: it is up, whatever its pod says.
    pub serving: bool,
    /// Its record is in etcd, in any state.
    pub recorded: bool,
    /// Its record is in etcd, active: logic offers it and job pushes to it.
    pub registered: bool,
}

/// The records etcd should hold: every ready, running comet pod, draining ones so marked.
/// A comet that is draining turns not ready and its pod may be terminating, but it still
/// holds clients until it exits: while it serves and was registered, its record stays
/// (marked draining), so job keeps pushing to its remaining clients.
pub fn desired_records(
    pc: &PushCluster,
    pods: &[CometPod],
    draining: &[String],
) -> BTreeMap<String, CometRecord> {
    let p = &pc.spec.comet.ports;
    pods.iter()
        .filter_map(|pod| {
            let active = pod.ready && !pod.terminating;
            let leaving = !active && pod.serving && pod.recorded;
            if !active && !leaving {
                return None;
            }
            let ip = pod.ip.as_deref()?;
            Some((
                pod.name.clone(),
                CometRecord {
                    name: pod.name.clone(),
                    grpc: format!("{ip}:{}", p.grpc),
                    tcp: format!("{ip}:{}", p.tcp),
                    ws: format!("{ip}:{}", p.ws),
                    addrs: Vec::new(),
                    weight: pc.spec.comet.weight,
                    region: String::new(),
                    zone: String::new(),
                    state: if leaving || draining.contains(&pod.name) {
                        CometState::Draining
                    } else {
                        CometState::Active
                    },
                    drain_ms: u64::try_from(pc.spec.comet.drain_seconds.max(1)).unwrap_or(1) * 1000,
                    pod_uid: pod.uid.clone().unwrap_or_default(),
                },
            ))
        })
        .collect()
}

/// The rolling update's decision for this reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollPlan {
    /// Pods to mark draining and delete now (the StatefulSet recreates them at the new
    /// revision).
    pub replace: Vec<String>,
    /// Pods in service range running the wanted revision.
    pub updated: i32,
    /// Pods in service range not running it yet.
    pub outdated: i32,
}

fn ordinal(sts: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(sts)?.strip_prefix('-')?.parse().ok()
}

/// Which comets to replace now. Only ordinals below `replicas` take part (higher ones are
/// the scale-down's). A pod is available when it is ready, not terminating, its comet serves
/// and its record is registered (written by an earlier reconcile); at most `max_unavailable` may be unavailable, so the next outdated pod goes only
/// once its predecessor's replacement is ready and registered. Outdated pods that are not
/// available anyway (a broken revision, a crash loop) are replaced without waiting, so a bad
/// rollout can be fixed by a new spec. Highest ordinals first, as a StatefulSet does.
pub fn roll(
    sts: &str,
    replicas: i32,
    revision: &str,
    max_unavailable: i32,
    pods: &[CometPod],
) -> RollPlan {
    let mut in_range: Vec<(i32, &CometPod)> = pods
        .iter()
        .filter_map(|p| Some((ordinal(sts, &p.name)?, p)))
        .filter(|(i, _)| (0..replicas).contains(i))
        .collect();
    in_range.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    let current = |p: &CometPod| p.revision.as_deref() == Some(revision);
    let available = |p: &CometPod| p.ready && !p.terminating && p.serving && p.registered;
    let up = in_range.iter().filter(|(_, p)| available(p)).count() as i32;
    let mut budget = max_unavailable.max(1) - (replicas - up);
    let mut replace = Vec::new();
    for (_, p) in &in_range {
        if current(p) || p.terminating {
            continue;
        }
        if !available(p) {
            replace.push(p.name.clone());
        } else if budget > 0 {
            budget -= 1;
            replace.push(p.name.clone());
        }
    }
    let updated = in_range.iter().filter(|(_, p)| current(p)).count() as i32;
    RollPlan {
        replace,
        updated,
        outdated: in_range.len() as i32 - updated,
    }
}

/// Where clients reach `service` (the comet client Service as the apiserver returned it):
/// its load balancer's address once it has one, else its name inside the cluster.
pub fn endpoints(service: &Service, tcp: i32, ws: i32) -> Endpoints {
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.hostname.clone().or_else(|| i.ip.clone()));
    let host = ingress.unwrap_or_else(|| {
        format!(
            "{}.{}.svc",
            service.metadata.name.as_deref().unwrap_or_default(),
            service.metadata.namespace.as_deref().unwrap_or("default")
        )
    });
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Endpoints {
        tcp: format!("{host}:{tcp}"),
        ws: format!("ws://{host}:{ws}/sub"),
    }
}

/// What the `Progressing` condition says while comets drain or roll, for `kubectl
/// describe`: which pods, how long, and what each one waits for.
pub fn progress_message(
    drain: &DrainPlan,
    now: i64,
    drain_seconds: i64,
    conns: impl Fn(&str) -> Option<u64>,
    roll: &RollPlan,
    revision: &str,
    pods: &[CometPod],
) -> String {
    let mut parts = Vec::new();
    if !drain.draining.is_empty() {
        let elapsed = now - drain.since.unwrap_or(now);
        let left: Vec<String> = drain
            .draining
            .iter()
            .map(|p| format!("{p} {}", conns(p).unwrap_or(0)))
            .collect();
        parts.push(format!(
            "scale-down: draining for {elapsed}s of drainSeconds {drain_seconds}, connections left: {}; the pods go when their clients have left or at the deadline",
            left.join(", ")
        ));
    }
    if roll.outdated > 0 {
        let waits: Vec<String> = pods
            .iter()
            .filter_map(|p| {
                let why = if p.terminating {
                    "terminating (draining its clients)"
                } else if !p.ready {
                    "pod not ready"
                } else if !p.serving {
                    "comet not reporting load to etcd (no lease)"
                } else if !p.registered {
                    "not registered in etcd yet"
                } else {
                    return None;
                };
                Some(format!("{}: {why}", p.name))
            })
            .collect();
        let mut m = format!(
            "rolling update to revision {revision}: {}/{} updated",
            roll.updated,
            roll.updated + roll.outdated
        );
        if !waits.is_empty() {
            m.push_str("; waiting for ");
            m.push_str(&waits.join(", "));
        }
        parts.push(m);
    }
    parts.join("; ")
}

/// Sets a condition, keeping `lastTransitionTime` unless the status really changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let status = if ok { "True" } else { "False" };
    let new = Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status;
            let ltt = if changed {
                now.clone()
            } else {
                c.last_transition_time.clone()
            };
            *c = Condition {
                last_transition_time: ltt,
                ..new
            };
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Why a cluster may not use its etcd prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixProblem {
    /// Empty, or characters that would nest it inside another prefix (`/`).
    Invalid(String),
    /// Another PushCluster on the same etcd claims it (namespace/name).
    Conflict(String),
}

/// Another PushCluster on a shared etcd endpoint that also owns `me`'s prefix, if any.
pub fn co_owner<'a>(me: &PushCluster, all: &'a [PushCluster]) -> Option<&'a PushCluster> {
    let mine = me.owned_prefix()?;
    all.iter().find(|o| {
        o.metadata.uid != me.metadata.uid
            && o.owned_prefix() == Some(mine)
            && o.spec
                .etcd
                .endpoints
                .iter()
                .any(|e| me.spec.etcd.endpoints.contains(e))
    })
}

/// Whether `me` may use its prefix, given every PushCluster. Of two clusters with one prefix
/// on a shared etcd endpoint, the one that already owns it (registered there) keeps it; when
/// neither or both do, the older one does (then namespace/name order).
pub fn prefix_problem(me: &PushCluster, all: &[PushCluster]) -> Option<PrefixProblem> {
    let prefix = me.etcd_prefix();
    let valid = !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Some(PrefixProblem::Invalid(format!(
            "etcd prefix {prefix:?} must be letters, digits, '.', '_' or '-'"
        )));
    }
    let id = |pc: &PushCluster| {
        format!(
            "{}/{}",
            pc.metadata.namespace.as_deref().unwrap_or_default(),
            pc.metadata.name.as_deref().unwrap_or_default()
        )
    };
    let rank = |pc: &PushCluster| {
        (
            pc.owned_prefix() != Some(prefix.as_str()),
            pc.metadata.creation_timestamp.as_ref().map(|t| t.0),
            id(pc),
        )
    };
    all.iter()
        .filter(|o| id(o) != id(me) && o.etcd_prefix() == prefix)
        .filter(|o| {
            o.spec
                .etcd
                .endpoints
                .iter()
                .any(|e| me.spec.etcd.endpoints.contains(e))
        })
        .filter(|o| rank(o) < rank(me))
        .map(|o| PrefixProblem::Conflict(id(o)))
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Autoscale;

    fn pc() -> PushCluster {
        serde_yaml::from_str(
            "apiVersion: goim.rs/v1beta1\nkind: PushCluster\nmetadata: {name: chat, namespace: ns}\nspec: {image: i, etcd: {endpoints: [e]}, auth: {mode: json}, comet: {replicas: 3}}",
        )
        .unwrap()
    }

    #[test]
    fn autoscale_clamps() {
        let a = Autoscale {
            min: 2,
            max: 5,
            target_connections_per_pod: 1000,
            ..scaler(0)
        };
        assert_eq!(autoscale(&a, 2, 0, &[], 0).0, 2);
        assert_eq!(autoscale(&a, 2, 3001, &[], 0).0, 4);
        assert_eq!(autoscale(&a, 4, 100_000, &[], 0).0, 5);
    }

    fn scaler(window: u32) -> Autoscale {
        Autoscale {
            min: 1,
            max: 10,
            target_connections_per_pod: 100,
            scale_down_stabilization_seconds: window,
            max_scale_up_step: 2,
            max_scale_down_step: 1,
            sync_seconds: 15,
        }
    }

    #[test]
    fn autoscale_steps_up_at_once_and_down_only_after_the_window() {
        let a = scaler(60);
        // Up: at most two at a time.
        let (r, h) = autoscale(&a, 1, 800, &[], 0);
        assert_eq!(r, 3);
        let (r, h) = autoscale(&a, r, 800, &h, 5);
        assert_eq!(r, 5);
        let (r, h) = autoscale(&a, r, 800, &h, 10);
        assert_eq!(r, 7);
        let (r, mut h) = autoscale(&a, r, 800, &h, 15);
        assert_eq!(r, 8);
        // Load falls (read at 20): held for the window after the high count stopped being in
        // force (it held until that reading).
        let mut r = r;
        for t in [20, 40, 70, 79] {
            (r, h) = autoscale(&a, r, 100, &h, t);
            assert_eq!(r, 8, "at {t}");
        }
        // Past it: down one at a time.
        (r, h) = autoscale(&a, r, 100, &h, 80);
        assert_eq!(r, 7);
        (r, _) = autoscale(&a, r, 100, &h, 85);
        assert_eq!(r, 6);
        // Unchanged readings add nothing (the status does not churn).
        assert_eq!(h.len(), 1);
        // Bounded by min and max, and the history by one entry per count.
        assert_eq!(autoscale(&a, 0, 0, &[], 0).0, 1);
        assert_eq!(autoscale(&a, 10, 1_000_000, &[], 0).0, 10);
        let (_, h) = autoscale(&a, 3, 300, &h, 81);
        assert!(h.len() <= 10);
    }

    #[test]
    fn autoscale_does_not_flap_on_swinging_load() {
        let a = scaler(30);
        let (mut r, mut h) = (4, Vec::new());
        let mut seen = Vec::new();
        for t in 0..60 {
            let load = if t % 2 == 0 { 400 } else { 100 };
            (r, h) = autoscale(&a, r, load, &h, t);
            seen.push(r);
        }
        assert!(seen.iter().all(|&n| n == 4), "{seen:?}");
    }

    #[test]
    fn drain_holds_replicas_until_empty_or_timeout() {
        let busy = |_: &str| Some(10);
        let p = drain("c", 4, 2, None, 100, 30, busy);
        assert_eq!(
            p,
            DrainPlan {
                replicas: 4,
                draining: vec!["c-2".into(), "c-3".into()],
                since: Some(100)
            }
        );
        // Still busy, within the window: keep holding.
        assert_eq!(drain("c", 4, 2, Some(100), 120, 30, busy).replicas, 4);
        // Window over: shrink anyway.
        assert_eq!(drain("c", 4, 2, Some(100), 130, 30, busy).replicas, 2);
        // Empty before the window ends: shrink now.
        let p = drain("c", 4, 2, Some(100), 101, 30, |_| Some(0));
        assert_eq!((p.replicas, p.draining.len()), (2, 0));
        // Scale up cancels a drain.
        assert_eq!(
            drain("c", 2, 3, Some(100), 101, 30, busy),
            DrainPlan {
                replicas: 3,
                draining: vec![],
                since: None
            }
        );
    }

    fn pod(name: &str, ip: &str, ready: bool, terminating: bool) -> CometPod {
        CometPod {
            name: name.into(),
            ip: Some(ip.into()),
            ready,
            terminating,
            serving: ready && !terminating,
            recorded: true,
            registered: ready && !terminating,
            ..Default::default()
        }
    }

    #[test]
    fn records_and_diff() {
        let mut p = pc();
        p.spec.comet.weight = 7;
        p.spec.comet.drain_seconds = 12;
        let pods = vec![
            pod("chat-comet-0", "10.0.0.1", true, false),
            pod("chat-comet-1", "10.0.0.2", false, false),
            pod("chat-comet-2", "10.0.0.3", true, false),
            pod("chat-comet-3", "10.0.0.4", true, true),
        ];
        let want = desired_records(&p, &pods, &["chat-comet-2".into()]);
        assert_eq!(want.len(), 2);
        assert_eq!(want["chat-comet-0"].grpc, "10.0.0.1:3109");
        assert_eq!(want["chat-comet-2"].state, CometState::Draining);
        // The live settings travel in the record.
        assert_eq!(
            (want["chat-comet-0"].weight, want["chat-comet-0"].drain_ms),
            (7, 12_000)
        );
        let mut actual = BTreeMap::new();
        actual.insert("chat-comet-0".to_string(), want["chat-comet-0"].clone());
        actual.insert("old".to_string(), CometRecord::default());
        let d = etcd_diff(&want, &actual);
        assert_eq!(d.put.keys().collect::<Vec<_>>(), vec!["chat-comet-2"]);
        assert_eq!(d.delete, vec!["old".to_string()]);
    }

    #[test]
    fn a_draining_comet_keeps_its_record_while_it_serves() {
        let p = pc();
        // Draining: not ready (its readiness probe fails on purpose), terminating, but its
        // comet still holds clients and a lease.
        let mut leaving = pod("chat-comet-1", "10.0.0.2", false, true);
        leaving.serving = true;
        let want = desired_records(&p, std::slice::from_ref(&leaving), &[]);
        assert_eq!(want["chat-comet-1"].state, CometState::Draining);
        // Never registered (it never became ready): nothing to keep.
        let never = CometPod {
            recorded: false,
            ..leaving.clone()
        };
        assert!(desired_records(&p, &[never], &[]).is_empty());
        // Its comet has exited: the record goes.
        leaving.serving = false;
        assert!(desired_records(&p, &[leaving], &[]).is_empty());
    }

    fn at(name: &str, rev: &str, available: bool) -> CometPod {
        CometPod {
            revision: Some(rev.into()),
            ..pod(name, "10.0.0.9", available, false)
        }
    }

    #[test]
    fn roll_replaces_one_at_a_time_highest_first() {
        let pods = vec![
            at("c-0", "old", true),
            at("c-1", "old", true),
            at("c-2", "old", true),
        ];
        let r = roll("c", 3, "new", 1, &pods);
        assert_eq!(r.replace, vec!["c-2".to_string()]);
        assert_eq!((r.updated, r.outdated), (0, 3));
        // c-2 is terminating: nothing else goes.
        let mut pods = pods;
        pods[2].terminating = true;
        assert!(roll("c", 3, "new", 1, &pods).replace.is_empty());
        // Gone and recreated at the new revision, not ready yet: still wait.
        pods[2] = at("c-2", "new", false);
        assert!(roll("c", 3, "new", 1, &pods).replace.is_empty());
        // Ready but its comet has not registered: wait.
        pods[2].ready = true;
        assert!(roll("c", 3, "new", 1, &pods).replace.is_empty());
        // Serving, but not registered in etcd yet: wait.
        pods[2].serving = true;
        pods[2].registered = false;
        assert!(roll("c", 3, "new", 1, &pods).replace.is_empty());
        // Registered: the next one.
        pods[2].registered = true;
        assert_eq!(
            roll("c", 3, "new", 1, &pods).replace,
            vec!["c-1".to_string()]
        );
        // A missing pod counts as unavailable.
        assert!(roll("c", 3, "new", 1, &pods[..2]).replace.is_empty());
        // Two at once when allowed.
        let pods = vec![
            at("c-0", "old", true),
            at("c-1", "old", true),
            at("c-2", "old", true),
        ];
        assert_eq!(
            roll("c", 3, "new", 2, &pods).replace,
            vec!["c-2".to_string(), "c-1".to_string()]
        );
        // All updated: nothing to do.
        let pods = vec![at("c-0", "new", true), at("c-1", "new", true)];
        assert_eq!(
            roll("c", 2, "new", 1, &pods),
            RollPlan {
                replace: vec![],
                updated: 2,
                outdated: 0
            }
        );
    }

    #[test]
    fn roll_replaces_broken_outdated_pods_without_waiting_and_leaves_scale_down_alone() {
        // c-0 crash-loops on the old revision while c-1 is being replaced: c-0 does not
        // serve anyway, so it goes too.
        let mut pods = vec![
            at("c-0", "old", false),
            at("c-1", "old", true),
            at("c-2", "old", true),
        ];
        pods[1].terminating = true;
        assert_eq!(
            roll("c", 3, "new", 1, &pods).replace,
            vec!["c-0".to_string()]
        );
        // c-2 is above the wanted replicas: it is the scale-down's to drain.
        let pods = vec![
            at("c-0", "new", true),
            at("c-1", "new", true),
            at("c-2", "old", true),
        ];
        let r = roll("c", 2, "new", 1, &pods);
        assert!(r.replace.is_empty());
        assert_eq!((r.updated, r.outdated), (2, 0));
        // Names of other StatefulSets never match.
        assert_eq!(ordinal("c", "cx-1"), None);
        assert_eq!(ordinal("c", "c-1"), Some(1));
    }

    #[test]
    fn conditions_keep_transition_time() {
        let t0 = Time(jiff::Timestamp::from_second(1000).unwrap());
        let t1 = Time(jiff::Timestamp::from_second(2000).unwrap());
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            "Ready",
            false,
            "Starting",
            "",
            Some(1),
            &t0
        ));
        assert!(!set_condition(
            &mut c,
            "Ready",
            false,
            "Starting",
            "still",
            Some(2),
            &t1
        ));
        assert_eq!(c[0].last_transition_time, t0);
        assert_eq!(c[0].observed_generation, Some(2));
        assert!(set_condition(
            &mut c,
            "Ready",
            true,
            "AllReady",
            "",
            Some(2),
            &t1
        ));
        assert_eq!(c[0].last_transition_time, t1);
    }

    fn named(ns: &str, name: &str, prefix: Option<&str>, age: i64) -> PushCluster {
        let mut p = pc();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.spec.etcd.prefix = prefix.map(String::from);
        p.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 - age).unwrap(),
        ));
        p
    }

    #[test]
    fn one_name_in_two_namespaces_gets_two_prefixes() {
        let (a, b) = (named("a", "chat", None, 10), named("b", "chat", None, 5));
        assert_eq!(
            (a.etcd_prefix(), b.etcd_prefix()),
            ("a.chat".into(), "b.chat".into())
        );
        let all = [a.clone(), b.clone()];
        assert_eq!(prefix_problem(&a, &all), None);
        assert_eq!(prefix_problem(&b, &all), None);
    }

    #[test]
    fn a_claimed_prefix_is_refused_to_others() {
        let owner = named("a", "chat", None, 1);
        let thief = named("b", "x", Some("a.chat"), 100);
        // Older, but the owner registered there first.
        let mut owner_claimed = owner.clone();
        owner_claimed.status = Some(Default::default());
        owner_claimed.status.as_mut().unwrap().etcd_prefix = Some("a.chat".into());
        let all = [owner_claimed.clone(), thief.clone()];
        assert_eq!(
            prefix_problem(&thief, &all),
            Some(PrefixProblem::Conflict("a/chat".into()))
        );
        assert_eq!(prefix_problem(&owner_claimed, &all), None);
        // Neither claimed yet: the older one wins.
        let all = [owner.clone(), thief.clone()];
        assert_eq!(
            prefix_problem(&owner, &all),
            Some(PrefixProblem::Conflict("b/x".into()))
        );
        // Different etcds do not conflict.
        let mut elsewhere = thief.clone();
        elsewhere.spec.etcd.endpoints = vec!["other:2379".into()];
        assert_eq!(prefix_problem(&owner, &[owner.clone(), elsewhere]), None);
    }

    #[test]
    fn a_prefix_that_would_nest_is_invalid() {
        let p = named("a", "chat", Some("a/chat"), 1);
        assert!(matches!(
            prefix_problem(&p, std::slice::from_ref(&p)),
            Some(PrefixProblem::Invalid(_))
        ));
    }

    #[test]
    fn a_cluster_registered_before_prefixes_were_recorded_keeps_its_name() {
        let mut p = named("a", "chat", None, 1);
        let now = Time(jiff::Timestamp::from_second(1_700_000_000).unwrap());
        let mut status = crate::crd::PushClusterStatus::default();
        set_condition(
            &mut status.conditions,
            "EtcdRegistered",
            true,
            "Registered",
            "",
            Some(1),
            &now,
        );
        p.status = Some(status);
        assert_eq!(p.etcd_prefix(), "chat");
    }

    #[test]
    fn cleanup_spares_a_prefix_another_cluster_owns() {
        let own = |ns: &str, uid: &str| {
            let mut p = named(ns, "chat", Some("shared"), 1);
            p.metadata.uid = Some(uid.into());
            p.status = Some(crate::crd::PushClusterStatus {
                etcd_prefix: Some("shared".into()),
                ..Default::default()
            });
            p
        };
        let (a, b) = (own("a", "1"), own("b", "2"));
        assert!(co_owner(&a, &[a.clone(), b.clone()]).is_some());
        assert!(co_owner(&a, std::slice::from_ref(&a)).is_none());
    }

    #[test]
    fn endpoints_name_the_load_balancer_once_it_has_an_address() {
        let mut svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "chat-comet", "namespace": "prod"}
        }))
        .unwrap();
        let e = endpoints(&svc, 3101, 3102);
        assert_eq!(e.tcp, "chat-comet.prod.svc:3101");
        assert_eq!(e.ws, "ws://chat-comet.prod.svc:3102/sub");
        svc.status = serde_json::from_value(
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}),
        )
        .unwrap();
        assert_eq!(endpoints(&svc, 443, 80).tcp, "203.0.113.7:443");
        svc.status = serde_json::from_value(
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": "2001:db8::1"}]}}),
        )
        .unwrap();
        assert_eq!(endpoints(&svc, 1, 2).ws, "ws://[2001:db8::1]:2/sub");
    }

    /// `kubectl describe` says why a drain or a rollout is still going.
    #[test]
    fn progress_says_what_a_drain_and_a_rollout_wait_for() {
        let drain = DrainPlan {
            replicas: 3,
            draining: vec!["chat-comet-2".into()],
            since: Some(100),
        };
        let conns = |p: &str| (p == "chat-comet-2").then_some(340);
        let idle = RollPlan::default();
        let m = progress_message(&drain, 160, 600, conns, &idle, "r1", &[]);
        assert!(
            m.contains("draining for 60s of drainSeconds 600") && m.contains("chat-comet-2 340"),
            "{m}"
        );
        let pods = vec![
            CometPod {
                name: "chat-comet-1".into(),
                ready: true,
                serving: true,
                registered: false,
                ..Default::default()
            },
            CometPod {
                name: "chat-comet-0".into(),
                ready: true,
                serving: true,
                registered: true,
                ..Default::default()
            },
        ];
        let roll = RollPlan {
            replace: vec![],
            updated: 1,
            outdated: 1,
        };
        let none = DrainPlan {
            replicas: 2,
            draining: vec![],
            since: None,
        };
        let m = progress_message(&none, 0, 30, |_| None, &roll, "r2", &pods);
        assert_eq!(
            m,
            "rolling update to revision r2: 1/2 updated; waiting for chat-comet-1: not registered in etcd yet"
        );
        assert_eq!(
            progress_message(&none, 0, 30, |_| None, &idle, "r2", &pods),
            ""
        );
    }
}
