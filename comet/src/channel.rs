//! One authenticated connection as the push paths see it: identity, watched ops, room, and a
//! bounded queue of pre-encoded pushes that the connection's own task drains.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use goim_proto::packet::HEADER_LEN;
use tokio::sync::Notify;

use crate::connection::Socket;
use crate::rooms::RoomInfo;

/// Most distinct ops a connection may watch; a sub beyond it is ignored, so a client cannot
/// grow its watch set without bound.
pub const MAX_ACCEPTS: usize = 1024;

/// A queued push, shared across all its recipients.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Already-encoded packets (an `OpRaw` body): bare on TCP, wrapped in an op-9 packet on
    /// WebSocket.
    Raw(Bytes),
    /// One packet, header and body.
    Packet {
        header: [u8; HEADER_LEN],
        body: Bytes,
    },
    /// What a direct write from the fan-out left over (the socket took only part): framed
    /// already, written as is, with the messages it completes.
    Rest { bytes: Bytes, messages: u32 },
}

/// A batch's place in its stream's numbering (a room's, or a user's, when the jobs keep its
/// history), for connections that speak the extensions: they get `position` (a `POSITION`
/// packet) before the batch.
#[derive(Debug, Clone)]
pub struct Numbered {
    /// What is numbered: a room id, or `user` (the connection's user).
    pub stream: Arc<str>,
    pub epoch: Arc<str>,
    /// Offset of the batch's first message; the rest follow one by one.
    pub offset: u64,
    pub count: u64,
    pub position: Outgoing,
}

impl Numbered {
    pub fn last(&self) -> u64 {
        self.offset + self.count.saturating_sub(1)
    }
}

/// Messages in a queued item: the packets of a raw batch, one for a packet, none for a
/// `POSITION` (it only numbers the next ones).
pub(crate) fn messages(o: &Outgoing) -> u64 {
    match o {
        Outgoing::Rest { messages, .. } => u64::from(*messages),
        Outgoing::Raw(b) => goim_proto::packet::raw_packets(b.clone()).count() as u64,
        Outgoing::Packet { header, .. } => {
            u64::from(goim_proto::packet::Header::parse(header).op != goim_proto::op::POSITION)
        }
    }
}

/// Result of offering a push to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Written to the socket at once, from the caller's thread.
    Written,
    /// The connection does not watch this op.
    Filtered,
    /// The queue was full: the push is dropped for this connection.
    Full,
    /// The connection is closing.
    Closed,
}

/// The queue is a `VecDeque` under the channel's mutex, drained whole by the connection's
/// task. Measured against goim's SPSC ring (benches/queue.rs, 200k items, 2 vCPU): ring with
/// indices on one line 8.2 ms, padded 9.7 ms, this mutex 75 ms when every item is contended.
/// A ring cannot take comet's many producers, and at a few pushes per connection per second
/// the lock is uncontended and cheap next to the writev; so the mutex stays.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub queue: VecDeque<Outgoing>,
    pub accepts: Vec<i32>,
    pub room: Option<Arc<RoomInfo>>,
    /// Index in the bucket's member list of `room`; valid while `room` is set.
    pub room_slot: usize,
    /// Rooms joined beside goim's one (`ROOM_JOIN`); boxed: nothing for connections in one
    /// room (bytes per idle connection are a measured goal).
    #[allow(clippy::box_collection)]
    pub extra_rooms: Option<Box<Vec<Arc<RoomInfo>>>>,
    /// The plain socket, for writes from the push paths while `queue` is empty and the
    /// task is not `writing` (`None` on TLS, before the auth reply and after the end).
    pub socket: Option<Socket>,
    /// The connection's task is writing: a direct write now could split its bytes.
    pub writing: bool,
    /// Whether the bucket still counts this channel (its map entry and IP count).
    pub registered: bool,
    pub closed: bool,
    pub kicked: bool,
    /// Closed by an admin kick: what is queued (the notice last) is written first.
    pub evicted: bool,
    /// The client said `HELLO`: it understands goim-rs's extension ops.
    pub extended: bool,
    /// `JOIN`s or `RECOVER`s in progress or just done, one per stream. Boxed: 8 bytes on
    /// every connection instead of a Vec's 24 (bytes per idle connection are a measured goal).
    #[allow(clippy::box_collection)]
    pub recovery: Option<Box<Vec<Recovery>>>,
    /// The client acks numbered pushes to its user: those sent and not acked yet (boxed:
    /// nothing for clients that do not ack).
    pub acks: Option<Box<Acks>>,
}

/// Numbered user pushes sent to a client that acks, oldest first.
#[derive(Debug, Default)]
pub struct Acks {
    pending: VecDeque<Unacked>,
    window: usize,
    /// Pushed out of the window since the last resend pass.
    given_up: u64,
}

#[derive(Debug)]
struct Unacked {
    /// `user` or `key`: offsets of the two streams are counted apart.
    stream: Arc<str>,
    epoch: Arc<str>,
    offset: u64,
    position: Outgoing,
    out: Outgoing,
    sent: tokio::time::Instant,
    tries: u32,
}

/// What a resend pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resent {
    pub resent: u64,
    /// Given up after `ack_retries` resends, or pushed out of the window.
    pub given_up: u64,
}

/// What a recovery keeps on the channel so its stream's batches come once each, after the
/// reply.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    stream: Arc<str>,
    /// While the room's position (and history) is fetched: its numbered batches that arrived
    /// meanwhile, written after the reply.
    held: Option<Vec<(Numbered, Outgoing)>>,
    /// A batch did not fit in `held`: what the recovery returns is not complete.
    overflow: bool,
    /// After: batches of this epoch up to this offset were in the history sent or came
    /// before this client's start; some may still be on their way from the job, and are
    /// not written. Cleared by the first batch past it (nothing older follows it).
    covered: Option<(Arc<str>, u64)>,
}

/// Queues `items` (a push, after its position when numbered), or with `direct` writes them to
/// the socket at once when nothing is queued before them and the task is not writing: no wake
/// and no poll of the connection's task for the common delivery. What the socket does not
/// take is queued for the task, which then waits for the socket within the write timeout.
/// The second value: the task must be woken.
fn deliver<const N: usize>(st: &mut State, items: [Outgoing; N], direct: bool) -> (Offer, bool) {
    let idle = st.queue.is_empty();
    if let Some(socket) = st.socket.as_ref().filter(|_| direct && idle && !st.writing) {
        match socket.try_write(&items) {
            Ok((written, total)) if written == total => return (Offer::Written, false),
            Ok((written, _)) if written > 0 => {
                let rest = socket.rest(&items, written);
                st.queue.push_back(rest);
                return (Offer::Queued, true);
            }
            // A full socket, or a broken one: the task's own write waits, or finds out.
            Ok(_) | Err(_) => {}
        }
    }
    st.queue.extend(items);
    (Offer::Queued, idle)
}

#[derive(Debug)]
pub struct Channel {
    pub key: Arc<str>,
    pub mid: i64,
    pub ip: IpAddr,
    /// The version of this connection's presence (from ConnectReply, updated when a lease
    /// change re-puts it); its Disconnect names it so only this presence is removed.
    pub presence_revision: std::sync::atomic::AtomicI64,
    state: Mutex<State>,
    pub(crate) notify: Notify,
}

impl Channel {
    pub fn new(key: Arc<str>, mid: i64, ip: IpAddr, accepts: &[i32]) -> Self {
        let ch = Channel {
            key,
            mid,
            ip,
            presence_revision: Default::default(),
            state: Mutex::new(State::default()),
            notify: Notify::new(),
        };
        ch.watch(accepts);
        ch
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent in a way that
        // matters more than losing the connection, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds ops to the watch set, up to [`MAX_ACCEPTS`]. The set is a sorted vector: a
    /// lookup per push is a binary search, and it costs no more memory than goim's list.
    pub fn watch(&self, ops: &[i32]) {
        let mut st = self.state();
        for &op in ops {
            if let Err(at) = st.accepts.binary_search(&op) {
                if st.accepts.len() < MAX_ACCEPTS {
                    st.accepts.insert(at, op);
                }
            }
        }
    }

    pub fn unwatch(&self, ops: &[i32]) {
        let mut gone = ops.to_vec();
        gone.sort_unstable();
        self.state()
            .accepts
            .retain(|op| gone.binary_search(op).is_err());
    }

    #[cfg(test)]
    pub(crate) fn accepts(&self, op: i32) -> bool {
        self.state().accepts.binary_search(&op).is_ok()
    }

    /// Queues a push if the connection watches `op` (`None`: no filter, as for rooms), or
    /// with `direct`, writes it at once when nothing is queued or being written.
    pub fn offer(&self, op: Option<i32>, out: Outgoing, cap: usize, direct: bool) -> Offer {
        let mut st = self.state();
        if st.closed {
            return Offer::Closed;
        }
        if let Some(op) = op {
            if st.accepts.binary_search(&op).is_err() {
                return Offer::Filtered;
            }
        }
        if st.queue.len() >= cap {
            return Offer::Full;
        }
        let (offer, wake) = deliver(&mut st, [out], direct);
        drop(st);
        // The task drains everything queued at once, so one wake per empty->non-empty edge.
        if wake {
            self.notify.notify_one();
        }
        offer
    }

    /// Lets the push paths write to `socket` directly (after the auth reply went out).
    pub(crate) fn attach(&self, socket: Socket) {
        self.state().socket = Some(socket);
    }

    /// No more direct writes: the connection is ending and its socket may close.
    pub(crate) fn detach(&self) {
        let socket = self.state().socket.take();
        drop(socket);
    }

    /// The task starts writing (replies): no direct write may come between its bytes.
    pub(crate) fn begin_write(&self) {
        self.state().writing = true;
    }

    /// Takes everything queued for one batched write by the task, which is writing from now
    /// until [`Channel::end_write`].
    pub(crate) fn take_for_write(&self) -> VecDeque<Outgoing> {
        let mut st = self.state();
        st.writing = true;
        std::mem::take(&mut st.queue)
    }

    pub(crate) fn end_write(&self) {
        self.state().writing = false;
    }

    /// Takes everything queued, for one batched write.
    pub(crate) fn take_queue(&self) -> VecDeque<Outgoing> {
        std::mem::take(&mut self.state().queue)
    }

    /// Asks the connection's task to close (duplicate key, drain or shutdown).
    /// Closes the channel; returns how many queued messages will never be written (the
    /// caller counts them).
    pub fn close(&self, kicked: bool) -> u64 {
        let mut st = self.state();
        st.closed = true;
        st.kicked |= kicked;
        let dropped = st.queue.drain(..).map(|o| messages(&o)).sum();
        drop(st);
        self.notify.notify_one();
        dropped
    }

    /// An admin kick: `notice` (for a client that speaks the extensions) goes after what is
    /// queued, then the connection closes. False if it was closing already.
    pub fn evict(&self, notice: Option<Outgoing>) -> bool {
        let mut st = self.state();
        if st.closed {
            return false;
        }
        if let Some(n) = notice {
            st.queue.push_back(n);
        }
        st.closed = true;
        st.evicted = true;
        drop(st);
        self.notify.notify_one();
        true
    }

    pub fn was_evicted(&self) -> bool {
        self.state().evicted
    }

    /// The client speaks the extensions (docs/PROTOCOL.md).
    pub fn set_extended(&self) {
        self.state().extended = true;
    }

    pub fn is_extended(&self) -> bool {
        self.state().extended
    }

    /// Offers a room batch (see [`Channel::offer_numbered`]); rooms are not filtered by op.
    pub fn offer_room(
        &self,
        out: &Outgoing,
        numbered: Option<&Numbered>,
        cap: usize,
        direct: bool,
    ) -> Offer {
        self.offer_numbered(out, numbered, None, cap, direct)
    }

    /// Offers a push that may be numbered: with its position first to a connection that
    /// speaks the extensions (which then gets every message of the stream, whatever ops it
    /// watches, so offsets have no holes), held back while that connection recovers the
    /// stream, and dropped when the history it was sent already held it. Otherwise as
    /// [`Channel::offer`].
    pub fn offer_numbered(
        &self,
        out: &Outgoing,
        numbered: Option<&Numbered>,
        op: Option<i32>,
        cap: usize,
        direct: bool,
    ) -> Offer {
        let mut st = self.state();
        if st.closed {
            return Offer::Closed;
        }
        let numbered = numbered.filter(|_| st.extended);
        match (numbered, op) {
            (None, Some(op)) if st.accepts.binary_search(&op).is_err() => return Offer::Filtered,
            _ => {}
        }
        if let (Some(n), Some(list)) = (numbered, st.recovery.as_mut()) {
            if let Some(i) = list.iter().position(|r| r.stream == n.stream) {
                let r = &mut list[i];
                if let Some(held) = r.held.as_mut() {
                    if held.len() >= cap {
                        r.overflow = true;
                        return Offer::Full;
                    }
                    held.push((n.clone(), out.clone()));
                    return Offer::Queued;
                }
                if let Some((epoch, top)) = &r.covered {
                    if **epoch == *n.epoch && n.last() <= *top {
                        return Offer::Filtered;
                    }
                }
                // Past the covered position: nothing older can follow.
                list.remove(i);
                if list.is_empty() {
                    st.recovery = None;
                }
            }
        }
        if st.queue.len() >= cap {
            return Offer::Full;
        }
        // A push that waits for an ack wakes the task even when written directly: the task
        // arms its resend timer when it runs.
        let mut awaits_ack = false;
        if let Some(n) = numbered {
            let acked = matches!(&*n.stream, "user" | "key");
            if let Some(acks) = st.acks.as_mut().filter(|_| acked) {
                awaits_ack = true;
                // Bounded: past the window the oldest is given up (counted at the next pass).
                if acks.pending.len() >= acks.window {
                    acks.pending.pop_front();
                    acks.given_up += 1;
                }
                acks.pending.push_back(Unacked {
                    stream: n.stream.clone(),
                    epoch: n.epoch.clone(),
                    offset: n.offset,
                    position: n.position.clone(),
                    out: out.clone(),
                    sent: tokio::time::Instant::now(),
                    tries: 0,
                });
            }
        }
        let (offer, wake) = match numbered {
            Some(n) => deliver(&mut st, [n.position.clone(), out.clone()], direct),
            None => deliver(&mut st, [out.clone()], direct),
        };
        drop(st);
        if wake || awaits_ack {
            self.notify.notify_one();
        }
        offer
    }

    /// The client acks numbered pushes to its user from now on; at most `window` wait.
    pub fn enable_acks(&self, window: usize) {
        self.state().acks.get_or_insert_with(|| {
            Box::new(Acks {
                window: window.max(1),
                ..Default::default()
            })
        });
    }

    /// The client has every numbered push of `stream` (its user's, `user`, or its key's,
    /// `key`) up to `offset` in `epoch` (any epoch when not given: offsets start again at 1
    /// in a new one).
    pub fn ack(&self, stream: &str, offset: u64, epoch: Option<&str>) {
        if let Some(acks) = self.state().acks.as_mut() {
            acks.pending.retain(|u| {
                *u.stream != *stream || u.offset > offset || epoch.is_some_and(|e| *u.epoch != *e)
            });
        }
    }

    /// When the oldest unacked push is due for a resend (`None`: nothing waits for an ack).
    pub fn resend_due(&self, timeout: Duration) -> Option<tokio::time::Instant> {
        let st = self.state();
        let oldest = st.acks.as_ref()?.pending.iter().map(|u| u.sent).min()?;
        Some(oldest + timeout)
    }

    /// Sends again every push not acked within `timeout` (same position), at most `retries`
    /// times each; beyond, they are given up (as are those pushed out of the window).
    pub fn resend(&self, timeout: Duration, retries: u32) -> Resent {
        let mut r = Resent::default();
        let now = tokio::time::Instant::now();
        let mut st = self.state();
        let st = &mut *st;
        let Some(acks) = st.acks.as_mut() else {
            return r;
        };
        r.given_up = std::mem::take(&mut acks.given_up);
        let before = acks.pending.len() as u64;
        acks.pending
            .retain(|u| u.tries < retries || now < u.sent + timeout);
        r.given_up += before - acks.pending.len() as u64;
        let wake = st.queue.is_empty();
        for u in acks.pending.iter_mut().filter(|u| now >= u.sent + timeout) {
            u.tries += 1;
            u.sent = now;
            st.queue.push_back(u.position.clone());
            st.queue.push_back(u.out.clone());
            r.resent += 1;
        }
        if wake && r.resent > 0 {
            self.notify.notify_one();
        }
        r
    }

    /// From now on `stream`'s numbered batches are held until [`Channel::end_recovery`]. A
    /// recovery of the stream that is already holding goes on holding.
    pub fn begin_recovery(&self, stream: &str) {
        let mut st = self.state();
        let list = st.recovery.get_or_insert_with(Default::default);
        // A connection is in one room: another room's entry is of no use any more (and
        // kept, JOINs to many rooms would grow the list).
        if stream.contains("://") {
            list.retain(|r| &*r.stream == stream || !r.stream.contains("://"));
        }
        match list.iter_mut().find(|r| &*r.stream == stream) {
            Some(r) if r.held.is_some() => {}
            Some(r) => {
                r.held = Some(Vec::new());
                r.overflow = false;
                r.covered = None;
            }
            None => list.push(Recovery {
                stream: stream.into(),
                held: Some(Vec::new()),
                ..Default::default()
            }),
        }
    }

    /// Queues what `first` returns (given whether held batches were lost), then the held
    /// batches of `stream` past `covered` (the position the reply gave: same epoch, up to
    /// that offset), and stops holding; batches up to `covered` that arrive later are
    /// dropped. Not bounded by the queue's limit: history is bounded by the job's, held
    /// batches by the queue's.
    pub fn end_recovery(
        &self,
        stream: &str,
        covered: (Arc<str>, u64),
        first: impl FnOnce(bool) -> Vec<Outgoing>,
    ) {
        let mut st = self.state();
        let r = st
            .recovery
            .as_mut()
            .and_then(|list| {
                let i = list.iter().position(|r| &*r.stream == stream)?;
                Some(list.remove(i))
            })
            .unwrap_or_default();
        let (epoch, top) = &covered;
        let is_covered = |n: &Numbered| *n.epoch == **epoch && n.last() <= *top;
        let wake = st.queue.is_empty();
        st.queue.extend(first(r.overflow));
        let mut past = false;
        for (n, out) in r.held.unwrap_or_default() {
            if !is_covered(&n) {
                past = true;
                st.queue.push_back(n.position);
                st.queue.push_back(out);
            }
        }
        if !past && !epoch.is_empty() {
            st.recovery
                .get_or_insert_with(Default::default)
                .push(Recovery {
                    stream: stream.into(),
                    covered: Some(covered),
                    ..Default::default()
                });
        }
        if st.recovery.as_ref().is_some_and(|l| l.is_empty()) {
            st.recovery = None;
        }
        let queued = !st.queue.is_empty();
        drop(st);
        if wake && queued {
            self.notify.notify_one();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    pub fn was_kicked(&self) -> bool {
        self.state().kicked
    }

    pub fn room(&self) -> Option<Arc<RoomInfo>> {
        self.state().room.clone()
    }

    /// Rooms joined beside the goim room.
    pub fn extra_rooms(&self) -> Vec<Arc<RoomInfo>> {
        self.state()
            .extra_rooms
            .as_deref()
            .map_or_else(Vec::new, |v| v.to_vec())
    }

    /// The heartbeat reply body: the room's cluster-wide count when logic has one, else the
    /// local count; 0 without a room.
    pub fn online(&self) -> i32 {
        self.state().room.as_ref().map_or(0, |r| r.online())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch() -> Channel {
        Channel::new(
            "k".into(),
            1,
            IpAddr::from([127, 0, 0, 1]),
            &[1000, 1000, 1001],
        )
    }

    fn numbered(epoch: &str, offset: u64, count: u64) -> Numbered {
        Numbered {
            stream: "chat://1".into(),
            epoch: epoch.into(),
            offset,
            count,
            position: Outgoing::Raw(Bytes::from(format!("pos {offset}"))),
        }
    }

    fn queued(c: &Channel) -> Vec<String> {
        c.take_queue()
            .into_iter()
            .map(|o| match o {
                Outgoing::Raw(b)
                | Outgoing::Packet { body: b, .. }
                | Outgoing::Rest { bytes: b, .. } => String::from_utf8(b.to_vec()).unwrap(),
            })
            .collect()
    }

    /// A JOIN's recovery: the room's batches are held while history is fetched, written
    /// after the reply unless the history covered them, and a covered batch still on its way
    /// from the job is dropped when it arrives (it came twice before this).
    #[test]
    fn recovery_holds_then_writes_each_batch_once() {
        let c = ch();
        c.set_extended();
        let batch = |s: &'static str| Outgoing::Raw(Bytes::from_static(s.as_bytes()));
        c.begin_recovery("chat://1");
        assert_eq!(
            c.offer_room(&batch("3-4"), Some(&numbered("e", 3, 2)), 8, false),
            Offer::Queued
        );
        assert_eq!(
            c.offer_room(&batch("5"), Some(&numbered("e", 5, 1)), 8, false),
            Offer::Queued
        );
        assert!(queued(&c).is_empty(), "held during the recovery");
        // History covered up to 4 and was sent with the reply.
        c.end_recovery("chat://1", ("e".into(), 4), |overflow| {
            assert!(!overflow);
            vec![batch("reply"), batch("history 1-4")]
        });
        assert_eq!(queued(&c), ["reply", "history 1-4", "pos 5", "5"]);
        // A batch past the covered one was held, so nothing covered is still on its way (a
        // job sends a comet its batches in order): no filter is kept.
        assert!(c.state().recovery.is_none());
        // Here the history covered up to 9 and nothing past it was held: 8-9, still on its
        // way from the job when the reply went, is dropped when it arrives.
        c.begin_recovery("chat://1");
        c.end_recovery("chat://1", ("e".into(), 9), |_| vec![batch("reply")]);
        assert_eq!(
            c.offer_room(&batch("8-9"), Some(&numbered("e", 8, 2)), 8, false),
            Offer::Filtered
        );
        assert_eq!(
            c.offer_room(&batch("10"), Some(&numbered("e", 10, 1)), 8, false),
            Offer::Queued
        );
        assert_eq!(queued(&c), ["reply", "pos 10", "10"]);
        // Held batches beyond the queue's bound make the recovery incomplete.
        c.begin_recovery("chat://1");
        for i in 0..3 {
            c.offer_room(&batch("x"), Some(&numbered("e", 11 + i, 1)), 2, false);
        }
        c.end_recovery("chat://1", ("e".into(), 10), |overflow| {
            assert!(overflow);
            Vec::new()
        });
    }

    /// A client that acks: what it does not ack is sent again after the timeout, at most
    /// `retries` times, then given up; an ack (cumulative) stops it; the window is bounded.
    #[tokio::test(start_paused = true)]
    async fn unacked_user_pushes_are_resent_then_given_up() {
        let c = ch();
        c.set_extended();
        c.enable_acks(3);
        let user = |offset| Numbered {
            stream: "user".into(),
            ..numbered("e", offset, 1)
        };
        let msg = |s: &'static str| Outgoing::Raw(Bytes::from_static(s.as_bytes()));
        for (i, body) in ["1", "2"].into_iter().enumerate() {
            c.offer_numbered(&msg(body), Some(&user(i as u64 + 1)), Some(1000), 8, false);
        }
        assert_eq!(queued(&c), ["pos 1", "1", "pos 2", "2"]);
        let timeout = Duration::from_secs(5);
        let due = c.resend_due(timeout).unwrap();
        // An ack for another epoch, or of the key's stream, acks nothing here.
        c.ack("user", 1, Some("other"));
        assert_eq!(c.resend_due(timeout), Some(due));
        c.ack("key", 2, Some("e"));
        assert_eq!(c.resend_due(timeout), Some(due));
        c.ack("user", 1, Some("e"));
        tokio::time::advance(timeout).await;
        assert!(tokio::time::Instant::now() >= due);
        assert_eq!(
            c.resend(timeout, 2),
            Resent {
                resent: 1,
                given_up: 0
            }
        );
        assert_eq!(queued(&c), ["pos 2", "2"], "only what was not acked");
        tokio::time::advance(timeout).await;
        assert_eq!(c.resend(timeout, 2).resent, 1);
        tokio::time::advance(timeout).await;
        assert_eq!(
            c.resend(timeout, 2),
            Resent {
                resent: 0,
                given_up: 1
            }
        );
        assert!(c.resend_due(timeout).is_none());
        // The window: a fourth push waiting gives up the oldest.
        queued(&c);
        for o in 3..=6 {
            c.offer_numbered(&msg("x"), Some(&user(o)), Some(1000), 64, false);
        }
        assert_eq!(c.resend(timeout, 2).given_up, 1);
        // Room batches are not acked.
        c.ack("user", 6, None);
        c.offer_room(&msg("r"), Some(&numbered("e", 1, 1)), 64, false);
        assert!(c.resend_due(timeout).is_none());
        // Pushes to the key are, on their own offsets.
        let key = |offset| Numbered {
            stream: "key".into(),
            ..numbered("k", offset, 1)
        };
        c.offer_numbered(&msg("k1"), Some(&key(1)), Some(1000), 64, false);
        c.offer_numbered(&msg("u7"), Some(&user(7)), Some(1000), 64, false);
        c.ack("user", 7, Some("e"));
        assert!(
            c.resend_due(timeout).is_some(),
            "the key's push still waits"
        );
        c.ack("key", 1, Some("k"));
        assert!(c.resend_due(timeout).is_none());
    }

    #[test]
    fn filter_queue_bound_and_close() {
        let c = ch();
        let out = Outgoing::Raw(Bytes::from_static(b"x"));
        assert_eq!(c.offer(Some(5), out.clone(), 2, false), Offer::Filtered);
        assert_eq!(c.offer(Some(1000), out.clone(), 2, false), Offer::Queued);
        assert_eq!(c.offer(None, out.clone(), 2, false), Offer::Queued);
        assert_eq!(c.offer(None, out.clone(), 2, false), Offer::Full);
        assert_eq!(c.take_queue().len(), 2);
        c.unwatch(&[1000]);
        assert_eq!(c.offer(Some(1000), out.clone(), 2, false), Offer::Filtered);
        assert!(c.accepts(1001));
        // Closing counts what will never be written: a batch of two messages, one packet.
        let two = [1, 2].map(|i| goim_proto::packet::Packet::new(1, 1000, i, &b"m"[..]).encode());
        let batch = Outgoing::Raw(Bytes::from([two[0].as_ref(), two[1].as_ref()].concat()));
        c.offer(None, batch, 2, false);
        let one = Outgoing::Packet {
            header: goim_proto::packet::Header::new(1, 1, 1000, 0).encode(),
            body: Bytes::from_static(b"m"),
        };
        c.offer(None, one, 2, false);
        assert_eq!(c.close(true), 3);
        assert_eq!(c.offer(None, out, 2, false), Offer::Closed);
        assert!(c.was_kicked());
    }

    #[test]
    fn watch_set_is_bounded() {
        let c = ch();
        let many: Vec<i32> = (0..5000).collect();
        c.watch(&many);
        assert_eq!(c.state().accepts.len(), MAX_ACCEPTS);
    }

    mod direct {
        use super::*;
        use crate::connection::{Connection, Limits, Transport};
        use tokio::io::AsyncReadExt;
        use tokio::net::{TcpListener, TcpStream};

        const LIMITS: Limits = Limits {
            max_frame: 64 * 1024,
            max_fragments: 16,
            write_timeout: Duration::from_secs(10),
        };

        /// The comet's end as a [`Connection`] whose socket `c` may write to, and the client's.
        async fn attached(c: &Channel) -> (Connection, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (server, _) = l.accept().await.unwrap();
            let conn = Connection::new(server, Transport::Tcp, LIMITS);
            c.attach(conn.socket().unwrap());
            (conn, client)
        }

        fn raw(s: &str) -> Outgoing {
            Outgoing::Raw(Bytes::from(s.to_string()))
        }

        /// A push to a connection with nothing queued or being written goes to its socket at
        /// once, without waking its task. While the task writes, or while anything is queued
        /// before it, or after the connection detached, a push is queued instead, so the
        /// client reads every push once and in order.
        #[tokio::test]
        async fn an_idle_connection_is_written_at_once_and_a_busy_one_queued() {
            let c = ch();
            let (mut conn, mut client) = attached(&c).await;
            assert_eq!(c.offer(None, raw("a"), 8, true), Offer::Written);
            assert!(c.state().queue.is_empty());
            let woken = c.notify.notified();
            tokio::pin!(woken);
            assert!(
                futures_ready(woken.as_mut()).is_none(),
                "a direct write wakes no one"
            );
            // Not asked to write directly (the fan-out is behind): queued.
            assert_eq!(c.offer(None, raw("b"), 8, false), Offer::Queued);
            // Queued before it: queued too, or it would overtake "b".
            assert_eq!(c.offer(None, raw("c"), 8, true), Offer::Queued);
            let items = c.take_for_write();
            // The task is writing: a direct write now could split its bytes.
            assert_eq!(c.offer(None, raw("d"), 8, true), Offer::Queued);
            conn.flush(items).await.unwrap();
            c.end_write();
            conn.flush(c.take_for_write()).await.unwrap();
            c.end_write();
            assert_eq!(c.offer(None, raw("e"), 8, true), Offer::Written);
            c.detach();
            assert_eq!(c.offer(None, raw("f"), 8, true), Offer::Queued);
            let mut got = [0u8; 5];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"abcde");
            assert_eq!(queued(&c), ["f"]);
        }

        /// A push that waits for the client's ack is written directly but still wakes the
        /// task, which arms the resend timer (found by the recovery test of acks).
        #[tokio::test]
        async fn a_push_awaiting_an_ack_wakes_the_task_when_written_directly() {
            let c = ch();
            let (_conn, _client) = attached(&c).await;
            c.set_extended();
            c.enable_acks(8);
            let user = Numbered {
                stream: "user".into(),
                epoch: "e".into(),
                offset: 1,
                count: 1,
                position: raw("pos"),
            };
            let woken = c.notify.notified();
            tokio::pin!(woken);
            assert_eq!(
                c.offer_numbered(&raw("m"), Some(&user), Some(1000), 8, true),
                Offer::Written
            );
            assert!(futures_ready(woken.as_mut()).is_some(), "the task is woken");
            assert!(c.resend_due(Duration::from_secs(1)).is_some());
        }

        /// A socket that takes only part of a push: the rest is queued, whole, for the task,
        /// and pushes after it queue behind it; the client reads every byte in order.
        #[tokio::test]
        async fn a_full_socket_leaves_the_rest_queued_in_order() {
            let c = ch();
            let (mut conn, mut client) = attached(&c).await;
            let header = goim_proto::packet::Header::new(49_999, 1, 1000, 0).encode();
            let push = |i: usize| Outgoing::Packet {
                header,
                body: Bytes::from(vec![i as u8; 49_999]),
            };
            let mut expected = Vec::new();
            let mut offers = Vec::new();
            // The client does not read: the socket fills and stops taking writes.
            for i in 0..200 {
                let o = c.offer(None, push(i), 1000, true);
                expected.extend_from_slice(&header);
                expected.extend_from_slice(&vec![i as u8; 49_999]);
                offers.push(o);
            }
            let first_queued = offers.iter().position(|o| *o == Offer::Queued).unwrap();
            assert!(first_queued > 0, "an empty socket takes the first push");
            assert!(offers[first_queued..].iter().all(|o| *o == Offer::Queued));
            let reader = tokio::spawn(async move {
                let mut got = vec![0u8; expected.len()];
                client.read_exact(&mut got).await.unwrap();
                got == expected
            });
            let items = c.take_for_write();
            assert!(
                matches!(items.front(), Some(Outgoing::Rest { messages: 1, .. })),
                "the push the socket took part of comes first, as its rest"
            );
            conn.flush(items).await.unwrap();
            c.end_write();
            assert!(reader.await.unwrap(), "every byte once, in order");
        }

        /// Polls a future once.
        fn futures_ready<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            match f.poll(&mut cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            }
        }
    }
}
