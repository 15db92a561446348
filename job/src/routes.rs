//! Which rooms each comet holds, so a room's batches go only to comets with members there
//! (goim sends every batch to every comet).
//!
//! Job watches each comet's rooms (`WatchRooms`): a snapshot, then every room that appears or
//! empties, each acknowledged once applied. A comet lets a room's first member in only after
//! every watching job acknowledged the room, so a push taken after a client joined reaches
//! its comet. Job trusts its view of a comet for [`LEASE`] after each ping the comet
//! answered; a comet that drops a watch waits that lease out before letting new rooms in.
//! A comet job has no valid view of (not watched yet, watch broken, lease run out, goim's
//! own comet) gets every room's batches, as in goim.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use goim_discovery::Backoff;
use goim_proto::comet::{RoomsAck, RoomsUpdate};
use goim_proto::service::CometService;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long job routes by a comet's rooms after a ping it answered.
pub const LEASE: Duration = Duration::from_secs(3);
/// Pings per lease: one lost or late still leaves the view valid.
const PINGS_PER_LEASE: u32 = 3;
/// A comet that does not serve `WatchRooms` (goim's own) is asked again after this long.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct View {
    rooms: HashSet<String>,
    /// Routed by until then; `None`: not yet (the snapshot is in, no ping answered since).
    valid_until: Option<Instant>,
}

/// Job's views of the comets' rooms.
#[derive(Debug, Default)]
pub struct Routes {
    views: Mutex<HashMap<String, View>>,
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, View>> {
        self.views.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `room`'s batches go to `comet`: it has members there, or job does not know.
    pub fn wants(&self, comet: &str, room: &str) -> bool {
        match self.lock().get(comet) {
            Some(v) if v.valid_until.is_some_and(|t| Instant::now() < t) => v.rooms.contains(room),
            _ => true,
        }
    }

    /// Whether job routes by what it knows of `comet` now.
    pub fn knows(&self, comet: &str) -> bool {
        self.lock()
            .get(comet)
            .is_some_and(|v| v.valid_until.is_some_and(|t| Instant::now() < t))
    }

    fn apply(&self, comet: &str, u: &RoomsUpdate) {
        let mut views = self.lock();
        let v = views.entry(comet.to_string()).or_default();
        if u.snapshot {
            v.rooms.clear();
        }
        for r in &u.removed {
            v.rooms.remove(r);
        }
        v.rooms.extend(u.added.iter().cloned());
    }

    fn extend(&self, comet: &str, until: Instant) {
        if let Some(v) = self.lock().get_mut(comet) {
            v.valid_until = Some(v.valid_until.map_or(until, |t| t.max(until)));
        }
    }

    /// Job no longer knows `comet`'s rooms: it gets every batch.
    pub fn forget(&self, comet: &str) {
        self.lock().remove(comet);
    }
}

/// Follows the rooms of every comet `names` lists, starting and stopping a [`follow`] task
/// as comets come and go (on each change of `changes`); ends when `changes` does.
pub async fn follow_all(
    routes: Arc<Routes>,
    dir: Arc<dyn crate::CometDirectory>,
    mut changes: Option<tokio::sync::watch::Receiver<u64>>,
) {
    let mut tasks: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    let mut set = tokio::task::JoinSet::new();
    loop {
        let names: HashSet<String> = dir.names().into_iter().collect();
        tasks.retain(|name, task| {
            let keep = names.contains(name);
            if !keep {
                task.abort();
                routes.forget(name);
            }
            keep
        });
        for name in names {
            if tasks.contains_key(&name) {
                continue;
            }
            let (d, n) = (dir.clone(), name.clone());
            let task = set.spawn(follow(routes.clone(), name.clone(), move || d.get(&n)));
            tasks.insert(name, task);
        }
        // Finished (aborted) tasks are reaped here, so the set does not grow.
        while set.try_join_next().is_some() {}
        let Some(c) = changes.as_mut() else {
            // A directory that never changes: the tasks run for as long as this one.
            return std::future::pending().await;
        };
        if c.changed().await.is_err() {
            return;
        }
    }
}

/// Follows one comet's rooms for as long as the task runs: watches, and watches again after
/// any failure (the view is forgotten meanwhile). `comet` finds the comet's current client.
pub async fn follow<F>(routes: Arc<Routes>, name: String, comet: F)
where
    F: Fn() -> Option<Arc<dyn CometService>>,
{
    let mut backoff = Backoff::standard();
    loop {
        let Some(c) = comet() else {
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        };
        let (acks, rx) = mpsc::channel(64);
        match c.watch_rooms(rx).await {
            Ok(updates) => {
                let took = watch(&routes, &name, acks, updates).await;
                routes.forget(&name);
                if took {
                    backoff.reset();
                }
                tracing::debug!(comet = %name, "room watch ended");
            }
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                routes.forget(&name);
                tokio::time::sleep(UNSUPPORTED_RETRY).await;
                continue;
            }
            Err(e) => {
                routes.forget(&name);
                tracing::debug!(comet = %name, error = %e, "room watch refused");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One watch: applies updates and acknowledges them, pings, and extends the view's lease
/// with each answer. Returns whether the snapshot came in.
async fn watch(
    routes: &Routes,
    name: &str,
    acks: mpsc::Sender<RoomsAck>,
    mut updates: mpsc::Receiver<RoomsUpdate>,
) -> bool {
    let lease_ms = LEASE.as_millis() as u32;
    let mut tick = tokio::time::interval(LEASE / PINGS_PER_LEASE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pings: VecDeque<(u64, Instant)> = VecDeque::new();
    let (mut next_ping, mut applied, mut sent) = (1u64, 0u64, 0u64);
    let mut synced = false;
    loop {
        tokio::select! {
            u = updates.recv() => {
                let Some(u) = u else { return synced };
                if u.snapshot {
                    synced = true;
                } else if !synced {
                    tracing::warn!(comet = %name, "room watch: a change before the snapshot");
                    return false;
                }
                routes.apply(name, &u);
                applied = applied.max(u.seq);
                if u.pong != 0 {
                    // Older pings went unanswered: their answers will not come.
                    while let Some(&(id, at)) = pings.front() {
                        if id > u.pong {
                            break;
                        }
                        pings.pop_front();
                        if id == u.pong {
                            routes.extend(name, at + LEASE);
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let ack = RoomsAck { seq: applied, ping: next_ping, lease_ms };
                // Never waits: a comet blocked sending updates must not block job's reading.
                // A ping not sent is one lease extension fewer.
                match acks.try_send(ack) {
                    Ok(()) => {
                        pings.push_back((next_ping, Instant::now()));
                        if pings.len() > 2 * PINGS_PER_LEASE as usize {
                            pings.pop_front();
                        }
                        next_ping += 1;
                        sent = applied;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return synced,
                    Err(mpsc::error::TrySendError::Full(_)) => {}
                }
                continue;
            }
        }
        if applied > sent {
            match acks.try_send(RoomsAck {
                seq: applied,
                ping: 0,
                lease_ms,
            }) {
                Ok(()) => sent = applied,
                Err(mpsc::error::TrySendError::Closed(_)) => return synced,
                // Sent with the next update or ping.
                Err(mpsc::error::TrySendError::Full(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use goim_proto::comet::*;
    use tonic::Status;

    /// A comet whose room watch the test drives: it hands over each watch's two ends.
    struct Fake {
        watches: mpsc::UnboundedSender<(mpsc::Receiver<RoomsAck>, mpsc::Sender<RoomsUpdate>)>,
        supported: bool,
    }

    #[async_trait]
    impl CometService for Fake {
        async fn push_msg(&self, _: PushMsgReq) -> Result<PushMsgReply, Status> {
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
        async fn watch_rooms(
            &self,
            acks: mpsc::Receiver<RoomsAck>,
        ) -> Result<mpsc::Receiver<RoomsUpdate>, Status> {
            if !self.supported {
                return Err(Status::unimplemented("watch rooms"));
            }
            let (tx, rx) = mpsc::channel(8);
            let _ = self.watches.send((acks, tx));
            Ok(rx)
        }
    }

    fn start(supported: bool) -> (Arc<Routes>, FakeEnds) {
        let (watches, rx) = mpsc::unbounded_channel();
        let fake: Arc<dyn CometService> = Arc::new(Fake { watches, supported });
        let routes = Arc::new(Routes::default());
        tokio::spawn(follow(routes.clone(), "c".into(), move || {
            Some(fake.clone())
        }));
        (routes, FakeEnds(rx))
    }

    struct FakeEnds(mpsc::UnboundedReceiver<(mpsc::Receiver<RoomsAck>, mpsc::Sender<RoomsUpdate>)>);

    fn update(
        seq: u64,
        snapshot: bool,
        added: &[&str],
        removed: &[&str],
        pong: u64,
    ) -> RoomsUpdate {
        RoomsUpdate {
            seq,
            snapshot,
            added: added.iter().map(|s| s.to_string()).collect(),
            removed: removed.iter().map(|s| s.to_string()).collect(),
            pong,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rooms_are_routed_by_the_view_only_while_its_lease_holds() {
        let (routes, mut ends) = start(true);
        let (mut acks, updates) = ends.0.recv().await.unwrap();
        // Nothing known yet: every room goes to the comet.
        assert!(routes.wants("c", "x"));
        updates.send(update(5, true, &["a"], &[], 0)).await.unwrap();
        let ping = acks.recv().await.unwrap();
        assert_eq!(ping.lease_ms, LEASE.as_millis() as u32);
        assert!(ping.ping > 0);
        // The snapshot is in, but no ping was answered since: still every room.
        assert!(routes.wants("c", "x"));
        updates
            .send(update(0, false, &[], &[], ping.ping))
            .await
            .unwrap();
        let ack = acks.recv().await.unwrap();
        assert_eq!((ack.seq, ack.ping), (5, 0));
        assert!(routes.knows("c"));
        assert!(routes.wants("c", "a"));
        assert!(!routes.wants("c", "x"));

        // A change is applied, then acknowledged.
        updates
            .send(update(6, false, &["x"], &["a"], 0))
            .await
            .unwrap();
        let ack = acks.recv().await.unwrap();
        assert_eq!(ack.seq, 6);
        assert!(routes.wants("c", "x"));
        assert!(!routes.wants("c", "a"));

        // Pings go unanswered: once the lease is over, every room goes there again.
        let answered = Instant::now();
        while routes.knows("c") {
            let _ = acks.recv().await.unwrap();
        }
        assert!(answered.elapsed() >= LEASE - LEASE / PINGS_PER_LEASE);
        assert!(routes.wants("c", "a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_watch_forgets_the_view_and_watches_again() {
        let (routes, mut ends) = start(true);
        let (mut acks, updates) = ends.0.recv().await.unwrap();
        updates.send(update(1, true, &["a"], &[], 0)).await.unwrap();
        let ping = acks.recv().await.unwrap();
        updates
            .send(update(0, false, &[], &[], ping.ping))
            .await
            .unwrap();
        let _ = acks.recv().await.unwrap();
        assert!(!routes.wants("c", "x"));
        drop(updates);
        // A new watch: until its snapshot and a ping's answer, every room goes there.
        let (_acks, updates) = ends.0.recv().await.unwrap();
        assert!(routes.wants("c", "x"));
        assert!(!routes.knows("c"));
        drop(updates);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_before_the_snapshot_ends_the_watch() {
        let (routes, mut ends) = start(true);
        let (_acks, updates) = ends.0.recv().await.unwrap();
        updates
            .send(update(1, false, &["a"], &[], 0))
            .await
            .unwrap();
        // The watch ends and starts again.
        let (_acks, _updates) = ends.0.recv().await.unwrap();
        assert!(routes.wants("c", "x"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_comet_without_room_watches_gets_every_room() {
        let (routes, _ends) = start(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(routes.wants("c", "anything"));
        assert!(!routes.knows("c"));
    }
}
