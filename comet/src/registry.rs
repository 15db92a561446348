//! A comet's presence in etcd (distributed mode): its lease, its registry record (unless the
//! operator writes it), its load report, the presence of its live connections after a lease
//! change, and the drain state the operator sets.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use goim_discovery::etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use goim_discovery::{
    Backoff, Client, CometRecord, CometState, Keys, LeaseHandle, LoadRecord, OnlineRecord,
    WatchCache, MAX_TXN_OPS,
};
use tokio_util::sync::CancellationToken;

use crate::channel::Channel;
use crate::server::Comet;
use crate::sweep::sweep;

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
        // Its own task: a sweep pages through etcd and must not hold up re-registering.
        tokio::spawn(self.clone().sweep_loop(stop.clone()));
        let mut lease = self.lease.clone();
        let mut current = 0;
        let mut renewing = false;
        let mut tick = tokio::time::interval(self.load_interval);
        let mut backoff = Backoff::standard();
        let mut draining = self.comet.draining_changes();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                // Published at once: logic stops offering a draining comet to clients.
                Ok(()) = draining.changed() => {
                    if current != 0 {
                        if let Err(e) = self.put_load(current, false).await {
                            tracing::warn!(error = %e, "load report failed");
                        }
                    }
                }
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
                            self.comet.metrics.registry_failures.inc();
                            tracing::warn!(lease = id, error = %e, "registering in etcd failed; retrying");
                            if !backoff.wait(&stop).await {
                                return;
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    if current != 0 {
                        if let Err(e) = self.put_load(current, false).await {
                            tracing::warn!(error = %e, "load report failed");
                        }
                    }
                }
            }
        }
    }

    /// `presence_pending`: the presence of this comet's connections is being put back.
    async fn put_load(
        &self,
        lease: i64,
        presence_pending: bool,
    ) -> Result<(), goim_discovery::etcd_client::Error> {
        let load = self.comet.load();
        let rec = LoadRecord {
            conn_count: load.conn_count,
            ip_count: load.ip_count,
            rooms: self.comet.shared.rooms.len() as u64,
            updated: now_ms(),
            presence_pending,
            draining: self.comet.is_draining(),
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
        // The load report first: job takes a comet as alive while it is there, and the
        // presence re-put below can take a while. Until it is done, logic tells the callers
        // of key and user pushes that presence is incomplete, and counts those pushes.
        self.put_load(lease, true).await?;
        let snapshot: Vec<_> = self
            .comet
            .buckets
            .iter()
            .flat_map(|b| b.channels())
            .collect();
        // Transactions of whole connections (at most 128 operations), remembering the
        // revision each connection's presence was written at.
        let mut written_at = vec![0i64; snapshot.len()];
        let mut n = 0;
        let mut start = 0;
        while start < snapshot.len() {
            let mut ops = Vec::new();
            let mut end = start;
            while end < snapshot.len() {
                let more = self.presence_ops(&snapshot[end], lease);
                if !ops.is_empty() && ops.len() + more.len() > MAX_TXN_OPS {
                    break;
                }
                ops.extend(more);
                end += 1;
            }
            n += ops.len();
            let r = self.client.clone().txn(Txn::new().and_then(ops)).await?;
            let rev = r.header().map_or(0, |h| h.revision());
            written_at[start..end].fill(rev);
            for ch in &snapshot[start..end] {
                ch.presence_revision
                    .store(rev, std::sync::atomic::Ordering::Relaxed);
            }
            start = end;
        }
        // A connection that closed while its presence was being re-put sent its Disconnect
        // too early to remove it: remove exactly what this re-put wrote for it (a later
        // Connect has another revision and stays), and put back the connection that took
        // its key over.
        for (ch, rev) in snapshot.iter().zip(written_at) {
            if ch.state().registered {
                continue;
            }
            let mut paths = vec![self.keys.online_key(&ch.key)];
            if ch.mid > 0 {
                paths.push(self.keys.online_mid(ch.mid, &ch.key));
            }
            for path in paths {
                let guarded = Txn::new()
                    .when([
                        Compare::lease(path.as_str(), CompareOp::Equal, lease),
                        Compare::mod_revision(path.as_str(), CompareOp::Equal, rev),
                    ])
                    .and_then([TxnOp::delete(path.as_str(), None)]);
                self.client.clone().txn(guarded).await?;
            }
            if let Some(successor) = self.comet.bucket(&ch.key).get(&ch.key) {
                let ops = self.presence_ops(&successor, lease);
                let r = self.client.clone().txn(Txn::new().and_then(ops)).await?;
                if let Some(h) = r.header() {
                    successor
                        .presence_revision
                        .store(h.revision(), std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        self.put_load(lease, false).await?;
        tracing::info!(lease, presence_ops = n, "registered in etcd");
        Ok(())
    }

    /// Sweeps presence no connection backs every `presence_sweep`, on the current lease.
    async fn sweep_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.comet.cfg.presence_sweep);
        // The lease and revision the previous sweep read at: a key goes only if it was
        // already there then (0: nothing is old enough yet).
        let mut last = (0, 0);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let lease = self.comet.lease();
            if lease == 0 {
                continue;
            }
            let older_than = if last.0 == lease { last.1 } else { 0 };
            match sweep(&self.client, &self.keys, &self.comet, lease, older_than).await {
                Ok(s) => {
                    last = (lease, s.revision);
                    self.comet.metrics.presence_swept.inc_by(s.removed);
                    if s.removed > 0 {
                        tracing::info!(removed = s.removed, "removed presence no connection backs");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "presence sweep failed"),
            }
        }
    }

    /// The presence puts of one connection on `lease` (its key, and its user's index entry).
    fn presence_ops(&self, ch: &Channel, lease: i64) -> Vec<TxnOp> {
        let name = self.comet.name();
        let opts = || Some(PutOptions::new().with_lease(lease));
        let rec = OnlineRecord {
            mid: ch.mid,
            comet: name.to_string(),
            room: ch.room().map(|r| r.id.to_string()).unwrap_or_default(),
        };
        let mut ops = vec![TxnOp::put(
            self.keys.online_key(&ch.key),
            serde_json::to_vec(&rec).unwrap_or_default(),
            opts(),
        )];
        if ch.mid > 0 {
            ops.push(TxnOp::put(
                self.keys.online_mid(ch.mid, &ch.key),
                name,
                opts(),
            ));
        }
        ops
    }

    /// Follows this comet's registry record: `draining` stops new clients and closes the
    /// current ones gradually; `drain_ms`, when set, is how long that takes.
    async fn follow_record(&self, stop: CancellationToken) {
        let cache: WatchCache<CometRecord> =
            WatchCache::spawn(self.client.clone(), self.keys.comets(), stop.clone());
        let mut changes = cache.subscribe();
        loop {
            let record = cache.get(self.comet.name());
            let draining = record
                .as_ref()
                .is_some_and(|e| e.value.state == CometState::Draining);
            if let Some(ms) = record
                .as_ref()
                .map(|e| e.value.drain_ms)
                .filter(|&ms| ms > 0)
            {
                let d = std::time::Duration::from_millis(ms);
                if d != self.comet.drain_period() {
                    tracing::info!(drain_ms = ms, "drain period changed");
                    self.comet.set_drain_period(d);
                }
            }
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
