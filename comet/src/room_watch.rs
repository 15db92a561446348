//! Jobs watching which rooms this comet holds (`WatchRooms`), so that a room's batches come
//! here only while it has members here.
//!
//! It must be exact: a push accepted after a client was told it joined a room must reach
//! it. So a room's first member is let in only when every watching job has acknowledged
//! the room (applied it to its routes), or can no longer route by what it knew. A job trusts
//! its view of this comet for a lease after each ping this comet answered. A watcher that
//! falls behind or stops acknowledging is dropped, and new rooms then wait until the lease
//! of its last answered ping has run out: from then on that job sends this comet every
//! room's batches, until it watches again.
//!
//! A job that does not know this comet yet (its etcd watch has not seen it) sends it nothing
//! and has no watcher here. So in a cluster the comet also knows the jobs registered in etcd,
//! and a room's first member waits until each of them watches (or [`ACK_TIMEOUT`] passes,
//! counted in `goim_comet_rooms_unwatched_total`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use goim_proto::comet::{RoomsAck, RoomsUpdate};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How long a room's first member waits for a watcher's acknowledgement before the watcher
/// is dropped (and fenced out by its lease).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Events queued per watcher; a watcher this far behind is dropped.
pub const WATCH_QUEUE: usize = 16 * 1024;
/// Added to a dropped watcher's lease before new rooms go ahead without it: clocks of two
/// hosts run at slightly different rates.
const LEASE_MARGIN: Duration = Duration::from_millis(100);
/// The lease a job may claim (`RoomsAck.lease_ms`), bounded so a bad value cannot stall
/// joins for long or make the fence meaningless.
const LEASE_MIN: Duration = Duration::from_millis(100);
const LEASE_MAX: Duration = Duration::from_secs(30);
/// Room changes per update at most, so an update stays far below gRPC's message limit.
pub const UPDATE_ROOMS: usize = 4096;
/// Most job watches one comet serves at once. Every new room waits for every watcher's
/// acknowledgement, so a peer on the internal port that opened watches without end would slow
/// every join; past this a watch is refused (`RESOURCE_EXHAUSTED`), and that job sends this
/// comet every room batch, as goim does.
pub const MAX_WATCHERS: usize = 1024;

/// What a watcher is sent: a room appeared (`true`) or emptied, with its number; or the
/// answer to a ping.
#[derive(Debug)]
pub enum Event {
    Room(u64, Arc<str>, bool),
    Pong(u64),
}

/// Longest job id kept from a watcher's acknowledgement (a host name); a longer one is
/// ignored, as if unnamed.
const MAX_JOB_ID: usize = 256;

/// Why a watcher was dropped (`goim_comet_room_watchers_dropped_total{reason}`).
pub const DROP_LAGGING: &str = "lagging";
pub const DROP_UNACKED: &str = "unacked";

#[derive(Debug)]
struct Watcher {
    id: u64,
    /// The job's id, from its acknowledgements (empty: not said yet, or a job that predates
    /// it).
    job: String,
    /// Changes numbered up to this are in its snapshot.
    base: u64,
    acked: u64,
    tx: mpsc::Sender<Event>,
    /// When its last ping was answered, and the lease it claimed.
    pinged: Option<(Instant, Duration)>,
}

/// The jobs a room must wait for beside the watchers.
#[derive(Debug, Default)]
enum Jobs {
    /// Standalone: the job is in-process and knows this comet.
    #[default]
    Unchecked,
    /// In a cluster, before the comet's view of jobs/ in etcd is complete: like a job that
    /// does not watch yet.
    Unknown,
    /// The ids registered in etcd.
    Known(Vec<String>),
}

#[derive(Debug, Default)]
struct State {
    /// Number of the last room change.
    seq: u64,
    jobs: Jobs,
    /// Jobs that named themselves in a watch here, so know this comet, or were waited for
    /// once in vain (counted): neither holds rooms back again. Pruned to the jobs in etcd.
    seen: Vec<String>,
    watchers: Vec<Watcher>,
    /// New rooms wait until then: a dropped watcher's job may still route by its old view.
    fence: Option<Instant>,
    next_id: u64,
}

/// The watchers of one comet's rooms.
#[derive(Debug)]
pub struct Watchers {
    state: Mutex<State>,
    /// Bumped on every acknowledgement and drop: waiting joins look again.
    changed: watch::Sender<u64>,
    dropped: DropCounter,
    /// Rooms let in before every job in etcd watched (`goim_comet_rooms_unwatched_total`).
    unwatched: prometheus_client::metrics::counter::Counter,
}

/// Dropped watchers by reason (`goim_comet_room_watchers_dropped_total`).
pub type DropCounter = prometheus_client::metrics::family::Family<
    crate::metrics::Reason,
    prometheus_client::metrics::counter::Counter,
>;

impl Default for Watchers {
    fn default() -> Self {
        Self::counting(DropCounter::default(), Default::default())
    }
}

impl State {
    /// A job registered in etcd has no watcher here: it may not know this comet. Watchers
    /// that have not named their job stand in for missing ones (jobs from before `job`).
    fn jobs_missing(&self) -> bool {
        match &self.jobs {
            Jobs::Unchecked => false,
            Jobs::Unknown => true,
            Jobs::Known(_) => {
                let anonymous = self.watchers.iter().filter(|w| w.job.is_empty()).count();
                self.missing().count() > anonymous
            }
        }
    }

    /// Jobs in etcd that never watched here.
    fn missing(&self) -> impl Iterator<Item = &String> {
        let ids = match &self.jobs {
            Jobs::Known(ids) => ids.as_slice(),
            _ => &[],
        };
        ids.iter()
            .filter(|id| !self.seen.contains(id) && !self.watchers.iter().any(|w| w.job == **id))
    }

    /// Marks `job` as having watched, if it is one of the jobs in etcd (so `seen` holds
    /// only those, whatever names watchers send).
    fn saw(&mut self, job: &str) {
        let known = matches!(&self.jobs, Jobs::Known(ids) if ids.iter().any(|id| id == job));
        if known && !self.seen.iter().any(|s| s == job) {
            self.seen.push(job.to_string());
        }
    }
}

impl Watchers {
    pub fn counting(
        dropped: DropCounter,
        unwatched: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Watchers {
            state: Mutex::default(),
            changed: watch::channel(0).0,
            dropped,
            unwatched,
        }
    }

    /// In a cluster: the jobs registered in etcd (`None` until that view is complete). New
    /// rooms wait until each of them watches this comet.
    pub fn set_jobs(&self, jobs: Option<Vec<String>>) {
        let mut st = self.lock();
        if let Some(ids) = &jobs {
            // Only jobs still registered: job ids come and go with their pods.
            st.seen.retain(|s| ids.contains(s));
        }
        st.jobs = jobs.map_or(Jobs::Unknown, Jobs::Known);
        // Jobs that named themselves before they were listed here.
        let named: Vec<String> = st.watchers.iter().map(|w| w.job.clone()).collect();
        for job in named.iter().filter(|j| !j.is_empty()) {
            st.saw(job);
        }
        drop(st);
        self.changed.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A room appeared or emptied: numbered and queued for every watcher. The caller holds
    /// the room map's lock, so changes are numbered in the order they happened.
    pub(crate) fn room_changed(&self, room: &Arc<str>, present: bool) -> u64 {
        let mut st = self.lock();
        st.seq += 1;
        let seq = st.seq;
        if !st.watchers.is_empty() {
            let mut lagging = Vec::new();
            for w in &st.watchers {
                if w.tx
                    .try_send(Event::Room(seq, room.clone(), present))
                    .is_err()
                {
                    lagging.push(w.id);
                }
            }
            for id in lagging {
                self.drop_watcher(&mut st, id, DROP_LAGGING);
            }
        }
        seq
    }

    /// A new watcher; `rooms` (read under the room map's lock, as is this call) is its
    /// snapshot. Returns its id, the number its snapshot is at, and its events.
    pub(crate) fn watch(&self) -> (u64, u64, mpsc::Receiver<Event>) {
        let mut st = self.lock();
        st.next_id += 1;
        let (id, base) = (st.next_id, st.seq);
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        st.watchers.push(Watcher {
            id,
            job: String::new(),
            base,
            acked: base,
            tx,
            pinged: None,
        });
        drop(st);
        // It may be the watch a waiting room needs from a job.
        self.changed.send_modify(|v| *v += 1);
        (id, base, rx)
    }

    /// A watcher's acknowledgement (and ping).
    pub fn ack(&self, id: u64, ack: &RoomsAck) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let seq = st.seq;
        let Some(w) = st.watchers.iter_mut().find(|w| w.id == id) else {
            return;
        };
        // Never past what was sent: a bad value must not let a room in unacknowledged.
        w.acked = w.acked.max(ack.seq.min(seq));
        let named = w.job != ack.job && ack.job.len() <= MAX_JOB_ID;
        if named {
            w.job.clone_from(&ack.job);
        }
        let mut lagging = false;
        if ack.ping != 0 {
            let lease = Duration::from_millis(ack.lease_ms.into()).clamp(LEASE_MIN, LEASE_MAX);
            w.pinged = Some((Instant::now(), lease));
            lagging = w.tx.try_send(Event::Pong(ack.ping)).is_err();
        }
        if named {
            st.saw(&ack.job);
        }
        if lagging {
            self.drop_watcher(st, id, DROP_LAGGING);
        }
        drop(guard);
        self.changed.send_modify(|v| *v += 1);
    }

    /// A watcher that went (its stream ended): its job knows it lost its view.
    pub fn unwatch(&self, id: u64) {
        let mut st = self.lock();
        // Its job may not have noticed yet: fenced like any drop.
        self.drop_watcher(&mut st, id, "");
    }

    fn drop_watcher(&self, st: &mut State, id: u64, reason: &'static str) {
        let Some(i) = st.watchers.iter().position(|w| w.id == id) else {
            return;
        };
        let w = st.watchers.swap_remove(i);
        if let Some((at, lease)) = w.pinged {
            let until = at + lease + LEASE_MARGIN;
            st.fence = Some(st.fence.map_or(until, |f| f.max(until)));
        }
        if !reason.is_empty() {
            self.dropped
                .get_or_create(&crate::metrics::Reason { reason })
                .inc();
            tracing::warn!(watcher = id, reason, "room watcher dropped");
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Waits until every job routes a room change numbered `seq` (a room's appearance):
    /// each watcher acknowledged it or had it in its snapshot, every dropped watcher's
    /// lease ran out, and every job registered in etcd watches. A watcher that does not
    /// acknowledge within [`ACK_TIMEOUT`] is dropped; a job that does not watch by then is
    /// given up on (counted).
    pub async fn announced(&self, seq: u64) {
        let mut changes = self.changed.subscribe();
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut jobs_given_up = false;
        loop {
            let fence = {
                let st = self.lock();
                let waiting = st.watchers.iter().any(|w| w.base < seq && w.acked < seq)
                    || (!jobs_given_up && st.jobs_missing());
                match st.fence.filter(|&f| f > Instant::now()) {
                    Some(f) => Some(f),
                    None if !waiting => return,
                    None => None,
                }
            };
            if let Some(f) = fence {
                tokio::time::sleep_until(f).await;
                continue;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let mut st = self.lock();
                let late: Vec<u64> = st
                    .watchers
                    .iter()
                    .filter(|w| w.base < seq && w.acked < seq)
                    .map(|w| w.id)
                    .collect();
                for id in late {
                    self.drop_watcher(&mut st, id, DROP_UNACKED);
                }
                if !jobs_given_up && st.jobs_missing() {
                    jobs_given_up = true;
                    self.unwatched.inc();
                    let missing: Vec<String> = st.missing().cloned().collect();
                    st.seen.extend(missing);
                    tracing::warn!(
                        "a new room went ahead without a watch from every job in etcd: its \
                         batches may miss members here until they watch"
                    );
                }
            }
        }
    }

    /// Whether a room change numbered `seq` is routed by every job already (the check
    /// [`Watchers::announced`] starts with, without waiting).
    pub fn is_announced(&self, seq: u64) -> bool {
        let st = self.lock();
        st.fence.is_none_or(|f| f <= Instant::now())
            && !st.watchers.iter().any(|w| w.base < seq && w.acked < seq)
            && !st.jobs_missing()
    }

    /// Watchers now.
    pub fn len(&self) -> usize {
        self.lock().watchers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether another watch may start: checked before it does, so watches that arrive
    /// together may pass it together (the gRPC server's concurrent-stream limit bounds them).
    pub fn admit_another(&self) -> bool {
        self.len() < MAX_WATCHERS
    }
}

/// A room kept on this comet (counted as a member) while a connection is about to join it:
/// the room is made known to every watching job first, so the wait holds nothing back from
/// the connection (a `JOIN` holds the room's batches while it recovers).
#[derive(Debug, Default)]
pub struct RoomHold(Option<(Arc<crate::rooms::Rooms>, Arc<crate::rooms::RoomInfo>)>);

impl RoomHold {
    /// Holds `room` ("" holds nothing) and waits until every watching job routes it here.
    pub async fn announce(rooms: &Arc<crate::rooms::Rooms>, room: &str) -> RoomHold {
        if room.is_empty() {
            return RoomHold(None);
        }
        let info = rooms.join(room);
        let hold = RoomHold(Some((rooms.clone(), info.clone())));
        if !rooms.watchers.is_announced(info.added) {
            // Boxed: rare, and inline it would grow every connection's task.
            Box::pin(rooms.watchers.announced(info.added)).await;
        }
        hold
    }
}

impl Drop for RoomHold {
    fn drop(&mut self) {
        if let Some((rooms, info)) = self.0.take() {
            rooms.leave(&info);
        }
    }
}

/// Serves one watcher (a `WatchRooms` stream): its snapshot, then the changes, while taking
/// its acknowledgements; until either side goes.
pub async fn serve(
    rooms: Arc<crate::rooms::Rooms>,
    mut acks: mpsc::Receiver<RoomsAck>,
    tx: mpsc::Sender<RoomsUpdate>,
) {
    let (id, snapshot, base, mut events) = rooms.watch();
    let run = async {
        // The snapshot first, in pieces a gRPC message holds; the first one resets.
        let mut pieces: Vec<&[String]> = snapshot.chunks(UPDATE_ROOMS).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        for (i, piece) in pieces.into_iter().enumerate() {
            let u = RoomsUpdate {
                seq: base,
                snapshot: i == 0,
                added: piece.to_vec(),
                ..Default::default()
            };
            tx.send(u).await.ok()?;
        }
        loop {
            tokio::select! {
                u = next_update(&mut events) => tx.send(u?).await.ok()?,
                a = acks.recv() => rooms.watchers.ack(id, &a?),
            }
        }
    };
    let _: Option<()> = run.await;
    rooms.watchers.unwatch(id);
}

/// Takes what is queued for a watcher now (waiting for the first), as one update: the last
/// change of each room wins, and the latest pong. `None` when the watcher was dropped.
pub async fn next_update(events: &mut mpsc::Receiver<Event>) -> Option<RoomsUpdate> {
    let mut e = events.recv().await?;
    let mut rooms: HashMap<Arc<str>, bool> = HashMap::new();
    let mut u = RoomsUpdate::default();
    loop {
        match e {
            Event::Room(seq, room, present) => {
                u.seq = seq;
                rooms.insert(room, present);
            }
            Event::Pong(p) => u.pong = p,
        }
        if rooms.len() >= UPDATE_ROOMS {
            break;
        }
        match events.try_recv() {
            Ok(next) => e = next,
            Err(_) => break,
        }
    }
    for (room, present) in rooms {
        if present {
            u.added.push(room.to_string());
        } else {
            u.removed.push(room.to_string());
        }
    }
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rooms::Rooms;

    fn ack(seq: u64, ping: u64) -> RoomsAck {
        RoomsAck {
            seq,
            ping,
            lease_ms: 2000,
            job: String::new(),
        }
    }

    fn ack_from(job: &str, seq: u64) -> RoomsAck {
        RoomsAck {
            job: job.into(),
            ..ack(seq, 0)
        }
    }

    /// In a cluster a new room also waits for every job registered in etcd to watch this
    /// comet: a job that has not seen the comet yet would skip it (found by a bench run that
    /// lost a room's first pushes as `no_comets`). A watcher that has not named its job
    /// stands in for one (jobs from before the name).
    #[tokio::test(start_paused = true)]
    async fn a_new_room_waits_until_every_job_in_etcd_watches() {
        let rooms = Rooms::default();
        // Standalone: nothing to wait for.
        assert!(rooms.watchers.is_announced(rooms.join("live://0").added));
        // Before the comet has listed the jobs: wait.
        rooms.watchers.set_jobs(None);
        assert!(!rooms.watchers.is_announced(rooms.join("live://1").added));
        rooms.watchers.set_jobs(Some(Vec::new()));
        assert!(rooms.watchers.is_announced(rooms.join("live://2").added));

        rooms
            .watchers
            .set_jobs(Some(vec!["j1".into(), "j2".into()]));
        let room = rooms.join("live://3");
        let wait = rooms.watchers.announced(room.added);
        tokio::pin!(wait);
        assert!(futures_poll(&mut wait).await.is_none(), "no job watches");
        let (id1, _, _, _e1) = rooms.watch();
        rooms.watchers.ack(id1, &ack_from("j1", room.added));
        assert!(futures_poll(&mut wait).await.is_none(), "j2 does not watch");
        let (id2, _, _, _e2) = rooms.watch();
        // Unnamed yet: stands in for j2.
        assert!(futures_poll(&mut wait).await.is_some());
        let next = rooms.join("live://4");
        rooms.watchers.ack(id1, &ack_from("j1", next.added));
        rooms.watchers.ack(id2, &ack_from("j2", next.added));
        assert!(rooms.watchers.is_announced(next.added));
        // A third job registers: new rooms wait for it too.
        rooms
            .watchers
            .set_jobs(Some(vec!["j1".into(), "j2".into(), "j3".into()]));
        assert!(!rooms.watchers.is_announced(next.added));
        assert_eq!(rooms.watchers.unwatched.get(), 0);
    }

    /// A job in etcd that never watches holds a new room for [`ACK_TIMEOUT`] at most; the
    /// room then goes ahead, counted.
    #[tokio::test(start_paused = true)]
    async fn a_job_that_never_watches_is_waited_for_once_and_counted() {
        let rooms = Rooms::default();
        rooms.watchers.set_jobs(Some(vec!["gone".into()]));
        let start = Instant::now();
        rooms.watchers.announced(rooms.join("live://1").added).await;
        assert!(start.elapsed() >= ACK_TIMEOUT);
        assert_eq!(rooms.watchers.unwatched.get(), 1);
        // Names a watcher sends that are not jobs in etcd are not kept.
        let (id, _, _, _e) = rooms.watch();
        for i in 0..100 {
            rooms
                .watchers
                .ack(id, &ack_from(&format!("stranger-{i}"), 0));
        }
        rooms
            .watchers
            .ack(id, &ack_from(&"x".repeat(MAX_JOB_ID + 1), 0));
        assert_eq!(rooms.watchers.lock().seen, ["gone"]);
        assert_eq!(rooms.watchers.lock().watchers[0].job, "stranger-99");
        rooms.watchers.unwatch(id);
        // Once: later rooms do not wait for it again.
        assert!(rooms.watchers.is_announced(rooms.join("live://2").added));
        // A job that watched once knows this comet: its watch ending holds nothing back
        // beyond its lease (none here: it never pinged).
        rooms
            .watchers
            .set_jobs(Some(vec!["gone".into(), "j".into()]));
        let (id, _, _, _events) = rooms.watch();
        rooms.watchers.ack(id, &ack_from("j", 0));
        rooms.watchers.unwatch(id);
        assert!(rooms.watchers.is_announced(rooms.join("live://3").added));
        assert_eq!(rooms.watchers.unwatched.get(), 1);
    }

    fn dropped(w: &Watchers, reason: &'static str) -> u64 {
        w.dropped
            .get_or_create(&crate::metrics::Reason { reason })
            .get()
    }

    #[test]
    fn watches_past_the_cap_are_refused_until_one_ends() {
        let rooms = Rooms::default();
        let held: Vec<_> = (0..MAX_WATCHERS).map(|_| rooms.watch()).collect();
        assert!(!rooms.watchers.admit_another());
        rooms.watchers.unwatch(held[0].0);
        assert!(rooms.watchers.admit_another());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_room_waits_until_every_watcher_has_it() {
        let rooms = Rooms::default();
        let old = rooms.join("live://old");
        let (id, snapshot, base, mut events) = rooms.watch();
        assert_eq!(snapshot, ["live://old"]);
        // In the snapshot: nothing to wait for.
        assert!(rooms.watchers.is_announced(old.added));

        let new = rooms.join("live://new");
        assert!(new.added > base);
        assert!(!rooms.watchers.is_announced(new.added));
        let wait = rooms.watchers.announced(new.added);
        tokio::pin!(wait);
        assert!(
            futures_poll(&mut wait).await.is_none(),
            "not acknowledged yet"
        );
        let u = next_update(&mut events).await.unwrap();
        assert_eq!(
            (u.seq, u.added.as_slice()),
            (new.added, &["live://new".to_string()][..])
        );
        rooms.watchers.ack(id, &ack(u.seq, 0));
        wait.await;
        assert!(rooms.watchers.is_announced(new.added));
        // Joining a room that is there already waits for nothing.
        let again = rooms.join("live://new");
        assert!(rooms.watchers.is_announced(again.added));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_watcher_is_dropped_and_its_lease_waited_out() {
        let rooms = Rooms::default();
        let (id, _, _, _events) = rooms.watch();
        let pinged = Instant::now();
        rooms.watchers.ack(id, &ack(0, 1));
        let room = rooms.join("live://1");
        rooms.watchers.announced(room.added).await;
        // Its job routed by its old view for 2 s after the ping: the room waited that out.
        assert!(pinged.elapsed() >= Duration::from_secs(2) + LEASE_MARGIN);
        assert!(pinged.elapsed() < Duration::from_secs(3));
        assert!(rooms.watchers.is_empty());
        assert_eq!(dropped(&rooms.watchers, DROP_UNACKED), 1);
        // The fence is over: later rooms go at once.
        let later = rooms.join("live://2");
        assert!(rooms.watchers.is_announced(later.added));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_that_never_pinged_leaves_no_fence() {
        let rooms = Rooms::default();
        let (id, _, _, _events) = rooms.watch();
        rooms.watchers.unwatch(id);
        let room = rooms.join("live://1");
        // Its job never routed by it (no ping answered): nothing to wait out.
        assert!(rooms.watchers.is_announced(room.added));
    }

    #[tokio::test]
    async fn changes_are_coalesced_in_order_with_the_last_pong() {
        let rooms = Rooms::default();
        let (id, _, _, mut events) = rooms.watch();
        let a = rooms.join("a");
        rooms.leave(&a);
        let b = rooms.join("b");
        let gone = rooms.join("gone");
        rooms.leave(&gone);
        let a2 = rooms.join("a");
        rooms.watchers.ack(id, &ack(0, 7));
        let mut u = next_update(&mut events).await.unwrap();
        u.added.sort();
        assert_eq!(u.added, ["a", "b"]);
        assert_eq!(u.removed, ["gone"]);
        assert_eq!((u.seq, u.pong, u.snapshot), (a2.added, 7, false));
        assert!(b.added < a2.added);
    }

    #[tokio::test]
    async fn a_watcher_too_far_behind_is_dropped() {
        let rooms = Rooms::default();
        let (_, _, _, _events) = rooms.watch();
        for i in 0..=WATCH_QUEUE {
            rooms.join(&format!("r{i}"));
        }
        assert!(rooms.watchers.is_empty());
        assert_eq!(dropped(&rooms.watchers, DROP_LAGGING), 1);
    }

    #[tokio::test]
    async fn an_ack_beyond_what_was_sent_counts_for_nothing_more() {
        let rooms = Rooms::default();
        let (id, _, _, _events) = rooms.watch();
        rooms.watchers.ack(id, &ack(u64::MAX, 0));
        let room = rooms.join("live://1");
        assert!(!rooms.watchers.is_announced(room.added));
    }

    #[tokio::test]
    async fn a_watch_starts_with_its_snapshot_in_pieces_and_ends_with_its_watcher() {
        let rooms = Arc::new(Rooms::default());
        for i in 0..UPDATE_ROOMS + 1 {
            rooms.join(&format!("r{i}"));
        }
        let (acks_tx, acks) = mpsc::channel(4);
        let (tx, mut updates) = mpsc::channel(4);
        let task = tokio::spawn(serve(rooms.clone(), acks, tx));
        let first = updates.recv().await.unwrap();
        let second = updates.recv().await.unwrap();
        assert!(first.snapshot && !second.snapshot);
        assert_eq!(first.added.len() + second.added.len(), UPDATE_ROOMS + 1);
        assert_eq!(
            (first.seq, second.seq),
            (UPDATE_ROOMS as u64 + 1, first.seq)
        );
        let room = rooms.join("new");
        let u = updates.recv().await.unwrap();
        assert_eq!(
            (u.seq, u.added.as_slice()),
            (room.added, &["new".to_string()][..])
        );
        acks_tx.send(ack(u.seq, 3)).await.unwrap();
        assert_eq!(updates.recv().await.unwrap().pong, 3);
        assert!(rooms.watchers.is_announced(room.added));
        // The job went: so does the watcher (fenced by the lease of its answered ping).
        drop(acks_tx);
        task.await.unwrap();
        assert!(rooms.watchers.is_empty());
        assert!(!rooms.watchers.is_announced(rooms.join("later").added));
    }

    /// Polls a future once.
    async fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
