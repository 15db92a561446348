//! One trait per boundary between roles. Standalone mode calls the implementations directly;
//! distributed mode puts a gRPC client behind the same trait, so the role logic is written once.
//!
//! Errors are `tonic::Status`, the type the gRPC boundary carries anyway.

use async_trait::async_trait;
use tokio::sync::mpsc;
use tonic::Status;

use crate::comet::{
    BroadcastReply, BroadcastReq, BroadcastRoomReply, BroadcastRoomReq, PushMsgReply, PushMsgReq,
    PushMsgsReply, PushMsgsReq, RoomsAck, RoomsReply, RoomsReq, RoomsUpdate,
};
use crate::job::{PushBatchReply, PushBatchReq, PushReply, PushResult};
use crate::logic::{
    ConnectReply, ConnectReq, DisconnectReply, DisconnectReq, DisconnectResult, DisconnectsReply,
    DisconnectsReq, HeartbeatReply, HeartbeatReq, HistoryReply, HistoryReq, NodesReply, NodesReq,
    OnlineReply, OnlineReq, PushMsg, ReceiveReply, ReceiveReq, RefreshReply, RefreshReq,
    RoomEventReply, RoomEventReq,
};

/// comet -> logic (`goim.logic.Logic`).
#[async_trait]
pub trait LogicService: Send + Sync + 'static {
    async fn connect(&self, req: ConnectReq) -> Result<ConnectReply, Status>;
    async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, Status>;
    /// Many Disconnects in one call (goim-rs): each applied as [`LogicService::disconnect`],
    /// answered in order (the gRPC glue refuses more than [`MAX_DISCONNECTS`]).
    async fn disconnects(&self, req: DisconnectsReq) -> Result<DisconnectsReply, Status> {
        let mut results = Vec::with_capacity(req.disconnects.len());
        for d in req.disconnects {
            results.push(DisconnectResult::from(self.disconnect(d).await));
        }
        Ok(DisconnectsReply { results })
    }
    async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, Status>;
    async fn renew_online(&self, req: OnlineReq) -> Result<OnlineReply, Status>;
    async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, Status>;
    /// goim's `Nodes` RPC (unused by goim itself; the HTTP API is what clients call).
    async fn nodes(&self, _req: NodesReq) -> Result<NodesReply, Status> {
        Err(Status::unimplemented("nodes"))
    }
    /// A room's messages after a position (goim-rs; answered by the job sequencing the room).
    async fn history(&self, _req: HistoryReq) -> Result<HistoryReply, Status> {
        Err(Status::unimplemented("history"))
    }
    /// A connection's new token (goim-rs): its expiry if it names the same user.
    async fn refresh(&self, _req: RefreshReq) -> Result<RefreshReply, Status> {
        Err(Status::unimplemented("refresh"))
    }
    /// A connection joined or left a room (goim-rs; for lifecycle events).
    async fn room_event(&self, _req: RoomEventReq) -> Result<RoomEventReply, Status> {
        Ok(RoomEventReply {})
    }
}

/// Most Disconnects one `Disconnects` call may carry.
pub const MAX_DISCONNECTS: usize = 1024;

impl From<Result<DisconnectReply, Status>> for DisconnectResult {
    fn from(r: Result<DisconnectReply, Status>) -> Self {
        match r {
            Ok(r) => DisconnectResult {
                has: r.has,
                ..Default::default()
            },
            Err(e) => DisconnectResult {
                has: false,
                code: e.code() as i32,
                message: e.message().to_string(),
            },
        }
    }
}

impl From<DisconnectResult> for Result<DisconnectReply, Status> {
    fn from(r: DisconnectResult) -> Self {
        match r.code {
            0 => Ok(DisconnectReply { has: r.has }),
            code => Err(Status::new(tonic::Code::from(code), r.message)),
        }
    }
}

/// job -> comet (`goim.comet.Comet`).
#[async_trait]
pub trait CometService: Send + Sync + 'static {
    async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, Status>;
    async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, Status>;
    async fn broadcast_room(&self, req: BroadcastRoomReq) -> Result<BroadcastRoomReply, Status>;
    async fn rooms(&self, req: RoomsReq) -> Result<RoomsReply, Status>;
    /// Several pushes, applied in order; one refused as malformed does not stop the others
    /// (the reply counts them).
    async fn push_msgs(&self, req: PushMsgsReq) -> Result<PushMsgsReply, Status> {
        let mut refused = 0;
        for p in req.pushes {
            if self.push_msg(p).await.is_err() {
                refused += 1;
            }
        }
        Ok(PushMsgsReply { refused })
    }
    /// The rooms this comet holds: a snapshot, then the changes, for as long as `acks` (the
    /// watcher's acknowledgements and pings) stays open (goim-rs; goim's comet answers
    /// Unimplemented, and job then sends it every room's batches).
    async fn watch_rooms(
        &self,
        _acks: mpsc::Receiver<RoomsAck>,
    ) -> Result<mpsc::Receiver<RoomsUpdate>, Status> {
        Err(Status::unimplemented("goim.comet.Comet/WatchRooms"))
    }
}

/// logic -> job (`goim.job.Job`, our replacement for goim's Kafka topic). A successful reply
/// means job has taken the message; ordering per room holds from that point on.
#[async_trait]
pub trait JobService: Send + Sync + 'static {
    async fn push(&self, msg: PushMsg) -> Result<PushReply, Status>;
    /// Several pushes, taken in order as if pushed one by one; one result each.
    async fn push_batch(&self, req: PushBatchReq) -> Result<PushBatchReply, Status> {
        let mut results = Vec::with_capacity(req.msgs.len());
        for m in req.msgs {
            results.push(match self.push(m).await {
                Ok(_) => PushResult::default(),
                Err(e) => PushResult {
                    code: e.code() as i32,
                    message: e.message().to_string(),
                },
            });
        }
        Ok(PushBatchReply { results })
    }
    /// A room's messages after a position, from the history this job keeps.
    async fn history(&self, _req: HistoryReq) -> Result<HistoryReply, Status> {
        Err(Status::unimplemented("history"))
    }
}
