//! Distributed mode's backends for logic: online state in etcd (every key on the owning comet's
//! lease, writes batched into transactions), nodes from the etcd registry, and the job ring.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use goim_discovery::etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use goim_discovery::keys::RoomCounts;
use goim_discovery::{
    Client, CometRecord, CometState, JobRecord, Keys, LoadRecord, OnlineRecord, WatchCache,
    MAX_TXN_OPS,
};
use goim_proto::grpc::{channel, RemoteJob};
use goim_proto::job::PushReply;
use goim_proto::logic::push_msg::Type as PushType;
use goim_proto::logic::PushMsg;
use goim_proto::service::JobService;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::nodes::{CometInstance, NodeSource};
use crate::online::{
    sum_room_counts, KeysByServer, OnlineError, OnlineStore, Origin, UserKeysByServer,
};

fn unavailable(e: impl std::fmt::Display) -> OnlineError {
    OnlineError::Unavailable(e.to_string())
}

/// A batch of puts from one Connect, and where to send the outcome.
struct Write {
    ops: Vec<TxnOp>,
    /// The keys it writes: etcd refuses a transaction that puts one key twice.
    keys: Vec<String>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Online state in etcd.
pub struct EtcdOnline {
    client: Client,
    keys: Keys,
    loads: WatchCache<LoadRecord>,
    rooms: WatchCache<RoomCounts>,
    writes: mpsc::Sender<Write>,
    /// Leases logic holds for comets that keep none themselves (goim's own comets speak
    /// `goim.logic.Logic` but know nothing of etcd): kept alive by their RenewOnline calls.
    adopted: tokio::sync::Mutex<HashMap<String, i64>>,
}

/// Seconds an adopted comet's presence outlives its last RenewOnline (goim renews every 10 s).
pub const ADOPTED_TTL: i64 = 30;

impl EtcdOnline {
    pub fn new(
        client: Client,
        keys: Keys,
        loads: WatchCache<LoadRecord>,
        stop: CancellationToken,
    ) -> Self {
        let rooms = WatchCache::spawn(client.clone(), keys.rooms_prefix(), stop.clone());
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(batch_writer(client.clone(), rx, stop));
        EtcdOnline {
            client,
            keys,
            loads,
            rooms,
            writes: tx,
            adopted: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn synced(&self) -> bool {
        self.rooms.synced() && self.loads.synced()
    }

    /// The lease a comet's state hangs on: the one it names (ours always do), or one logic
    /// holds for it (granted on first use).
    async fn lease_for(&self, from: Origin<'_>) -> Result<i64, OnlineError> {
        if from.lease != 0 {
            return Ok(from.lease);
        }
        let mut adopted = self.adopted.lock().await;
        if let Some(&l) = adopted.get(from.server) {
            return Ok(l);
        }
        let l = self
            .client
            .clone()
            .lease_grant(ADOPTED_TTL, None)
            .await
            .map_err(unavailable)?
            .id();
        tracing::info!(server = %from.server, lease = l, "holding a lease for a comet that keeps none");
        adopted.insert(from.server.to_string(), l);
        Ok(l)
    }

    /// The user a key belonged to until now on `server`, when it was another one than `mid`.
    async fn previous_user(
        &self,
        key: &str,
        server: &str,
        mid: i64,
    ) -> Result<Option<i64>, OnlineError> {
        let got = self
            .client
            .clone()
            .get(self.keys.online_key(key), None)
            .await
            .map_err(unavailable)?;
        let Some(kv) = got.kvs().first() else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<OnlineRecord>(kv.value())
            .ok()
            .filter(|old| old.mid > 0 && old.mid != mid && old.comet == server)
            .map(|old| old.mid))
    }

    /// Keeps an adopted lease alive while its comet calls RenewOnline; forgets it once etcd
    /// has let it expire (the next call adopts a fresh one).
    async fn renew_adopted(&self, server: &str) -> Result<(), OnlineError> {
        let Some(lease) = self.adopted.lock().await.get(server).copied() else {
            return Ok(());
        };
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(lease)
            .await
            .map_err(unavailable)?;
        keeper.keep_alive().await.map_err(unavailable)?;
        let alive = matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0);
        if !alive {
            self.adopted.lock().await.remove(server);
        }
        Ok(())
    }
}

/// Many concurrent Connects become one transaction: whatever is queued when etcd is free goes
/// in the next txn, up to etcd's 128 operations.
async fn batch_writer(client: Client, mut rx: mpsc::Receiver<Write>, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            w = rx.recv() => match w { Some(w) => w, None => return },
        };
        let mut keys: std::collections::HashSet<String> = first.keys.iter().cloned().collect();
        let mut n = first.ops.len();
        let mut batch = vec![first];
        while let Ok(w) = rx.try_recv() {
            // Full, or the same key again (two connects racing with one key): commit first.
            if n + w.ops.len() > MAX_TXN_OPS || w.keys.iter().any(|k| keys.contains(k)) {
                let (txn_ops, waiters) = take(&mut batch);
                commit(&client, txn_ops, waiters).await;
                n = 0;
                keys.clear();
            }
            n += w.ops.len();
            keys.extend(w.keys.iter().cloned());
            batch.push(w);
        }
        let (txn_ops, waiters) = take(&mut batch);
        commit(&client, txn_ops, waiters).await;
    }
}

fn take(batch: &mut Vec<Write>) -> (Vec<TxnOp>, Vec<oneshot::Sender<Result<(), String>>>) {
    let mut ops = Vec::new();
    let mut waiters = Vec::new();
    for w in batch.drain(..) {
        ops.extend(w.ops);
        waiters.push(w.done);
    }
    (ops, waiters)
}

async fn commit(
    client: &Client,
    ops: Vec<TxnOp>,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
) {
    if ops.is_empty() {
        return;
    }
    let r = client
        .clone()
        .txn(Txn::new().and_then(ops))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    for w in waiters {
        let _ = w.send(r.clone());
    }
}

/// Runs read operations in transactions of at most 128, returning every response in order.
async fn read_all(client: &Client, ops: Vec<TxnOp>) -> Result<Vec<TxnOpResponse>, OnlineError> {
    let mut out = Vec::with_capacity(ops.len());
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
        let r = client
            .clone()
            .txn(Txn::new().and_then(chunk))
            .await
            .map_err(unavailable)?;
        out.extend(r.op_responses());
    }
    Ok(out)
}

#[async_trait]
impl OnlineStore for EtcdOnline {
    async fn add(
        &self,
        from: Origin<'_>,
        mid: i64,
        key: &str,
        room: &str,
    ) -> Result<(), OnlineError> {
        let server = from.server;
        let lease = self.lease_for(from).await?;
        let rec = OnlineRecord {
            mid,
            comet: server.to_string(),
            room: room.to_string(),
        };
        let value = serde_json::to_vec(&rec).map_err(unavailable)?;
        let opts = || Some(PutOptions::new().with_lease(lease));
        let mut keys = vec![self.keys.online_key(key)];
        let mut ops = vec![TxnOp::put(keys[0].as_str(), value, opts())];
        if mid > 0 {
            keys.push(self.keys.online_mid(mid, key));
            ops.push(TxnOp::put(keys[1].as_str(), server, opts()));
        }
        // The key changes hands on this comet (account switch): the comet has kicked the old
        // connection, so the previous user's index entry goes in the same transaction. (On
        // another comet the old connection may live on; its own Disconnect removes it.)
        if let Some(old) = self.previous_user(key, server, mid).await? {
            let k = self.keys.online_mid(old, key);
            ops.push(TxnOp::delete(k.as_str(), None));
            keys.push(k);
        }
        let (done, wait) = oneshot::channel();
        self.writes
            .send(Write { ops, keys, done })
            .await
            .map_err(|_| unavailable("online writer stopped"))?;
        wait.await
            .map_err(|_| unavailable("online writer stopped"))?
            .map_err(unavailable)
    }

    async fn del(&self, from: Origin<'_>, mid: i64, key: &str) -> Result<bool, OnlineError> {
        // Delete only while the key is still on this comet's lease (named, or adopted by
        // logic): a reconnect elsewhere has moved it to another lease. The user's index entry
        // is guarded on its own: it stays this comet's even when the key moved on.
        let own = Some(from.lease).filter(|&l| l != 0);
        let adopted = self.adopted.lock().await.get(from.server).copied();
        for lease in [own, adopted].into_iter().flatten() {
            let (online_key, mid_key) = (self.keys.online_key(key), self.keys.online_mid(mid, key));
            let mut ops = vec![TxnOp::delete(online_key.as_str(), None)];
            let mut otherwise = Vec::new();
            if mid > 0 {
                ops.push(TxnOp::delete(mid_key.as_str(), None));
                otherwise.push(TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(mid_key.as_str(), CompareOp::Equal, lease)])
                        .and_then([TxnOp::delete(mid_key.as_str(), None)]),
                ));
            }
            let txn = Txn::new()
                .when([Compare::lease(online_key.as_str(), CompareOp::Equal, lease)])
                .and_then(ops)
                .or_else(otherwise);
            if self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(unavailable)?
                .succeeded()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn servers_by_keys(&self, keys: &[String]) -> Result<KeysByServer, OnlineError> {
        let ops = keys
            .iter()
            .map(|k| TxnOp::get(self.keys.online_key(k), None))
            .collect();
        let mut out = KeysByServer::new();
        for (key, resp) in keys.iter().zip(read_all(&self.client, ops).await?) {
            let TxnOpResponse::Get(g) = resp else {
                continue;
            };
            let Some(kv) = g.kvs().first() else { continue };
            match serde_json::from_slice::<OnlineRecord>(kv.value()) {
                Ok(rec) => out.entry(rec.comet).or_default().push(key.clone()),
                Err(e) => tracing::warn!(%key, error = %e, "skipping invalid online record"),
            }
        }
        Ok(out)
    }

    async fn servers_by_mids(&self, mids: &[i64]) -> Result<UserKeysByServer, OnlineError> {
        let ops = mids
            .iter()
            .map(|m| {
                TxnOp::get(
                    self.keys.online_mid_prefix(*m),
                    Some(GetOptions::new().with_prefix()),
                )
            })
            .collect();
        let mut out = UserKeysByServer::new();
        for (mid, resp) in mids.iter().zip(read_all(&self.client, ops).await?) {
            let TxnOpResponse::Get(g) = resp else {
                continue;
            };
            let prefix = self.keys.online_mid_prefix(*mid);
            for kv in g.kvs() {
                let (Ok(k), Ok(server)) = (
                    std::str::from_utf8(kv.key()),
                    std::str::from_utf8(kv.value()),
                ) else {
                    continue;
                };
                if let Some(key) = k.strip_prefix(&prefix) {
                    out.entry(server.to_string())
                        .or_default()
                        .push((key.to_string(), *mid));
                }
            }
        }
        Ok(out)
    }

    async fn renew_rooms(
        &self,
        from: Origin<'_>,
        counts: HashMap<String, i32>,
    ) -> Result<(), OnlineError> {
        let server = from.server;
        if from.lease == 0 {
            self.renew_adopted(server).await?;
        }
        let lease = self.lease_for(from).await?;
        if self
            .rooms
            .get(server)
            .is_some_and(|e| e.value == counts && e.lease == lease)
        {
            return Ok(());
        }
        let value = serde_json::to_vec(&counts).map_err(unavailable)?;
        self.client
            .clone()
            .put(
                self.keys.rooms(server),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn touch(&self, from: Origin<'_>, mid: i64, key: &str) -> Result<(), OnlineError> {
        // A comet with its own lease re-registers presence itself; for an adopted one the
        // heartbeat puts back a key that expired with a lapsed lease (goim's re-add on
        // heartbeat).
        if !self.adopted.lock().await.contains_key(from.server) {
            return Ok(());
        }
        let missing = self
            .client
            .clone()
            .get(self.keys.online_key(key), None)
            .await
            .map_err(unavailable)?
            .kvs()
            .is_empty();
        if !missing {
            return Ok(());
        }
        self.add(from, mid, key, "").await
    }

    async fn room_counts(&self) -> Result<HashMap<String, i32>, OnlineError> {
        let snap = self.rooms.snapshot();
        Ok(sum_room_counts(snap.iter().map(|(_, e)| &e.value)))
    }
}

/// Comets from the registry and their load reports.
#[derive(Clone)]
pub struct EtcdNodes {
    pub comets: WatchCache<CometRecord>,
    pub loads: WatchCache<LoadRecord>,
}

impl NodeSource for EtcdNodes {
    fn instances(&self) -> Vec<CometInstance> {
        self.comets
            .snapshot()
            .into_iter()
            .filter_map(|(name, e)| {
                // A registered comet with no load report is not running (yet, or any more).
                let load = self.loads.get(&name)?.value;
                let r = e.value;
                Some(CometInstance {
                    name,
                    region: r.region,
                    zone: r.zone,
                    grpc_addr: format!("grpc://{}", r.grpc),
                    addrs: r.addrs,
                    weight: r.weight,
                    draining: r.state == CometState::Draining,
                    conn_count: load.conn_count as i64,
                    ip_count: load.ip_count as i64,
                    updated: load.updated.saturating_mul(1_000_000),
                })
            })
            .collect()
    }
}

/// Consistent hashing of pushes onto the registered jobs: one room's messages always go to the
/// same job (so they keep their order and batch together); when jobs come and go only the
/// rooms of the moved ring segments move.
pub struct JobRing {
    jobs: WatchCache<JobRecord>,
    clients: Mutex<HashMap<String, (String, RemoteJob)>>,
}

/// Points per job on the ring.
const VNODES: u32 = 64;

fn ring_hash(s: &[u8]) -> u64 {
    cityhasher::hash::<u64>(s)
}

/// Picks the owner of `route` among `ids` (sorted or not): the first ring point at or after the
/// route's hash.
pub fn ring_pick<'a>(ids: &'a [String], route: &str) -> Option<&'a String> {
    let mut points: BTreeMap<u64, &String> = BTreeMap::new();
    for id in ids {
        for v in 0..VNODES {
            points.insert(ring_hash(format!("{id}#{v}").as_bytes()), id);
        }
    }
    let h = ring_hash(route.as_bytes());
    points
        .range(h..)
        .next()
        .or_else(|| points.iter().next())
        .map(|(_, id)| *id)
}

impl JobRing {
    pub fn new(jobs: WatchCache<JobRecord>) -> Self {
        JobRing {
            jobs,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn synced(&self) -> bool {
        self.jobs.synced()
    }

    fn client_for(&self, route: &str) -> Result<RemoteJob, Status> {
        let jobs = self.jobs.snapshot();
        let ids: Vec<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
        let id = ring_pick(&ids, route)
            .ok_or_else(|| Status::unavailable("no job registered in etcd"))?;
        let addr = jobs
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, e)| e.value.grpc.clone())
            .unwrap_or_default();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|k, _| ids.contains(k));
        if let Some((a, c)) = clients.get(id) {
            if *a == addr {
                return Ok(c.clone());
            }
        }
        let ch = channel(&addr)
            .map_err(|e| Status::unavailable(format!("job {id} address {addr}: {e}")))?;
        let c = RemoteJob::new(ch);
        clients.insert(id.clone(), (addr, c.clone()));
        Ok(c)
    }
}

/// What a push is routed by: the room, the first key, or the op (goim's Kafka keys).
pub fn route_of(m: &PushMsg) -> String {
    match PushType::try_from(m.r#type) {
        Ok(PushType::Room) => m.room.clone(),
        Ok(PushType::Push) => m.keys.first().cloned().unwrap_or_default(),
        _ => m.operation.to_string(),
    }
}

#[async_trait]
impl JobService for JobRing {
    async fn push(&self, msg: PushMsg) -> Result<PushReply, Status> {
        let job = self.client_for(&route_of(&msg))?;
        job.push(msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_stable_and_moves_little() {
        let two: Vec<String> = vec!["job-a".into(), "job-b".into()];
        let three: Vec<String> = vec!["job-a".into(), "job-b".into(), "job-c".into()];
        let rooms: Vec<String> = (0..1000).map(|i| format!("live://{i}")).collect();
        let mut moved = 0;
        let mut per = HashMap::new();
        for r in &rooms {
            let a = ring_pick(&two, r).unwrap();
            assert_eq!(a, ring_pick(&two, r).unwrap());
            let b = ring_pick(&three, r).unwrap();
            *per.entry(b.clone()).or_insert(0) += 1;
            if a != b {
                moved += 1;
                assert_eq!(b, "job-c", "a room only moves to the new job");
            }
        }
        assert!(moved > 150 && moved < 550, "moved {moved}");
        assert!(per.values().all(|&n| n > 150), "{per:?}");
        assert!(ring_pick(&[], "x").is_none());
    }
}
