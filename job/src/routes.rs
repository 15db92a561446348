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
    /// The follower that owns it: a follower replaced (its comet restarted) may still be
    /// running for a moment after it was stopped, and must not write over its successor.
    owner: u64,
    rooms: HashSet<String>,
    /// Routed by until then; `None`: not yet (the snapshot is in, no ping answered since).
    valid_until: Option<Instant>,
}

/// Job's views of the comets' rooms.
#[derive(Debug, Default)]
pub struct Routes {
    views: Mutex<HashMap<String, View>>,
    owners: std::sync::atomic::AtomicU64,
    /// This job's id under jobs/ in etcd, told to each comet it watches (empty: none).
    job: std::sync::OnceLock<String>,
}

impl Routes {
    /// Names this job in its acknowledgements from now on (once; later calls are ignored).
    pub fn set_job_id(&self, id: &str) {
        let _ = self.job.set(id.to_string());
    }

    fn job_id(&self) -> String {
        self.job.get().cloned().unwrap_or_default()
    }

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

    /// A new follower of `comet`: the view starts empty (not routed by) and is its alone.
    pub fn begin(&self, comet: &str) -> u64 {
        let owner = self
            .owners
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let view = View {
            owner,
            ..View::default()
        };
        self.lock().insert(comet.to_string(), view);
        owner
    }

    /// `comet`'s view, if `owner` still owns it.
    fn owned<'a>(
        views: &'a mut HashMap<String, View>,
        comet: &str,
        owner: u64,
    ) -> Option<&'a mut View> {
        views.get_mut(comet).filter(|v| v.owner == owner)
    }

    fn apply(&self, comet: &str, owner: u64, u: &RoomsUpdate) {
        let mut views = self.lock();
        let Some(v) = Self::owned(&mut views, comet, owner) else {
            return;
        };
        if u.snapshot {
            v.rooms.clear();
        }
        for r in &u.removed {
            v.rooms.remove(r);
        }
        v.rooms.extend(u.added.iter().cloned());
    }

    fn extend(&self, comet: &str, owner: u64, until: Instant) {
        if let Some(v) = Self::owned(&mut self.lock(), comet, owner) {
            v.valid_until = Some(v.valid_until.map_or(until, |t| t.max(until)));
        }
    }

    /// The follower's watch ended: nothing known until the next one's snapshot and ping.
    fn reset(&self, comet: &str, owner: u64) {
        if let Some(v) = Self::owned(&mut self.lock(), comet, owner) {
            v.rooms.clear();
            v.valid_until = None;
        }
    }

    /// Job no longer follows `comet`: it gets every batch.
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
    let mut tasks: HashMap<String, (Option<i64>, tokio::task::AbortHandle)> = HashMap::new();
    let mut set = tokio::task::JoinSet::new();
    loop {
        let names: HashMap<String, Option<i64>> = dir
            .names()
            .into_iter()
            .map(|n| {
                let i = dir.instance(&n);
                (n, i)
            })
            .collect();
        // A comet gone, or restarted under its name (a node lost, say, while the watch of
        // the old process still looks alive): its view goes at once.
        tasks.retain(|name, (instance, task)| {
            let keep = names.get(name) == Some(instance);
            if !keep {
                task.abort();
                routes.forget(name);
            }
            keep
        });
        for (name, instance) in names {
            if tasks.contains_key(&name) {
                continue;
            }
            let (d, n) = (dir.clone(), name.clone());
            let owner = routes.begin(&name);
            let task = set.spawn(follow(routes.clone(), name.clone(), owner, move || {
                d.get(&n)
            }));
            tasks.insert(name, (instance, task));
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
pub async fn follow<F>(routes: Arc<Routes>, name: String, owner: u64, comet: F)
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
                let took = watch(&routes, &name, owner, acks, updates).await;
                routes.reset(&name, owner);
                if took {
                    backoff.reset();
                }
                tracing::debug!(comet = %name, "room watch ended");
            }
            Err(e) if e.code() == tonic::Code::Unimplemented => {
                routes.reset(&name, owner);
                tokio::time::sleep(UNSUPPORTED_RETRY).await;
                continue;
            }
            Err(e) => {
                routes.reset(&name, owner);
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
    owner: u64,
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
                routes.apply(name, owner, &u);
                applied = applied.max(u.seq);
                if u.pong != 0 {
                    // Older pings went unanswered: their answers will not come.
                    while let Some(&(id, at)) = pings.front() {
                        if id > u.pong {
                            break;
                        }
                        pings.pop_front();
                        if id == u.pong {
                            routes.extend(name, owner, at + LEASE);
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let ack = RoomsAck { seq: applied, ping: next_ping, lease_ms, job: routes.job_id() };
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
                job: routes.job_id(),
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
pub(super) mod tests {
    use super::*;
    use async_trait::async_trait;
    use goim_proto::comet::*;
    use tonic::Status;

    /// A comet whose room watch the test drives: it hands over each watch's two ends.
    pub(super) struct Fake {
        pub(super) watches:
            mpsc::UnboundedSender<(mpsc::Receiver<RoomsAck>, mpsc::Sender<RoomsUpdate>)>,
        pub(super) supported: bool,
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
        let owner = routes.begin("c");
        tokio::spawn(follow(routes.clone(), "c".into(), owner, move || {
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

#[cfg(test)]
mod follow_all_tests {
    use super::tests::Fake;
    use super::*;
    use crate::CometDirectory;
    use std::sync::atomic::{AtomicI64, Ordering};

    type Ends = (mpsc::Receiver<RoomsAck>, mpsc::Sender<RoomsUpdate>);

    /// One comet "c" whose process (instance) the test changes.
    struct Dir {
        comet: Arc<dyn CometService>,
        instance: AtomicI64,
        changes: tokio::sync::watch::Sender<u64>,
    }

    impl CometDirectory for Dir {
        fn get(&self, _: &str) -> Option<Arc<dyn CometService>> {
            Some(self.comet.clone())
        }
        fn names(&self) -> Vec<String> {
            vec!["c".into()]
        }
        fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
            Some(self.changes.subscribe())
        }
        fn instance(&self, _: &str) -> Option<i64> {
            Some(self.instance.load(Ordering::SeqCst))
        }
    }

    /// Gives the view a snapshot (room "a") and answers a ping; returns the watch's ends,
    /// kept open.
    async fn synced(routes: &Routes, (mut acks, updates): Ends) -> Ends {
        let snapshot = RoomsUpdate {
            seq: 1,
            snapshot: true,
            added: vec!["a".into()],
            ..Default::default()
        };
        updates.send(snapshot).await.unwrap();
        let ping = acks.recv().await.unwrap().ping;
        let pong = RoomsUpdate {
            pong: ping,
            ..Default::default()
        };
        updates.send(pong).await.unwrap();
        while !routes.knows("c") {
            tokio::task::yield_now().await;
        }
        (acks, updates)
    }

    /// A comet restarted under its name (a new lease): what job knew of the old process is
    /// dropped at once, even while the old watch still looks alive, and the old watch can
    /// no longer write.
    #[tokio::test(start_paused = true)]
    async fn a_comet_restarted_under_its_name_is_learnt_anew() {
        let (watches, mut ends) = mpsc::unbounded_channel();
        let dir = Arc::new(Dir {
            comet: Arc::new(Fake {
                watches,
                supported: true,
            }),
            instance: AtomicI64::new(1),
            changes: tokio::sync::watch::channel(0).0,
        });
        let routes = Arc::new(Routes::default());
        let d: Arc<dyn CometDirectory> = dir.clone();
        tokio::spawn(follow_all(routes.clone(), d, dir.changes()));
        let (_old_acks, old) = synced(&routes, ends.recv().await.unwrap()).await;
        assert!(!routes.wants("c", "x"));

        dir.instance.store(2, Ordering::SeqCst);
        dir.changes.send_modify(|v| *v += 1);
        // At once: not when the old watch's lease runs out.
        let new = tokio::time::timeout(Duration::from_millis(100), ends.recv())
            .await
            .expect("a new watch at once")
            .unwrap();
        assert!(!routes.knows("c"));
        assert!(routes.wants("c", "x"));
        // Whatever the old watch still says is not taken.
        let late = RoomsUpdate {
            seq: 9,
            snapshot: true,
            pong: 1,
            ..Default::default()
        };
        let _ = old.send(late).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!routes.knows("c"));
        // The new process's snapshot and ping make the view again.
        synced(&routes, new).await;
        assert!(routes.wants("c", "a") && !routes.wants("c", "x"));
    }
}
