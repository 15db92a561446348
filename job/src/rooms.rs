//! Room batchers: one task per room with messages in flight packs them into one `OpRaw` batch
//! per flush, in order, and hands the batch to the queue of every comet with members in it
//! ([`crate::routes`]). A flush happens as soon as
//! the room's queue is empty (goim waits up to 1 s), so batching adds no latency when idle and
//! grows with load. A batcher retires after `room_idle` without messages, so a room that was
//! pushed to once costs nothing soon after; at most `max_rooms` live at once.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use goim_proto::comet::BroadcastRoomReq;
use goim_proto::op;
use goim_proto::packet::{Packet, SERVER_VER};
use goim_proto::protocol::Proto;
use tokio::sync::mpsc;
use tonic::Status;

use crate::outbox::Delivery;
use crate::{retire_if_idle, Inner};

/// A room message waiting for its batch.
pub(crate) struct RoomMsg {
    pub op: i32,
    pub msg: Bytes,
}

impl Inner {
    /// Hands a room message to the room's batcher, starting one if needed. Waits when the
    /// room's queue is full, so an accepted push is never dropped here (goim drops at 40).
    pub(crate) async fn push_room(
        self: &Arc<Self>,
        room: &str,
        msg: RoomMsg,
    ) -> Result<(), Status> {
        let mut msg = msg;
        loop {
            let tx = {
                let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
                match rooms.get(room) {
                    Some(tx) => tx.clone(),
                    None if rooms.len() >= self.cfg.max_rooms => {
                        self.metrics.undeliverable("too_many_rooms", 1);
                        return Err(Status::resource_exhausted(format!(
                            "job holds {} rooms with messages in flight; try again",
                            rooms.len()
                        )));
                    }
                    None => {
                        let (tx, rx) = mpsc::channel(self.cfg.room_queue.max(1));
                        rooms.insert(room.to_string(), tx.clone());
                        self.metrics.rooms.inc();
                        let me = tx.downgrade();
                        self.room_tasks
                            .spawn(batcher(self.clone(), room.to_string(), rx, me));
                        tx
                    }
                }
            };
            match tx.send(msg).await {
                Ok(()) => {
                    self.metrics.queued.inc();
                    return Ok(());
                }
                // The batcher retired between our lookup and the send: start a new one.
                Err(mpsc::error::SendError(back)) => msg = back,
            }
        }
    }
}

async fn batcher(
    inner: Arc<Inner>,
    room: String,
    mut rx: mpsc::Receiver<RoomMsg>,
    me: mpsc::WeakSender<RoomMsg>,
) {
    let cfg = &inner.cfg;
    loop {
        let first = match tokio::time::timeout(cfg.room_idle, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(_) => {
                let retired = retire_if_idle(&inner.rooms, &room, &mut rx, &me);
                if retired {
                    // Anything sent before the close is still flushed, never lost here:
                    // `recv` also waits for a sender that reserved its slot already.
                    while let Some(m) = rx.recv().await {
                        flush(&inner, &room, vec![m]);
                    }
                    break;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].msg.len();
        if !cfg.room_linger.is_zero() {
            let deadline = tokio::time::Instant::now() + cfg.room_linger;
            while batch.len() < cfg.room_batch && bytes < cfg.room_batch_bytes {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => {
                        bytes += m.msg.len();
                        batch.push(m);
                    }
                    _ => break,
                }
            }
        }
        while batch.len() < cfg.room_batch && bytes < cfg.room_batch_bytes {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.msg.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        flush(&inner, &room, batch);
    }
    inner.metrics.rooms.dec();
}

/// Packs a batch into one raw packet and queues it for every comet, numbered first when the
/// room keeps history.
fn flush(inner: &Arc<Inner>, room: &str, batch: Vec<RoomMsg>) {
    let n = batch.len() as u64;
    inner.metrics.queued.dec_by(n as i64);
    let size: usize = batch.iter().map(|m| 16 + m.msg.len()).sum();
    let mut buf = BytesMut::with_capacity(size);
    for m in &batch {
        Packet::new(SERVER_VER, m.op, 0, m.msg.clone()).encode_into(&mut buf);
    }
    inner.metrics.room_batches.inc();
    inner.metrics.room_messages.inc_by(n);
    let proto = Proto {
        ver: SERVER_VER as i32,
        op: op::RAW,
        seq: 0,
        body: buf.freeze(),
    };
    let msgs: Vec<(i32, Bytes)> = batch.into_iter().map(|m| (m.op, m.msg)).collect();
    inner.history.append(room, &msgs, |position| {
        let comets = inner.targets();
        if comets.is_empty() {
            inner.metrics.undeliverable("no_comets", n);
            return;
        }
        let (epoch, offset) = position.map_or((String::new(), 0), |(e, o)| (e.to_string(), o));
        for name in comets {
            // Only comets with members there, or whose rooms job does not know.
            if !inner.routes.wants(&name, room) {
                inner.metrics.room_deliveries_skipped.inc();
                continue;
            }
            let req = BroadcastRoomReq {
                room_id: room.to_string(),
                proto: Some(proto.clone()),
                epoch: epoch.clone(),
                offset,
            };
            inner.enqueue(&name, Delivery::Room(req, n));
        }
    });
}
