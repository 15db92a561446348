//! One etcd lease kept alive for the life of a role. If it is lost (etcd forgot it, or it
//! expired while etcd was unreachable) a new one is granted and published, so owners can put
//! their keys back.

use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;

use crate::Backoff;
use tokio_util::sync::CancellationToken;

/// The current lease id (0 while none is held).
#[derive(Debug, Clone)]
pub struct LeaseHandle {
    rx: watch::Receiver<i64>,
}

impl LeaseHandle {
    pub fn id(&self) -> i64 {
        *self.rx.borrow()
    }

    /// Waits for a lease different from `seen` (and non-zero).
    pub async fn changed_from(&mut self, seen: i64) -> Option<i64> {
        loop {
            let id = *self.rx.borrow_and_update();
            if id != 0 && id != seen {
                return Some(id);
            }
            self.rx.changed().await.ok()?;
        }
    }

    /// A handle on a lease some other process keeps (tests pass one etcd does not know).
    pub fn fixed(id: i64) -> LeaseHandle {
        let (_tx, rx) = watch::channel(id);
        LeaseHandle { rx }
    }

    /// Starts the keeper. `ttl` in seconds.
    pub fn spawn(client: Client, ttl: i64, stop: CancellationToken) -> LeaseHandle {
        let (tx, rx) = watch::channel(0);
        tokio::spawn(keeper(client, ttl.max(2), tx, stop));
        LeaseHandle { rx }
    }

    /// Revokes the current lease (clean shutdown: the role's keys go at once).
    pub async fn revoke(&self, client: &mut Client) {
        let id = self.id();
        if id != 0 {
            if let Err(e) = client.lease_revoke(id).await {
                tracing::warn!(error = %e, "lease revoke failed");
            }
        }
    }
}

async fn keeper(mut client: Client, ttl: i64, tx: watch::Sender<i64>, stop: CancellationToken) {
    let period = Duration::from_millis((ttl as u64 * 1000) / 3);
    let mut backoff = Backoff::standard();
    'grant: loop {
        let id = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.lease_grant(ttl, None) => match r {
                Ok(r) => r.id(),
                Err(e) => {
                    tracing::warn!(error = %e, "lease grant failed; retrying");
                    if !backoff.wait(&stop).await { return }
                    continue 'grant;
                }
            },
        };
        tracing::info!(lease = id, ttl, "lease granted");
        let _ = tx.send(id);
        backoff.reset();
        // Keep it alive; a broken stream is reopened, a lease etcd no longer has is replaced.
        loop {
            let (mut keeper, mut stream) = match client.lease_keep_alive(id).await {
                Ok(k) => k,
                Err(e) if lease_gone(&e) => {
                    // etcd let it expire (it was stalled or away longer than the TTL).
                    tracing::warn!(lease = id, "lease expired; granting a new one");
                    let _ = tx.send(0);
                    continue 'grant;
                }
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "keepalive stream failed");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                if let Err(e) = keeper.keep_alive().await {
                    tracing::warn!(lease = id, error = %e, "keepalive send failed");
                    break;
                }
                let answer = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = stream.message() => m,
                    _ = tokio::time::sleep(period) => {
                        tracing::warn!(lease = id, "keepalive unanswered");
                        break;
                    }
                };
                match answer {
                    Ok(Some(r)) if r.ttl() > 0 => backoff.reset(),
                    Ok(Some(_)) => {
                        tracing::warn!(lease = id, "lease expired; granting a new one");
                        let _ = tx.send(0);
                        continue 'grant;
                    }
                    Ok(None) | Err(_) => break,
                }
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(period) => {} }
            }
            if !backoff.wait(&stop).await {
                return;
            }
        }
    }
}

/// Whether etcd says the lease no longer exists (as opposed to being unreachable).
fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

/// Keeps `key = value` written under the current lease: once per lease, again whenever the
/// lease is replaced.
pub async fn keep_registered(
    client: Client,
    mut lease: LeaseHandle,
    key: String,
    value: Vec<u8>,
    stop: CancellationToken,
) {
    let mut current = 0;
    let mut backoff = Backoff::standard();
    loop {
        let id = tokio::select! {
            _ = stop.cancelled() => return,
            id = lease.changed_from(current) => match id { Some(id) => id, None => return },
        };
        let opts = etcd_client::PutOptions::new().with_lease(id);
        match client
            .clone()
            .put(key.as_str(), value.clone(), Some(opts))
            .await
        {
            Ok(_) => {
                tracing::info!(%key, lease = id, "registered");
                current = id;
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "register failed; retrying");
                if !backoff.wait(&stop).await {
                    return;
                }
            }
        }
    }
}
