//! Presence lookups from many pushes in few etcd transactions: the lookups that arrive while
//! etcd answers earlier ones go into one read transaction (up to etcd's 128 operations), with
//! a few transactions in flight at once. Every lookup is still read by a transaction sent
//! after it arrived, so it sees every presence write that finished before the push did; the
//! batching only spares etcd a request (and its read-index round) per push.

use std::sync::Arc;

use goim_discovery::etcd_client::{Txn, TxnOp, TxnOpResponse};
use goim_discovery::{Client, MAX_TXN_OPS};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

/// Read transactions in flight at once: enough to keep etcd busy, few enough that lookups
/// queue up and share a transaction under load.
const IN_FLIGHT: usize = 2;

struct Request {
    ops: Vec<TxnOp>,
    done: oneshot::Sender<Result<Vec<TxnOpResponse>, String>>,
}

/// Handle to the batching task.
#[derive(Clone)]
pub struct Reader {
    tx: mpsc::Sender<Request>,
}

impl Reader {
    pub fn spawn(client: Client, stop: CancellationToken) -> Reader {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(run(client, rx, stop));
        Reader { tx }
    }

    /// Reads `ops` in a transaction sent after this call; their responses, in order. More
    /// than one transaction's worth is read in several (each sent after this call).
    pub async fn read(&self, ops: Vec<TxnOp>) -> Result<Vec<TxnOpResponse>, String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request { ops, done })
            .await
            .map_err(|_| "online reader stopped".to_string())?;
        wait.await
            .map_err(|_| "online reader stopped".to_string())?
    }
}

async fn run(client: Client, mut rx: mpsc::Receiver<Request>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut held: Option<Request> = None;
    loop {
        // A slot first: while every transaction is in flight, lookups pile up in the queue
        // and the next transaction takes them all.
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => return },
        };
        let first = match held.take() {
            Some(r) => r,
            None => tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => match r { Some(r) => r, None => return },
            },
        };
        let mut n = first.ops.len();
        let mut batch = vec![first];
        while n < MAX_TXN_OPS {
            let Ok(r) = rx.try_recv() else { break };
            if n + r.ops.len() > MAX_TXN_OPS {
                held = Some(r);
                break;
            }
            n += r.ops.len();
            batch.push(r);
        }
        let client = client.clone();
        tokio::spawn(async move {
            answer(&client, batch).await;
            drop(slot);
        });
    }
}

/// Reads a batch in one transaction (a request larger than one transaction alone, in
/// several) and hands each request its responses.
async fn answer(client: &Client, batch: Vec<Request>) {
    if batch.len() == 1 && batch[0].ops.len() > MAX_TXN_OPS {
        let r = batch.into_iter().next().expect("one request");
        let _ = r.done.send(read_chunks(client, r.ops).await);
        return;
    }
    let ops: Vec<TxnOp> = batch.iter().flat_map(|r| r.ops.iter().cloned()).collect();
    match client.clone().txn(Txn::new().and_then(ops)).await {
        Ok(resp) => {
            let mut responses = resp.op_responses().into_iter();
            for r in batch {
                let mine = responses.by_ref().take(r.ops.len()).collect();
                let _ = r.done.send(Ok(mine));
            }
        }
        Err(e) => {
            for r in batch {
                let _ = r.done.send(Err(e.to_string()));
            }
        }
    }
}

async fn read_chunks(client: &Client, ops: Vec<TxnOp>) -> Result<Vec<TxnOpResponse>, String> {
    let mut out = Vec::with_capacity(ops.len());
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
        let r = client
            .clone()
            .txn(Txn::new().and_then(chunk))
            .await
            .map_err(|e| e.to_string())?;
        out.extend(r.op_responses());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_testkit::Etcd;

    fn get(key: &str) -> Vec<TxnOp> {
        vec![TxnOp::get(key, None)]
    }

    fn value(r: &TxnOpResponse) -> Option<String> {
        match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        }
    }

    /// Lookups queued together share one transaction yet each gets its own answers, in
    /// order; a lookup larger than a transaction is read in several; a value written before
    /// a lookup was sent is always seen.
    #[tokio::test]
    async fn batched_lookups_get_their_own_answers_and_see_earlier_writes() {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let mut client = goim_discovery::connect(&[etcd.endpoint()]).await.unwrap();
        for i in 0..300 {
            client
                .put(format!("/r/k{i}"), format!("v{i}"), None)
                .await
                .unwrap();
        }
        let (tx, rx) = mpsc::channel(4096);
        let reader = Reader { tx };
        // Queued before the task starts: they share transactions deterministically.
        let waits: Vec<_> = (0..300)
            .map(|i| {
                let reader = reader.clone();
                let key = format!("/r/k{}", 299 - i);
                tokio::spawn(async move { reader.read(get(&key)).await })
            })
            .collect();
        let big: Vec<TxnOp> = (0..300).flat_map(|i| get(&format!("/r/k{i}"))).collect();
        let big = {
            let reader = reader.clone();
            tokio::spawn(async move { reader.read(big).await })
        };
        while reader.tx.capacity() > 4096 - 301 {
            tokio::task::yield_now().await;
        }
        let stop = CancellationToken::new();
        tokio::spawn(run(client.clone(), rx, stop.clone()));
        for (i, w) in waits.into_iter().enumerate() {
            let r = w.await.unwrap().unwrap();
            assert_eq!(r.len(), 1);
            assert_eq!(value(&r[0]), Some(format!("v{}", 299 - i)));
        }
        let r = big.await.unwrap().unwrap();
        let got: Vec<_> = r.iter().map(value).collect();
        let want: Vec<_> = (0..300).map(|i| Some(format!("v{i}"))).collect();
        assert_eq!(got, want);
        // Read-your-writes through the batcher, many times over.
        for i in 0..50 {
            client.put("/r/x", format!("x{i}"), None).await.unwrap();
            let r = reader.read(get("/r/x")).await.unwrap();
            assert_eq!(value(&r[0]), Some(format!("x{i}")));
        }
        stop.cancel();
    }
}
