//! Online state in etcd: every key hangs on the lease of the comet holding the connection, so
//! a dead comet's presence vanishes with its lease. Connects and Disconnects go through the
//! batching [`Writer`]; room counts are split over several keys per comet so that no value
//! comes near etcd's request limit.

use std::collections::HashMap;

use async_trait::async_trait;
use goim_discovery::etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use goim_discovery::keys::RoomCounts;
use goim_discovery::{Client, Departures, Keys, LoadRecord, OnlineRecord, WatchCache};
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

use super::reader::Reader;
use super::writer::{WriteError, Writer, Written};
use crate::online::{sum_room_counts, Found, OnlineError, OnlineStore, Origin, UserKeysByServer};

fn unavailable(e: impl std::fmt::Display) -> OnlineError {
    OnlineError::Unavailable(e.to_string())
}

/// Seconds an adopted comet's presence outlives its last RenewOnline (goim renews every 10 s).
pub const ADOPTED_TTL: i64 = 30;

/// How long after a comet's load report vanished a lookup still says presence may be
/// incomplete: a comet whose lease lapsed while etcd stalled re-registers within about a
/// third of its lease TTL of etcd answering again.
pub const PRESENCE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Most serialized bytes of room counts in one etcd value (etcd refuses requests over 1.5 MiB).
const ROOM_CHUNK_BYTES: usize = 256 * 1024;
/// Most rooms one comet reports; beyond it the emptiest rooms are left out and counted.
pub const MAX_ROOMS_PER_COMET: usize = 100_000;

/// Online state in etcd.
pub struct EtcdOnline {
    client: Client,
    keys: Keys,
    rooms: WatchCache<RoomCounts>,
    /// Comets' load reports: one says when its comet is putting its presence back.
    loads: WatchCache<LoadRecord>,
    /// Comets whose load report vanished a moment ago (lease lapsed, or the comet died).
    departed: std::sync::Arc<Departures>,
    writer: Writer,
    /// Presence lookups, batched.
    reader: Reader,
    /// Leases logic holds for comets that keep none themselves (goim's own comets speak
    /// `goim.logic.Logic` but know nothing of etcd): kept alive by their RenewOnline calls.
    adopted: tokio::sync::Mutex<HashMap<String, i64>>,
    /// Rooms left out of comets' reports for being over [`MAX_ROOMS_PER_COMET`].
    pub rooms_left_out: Counter,
}

impl EtcdOnline {
    pub fn new(client: Client, keys: Keys, stop: CancellationToken) -> Self {
        let rooms = WatchCache::spawn(client.clone(), keys.rooms_prefix(), stop.clone());
        let loads: WatchCache<LoadRecord> =
            WatchCache::spawn(client.clone(), keys.loads(), stop.clone());
        let departed = std::sync::Arc::new(Departures::new(PRESENCE_GRACE));
        let l = loads.clone();
        Departures::follow(
            std::sync::Arc::downgrade(&departed),
            loads.subscribe(),
            move || l.names(),
        );
        EtcdOnline {
            reader: Reader::spawn(client.clone(), stop.clone()),
            writer: Writer::spawn(client.clone(), stop),
            client,
            keys,
            rooms,
            loads,
            departed,
            adopted: tokio::sync::Mutex::new(HashMap::new()),
            rooms_left_out: Counter::default(),
        }
    }

    pub fn synced(&self) -> bool {
        self.rooms.synced() && self.loads.synced()
    }

    /// The read a lookup adds to its transaction: how many load reports exist at the revision
    /// it reads presence at.
    fn loads_count_op(&self) -> TxnOp {
        TxnOp::get(
            self.keys.loads(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
    }

    /// Whether presence read when `loads_at_read` load reports existed can have missed a
    /// connection: some comet is putting its presence back, vanished a moment ago, or
    /// vanished at that revision and this mirror has not caught up yet.
    /// Runs on every key and user push: counts under the locks, copies nothing (departures
    /// are noted by their follower task; one it has not noted yet shows as fewer load reports
    /// than at its last look).
    fn presence_complete(&self, loads_at_read: Option<i64>) -> bool {
        let (live, pending) = self.loads.count(|r| r.presence_pending);
        let (listed, left) = self.departed.last_look();
        let caught_up = loads_at_read.is_some_and(|n| n >= live as i64);
        pending == 0 && caught_up && !left && live >= listed
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

    /// Forgets an adopted lease etcd no longer has (the comet was away longer than its TTL);
    /// the next call adopts a fresh one.
    async fn forget_adopted(&self, server: &str, lease: i64) {
        let mut adopted = self.adopted.lock().await;
        if adopted.get(server) == Some(&lease) {
            tracing::info!(%server, lease, "adopted lease expired; adopting a new one");
            adopted.remove(server);
        }
    }

    /// Keeps an adopted lease alive while its comet calls RenewOnline; forgets it once etcd
    /// has let it expire.
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
            self.forget_adopted(server, lease).await;
        }
        Ok(())
    }

    /// Runs a write on the comet's lease. An adopted lease that has expired is replaced once
    /// and the write retried; a comet's own dead lease is its problem (it re-registers).
    async fn write_on_lease<F>(&self, from: Origin<'_>, build: F) -> Result<Written, OnlineError>
    where
        F: Fn(i64) -> (Vec<TxnOp>, Vec<String>),
    {
        let lease = self.lease_for(from).await?;
        let (ops, keys) = build(lease);
        match self.writer.submit(ops, keys).await {
            Err(WriteError::LeaseNotFound) if from.lease == 0 => {
                self.forget_adopted(from.server, lease).await;
                let lease = self.lease_for(from).await?;
                let (ops, keys) = build(lease);
                self.writer.submit(ops, keys).await.map_err(unavailable)
            }
            r => r.map_err(unavailable),
        }
    }

    /// Removes a previous user's index entry for `key` (an account switch on this comet),
    /// while it is still on `lease`. Failing only leaves an entry the comet's user check
    /// makes harmless and its sweep removes, so a failure is logged, never the Connect's.
    async fn forget_previous_user(&self, old: i64, key: &str, lease: i64) {
        let k = self.keys.online_mid(old, key);
        let ops = vec![TxnOp::txn(
            Txn::new()
                .when([Compare::lease(k.as_str(), CompareOp::Equal, lease)])
                .and_then([TxnOp::delete(k.as_str(), None)]),
        )];
        if let Err(e) = self.writer.submit(ops, vec![k]).await {
            tracing::warn!(%key, old_mid = old, error = %e, "previous user's index entry left for the sweep");
        }
    }
}

/// The user a key belonged to until a Connect's put (its previous value) on `server`, when it
/// was another one than `mid`.
fn previous_user(put: Option<&TxnOpResponse>, server: &str, mid: i64) -> Option<i64> {
    let Some(TxnOpResponse::Put(p)) = put else {
        return None;
    };
    serde_json::from_slice::<OnlineRecord>(p.prev_key()?.value())
        .ok()
        .filter(|old| old.mid > 0 && old.mid != mid && old.comet == server)
        .map(|old| old.mid)
}

/// The count a lookup's load-report read returned.
fn loads_count(r: Option<TxnOpResponse>) -> Option<i64> {
    match r {
        Some(TxnOpResponse::Get(g)) => Some(g.count()),
        _ => None,
    }
}

/// A comet's room counts as etcd values of at most [`ROOM_CHUNK_BYTES`], in room order; at
/// most [`MAX_ROOMS_PER_COMET`] rooms (the fullest), and how many were left out.
pub fn room_chunks(counts: &HashMap<String, i32>) -> (Vec<RoomCounts>, usize) {
    let mut rooms: Vec<(&String, i32)> = counts.iter().map(|(r, n)| (r, *n)).collect();
    let mut left_out = 0;
    if rooms.len() > MAX_ROOMS_PER_COMET {
        rooms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        left_out = rooms.len() - MAX_ROOMS_PER_COMET;
        rooms.truncate(MAX_ROOMS_PER_COMET);
    }
    rooms.sort();
    let mut chunks = Vec::new();
    let mut chunk = RoomCounts::new();
    let mut bytes = 0;
    for (room, n) in rooms {
        // A room as JSON: its quoted id (escapes at most double it), a colon, up to 11
        // digits and a comma.
        let size = 2 * room.len() + 16;
        if bytes + size > ROOM_CHUNK_BYTES && !chunk.is_empty() {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
        bytes += size;
        chunk.insert(room.clone(), n);
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    (chunks, left_out)
}

#[async_trait]
impl OnlineStore for EtcdOnline {
    async fn add(
        &self,
        from: Origin<'_>,
        mid: i64,
        key: &str,
        room: &str,
    ) -> Result<i64, OnlineError> {
        let server = from.server;
        let rec = OnlineRecord {
            mid,
            comet: server.to_string(),
            room: room.to_string(),
        };
        let value = serde_json::to_vec(&rec).map_err(unavailable)?;
        let used = std::sync::atomic::AtomicI64::new(0);
        let written = self
            .write_on_lease(from, |lease| {
                used.store(lease, std::sync::atomic::Ordering::Relaxed);
                let opts = || Some(PutOptions::new().with_lease(lease));
                let mut keys = vec![self.keys.online_key(key)];
                // The previous value comes back with the write: no read per Connect.
                let with_prev = PutOptions::new().with_lease(lease).with_prev_key();
                let mut ops = vec![TxnOp::put(keys[0].as_str(), value.clone(), Some(with_prev))];
                if mid > 0 {
                    keys.push(self.keys.online_mid(mid, key));
                    ops.push(TxnOp::put(keys[1].as_str(), server, opts()));
                }
                (ops, keys)
            })
            .await?;
        // The key changed hands on this comet (account switch): the comet has kicked the old
        // connection, so the previous user's index entry goes. (On another comet the old
        // connection may live on; its own Disconnect removes it.)
        if let Some(old) = previous_user(written.responses.first(), server, mid) {
            let lease = used.load(std::sync::atomic::Ordering::Relaxed);
            self.forget_previous_user(old, key, lease).await;
        }
        Ok(written.revision)
    }

    async fn del(
        &self,
        from: Origin<'_>,
        mid: i64,
        key: &str,
        revision: i64,
    ) -> Result<bool, OnlineError> {
        // Delete only while the key is still on this comet's lease (named, or adopted by
        // logic) and, when the comet names it, still the version its Connect wrote: a
        // reconnect of the same key, here or elsewhere, has rewritten it. The user's index
        // entry is guarded on its own: it stays this connection's even when the key moved.
        let lease = match from.lease {
            0 => match self.adopted.lock().await.get(from.server) {
                Some(&l) => l,
                None => return Ok(false),
            },
            l => l,
        };
        let (online_key, mid_key) = (self.keys.online_key(key), self.keys.online_mid(mid, key));
        let guard = |k: &str| {
            let mut g = vec![Compare::lease(k, CompareOp::Equal, lease)];
            if revision > 0 {
                g.push(Compare::mod_revision(k, CompareOp::Equal, revision));
            }
            g
        };
        let mut ops = vec![TxnOp::delete(online_key.as_str(), None)];
        let mut otherwise = Vec::new();
        let mut keys = vec![online_key.clone()];
        if mid > 0 {
            let mid_del = TxnOp::txn(
                Txn::new()
                    .when(guard(&mid_key))
                    .and_then([TxnOp::delete(mid_key.as_str(), None)]),
            );
            ops.push(mid_del.clone());
            otherwise.push(mid_del);
            keys.push(mid_key.clone());
        }
        let guarded = TxnOp::txn(
            Txn::new()
                .when(guard(&online_key))
                .and_then(ops)
                .or_else(otherwise),
        );
        // Batched with other comets' Disconnects and Connects (a closing comet sends
        // thousands at once), not one transaction each.
        let r = self
            .writer
            .submit(vec![guarded], keys)
            .await
            .map_err(unavailable)?;
        Ok(matches!(r.responses.first(), Some(TxnOpResponse::Txn(t)) if t.succeeded()))
    }

    async fn servers_by_keys(
        &self,
        keys: &[String],
    ) -> Result<Found<UserKeysByServer>, OnlineError> {
        let mut ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::get(self.keys.online_key(k), None))
            .collect();
        ops.push(self.loads_count_op());
        let mut responses = self
            .reader
            .read(ops)
            .await
            .map_err(OnlineError::Unavailable)?;
        let loads_at_read = loads_count(responses.pop());
        let mut out = UserKeysByServer::new();
        for (key, resp) in keys.iter().zip(responses) {
            let TxnOpResponse::Get(g) = resp else {
                continue;
            };
            let Some(kv) = g.kvs().first() else { continue };
            match serde_json::from_slice::<OnlineRecord>(kv.value()) {
                Ok(rec) => out
                    .entry(rec.comet)
                    .or_default()
                    .push((key.clone(), rec.mid)),
                Err(e) => tracing::warn!(%key, error = %e, "skipping invalid online record"),
            }
        }
        Ok(Found {
            servers: out,
            complete: self.presence_complete(loads_at_read),
        })
    }

    async fn servers_by_mids(&self, mids: &[i64]) -> Result<Found<UserKeysByServer>, OnlineError> {
        let mut ops: Vec<TxnOp> = mids
            .iter()
            .map(|m| {
                TxnOp::get(
                    self.keys.online_mid_prefix(*m),
                    Some(GetOptions::new().with_prefix()),
                )
            })
            .collect();
        ops.push(self.loads_count_op());
        let mut responses = self
            .reader
            .read(ops)
            .await
            .map_err(OnlineError::Unavailable)?;
        let loads_at_read = loads_count(responses.pop());
        let mut out = UserKeysByServer::new();
        for (mid, resp) in mids.iter().zip(responses) {
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
        Ok(Found {
            servers: out,
            complete: self.presence_complete(loads_at_read),
        })
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
        let (chunks, left_out) = room_chunks(&counts);
        if left_out > 0 {
            self.rooms_left_out.inc_by(left_out as u64);
            tracing::warn!(%server, left_out, "room counts over the per-comet limit left out");
        }
        // `rooms/{server}/{i}`: only the chunks that changed are written, and chunks beyond
        // the current count are removed.
        let mut client = self.client.clone();
        for (i, chunk) in chunks.iter().enumerate() {
            let name = format!("{server}/{i}");
            if self
                .rooms
                .get(&name)
                .is_some_and(|e| &e.value == chunk && e.lease == lease)
            {
                continue;
            }
            let value = serde_json::to_vec(chunk).map_err(unavailable)?;
            client
                .put(
                    self.keys.rooms(&name),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await
                .map_err(unavailable)?;
        }
        let mine = format!("{server}/");
        // Names only: a snapshot would copy every comet's room counts on each renewal.
        for name in self.rooms.names() {
            let stale = name
                .strip_prefix(&mine)
                .is_some_and(|i| i.parse::<usize>().map_or(true, |i| i >= chunks.len()));
            // The single-record layout of earlier versions, too.
            if stale || name == server {
                client
                    .delete(self.keys.rooms(&name), None)
                    .await
                    .map_err(unavailable)?;
            }
        }
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
        self.add(from, mid, key, "").await.map(drop)
    }

    async fn room_counts(&self) -> Result<HashMap<String, i32>, OnlineError> {
        let snap = self.rooms.snapshot();
        Ok(sum_room_counts(snap.iter().map(|(_, e)| &e.value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goim_testkit::{wait_until, Etcd};

    async fn store(etcd: &Etcd) -> (EtcdOnline, Client, CancellationToken) {
        let client = goim_discovery::connect(&[etcd.endpoint()]).await.unwrap();
        let keys = Keys::new("t");
        let stop = CancellationToken::new();
        let s = EtcdOnline::new(client.clone(), keys, stop.clone());
        (s, client, stop)
    }

    #[test]
    fn room_chunks_stay_small_and_cover_every_room() {
        let counts: HashMap<String, i32> = (0..50_000)
            .map(|i| (format!("live://{i:0>200}"), 1 + i % 7))
            .collect();
        let (chunks, left_out) = room_chunks(&counts);
        assert_eq!(left_out, 0);
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(serde_json::to_vec(c).unwrap().len() <= ROOM_CHUNK_BYTES);
        }
        assert_eq!(sum_room_counts(chunks.iter()), counts);
        let many: HashMap<String, i32> = (0..MAX_ROOMS_PER_COMET as i32 + 10)
            .map(|i| (format!("r{i}"), i))
            .collect();
        let (chunks, left_out) = room_chunks(&many);
        assert_eq!(left_out, 10);
        let kept = sum_room_counts(chunks.iter());
        // The emptiest rooms are the ones left out.
        assert!(!kept.contains_key("r0") && kept.contains_key("r100009"));
    }

    /// 50,000 distinct rooms of up to 256 bytes on one comet: once one value over etcd's
    /// request limit, refused forever; now split, and the counts add up in logic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_thousand_rooms_on_one_comet() {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let (s, client, stop) = store(&etcd).await;
        let lease = client.clone().lease_grant(30, None).await.unwrap().id();
        let counts: HashMap<String, i32> = (0..50_000)
            .map(|i| (format!("live://{i:0>249}"), 2))
            .collect();
        s.renew_rooms(Origin::new("c", lease), counts.clone())
            .await
            .unwrap();
        let want = counts.len();
        tokio::task::spawn_blocking({
            let rooms = s.rooms.clone();
            move || {
                wait_until("room counts mirrored", || {
                    sum_room_counts(rooms.snapshot().iter().map(|(_, e)| &e.value)).len() == want
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(s.room_counts().await.unwrap(), counts);
        // Shrinking removes the chunks no longer needed.
        let few: HashMap<String, i32> = [("live://1".to_string(), 1)].into();
        s.renew_rooms(Origin::new("c", lease), few.clone())
            .await
            .unwrap();
        tokio::task::spawn_blocking({
            let rooms = s.rooms.clone();
            move || wait_until("old chunks removed", || rooms.snapshot().len() == 1)
        })
        .await
        .unwrap();
        assert_eq!(s.room_counts().await.unwrap(), few);
        stop.cancel();
    }

    /// goim's comet (no lease of its own) away longer than the adopted lease's TTL: its next
    /// Connect must adopt a fresh lease instead of failing until logic restarts.
    #[tokio::test]
    async fn an_expired_adopted_lease_is_replaced() {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let (s, mut client, stop) = store(&etcd).await;
        let goim = Origin::new("goim-comet", 0);
        s.add(goim, 1, "k1", "").await.unwrap();
        let first = *s.adopted.lock().await.get("goim-comet").unwrap();
        // What etcd does when the TTL passes without a renewal.
        client.lease_revoke(first).await.unwrap();
        let rev = s.add(goim, 1, "k2", "").await.unwrap();
        let second = *s.adopted.lock().await.get("goim-comet").unwrap();
        assert_ne!(first, second);
        let kv = client.get("/goim/t/online/key/k2", None).await.unwrap();
        assert_eq!(kv.kvs()[0].lease(), second);
        assert!(
            !s.del(goim, 1, "k2", rev - 1).await.unwrap(),
            "another version"
        );
        assert!(s.del(goim, 1, "k2", rev).await.unwrap());
        stop.cancel();
    }

    /// A client reconnects with the same key to the same comet while its old connection's
    /// Disconnect is still on the way: that late Disconnect must not remove the new presence.
    /// Waits until the store's mirror of load reports satisfies `f`.
    async fn until_loads(s: &EtcdOnline, f: impl Fn(&WatchCache<LoadRecord>) -> bool) {
        let mut changes = s.loads.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while !f(&s.loads) {
                changes.changed().await.unwrap();
            }
        })
        .await
        .expect("load reports not mirrored");
    }

    /// A key or user lookup says presence may be incomplete while a comet puts its presence
    /// back (its load report says so) and for a while after a comet's load report vanished.
    #[tokio::test]
    async fn lookups_say_when_presence_may_be_incomplete() {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let (s, mut client, stop) = store(&etcd).await;
        let lease = client.lease_grant(30, None).await.unwrap().id();
        s.add(Origin::new("c", lease), 5, "k", "").await.unwrap();
        let load = "/goim/t/load/c";
        for pending in [false, true, false] {
            let rec = LoadRecord {
                presence_pending: pending,
                ..Default::default()
            };
            let value = serde_json::to_vec(&rec).unwrap();
            let opts = PutOptions::new().with_lease(lease);
            client.put(load, value, Some(opts)).await.unwrap();
            until_loads(&s, |l| {
                l.get("c")
                    .is_some_and(|e| e.value.presence_pending == pending)
            })
            .await;
            let by_mid = s.servers_by_mids(&[5]).await.unwrap();
            assert_eq!(by_mid.servers["c"], vec![("k".to_string(), 5)]);
            assert_eq!(by_mid.complete, !pending, "pending {pending}");
            let by_key = s.servers_by_keys(&["k".into()]).await.unwrap();
            assert_eq!(by_key.servers["c"], vec![("k".to_string(), 5)]);
            assert_eq!(by_key.complete, !pending, "pending {pending}");
        }
        // The comet's load report vanishes (its lease lapsed; it will re-register).
        client.delete(load, None).await.unwrap();
        until_loads(&s, |l| l.get("c").is_none()).await;
        assert!(!s.servers_by_mids(&[5]).await.unwrap().complete);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_late_disconnect_spares_a_reconnect_of_the_same_key() {
        let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
        let (s, mut client, stop) = store(&etcd).await;
        let lease = client.lease_grant(30, None).await.unwrap().id();
        let comet = Origin::new("c", lease);
        let old = s.add(comet, 5, "k", "").await.unwrap();
        let new = s.add(comet, 5, "k", "").await.unwrap();
        assert!(!s.del(comet, 5, "k", old).await.unwrap());
        for key in ["/goim/t/online/key/k", "/goim/t/online/mid/5/k"] {
            assert_eq!(client.get(key, None).await.unwrap().count(), 1, "{key}");
        }
        assert!(s.del(comet, 5, "k", new).await.unwrap());
        for key in ["/goim/t/online/key/k", "/goim/t/online/mid/5/k"] {
            assert_eq!(client.get(key, None).await.unwrap().count(), 0, "{key}");
        }
        stop.cancel();
    }
}
