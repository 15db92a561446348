//! One bounded delivery queue per comet, drained by its own task: a slow or dead comet delays
//! and loses only what was meant for it, never another comet's deliveries or the next room
//! batch. Per comet, deliveries keep the order they were queued in (one room's batches, one
//! key's pushes). Key and user pushes queued back to back go to a comet in one call.

use std::sync::Arc;

use goim_proto::comet::{BroadcastReq, BroadcastRoomReq, PushMsgReq, PushMsgsReq};
use goim_proto::service::CometService;
use tokio::sync::mpsc::{self, error::TrySendError};
use tonic::Status;

use crate::{retire_if_idle, Inner};

/// Most key and user pushes one call to a comet carries.
const MAX_PUSHES_PER_CALL: usize = 256;

/// What one comet is sent.
pub(crate) enum Delivery {
    Keys(PushMsgReq),
    /// Key and user pushes queued back to back, sent in one call (in order).
    KeysBatch(Vec<PushMsgReq>),
    /// A room batch of `messages` messages.
    Room(BroadcastRoomReq, u64),
    All(BroadcastReq),
}

impl Delivery {
    /// Messages it carries (what is counted when it is lost).
    fn messages(&self) -> u64 {
        match self {
            Delivery::Room(_, n) => *n,
            Delivery::KeysBatch(v) => v.len() as u64,
            _ => 1,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Delivery::Keys(_) | Delivery::KeysBatch(_) => "push",
            Delivery::Room(..) => "room",
            Delivery::All(_) => "broadcast",
        }
    }

    /// Sends it; how many of its messages the comet refused as malformed.
    async fn send(self, comet: Arc<dyn CometService>) -> Result<u64, Status> {
        match self {
            Delivery::Keys(r) => comet.push_msg(r).await.map(|_| 0),
            Delivery::KeysBatch(pushes) => comet
                .push_msgs(PushMsgsReq { pushes })
                .await
                .map(|r| r.refused.into()),
            Delivery::Room(r, _) => comet.broadcast_room(r).await.map(|_| 0),
            Delivery::All(r) => comet.broadcast(r).await.map(|_| 0),
        }
    }

    /// This delivery and the key pushes queued right behind it, as one call; the first
    /// delivery that is not a key push is handed back to go next.
    fn coalesce(self, rx: &mut mpsc::Receiver<Delivery>) -> (Delivery, Option<Delivery>) {
        let Delivery::Keys(first) = self else {
            return (self, None);
        };
        let mut pushes = vec![first];
        let mut next = None;
        while pushes.len() < MAX_PUSHES_PER_CALL {
            match rx.try_recv() {
                Ok(Delivery::Keys(r)) => pushes.push(r),
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let d = if pushes.len() == 1 {
            Delivery::Keys(pushes.pop().expect("one push"))
        } else {
            Delivery::KeysBatch(pushes)
        };
        (d, next)
    }
}

impl Inner {
    /// Queues a delivery for the comet `name`, starting its queue if needed; a full queue
    /// loses this delivery for this comet only, counted.
    pub(crate) fn enqueue(self: &Arc<Self>, name: &str, mut d: Delivery) {
        loop {
            let tx = {
                let mut outboxes = self.outboxes.lock().unwrap_or_else(|e| e.into_inner());
                match outboxes.get(name) {
                    Some(tx) => tx.clone(),
                    None => {
                        let (tx, rx) = mpsc::channel(self.cfg.comet_queue.max(1));
                        outboxes.insert(name.to_string(), tx.clone());
                        let me = tx.downgrade();
                        self.tasks
                            .spawn(outbox(self.clone(), name.to_string(), rx, me));
                        tx
                    }
                }
            };
            let n = d.messages();
            match tx.try_send(d) {
                Ok(()) => {
                    self.metrics.queued.inc_by(n as i64);
                    return;
                }
                Err(TrySendError::Full(d)) => {
                    self.metrics.undeliverable("comet_queue_full", d.messages());
                    tracing::warn!(comet = name, "comet queue full; delivery dropped");
                    return;
                }
                // The queue retired between the lookup and the send: start a new one.
                Err(TrySendError::Closed(back)) => d = back,
            }
        }
    }

    /// The comet named `name`, waiting up to `unknown_comet_wait` for a comet the registry
    /// does not show yet (a pod that is ready while its record is still being written).
    async fn resolve(&self, name: &str) -> Option<Arc<dyn CometService>> {
        if let Some(c) = self.comets.get(name) {
            return Some(c);
        }
        let mut changes = self.comets.changes()?;
        let deadline = tokio::time::Instant::now() + self.cfg.unknown_comet_wait;
        loop {
            tokio::time::timeout_at(deadline, changes.changed())
                .await
                .ok()?
                .ok()?;
            if let Some(c) = self.comets.get(name) {
                return Some(c);
            }
        }
    }
}

/// Sends one comet its deliveries in order, each bounded by `comet_timeout`. Retires after
/// `room_idle` without work (a comet that left costs nothing after that).
async fn outbox(
    inner: Arc<Inner>,
    name: String,
    mut rx: mpsc::Receiver<Delivery>,
    me: mpsc::WeakSender<Delivery>,
) {
    // A delivery taken off the queue while gathering key pushes, sent next.
    let mut next: Option<Delivery> = None;
    loop {
        if let Some(d) = next.take() {
            let (d, after) = d.coalesce(&mut rx);
            next = after;
            deliver(&inner, &name, d).await;
            continue;
        }
        let d = match tokio::time::timeout(inner.cfg.room_idle, rx.recv()).await {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(_) => {
                let retired = retire_if_idle(&inner.outboxes, &name, &mut rx, &me);
                if retired {
                    // Anything sent before the close is still delivered: `recv` (unlike
                    // `try_recv`) also waits for a sender that reserved its slot already.
                    while let Some(d) = rx.recv().await {
                        deliver(&inner, &name, d).await;
                    }
                    return;
                }
                continue;
            }
        };
        let (d, after) = d.coalesce(&mut rx);
        next = after;
        deliver(&inner, &name, d).await;
    }
}

async fn deliver(inner: &Inner, name: &str, d: Delivery) {
    let n = d.messages();
    // Held (and counted by a drain that runs out of time) until the call is over.
    let _held = Held(inner, n);
    let Some(comet) = inner.resolve(name).await else {
        inner.metrics.undeliverable("unknown_comet", n);
        tracing::debug!(comet = name, "delivery for an unknown comet dropped");
        return;
    };
    let kind = d.kind();
    inner.metrics.call(kind);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(inner.cfg.comet_timeout, d.send(comet)).await;
    inner.metrics.call_took(kind, started.elapsed());
    match result {
        Ok(Ok(0)) => {}
        Ok(Ok(refused)) => {
            inner.metrics.undeliverable("comet_refused", refused);
            tracing::warn!(comet = name, refused, "comet refused pushes as malformed");
        }
        Ok(Err(e)) => {
            inner.metrics.undeliverable("comet_unreachable", n);
            tracing::warn!(comet = name, error = %e, "call to comet failed");
        }
        Err(_) => {
            inner.metrics.undeliverable("comet_unreachable", n);
            tracing::warn!(comet = name, "call to comet timed out");
        }
    }
}

/// One queued delivery of that many messages, released from the `queued` gauge when dropped.
struct Held<'a>(&'a Inner, u64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.metrics.queued.dec_by(self.1 as i64);
    }
}
