//! Pure decisions: how many comets, which ones drain before a scale-down, what etcd should
//! hold, and the status conditions. Tested without any API server or etcd.

use std::collections::BTreeMap;

use goim_discovery::{CometRecord, CometState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::PushCluster;

/// Comets wanted: the autoscaler's answer when autoscaling, else `spec.comet.replicas`.
pub fn desired_comets(pc: &PushCluster, total_connections: u64) -> i32 {
    match &pc.spec.comet.autoscale {
        Some(a) => {
            let per = a.target_connections_per_pod.max(1) as u64;
            let want = i64::try_from(total_connections.div_ceil(per)).unwrap_or(i64::MAX);
            want.clamp(i64::from(a.min), i64::from(a.max.max(a.min))) as i32
        }
        None => pc.spec.comet.replicas.max(0),
    }
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

/// A comet pod as the registry needs it.
#[derive(Debug, Clone)]
pub struct CometPod {
    pub name: String,
    pub ip: Option<String>,
    pub ready: bool,
    pub terminating: bool,
}

/// The records etcd should hold: every ready, running comet pod, draining ones so marked.
pub fn desired_records(
    pc: &PushCluster,
    pods: &[CometPod],
    draining: &[String],
) -> BTreeMap<String, CometRecord> {
    let p = &pc.spec.comet.ports;
    pods.iter()
        .filter(|pod| pod.ready && !pod.terminating)
        .filter_map(|pod| {
            let ip = pod.ip.as_deref()?;
            Some((
                pod.name.clone(),
                CometRecord {
                    name: pod.name.clone(),
                    grpc: format!("{ip}:{}", p.grpc),
                    tcp: format!("{ip}:{}", p.tcp),
                    ws: format!("{ip}:{}", p.ws),
                    addrs: Vec::new(),
                    weight: 10,
                    region: String::new(),
                    zone: String::new(),
                    state: if draining.contains(&pod.name) {
                        CometState::Draining
                    } else {
                        CometState::Active
                    },
                },
            ))
        })
        .collect()
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
            "apiVersion: goim.rs/v1alpha1\nkind: PushCluster\nmetadata: {name: chat, namespace: ns}\nspec: {image: i, etcd: {endpoints: [e]}, comet: {replicas: 3}}",
        )
        .unwrap()
    }

    #[test]
    fn autoscale_clamps() {
        let mut p = pc();
        assert_eq!(desired_comets(&p, 1_000_000), 3);
        p.spec.comet.autoscale = Some(Autoscale {
            min: 2,
            max: 5,
            target_connections_per_pod: 1000,
        });
        assert_eq!(desired_comets(&p, 0), 2);
        assert_eq!(desired_comets(&p, 3001), 4);
        assert_eq!(desired_comets(&p, 100_000), 5);
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

    #[test]
    fn records_and_diff() {
        let p = pc();
        let pods = vec![
            CometPod {
                name: "chat-comet-0".into(),
                ip: Some("10.0.0.1".into()),
                ready: true,
                terminating: false,
            },
            CometPod {
                name: "chat-comet-1".into(),
                ip: Some("10.0.0.2".into()),
                ready: false,
                terminating: false,
            },
            CometPod {
                name: "chat-comet-2".into(),
                ip: Some("10.0.0.3".into()),
                ready: true,
                terminating: false,
            },
            CometPod {
                name: "chat-comet-3".into(),
                ip: Some("10.0.0.4".into()),
                ready: true,
                terminating: true,
            },
        ];
        let want = desired_records(&p, &pods, &["chat-comet-2".into()]);
        assert_eq!(want.len(), 2);
        assert_eq!(want["chat-comet-0"].grpc, "10.0.0.1:3109");
        assert_eq!(want["chat-comet-2"].state, CometState::Draining);
        let mut actual = BTreeMap::new();
        actual.insert("chat-comet-0".to_string(), want["chat-comet-0"].clone());
        actual.insert("old".to_string(), CometRecord::default());
        let d = etcd_diff(&want, &actual);
        assert_eq!(d.put.keys().collect::<Vec<_>>(), vec!["chat-comet-2"]);
        assert_eq!(d.delete, vec!["old".to_string()]);
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
}
