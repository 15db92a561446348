//! Presence writes from many comets in few etcd transactions: the Connects and Disconnects
//! queued while etcd is busy go into the next transaction, up to etcd's 128 operations. A
//! batch that etcd refuses because of one request (a lease that no longer exists) is split in
//! halves until that request fails alone; a batch refused for load ("too many requests") or a
//! lost connection is retried after a backoff, a bounded number of times.

use goim_discovery::etcd_client::{Error as EtcdError, Txn, TxnOp, TxnOpResponse};
use goim_discovery::{Backoff, Client, MAX_TXN_OPS};
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// Why a write did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The lease named by the write is gone (expired or revoked).
    #[error("etcd: requested lease not found")]
    LeaseNotFound,
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("online writer stopped")]
    Stopped,
}

impl WriteError {
    fn from_etcd(e: &EtcdError) -> Self {
        match e {
            EtcdError::GRpcStatus(s) if s.code() == Code::NotFound => WriteError::LeaseNotFound,
            other => WriteError::Etcd(other.to_string()),
        }
    }
}

/// Errors caused by one request of a batch rather than by etcd's state.
fn request_specific(e: &EtcdError) -> bool {
    matches!(e, EtcdError::GRpcStatus(s) if matches!(
        s.code(),
        Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange
    ))
}

/// Errors worth another try of the same batch.
fn transient(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(s) => matches!(
            s.code(),
            Code::ResourceExhausted | Code::Unavailable | Code::DeadlineExceeded | Code::Aborted
        ),
        EtcdError::TransportError(_) | EtcdError::IoError(_) => true,
        _ => false,
    }
}

/// Tries of one batch before its requests fail.
const TRIES: usize = 4;

struct Request {
    ops: Vec<TxnOp>,
    /// The keys it writes: etcd refuses a transaction that names one key twice.
    keys: Vec<String>,
    done: oneshot::Sender<Result<Written, WriteError>>,
}

/// What a request's operations answered, and the revision their transaction made.
#[derive(Debug)]
pub struct Written {
    pub revision: i64,
    pub responses: Vec<TxnOpResponse>,
}

/// Handle to the batching task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

impl Writer {
    pub fn spawn(client: Client, stop: CancellationToken) -> Writer {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run(client, rx, stop));
        Writer { tx }
    }

    /// Runs `ops` (which write `keys`) in the next transaction; returns their responses.
    pub async fn submit(&self, ops: Vec<TxnOp>, keys: Vec<String>) -> Result<Written, WriteError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request { ops, keys, done })
            .await
            .map_err(|_| WriteError::Stopped)?;
        wait.await.map_err(|_| WriteError::Stopped)?
    }
}

async fn run(client: Client, mut rx: mpsc::Receiver<Request>, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.recv() => match r { Some(r) => r, None => return },
        };
        let mut keys: HashSet<String> = first.keys.iter().cloned().collect();
        let mut n = first.ops.len();
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            // Full, or the same key again (two requests racing on one key): commit first.
            if n + r.ops.len() > MAX_TXN_OPS || r.keys.iter().any(|k| keys.contains(k)) {
                commit(&client, std::mem::take(&mut batch)).await;
                n = 0;
                keys.clear();
            }
            n += r.ops.len();
            keys.extend(r.keys.iter().cloned());
            batch.push(r);
        }
        commit(&client, batch).await;
    }
}

/// Commits a batch, splitting it while etcd blames one of its requests.
async fn commit(client: &Client, batch: Vec<Request>) {
    let mut parts = vec![batch];
    while let Some(mut part) = parts.pop() {
        if part.is_empty() {
            continue;
        }
        match try_txn(client, &part).await {
            Ok((revision, responses)) => {
                let mut responses = responses.into_iter();
                for r in part {
                    let mine = responses.by_ref().take(r.ops.len()).collect();
                    let _ = r.done.send(Ok(Written {
                        revision,
                        responses: mine,
                    }));
                }
            }
            Err(e) if part.len() > 1 && request_specific(&e) => {
                let right = part.split_off(part.len() / 2);
                parts.push(right);
                parts.push(part);
            }
            Err(e) => {
                let e = WriteError::from_etcd(&e);
                for r in part {
                    let _ = r.done.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn try_txn(
    client: &Client,
    part: &[Request],
) -> Result<(i64, Vec<TxnOpResponse>), EtcdError> {
    let ops: Vec<TxnOp> = part.iter().flat_map(|r| r.ops.iter().cloned()).collect();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut tries = 0;
    loop {
        tries += 1;
        match client.clone().txn(Txn::new().and_then(ops.clone())).await {
            Ok(r) => return Ok((r.header().map_or(0, |h| h.revision()), r.op_responses())),
            Err(e) if tries < TRIES && transient(&e) => {
                tracing::debug!(error = %e, tries, "presence transaction failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_discovery::etcd_client::PutOptions;
    use goim_testkit::Etcd;

    fn put(key: &str, lease: i64) -> (Vec<TxnOp>, Vec<String>) {
        let opts = Some(PutOptions::new().with_lease(lease));
        (vec![TxnOp::put(key, "v", opts)], vec![key.to_string()])
    }

    /// One request naming a dead lease, queued with good ones so that they share a batch,
    /// fails alone; the others are written.
    #[tokio::test]
    async fn a_dead_lease_fails_only_its_own_request() {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let client = goim_discovery::connect(&[etcd.endpoint()]).await.unwrap();
        let good = client.clone().lease_grant(30, None).await.unwrap().id();
        let (tx, rx) = mpsc::channel(64);
        let mut waits = Vec::new();
        for i in 0..9 {
            let lease = if i == 4 { 0x7fff_0000 } else { good };
            let (ops, keys) = put(&format!("/t/k{i}"), lease);
            let (done, wait) = oneshot::channel();
            tx.send(Request { ops, keys, done }).await.unwrap();
            waits.push(wait);
        }
        // Everything is queued before the writer starts: one batch, deterministically.
        let stop = CancellationToken::new();
        tokio::spawn(run(client.clone(), rx, stop.clone()));
        for (i, w) in waits.into_iter().enumerate() {
            let r = w.await.unwrap();
            if i == 4 {
                assert_eq!(r.unwrap_err(), WriteError::LeaseNotFound);
            } else {
                assert_eq!(r.unwrap().responses.len(), 1, "request {i}");
            }
        }
        let got = client
            .clone()
            .get(
                "/t/",
                Some(goim_discovery::etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert_eq!(got.kvs().len(), 8);
        stop.cancel();
    }
}
