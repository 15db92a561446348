//! gRPC glue: each service trait served over tonic, and a tonic client behind each trait, so a
//! role calls a remote peer exactly as it calls an in-process one.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::batcher::{Batcher, Calls, Shape, BATCHES_REFUSED, BATCHES_TAKEN, BATCHES_UNKNOWN};
use crate::comet::comet_client::CometClient;
use crate::comet::comet_server::{Comet, CometServer};
use crate::comet::*;
use crate::job::job_client::JobClient;
use crate::job::job_server::{Job, JobServer};
use crate::job::{PushBatchReply, PushBatchReq, PushReply};
use crate::logic::logic_client::LogicClient;
use crate::logic::logic_server::{Logic, LogicServer};
use crate::logic::*;
use crate::service::{CometService, JobService, LogicService};

/// Largest gRPC message either side accepts (goim uses 16 MiB).
pub const MAX_MESSAGE: usize = 16 << 20;

/// Serves a [`CometService`] as `goim.comet.Comet`.
pub struct CometGrpc(pub Arc<dyn CometService>);

#[async_trait]
impl Comet for CometGrpc {
    async fn push_msg(&self, r: Request<PushMsgReq>) -> Result<Response<PushMsgReply>, Status> {
        self.0.push_msg(r.into_inner()).await.map(Response::new)
    }
    async fn broadcast(
        &self,
        r: Request<BroadcastReq>,
    ) -> Result<Response<BroadcastReply>, Status> {
        self.0.broadcast(r.into_inner()).await.map(Response::new)
    }
    async fn broadcast_room(
        &self,
        r: Request<BroadcastRoomReq>,
    ) -> Result<Response<BroadcastRoomReply>, Status> {
        self.0
            .broadcast_room(r.into_inner())
            .await
            .map(Response::new)
    }
    async fn rooms(&self, r: Request<RoomsReq>) -> Result<Response<RoomsReply>, Status> {
        self.0.rooms(r.into_inner()).await.map(Response::new)
    }
    async fn push_msgs(&self, r: Request<PushMsgsReq>) -> Result<Response<PushMsgsReply>, Status> {
        self.0.push_msgs(r.into_inner()).await.map(Response::new)
    }
    type WatchRoomsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<RoomsUpdate, Status>> + Send>>;
    async fn watch_rooms(
        &self,
        r: Request<tonic::Streaming<RoomsAck>>,
    ) -> Result<Response<Self::WatchRoomsStream>, Status> {
        use tokio_stream::StreamExt;
        let mut incoming = r.into_inner();
        let (tx, acks) = mpsc::channel(WATCH_BUFFER);
        // Ends (and with it the watch) when the watcher goes or sends something malformed.
        tokio::spawn(async move {
            while let Ok(Some(ack)) = incoming.message().await {
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
        let updates = self.0.watch_rooms(acks).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(updates).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Messages buffered each way on a `WatchRooms` stream, between the wire and the service.
const WATCH_BUFFER: usize = 64;

pub fn comet_server(s: Arc<dyn CometService>) -> CometServer<CometGrpc> {
    CometServer::new(CometGrpc(s))
        .max_decoding_message_size(MAX_MESSAGE)
        .accept_compressed(CompressionEncoding::Gzip)
}

/// Serves a [`LogicService`] as `goim.logic.Logic`; accepts goim comets' gzip `RenewOnline`.
pub struct LogicGrpc(pub Arc<dyn LogicService>);

#[async_trait]
impl Logic for LogicGrpc {
    async fn connect(&self, r: Request<ConnectReq>) -> Result<Response<ConnectReply>, Status> {
        self.0.connect(r.into_inner()).await.map(Response::new)
    }
    async fn disconnect(
        &self,
        r: Request<DisconnectReq>,
    ) -> Result<Response<DisconnectReply>, Status> {
        self.0.disconnect(r.into_inner()).await.map(Response::new)
    }
    async fn disconnects(
        &self,
        r: Request<DisconnectsReq>,
    ) -> Result<Response<DisconnectsReply>, Status> {
        let req = r.into_inner();
        let n = req.disconnects.len();
        if n > crate::service::MAX_DISCONNECTS {
            return Err(Status::invalid_argument(format!(
                "{n} disconnects in one call; at most {}",
                crate::service::MAX_DISCONNECTS
            )));
        }
        self.0.disconnects(req).await.map(Response::new)
    }
    async fn heartbeat(
        &self,
        r: Request<HeartbeatReq>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.0.heartbeat(r.into_inner()).await.map(Response::new)
    }
    async fn renew_online(&self, r: Request<OnlineReq>) -> Result<Response<OnlineReply>, Status> {
        self.0.renew_online(r.into_inner()).await.map(Response::new)
    }
    async fn receive(&self, r: Request<ReceiveReq>) -> Result<Response<ReceiveReply>, Status> {
        self.0.receive(r.into_inner()).await.map(Response::new)
    }
    async fn history(&self, r: Request<HistoryReq>) -> Result<Response<HistoryReply>, Status> {
        self.0.history(r.into_inner()).await.map(Response::new)
    }
    async fn nodes(&self, r: Request<NodesReq>) -> Result<Response<NodesReply>, Status> {
        self.0.nodes(r.into_inner()).await.map(Response::new)
    }
    async fn refresh(&self, r: Request<RefreshReq>) -> Result<Response<RefreshReply>, Status> {
        self.0.refresh(r.into_inner()).await.map(Response::new)
    }
    async fn room_event(
        &self,
        r: Request<RoomEventReq>,
    ) -> Result<Response<RoomEventReply>, Status> {
        self.0.room_event(r.into_inner()).await.map(Response::new)
    }
}

pub fn logic_server(s: Arc<dyn LogicService>) -> LogicServer<LogicGrpc> {
    LogicServer::new(LogicGrpc(s))
        .max_decoding_message_size(MAX_MESSAGE)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
}

/// Serves a [`JobService`] as `goim.job.Job`.
pub struct JobGrpc(pub Arc<dyn JobService>);

#[async_trait]
impl Job for JobGrpc {
    async fn push(&self, r: Request<PushMsg>) -> Result<Response<PushReply>, Status> {
        self.0.push(r.into_inner()).await.map(Response::new)
    }
    async fn history(&self, r: Request<HistoryReq>) -> Result<Response<HistoryReply>, Status> {
        self.0.history(r.into_inner()).await.map(Response::new)
    }
    async fn push_batch(
        &self,
        r: Request<PushBatchReq>,
    ) -> Result<Response<PushBatchReply>, Status> {
        self.0.push_batch(r.into_inner()).await.map(Response::new)
    }
}

pub fn job_server(s: Arc<dyn JobService>) -> JobServer<JobGrpc> {
    JobServer::new(JobGrpc(s)).max_decoding_message_size(MAX_MESSAGE)
}

/// A remote comet behind [`CometService`].
#[derive(Clone)]
pub struct RemoteComet {
    client: CometClient<Channel>,
    /// Whether the comet takes `PushMsgs`: [`BATCHES_UNKNOWN`] until its first answer;
    /// goim's own comet answers Unimplemented, and batches then go as one `PushMsg` each.
    batches: Arc<std::sync::atomic::AtomicU8>,
}

impl RemoteComet {
    pub fn new(ch: Channel) -> Self {
        RemoteComet {
            client: CometClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            batches: Arc::new(std::sync::atomic::AtomicU8::new(BATCHES_UNKNOWN)),
        }
    }
}

#[async_trait]
impl CometService for RemoteComet {
    async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, Status> {
        Ok(self.client.clone().push_msg(req).await?.into_inner())
    }
    async fn broadcast(&self, req: BroadcastReq) -> Result<BroadcastReply, Status> {
        Ok(self.client.clone().broadcast(req).await?.into_inner())
    }
    async fn broadcast_room(&self, req: BroadcastRoomReq) -> Result<BroadcastRoomReply, Status> {
        Ok(self.client.clone().broadcast_room(req).await?.into_inner())
    }
    async fn rooms(&self, req: RoomsReq) -> Result<RoomsReply, Status> {
        Ok(self.client.clone().rooms(req).await?.into_inner())
    }
    async fn push_msgs(&self, req: PushMsgsReq) -> Result<PushMsgsReply, Status> {
        use std::sync::atomic::Ordering;
        match self.batches.load(Ordering::Relaxed) {
            BATCHES_TAKEN => return Ok(self.client.clone().push_msgs(req).await?.into_inner()),
            BATCHES_UNKNOWN => {
                // Kept until the comet has answered once: Unimplemented comes before anything
                // is applied, and the pushes then go one by one.
                match self.client.clone().push_msgs(req.clone()).await {
                    Err(e) if e.code() == tonic::Code::Unimplemented => {
                        self.batches.store(BATCHES_REFUSED, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                    Ok(r) => {
                        self.batches.store(BATCHES_TAKEN, Ordering::Relaxed);
                        return Ok(r.into_inner());
                    }
                }
            }
            _ => {}
        }
        let mut refused = 0;
        for p in req.pushes {
            match self.push_msg(p).await {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::InvalidArgument => refused += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(PushMsgsReply { refused })
    }
    async fn watch_rooms(
        &self,
        acks: mpsc::Receiver<RoomsAck>,
    ) -> Result<mpsc::Receiver<RoomsUpdate>, Status> {
        let acks = tokio_stream::wrappers::ReceiverStream::new(acks);
        let mut incoming = self.client.clone().watch_rooms(acks).await?.into_inner();
        let (tx, updates) = mpsc::channel(WATCH_BUFFER);
        // Ends when the stream does, for any reason: the watcher then knows nothing more.
        tokio::spawn(async move {
            while let Ok(Some(u)) = incoming.message().await {
                if tx.send(u).await.is_err() {
                    return;
                }
            }
        });
        Ok(updates)
    }
}

/// Calls a comet keeps in flight to logic at once. A reconnect storm (or every client leaving
/// at once) would otherwise open more HTTP/2 streams than the server allows (hyper: 200) and
/// calls fail; past this they wait their turn instead.
pub const LOGIC_IN_FLIGHT: usize = 128;

/// A remote logic behind [`LogicService`]. `RenewOnline` goes gzip-compressed, as goim's
/// comet sends it, and takes a compressed reply; the other calls go plain.
#[derive(Clone)]
pub struct RemoteLogic {
    calls: LogicCalls,
    /// Disconnects that arrive together (clients leaving at once) go as one `Disconnects`.
    disconnects: Batcher<DisconnectReq, DisconnectReply>,
}

/// How a comet's Disconnects are grouped: up to 512 in a call, 4 calls in flight (each also
/// takes one of the [`LOGIC_IN_FLIGHT`] slots).
const DISCONNECTS: Shape = Shape {
    max: 512,
    in_flight: 4,
    queue: 4096,
};

impl RemoteLogic {
    /// Must be called within a Tokio runtime (it starts the task batching Disconnects, which
    /// ends when the last clone is dropped).
    pub fn new(ch: Channel) -> Self {
        // No gzip by default: replies to Connect and the other per-connection calls are
        // small, and compressing them cost logic and comet more CPU than the call itself
        // (a fresh deflate state per message).
        let client = LogicClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let calls = LogicCalls {
            client,
            in_flight: Arc::new(tokio::sync::Semaphore::new(LOGIC_IN_FLIGHT)),
        };
        RemoteLogic {
            disconnects: Batcher::start(calls.clone(), DISCONNECTS),
            calls,
        }
    }

    async fn slot(
        &self,
    ) -> Result<(LogicClient<Channel>, tokio::sync::OwnedSemaphorePermit), Status> {
        let permit = self.calls.slot().await?;
        Ok((self.calls.client.clone(), permit))
    }

    /// For `RenewOnline`: every room's count, worth compressing both ways.
    fn compressed(c: LogicClient<Channel>) -> LogicClient<Channel> {
        c.send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip)
    }
}

#[async_trait]
impl LogicService for RemoteLogic {
    async fn connect(&self, req: ConnectReq) -> Result<ConnectReply, Status> {
        let (mut c, _p) = self.slot().await?;
        Ok(c.connect(req).await?.into_inner())
    }
    async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, Status> {
        self.disconnects.call(req).await
    }
    async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, Status> {
        let (mut c, _p) = self.slot().await?;
        Ok(c.heartbeat(req).await?.into_inner())
    }
    async fn renew_online(&self, req: OnlineReq) -> Result<OnlineReply, Status> {
        let (c, _p) = self.slot().await?;
        Ok(Self::compressed(c).renew_online(req).await?.into_inner())
    }
    async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, Status> {
        let (mut c, _p) = self.slot().await?;
        Ok(c.receive(req).await?.into_inner())
    }
    async fn nodes(&self, req: NodesReq) -> Result<NodesReply, Status> {
        let (mut c, _p) = self.slot().await?;
        Ok(c.nodes(req).await?.into_inner())
    }
    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, Status> {
        let (mut c, _p) = self.slot().await?;
        Ok(c.history(req).await?.into_inner())
    }
    async fn refresh(&self, req: RefreshReq) -> Result<RefreshReply, Status> {
        let (mut c, _p) = self.slot().await?;
        Ok(c.refresh(req).await?.into_inner())
    }
    async fn room_event(&self, req: RoomEventReq) -> Result<RoomEventReply, Status> {
        let (mut c, _p) = self.slot().await?;
        Ok(c.room_event(req).await?.into_inner())
    }
}

/// A comet's client to logic and its slots (see [`LOGIC_IN_FLIGHT`]); as [`Calls`]:
/// `Disconnects` for connections that closed together, `Disconnect` for a lone one.
#[derive(Clone)]
struct LogicCalls {
    client: LogicClient<Channel>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl LogicCalls {
    async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("logic client closed"))
    }
}

impl Calls<DisconnectReq, DisconnectReply> for LogicCalls {
    async fn many(
        &self,
        disconnects: Vec<DisconnectReq>,
    ) -> Result<Vec<Result<DisconnectReply, Status>>, Status> {
        let _slot = self.slot().await?;
        let reply = self
            .client
            .clone()
            .disconnects(DisconnectsReq { disconnects })
            .await?;
        Ok(reply
            .into_inner()
            .results
            .into_iter()
            .map(Into::into)
            .collect())
    }
    async fn one(&self, req: DisconnectReq) -> Result<DisconnectReply, Status> {
        let _slot = self.slot().await?;
        Ok(self.client.clone().disconnect(req).await?.into_inner())
    }
}

/// A remote job behind [`JobService`].
#[derive(Clone)]
pub struct RemoteJob {
    client: JobClient<Channel>,
    /// Pushes that arrive together go as one `PushBatch`.
    pushes: Batcher<PushMsg, PushReply>,
}

/// How a logic's pushes to one job are grouped: up to 128 in a `PushBatch`, 8 calls in flight.
const JOB_PUSHES: Shape = Shape {
    max: 128,
    in_flight: 8,
    queue: 4096,
};

impl RemoteJob {
    /// Must be called within a Tokio runtime (it starts the batching task, which ends when
    /// the last clone is dropped).
    pub fn new(ch: Channel) -> Self {
        let client = JobClient::new(ch).max_encoding_message_size(MAX_MESSAGE);
        let pushes = Batcher::start(JobCalls(client.clone()), JOB_PUSHES);
        RemoteJob { client, pushes }
    }
}

/// `PushBatch` for pushes that queued together, `Push` for a lone one.
#[derive(Clone)]
struct JobCalls(JobClient<Channel>);

impl Calls<PushMsg, PushReply> for JobCalls {
    async fn many(&self, msgs: Vec<PushMsg>) -> Result<Vec<Result<PushReply, Status>>, Status> {
        let reply = self.0.clone().push_batch(PushBatchReq { msgs }).await?;
        Ok(reply
            .into_inner()
            .results
            .into_iter()
            .map(|r| match r.code {
                0 => Ok(PushReply {}),
                code => Err(Status::new(tonic::Code::from(code), r.message)),
            })
            .collect())
    }
    async fn one(&self, msg: PushMsg) -> Result<PushReply, Status> {
        Ok(self.0.clone().push(msg).await?.into_inner())
    }
}

#[async_trait]
impl JobService for RemoteJob {
    async fn push(&self, msg: PushMsg) -> Result<PushReply, Status> {
        self.pushes.call(msg).await
    }
    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, Status> {
        Ok(self.client.clone().history(req).await?.into_inner())
    }
}

fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(tonic::transport::Endpoint::from_shared(uri)?
        .connect_timeout(std::time::Duration::from_secs(1))
        // Every call between roles is bounded; callers count what times out.
        .timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(3))
        .keep_alive_while_idle(true))
}

/// A lazily connecting channel to `host:port` (plain HTTP/2), with goim's client keepalive.
/// It reconnects by itself when the peer restarts.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr)?.connect_lazy())
}

/// A channel balancing calls over several endpoints (goim's round robin over logics).
pub fn balanced_channel(addrs: &[String]) -> Result<Channel, tonic::transport::Error> {
    if let [one] = addrs {
        return channel(one);
    }
    let eps = addrs
        .iter()
        .map(|a| endpoint(a))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Channel::balance_list(eps.into_iter()))
}

/// A gRPC address that cannot be dialed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("with mutual TLS between roles, give one address (a Service) instead of {0}")]
    TlsBalance(usize),
}

/// How a role dials the others: plain HTTP/2, or mutual TLS with the cluster's certificates
/// (each reconnect uses the certificates current then).
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<goim_tls::Connector>,
}

impl Dialer {
    pub fn plain() -> Self {
        Dialer::default()
    }

    pub fn tls(connector: goim_tls::Connector) -> Self {
        Dialer {
            tls: Some(connector),
        }
    }

    /// A lazily connecting channel to `addr`.
    pub fn channel(&self, addr: &str) -> Result<Channel, DialError> {
        let ep = endpoint(addr)?;
        Ok(match &self.tls {
            None => ep.connect_lazy(),
            Some(c) => ep.connect_with_connector_lazy(c.clone()),
        })
    }

    /// A channel balancing calls over `addrs`. tonic balances only over its own
    /// connections, so with TLS there must be one address.
    pub fn balanced(&self, addrs: &[String]) -> Result<Channel, DialError> {
        match (&self.tls, addrs) {
            (None, _) => Ok(balanced_channel(addrs)?),
            (Some(_), [one]) => self.channel(one),
            (Some(_), many) => Err(DialError::TlsBalance(many.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A comet that answers `PushMsgs` as goim's comet does (it has no such method).
    #[derive(Default)]
    struct GoimLike {
        pushed: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl CometService for GoimLike {
        async fn push_msg(&self, req: PushMsgReq) -> Result<PushMsgReply, Status> {
            self.pushed.lock().unwrap().push(req.keys.join(","));
            Ok(PushMsgReply {})
        }
        async fn broadcast(&self, _: BroadcastReq) -> Result<BroadcastReply, Status> {
            Ok(BroadcastReply {})
        }
        async fn broadcast_room(&self, _: BroadcastRoomReq) -> Result<BroadcastRoomReply, Status> {
            Ok(BroadcastRoomReply {})
        }
        async fn rooms(&self, _: RoomsReq) -> Result<RoomsReply, Status> {
            Ok(RoomsReply::default())
        }
        async fn push_msgs(&self, _: PushMsgsReq) -> Result<PushMsgsReply, Status> {
            Err(Status::unimplemented("goim.comet.Comet/PushMsgs"))
        }
    }

    /// A job that records pushes, refuses those whose op is negative as a draining job
    /// does, and (unless `batches`) lacks `PushBatch` as a job from before it.
    struct Recorded {
        pushed: Mutex<Vec<i32>>,
        batches: bool,
        batch_calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl JobService for Recorded {
        async fn push(&self, msg: PushMsg) -> Result<PushReply, Status> {
            if msg.operation < 0 {
                return Err(Status::unavailable("job is draining"));
            }
            self.pushed.lock().unwrap().push(msg.operation);
            Ok(PushReply {})
        }
        async fn push_batch(&self, req: PushBatchReq) -> Result<PushBatchReply, Status> {
            if !self.batches {
                return Err(Status::unimplemented("goim.job.Job/PushBatch"));
            }
            self.batch_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut results = Vec::new();
            for m in req.msgs {
                results.push(match self.push(m).await {
                    Ok(_) => crate::job::PushResult::default(),
                    Err(e) => crate::job::PushResult {
                        code: e.code() as i32,
                        message: e.message().to_string(),
                    },
                });
            }
            Ok(PushBatchReply { results })
        }
    }

    /// Serves `router` on a free port; a channel to it, and the task serving it.
    async fn serve(
        router: tonic::transport::server::Router,
    ) -> (Channel, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server =
            router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let served = tokio::spawn(async move {
            let _ = server.await;
        });
        let ch = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (ch, served)
    }

    async fn serve_job(job: Arc<Recorded>) -> (RemoteJob, tokio::task::JoinHandle<()>) {
        let (ch, served) =
            serve(tonic::transport::Server::builder().add_service(job_server(job))).await;
        (RemoteJob::new(ch), served)
    }

    /// Pushes sent at once reach the job (in batches when it takes them, one by one when it
    /// does not), and each caller gets its own push's result.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_pushes_share_calls_and_keep_their_own_results() {
        for batches in [true, false] {
            let job = Arc::new(Recorded {
                pushed: Mutex::default(),
                batches,
                batch_calls: Default::default(),
            });
            let (remote, served) = serve_job(job.clone()).await;
            let calls: Vec<_> = (1..=300)
                .map(|i| {
                    let remote = remote.clone();
                    // Every tenth as a draining job refuses it.
                    let op = if i % 10 == 0 { -i } else { i };
                    tokio::spawn(async move {
                        let m = PushMsg {
                            operation: op,
                            ..Default::default()
                        };
                        (op, remote.push(m).await)
                    })
                })
                .collect();
            for c in calls {
                let (op, r) = c.await.unwrap();
                if op < 0 {
                    let e = r.unwrap_err();
                    assert_eq!(
                        (e.code(), e.message()),
                        (tonic::Code::Unavailable, "job is draining")
                    );
                } else {
                    r.unwrap();
                }
            }
            let mut pushed = job.pushed.lock().unwrap().clone();
            pushed.sort();
            let want: Vec<i32> = (1..=300).filter(|i| i % 10 != 0).collect();
            assert_eq!(pushed, want, "batches: {batches}");
            let batch_calls = job.batch_calls.load(std::sync::atomic::Ordering::SeqCst);
            if batches {
                assert!(
                    batch_calls > 0 && batch_calls < 300,
                    "{batch_calls} batch calls"
                );
            } else {
                assert_eq!(batch_calls, 0);
            }
            served.abort();
        }
    }

    fn batch(keys: &[&str]) -> PushMsgsReq {
        PushMsgsReq {
            pushes: keys
                .iter()
                .map(|k| PushMsgReq {
                    keys: vec![k.to_string()],
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// A comet without `PushMsgs` still gets every push of a batch, in order, one call each,
    /// and later batches go that way from the start.
    #[tokio::test]
    async fn batches_to_a_comet_without_them_go_one_by_one() {
        let comet = Arc::new(GoimLike::default());
        let router = tonic::transport::Server::builder().add_service(comet_server(comet.clone()));
        let (ch, served) = serve(router).await;
        let remote = RemoteComet::new(ch);
        let r = remote.push_msgs(batch(&["a", "b", "c"])).await.unwrap();
        assert_eq!(r.refused, 0);
        let r = remote.push_msgs(batch(&["d", "e"])).await.unwrap();
        assert_eq!(r.refused, 0);
        assert_eq!(*comet.pushed.lock().unwrap(), ["a", "b", "c", "d", "e"]);
        assert_eq!(
            remote.batches.load(std::sync::atomic::Ordering::Relaxed),
            BATCHES_REFUSED
        );
        served.abort();
    }

    /// A logic that answers Connect and RenewOnline with something to compress.
    struct Answers;

    #[async_trait]
    impl LogicService for Answers {
        async fn connect(&self, _: ConnectReq) -> Result<ConnectReply, Status> {
            Ok(ConnectReply {
                key: "k".repeat(64),
                ..Default::default()
            })
        }
        async fn disconnect(&self, _: DisconnectReq) -> Result<DisconnectReply, Status> {
            Ok(DisconnectReply::default())
        }
        async fn heartbeat(&self, _: HeartbeatReq) -> Result<HeartbeatReply, Status> {
            Ok(HeartbeatReply::default())
        }
        async fn renew_online(&self, _: OnlineReq) -> Result<OnlineReply, Status> {
            let all_room_count = (0..100).map(|i| (format!("live://{i}"), i)).collect();
            Ok(OnlineReply { all_room_count })
        }
        async fn receive(&self, _: ReceiveReq) -> Result<ReceiveReply, Status> {
            Ok(ReceiveReply::default())
        }
    }

    /// Connect replies (one per client connection) come back uncompressed: gzip there cost
    /// logic and comet more CPU than the call itself. RenewOnline (every room's count, and
    /// gzip in goim's comet) stays compressed both ways.
    #[tokio::test]
    async fn only_renew_online_is_compressed() {
        let router =
            tonic::transport::Server::builder().add_service(logic_server(Arc::new(Answers)));
        let (ch, served) = serve(router).await;
        let remote = RemoteLogic::new(ch);
        let encoding = |m: &tonic::metadata::MetadataMap| {
            m.get("grpc-encoding")
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (mut c, _p) = remote.slot().await.unwrap();
        let r = c.connect(ConnectReq::default()).await.unwrap();
        assert_eq!(encoding(r.metadata()), None);
        assert_eq!(r.into_inner().key.len(), 64);
        let mut c = RemoteLogic::compressed(remote.slot().await.unwrap().0);
        let r = c.renew_online(OnlineReq::default()).await.unwrap();
        assert_eq!(encoding(r.metadata()).as_deref(), Some("gzip"));
        assert_eq!(r.into_inner().all_room_count.len(), 100);
        // And through the service as comet calls it.
        assert_eq!(
            remote
                .connect(ConnectReq::default())
                .await
                .unwrap()
                .key
                .len(),
            64
        );
        served.abort();
    }

    /// A logic that records Disconnects: each answers `has` for keys ending in an even digit,
    /// keys starting with "fail" fail, and (unless `batches`) it lacks `Disconnects` as a
    /// logic from before it.
    struct Leaves {
        batches: bool,
        left: Mutex<Vec<String>>,
        batch_calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl LogicService for Leaves {
        async fn connect(&self, _: ConnectReq) -> Result<ConnectReply, Status> {
            Ok(ConnectReply::default())
        }
        async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, Status> {
            if req.key.starts_with("fail") {
                return Err(Status::unavailable(format!("etcd down for {}", req.key)));
            }
            self.left.lock().unwrap().push(req.key.clone());
            let even = req.key.ends_with(['0', '2', '4', '6', '8']);
            Ok(DisconnectReply { has: even })
        }
        async fn disconnects(&self, req: DisconnectsReq) -> Result<DisconnectsReply, Status> {
            if !self.batches {
                return Err(Status::unimplemented("goim.logic.Logic/Disconnects"));
            }
            self.batch_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut results = Vec::new();
            for d in req.disconnects {
                results.push(self.disconnect(d).await.into());
            }
            Ok(DisconnectsReply { results })
        }
        async fn heartbeat(&self, _: HeartbeatReq) -> Result<HeartbeatReply, Status> {
            Ok(HeartbeatReply::default())
        }
        async fn renew_online(&self, _: OnlineReq) -> Result<OnlineReply, Status> {
            Ok(OnlineReply::default())
        }
        async fn receive(&self, _: ReceiveReq) -> Result<ReceiveReply, Status> {
            Ok(ReceiveReply::default())
        }
    }

    /// Connections closing at once reach logic in few `Disconnects` calls (one `Disconnect`
    /// each when logic lacks it), and each gets its own answer, failures included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disconnects_at_once_share_calls_and_keep_their_own_answers() {
        for batches in [true, false] {
            let logic = Arc::new(Leaves {
                batches,
                left: Mutex::default(),
                batch_calls: Default::default(),
            });
            let router =
                tonic::transport::Server::builder().add_service(logic_server(logic.clone()));
            let (ch, served) = serve(router).await;
            let remote = RemoteLogic::new(ch);
            let keys: Vec<String> = (0..600)
                .map(|i| match i % 50 {
                    0 => format!("fail{i}"),
                    _ => format!("k{i}"),
                })
                .collect();
            let calls: Vec<_> = keys
                .iter()
                .map(|k| {
                    let (remote, key) = (remote.clone(), k.clone());
                    tokio::spawn(async move {
                        let req = DisconnectReq {
                            key,
                            ..Default::default()
                        };
                        remote.disconnect(req).await
                    })
                })
                .collect();
            for (k, c) in keys.iter().zip(calls) {
                match c.await.unwrap() {
                    Ok(r) => {
                        assert!(!k.starts_with("fail"), "{k} answered {r:?}");
                        assert_eq!(r.has, k.ends_with(['0', '2', '4', '6', '8']), "{k}");
                    }
                    Err(e) => assert_eq!(
                        (e.code(), e.message()),
                        (
                            tonic::Code::Unavailable,
                            format!("etcd down for {k}").as_str()
                        )
                    ),
                }
            }
            let mut left = logic.left.lock().unwrap().clone();
            left.sort();
            let mut want: Vec<String> = keys
                .iter()
                .filter(|k| !k.starts_with("fail"))
                .cloned()
                .collect();
            want.sort();
            assert_eq!(left, want, "batches: {batches}");
            let batch_calls = logic.batch_calls.load(std::sync::atomic::Ordering::SeqCst);
            if batches {
                assert!(
                    batch_calls > 0 && batch_calls < 600,
                    "{batch_calls} batch calls"
                );
            } else {
                assert_eq!(batch_calls, 0);
            }
            served.abort();
        }
    }

    /// A `Disconnects` call past the limit is refused whole, before anything is applied.
    #[tokio::test]
    async fn too_many_disconnects_in_one_call_are_refused() {
        let logic = Arc::new(Leaves {
            batches: true,
            left: Mutex::default(),
            batch_calls: Default::default(),
        });
        let router = tonic::transport::Server::builder().add_service(logic_server(logic.clone()));
        let (ch, served) = serve(router).await;
        let mut client = LogicClient::new(ch);
        let req = |n: usize| DisconnectsReq {
            disconnects: vec![DisconnectReq::default(); n],
        };
        let r = client
            .disconnects(req(crate::service::MAX_DISCONNECTS + 1))
            .await;
        let e = r.map(|r| r.into_inner().results.len()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(logic.left.lock().unwrap().is_empty());
        let r = client
            .disconnects(req(crate::service::MAX_DISCONNECTS))
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().results.len(),
            crate::service::MAX_DISCONNECTS
        );
        served.abort();
    }
}
