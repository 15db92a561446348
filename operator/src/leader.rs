//! Leader election on a `coordination.k8s.io` Lease, so two operator replicas never both
//! write (linkerd's pattern: only the leader mutates anything). Acquire when the lease is free
//! or expired, renew every third of its duration, and give up (exit, so the pod restarts
//! clean) the moment a renewal fails past the duration or someone else holds it.
//!
//! "Expired" is judged as client-go does, on this replica's monotonic clock: a lease held by
//! another is expired only once it has not changed for its duration since this replica saw
//! it change. The holder's `renewTime` is never compared with the local wall clock, so clocks
//! that disagree (by seconds or hours) cannot make a standby take over from a live leader.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;

#[derive(Debug, Clone)]
pub struct Election {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    /// Another holder's lease as last seen, and when it last changed.
    seen: Arc<Mutex<Option<Seen>>>,
}

/// A version of another holder's lease, and the local (monotonic) time it was first seen.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    holder: Option<String>,
    version: Option<String>,
    at: Instant,
}

/// Whether a lease held by another has expired: it has stayed the same version for
/// `duration` since this replica first saw that version. A new version (a renewal) starts the
/// count again; so does a lease never seen before.
fn expired(
    seen: &mut Option<Seen>,
    holder: Option<&str>,
    version: Option<&str>,
    duration: Duration,
    now: Instant,
) -> bool {
    match seen {
        Some(s) if s.holder.as_deref() == holder && s.version.as_deref() == version => {
            now.duration_since(s.at) >= duration
        }
        _ => {
            *seen = Some(Seen {
                holder: holder.map(String::from),
                version: version.map(String::from),
                at: now,
            });
            false
        }
    }
}

impl Election {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Election {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            seen: Default::default(),
        }
    }

    fn spec(&self, transitions: i32) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt: `Ok(true)` when this identity now holds the lease.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let duration = spec
            .lease_duration_seconds
            .and_then(|d| u64::try_from(d).ok())
            .map_or(self.duration, Duration::from_secs);
        let expired = !mine
            && !free
            && expired(
                &mut self.seen.lock().unwrap_or_else(|e| e.into_inner()),
                spec.holder_identity.as_deref(),
                lease.metadata.resource_version.as_deref(),
                duration,
                Instant::now(),
            );
        if !(mine || expired || free) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let mut new = self.spec(transitions);
        if mine {
            new.acquire_time = spec.acquire_time;
        }
        lease.spec = Some(new);
        // resourceVersion makes this a compare-and-swap: two candidates cannot both win.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this identity leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews until leadership is lost; returns then.
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!("leadership taken by another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    if last_ok.elapsed() >= self.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (clean shutdown), so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_only_after_it_stopped_changing_for_its_duration() {
        let d = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut seen = None;
        // First sight: never expired, whatever its renewTime says.
        assert!(!expired(&mut seen, Some("a"), Some("1"), d, t0));
        assert!(!expired(&mut seen, Some("a"), Some("1"), d, t0 + d / 2));
        // Renewed (a new version): the count starts again.
        assert!(!expired(&mut seen, Some("a"), Some("2"), d, t0 + d));
        assert!(!expired(&mut seen, Some("a"), Some("2"), d, t0 + d + d / 2));
        // Unchanged for the whole duration: expired.
        assert!(expired(&mut seen, Some("a"), Some("2"), d, t0 + d * 2));
        // Another holder took it meanwhile: fresh again.
        assert!(!expired(&mut seen, Some("b"), Some("3"), d, t0 + d * 3));
    }
}
