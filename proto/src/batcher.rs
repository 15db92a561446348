//! Requests from many tasks to one peer, sent together (group commit): what queues while
//! earlier calls are in flight goes as one batch call, so a storm costs few calls, and a lone
//! request goes at once as the plain call it always was.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

/// Whether the peer takes the batch call: unknown until its first answer; a peer from before
/// it (goim's own roles, an older goim-rs) answers Unimplemented, and requests then go one by
/// one.
pub(crate) const BATCHES_UNKNOWN: u8 = 0;
pub(crate) const BATCHES_TAKEN: u8 = 1;
pub(crate) const BATCHES_REFUSED: u8 = 2;

/// The two ways to send one kind of request.
pub(crate) trait Calls<Q, A>: Clone + Send + Sync + 'static {
    /// One call for several requests: a result per request, in order.
    fn many(
        &self,
        requests: Vec<Q>,
    ) -> impl Future<Output = Result<Vec<Result<A, Status>>, Status>> + Send;
    /// The plain call for one request.
    fn one(&self, request: Q) -> impl Future<Output = Result<A, Status>> + Send;
}

/// A request waiting for its call, and where its answer goes.
type Waiting<Q, A> = (Q, oneshot::Sender<Result<A, Status>>);

/// The sending side; the batching task ends when the last clone is dropped.
pub(crate) struct Batcher<Q, A> {
    queue: mpsc::Sender<Waiting<Q, A>>,
}

impl<Q, A> Clone for Batcher<Q, A> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
        }
    }
}

/// How a [`Batcher`] groups requests.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    /// Most requests in one call.
    pub max: usize,
    /// Calls in flight at once; requests that arrive while all are busy wait for the next.
    pub in_flight: usize,
    /// Requests waiting at most; callers past it wait to queue.
    pub queue: usize,
}

impl<Q: Clone + Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// Must be called within a Tokio runtime: it starts the batching task.
    pub(crate) fn start(calls: impl Calls<Q, A>, shape: Shape) -> Self {
        let (queue, rx) = mpsc::channel(shape.queue.max(1));
        tokio::spawn(run(calls, rx, shape));
        Batcher { queue }
    }

    /// Sends `request` (with whatever else is waiting) and returns its own answer.
    pub(crate) async fn call(&self, request: Q) -> Result<A, Status> {
        let closed = || Status::unavailable("client closed");
        let (done, answer) = oneshot::channel();
        self.queue
            .send((request, done))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

async fn run<Q, A, C>(calls: C, mut rx: mpsc::Receiver<Waiting<Q, A>>, shape: Shape)
where
    Q: Clone + Send + 'static,
    A: Send + 'static,
    C: Calls<Q, A>,
{
    let slots = Arc::new(Semaphore::new(shape.in_flight.max(1)));
    let known = Arc::new(AtomicU8::new(BATCHES_UNKNOWN));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < shape.max {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let (calls, known) = (calls.clone(), known.clone());
        tokio::spawn(async move {
            send(&calls, batch, &known).await;
            drop(slot);
        });
    }
}

/// One batch call when there are several requests and the peer takes it; else plain calls.
async fn send<Q: Clone, A, C: Calls<Q, A>>(calls: &C, batch: Vec<Waiting<Q, A>>, known: &AtomicU8) {
    let (requests, dones): (Vec<Q>, Vec<_>) = batch.into_iter().unzip();
    let state = known.load(Ordering::Relaxed);
    let requests = if dones.len() > 1 && state != BATCHES_REFUSED {
        // A copy only until the peer has answered once: Unimplemented comes before anything
        // is applied, and the requests then go one by one.
        let spare = (state == BATCHES_UNKNOWN).then(|| requests.clone());
        match calls.many(requests).await {
            Ok(answers) => {
                known.store(BATCHES_TAKEN, Ordering::Relaxed);
                let mut answers = answers.into_iter();
                for done in dones {
                    // A reply short of answers: those requests were not answered for.
                    let a = answers
                        .next()
                        .unwrap_or_else(|| Err(Status::internal("answered fewer than sent")));
                    let _ = done.send(a);
                }
                return;
            }
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                known.store(BATCHES_REFUSED, Ordering::Relaxed);
                match spare {
                    Some(r) => r,
                    // The peer at this address was replaced by an older one mid-batch.
                    None => return fail(dones, e),
                }
            }
            Err(e) => return fail(dones, e),
        }
    } else {
        requests
    };
    for (r, done) in requests.into_iter().zip(dones) {
        let _ = done.send(calls.one(r).await);
    }
}

fn fail<A>(dones: Vec<oneshot::Sender<Result<A, Status>>>, e: Status) {
    for done in dones {
        let _ = done.send(Err(e.clone()));
    }
}
