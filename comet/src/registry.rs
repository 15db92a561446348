//! A comet's presence in etcd (distributed mode): its lease, its registry record (unless the
//! operator writes it), its load report, the presence of its live connections after a lease
//! change, and the drain state the operator sets.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use goim_discovery::etcd_client::{PutOptions, Txn, TxnOp};
use goim_discovery::{
    Backoff, Client, CometRecord, CometState, Keys, LeaseHandle, LoadRecord, OnlineRecord,
    WatchCache, MAX_TXN_OPS,
};
use tokio_util::sync::CancellationToken;

use crate::server::Comet;

pub struct Registrar {
    pub comet: Arc<Comet>,
    pub client: Client,
    pub keys: Keys,
    /// What the comet writes under `comets/{name}` when it registers itself.
    pub record: CometRecord,
    /// Under the operator the record is the operator's; the comet only reads it.
    pub self_register: bool,
    pub lease: LeaseHandle,
    pub load_interval: Duration,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Registrar {
    /// Runs until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        let s = stop.clone();
        tokio::spawn(async move { me.follow_record(s).await });
        let mut lease = self.lease.clone();
        let mut current = 0;
        let mut renewing = false;
        let mut tick = tokio::time::interval(self.load_interval);
        let mut backoff = Backoff::standard();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                id = lease.changed_from(current) => {
                    let Some(id) = id else { return };
                    // New connections go on the new lease at once; the ones already here are
                    // moved by `register`.
                    self.comet.set_lease(id);
                    match self.register(id).await {
                        Ok(()) => {
                            current = id;
                            backoff.reset();
                            // Room counts go to logic only once they can name the lease.
                            if !std::mem::replace(&mut renewing, true) {
                                tokio::spawn(self.comet.clone().renew_online_loop());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(lease = id, error = %e, "registering in etcd failed; retrying");
                            if !backoff.wait(&stop).await {
                                return;
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    if current != 0 {
                        if let Err(e) = self.put_load(current).await {
                            tracing::warn!(error = %e, "load report failed");
                        }
                    }
                }
            }
        }
    }

    async fn put_load(&self, lease: i64) -> Result<(), goim_discovery::etcd_client::Error> {
        let load = self.comet.load();
        let rec = LoadRecord {
            conn_count: load.conn_count,
            ip_count: load.ip_count,
            rooms: self.comet.shared.rooms.len() as u64,
            updated: now_ms(),
        };
        let value = serde_json::to_vec(&rec).unwrap_or_default();
        self.client
            .clone()
            .put(
                self.keys.load(self.comet.name()),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    /// Puts everything the comet owns under a (new) lease: its record, its load and the
    /// presence of every live connection, so a comet whose lease expired while etcd was away
    /// becomes reachable again without its clients reconnecting.
    async fn register(&self, lease: i64) -> Result<(), goim_discovery::etcd_client::Error> {
        let name = self.comet.name().to_string();
        let opts = || Some(PutOptions::new().with_lease(lease));
        if self.self_register {
            let value = serde_json::to_vec(&self.record).unwrap_or_default();
            self.client
                .clone()
                .put(self.keys.comet(&name), value, opts())
                .await?;
        }
        let mut ops = Vec::new();
        for ch in self.comet.buckets.iter().flat_map(|b| b.channels()) {
            let rec = OnlineRecord {
                mid: ch.mid,
                comet: name.clone(),
                room: ch.room().map(|r| r.id.to_string()).unwrap_or_default(),
            };
            ops.push(TxnOp::put(
                self.keys.online_key(&ch.key),
                serde_json::to_vec(&rec).unwrap_or_default(),
                opts(),
            ));
            if ch.mid > 0 {
                ops.push(TxnOp::put(
                    self.keys.online_mid(ch.mid, &ch.key),
                    name.as_str(),
                    opts(),
                ));
            }
        }
        let n = ops.len();
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let chunk: Vec<TxnOp> = ops.by_ref().take(MAX_TXN_OPS).collect();
            self.client.clone().txn(Txn::new().and_then(chunk)).await?;
        }
        self.put_load(lease).await?;
        tracing::info!(lease, presence_ops = n, "registered in etcd");
        Ok(())
    }

    /// Follows this comet's registry record: `draining` stops new clients and closes the
    /// current ones gradually.
    async fn follow_record(&self, stop: CancellationToken) {
        let cache: WatchCache<CometRecord> =
            WatchCache::spawn(self.client.clone(), self.keys.comets(), stop.clone());
        let mut changes = cache.subscribe();
        loop {
            let draining = cache
                .get(self.comet.name())
                .is_some_and(|e| e.value.state == CometState::Draining);
            if draining != self.comet.is_draining() {
                tracing::info!(draining, "drain state changed");
                self.comet.set_draining(draining);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
        }
    }
}
