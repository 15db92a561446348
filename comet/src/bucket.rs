//! A shard of the comet's connections: key -> channel, room -> members, IP counts. Connections
//! are spread by `CityHash32(key) % buckets`, as goim does, so pushes to different keys and the
//! shards of one room fan-out take different locks.
//!
//! Lock order: bucket, then a channel's state, then the comet-wide room registry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::channel::{Channel, Numbered, Offer, Outgoing};
use crate::rooms::Rooms;

/// goim's bucket index: CityHash32 v1.1 of the key, modulo the bucket count.
pub fn bucket_index(key: &str, buckets: usize) -> usize {
    cityhasher::hash::<u32>(key.as_bytes()) as usize % buckets.max(1)
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    chans: HashMap<Arc<str>, Arc<Channel>>,
    rooms: HashMap<Arc<str>, Vec<Arc<Channel>>>,
}

/// Connections per client IP across the comet, kept as connections come and go so a load
/// report is a lookup, not a walk over every connection.
#[derive(Debug, Default)]
pub struct Ips(std::sync::Mutex<HashMap<IpAddr, u32>>);

impl Ips {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, ip: IpAddr) {
        *self.lock().entry(ip).or_insert(0) += 1;
    }

    fn remove(&self, ip: IpAddr) {
        let mut m = self.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// Distinct client IPs.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Comet-wide registries a bucket updates alongside its own maps.
#[derive(Debug, Default)]
pub struct Shared {
    pub rooms: Arc<Rooms>,
    pub ips: Ips,
}

/// Totals of one fan-out over a bucket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Taken for the connection: queued, or written at once.
    pub queued: u64,
    /// Of those, written at once by the caller (no queue, no wake).
    pub written: u64,
    pub dropped: u64,
}

impl Delivery {
    pub fn add(&mut self, o: Offer) {
        match o {
            Offer::Queued => self.queued += 1,
            Offer::Written => {
                self.queued += 1;
                self.written += 1;
            }
            Offer::Full => self.dropped += 1,
            Offer::Filtered | Offer::Closed => {}
        }
    }

    pub fn merge(&mut self, o: Delivery) {
        self.queued += o.queued;
        self.written += o.written;
        self.dropped += o.dropped;
    }
}

#[derive(Debug, Default)]
pub struct Bucket {
    inner: RwLock<Inner>,
}

impl Bucket {
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an authenticated channel and joins `room` (empty: none). An older channel with
    /// the same key is kicked and unregistered, as goim does.
    /// Returns how many messages queued for the kicked channel were dropped.
    pub fn put(&self, ch: &Arc<Channel>, room: &str, shared: &Shared) -> u64 {
        let mut inner = self.write();
        let mut dropped = 0;
        if let Some(old) = inner.chans.insert(ch.key.clone(), ch.clone()) {
            if !Arc::ptr_eq(&old, ch) {
                unregister(&mut inner, &old, shared);
                dropped = old.close(true);
            }
        }
        shared.ips.add(ch.ip);
        ch.state().registered = true;
        if !room.is_empty() {
            join(&mut inner, ch, room, &shared.rooms);
        }
        dropped
    }

    /// Removes a channel on close; a no-op if it was already replaced.
    pub fn del(&self, ch: &Arc<Channel>, shared: &Shared) {
        let mut inner = self.write();
        if inner.chans.get(&ch.key).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            inner.chans.remove(&ch.key);
        }
        unregister(&mut inner, ch, shared);
    }

    /// Moves a channel to another room; an empty `room` leaves the current one.
    pub fn change_room(&self, ch: &Arc<Channel>, room: &str, rooms: &Rooms) {
        let mut inner = self.write();
        if !ch.state().registered {
            return;
        }
        if ch.state().room.as_ref().is_some_and(|r| &*r.id == room) {
            return;
        }
        // A room joined beside it becomes the goim room: a member once, not twice.
        let mut st = ch.state();
        let extra = st.extra_rooms.as_mut().and_then(|v| {
            let i = v.iter().position(|r| &*r.id == room)?;
            Some(v.swap_remove(i))
        });
        if st.extra_rooms.as_ref().is_some_and(|v| v.is_empty()) {
            st.extra_rooms = None;
        }
        drop(st);
        if let Some(info) = extra {
            remove_member(&mut inner, ch, &info);
            rooms.leave(&info);
        }
        leave(&mut inner, ch, rooms);
        if !room.is_empty() {
            join(&mut inner, ch, room, rooms);
        }
    }

    /// Joins `room` beside the connection's goim room (and any others); `Ok(false)` when it
    /// is in it already, `Err(())` beyond `max` extra rooms.
    #[allow(clippy::result_unit_err)]
    pub fn add_room(
        &self,
        ch: &Arc<Channel>,
        room: &str,
        rooms: &Rooms,
        max: usize,
    ) -> Result<bool, ()> {
        let mut inner = self.write();
        let mut st = ch.state();
        if !st.registered || room.is_empty() {
            return Ok(false);
        }
        let held = st
            .room
            .iter()
            .chain(st.extra_rooms.iter().flat_map(|v| v.iter()));
        if held.clone().any(|r| &*r.id == room) {
            return Ok(false);
        }
        if st.extra_rooms.as_ref().map_or(0, |v| v.len()) >= max {
            return Err(());
        }
        let info = rooms.join(room);
        inner
            .rooms
            .entry(info.id.clone())
            .or_default()
            .push(ch.clone());
        st.extra_rooms
            .get_or_insert_with(Default::default)
            .push(info);
        Ok(true)
    }

    /// Leaves a room joined with [`Bucket::add_room`]; `false` if it was not one.
    pub fn remove_room(&self, ch: &Arc<Channel>, room: &str, rooms: &Rooms) -> bool {
        let mut inner = self.write();
        let mut st = ch.state();
        let Some(extra) = st.extra_rooms.as_mut() else {
            return false;
        };
        let Some(i) = extra.iter().position(|r| &*r.id == room) else {
            return false;
        };
        let info = extra.swap_remove(i);
        if extra.is_empty() {
            st.extra_rooms = None;
        }
        drop(st);
        remove_member(&mut inner, ch, &info);
        rooms.leave(&info);
        true
    }

    pub fn get(&self, key: &str) -> Option<Arc<Channel>> {
        self.read().chans.get(key).cloned()
    }

    /// Pushes to every member of `room`, ignoring watched ops (goim's `BroadcastRoom`);
    /// `direct`: written at once where nothing is queued (see [`Channel::offer`]).
    pub fn push_room(
        &self,
        room: &str,
        out: &Outgoing,
        numbered: Option<&Numbered>,
        cap: usize,
        direct: bool,
    ) -> Delivery {
        let mut d = Delivery::default();
        if let Some(members) = self.read().rooms.get(room) {
            for ch in members {
                d.add(ch.offer_room(out, numbered, cap, direct));
            }
        }
        d
    }

    /// Pushes to every channel that watches `op`.
    pub fn push_all(&self, op: i32, out: &Outgoing, cap: usize, direct: bool) -> Delivery {
        let mut d = Delivery::default();
        for ch in self.read().chans.values() {
            d.add(ch.offer(Some(op), out.clone(), cap, direct));
        }
        d
    }

    pub fn channel_count(&self) -> usize {
        self.read().chans.len()
    }

    pub fn channels(&self) -> Vec<Arc<Channel>> {
        self.read().chans.values().cloned().collect()
    }

    #[cfg(test)]
    fn room_members(&self, room: &str) -> usize {
        self.read().rooms.get(room).map_or(0, Vec::len)
    }
}

fn unregister(inner: &mut Inner, ch: &Arc<Channel>, shared: &Shared) {
    leave(inner, ch, &shared.rooms);
    let extra = ch.state().extra_rooms.take();
    for info in extra.into_iter().flat_map(|v| v.into_iter()) {
        remove_member(inner, ch, &info);
        shared.rooms.leave(&info);
    }
    if std::mem::take(&mut ch.state().registered) {
        shared.ips.remove(ch.ip);
    }
}

fn join(inner: &mut Inner, ch: &Arc<Channel>, room: &str, rooms: &Rooms) {
    let info = rooms.join(room);
    let members = inner.rooms.entry(info.id.clone()).or_default();
    let mut st = ch.state();
    st.room_slot = members.len();
    st.room = Some(info);
    members.push(ch.clone());
}

fn leave(inner: &mut Inner, ch: &Arc<Channel>, rooms: &Rooms) {
    let mut st = ch.state();
    let Some(info) = st.room.take() else {
        return;
    };
    let slot = st.room_slot;
    drop(st);
    if let Some(members) = inner.rooms.get_mut(&info.id) {
        if members.get(slot).is_some_and(|m| Arc::ptr_eq(m, ch)) {
            swap_remove_member(members, slot, &info.id);
        }
        if members.is_empty() {
            inner.rooms.remove(&info.id);
        }
    }
    rooms.leave(&info);
}

/// Removes `ch` from an extra room's members (found by a scan: extra rooms keep no slot).
fn remove_member(inner: &mut Inner, ch: &Arc<Channel>, info: &crate::rooms::RoomInfo) {
    if let Some(members) = inner.rooms.get_mut(&info.id) {
        if let Some(i) = members.iter().position(|m| Arc::ptr_eq(m, ch)) {
            swap_remove_member(members, i, &info.id);
        }
        if members.is_empty() {
            inner.rooms.remove(&info.id);
        }
    }
}

/// Removes the member at `i`; the member moved into its place keeps a correct slot if this
/// room is its goim room (an extra room has no slot to fix).
fn swap_remove_member(members: &mut Vec<Arc<Channel>>, i: usize, room: &str) {
    members.swap_remove(i);
    if let Some(moved) = members.get(i) {
        let mut st = moved.state();
        if st.room.as_ref().is_some_and(|r| &*r.id == room) {
            st.room_slot = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ch(key: &str) -> Arc<Channel> {
        Arc::new(Channel::new(
            key.into(),
            0,
            IpAddr::from([127, 0, 0, 1]),
            &[1],
        ))
    }

    #[test]
    fn cityhash_matches_goim() {
        // Reference values of Google's CityHash32 v1.1 (as in the Go port goim uses).
        assert_eq!(cityhasher::hash::<u32>(b""), 0xdc56d17a);
        assert_eq!(cityhasher::hash::<u32>(b"a"), 0x3c973d4d);
        assert!(bucket_index("some-key", 32) < 32);
    }

    #[test]
    fn rooms_membership_survives_swap_remove() {
        let (b, shared) = (Bucket::default(), Shared::default());
        let rooms = &shared.rooms;
        let chans: Vec<_> = (0..5).map(|i| ch(&format!("k{i}"))).collect();
        for c in &chans {
            b.put(c, "r", &shared);
        }
        b.del(&chans[1], &shared);
        b.change_room(&chans[0], "s", rooms);
        assert_eq!(b.room_members("r"), 3);
        assert_eq!(b.room_members("s"), 1);
        assert_eq!(rooms.get("r").unwrap().local(), 3);
        let out = Outgoing::Raw(Bytes::from_static(b"x"));
        assert_eq!(b.push_room("r", &out, None, 8, false).queued, 3);
        for c in &chans[2..] {
            b.change_room(c, "", rooms);
        }
        assert_eq!(b.room_members("r"), 0);
        assert!(rooms.get("r").is_none());
        assert_eq!(b.channel_count(), 4);
    }

    /// Several rooms per connection: pushes to each reach it once; members mixing a goim
    /// room and extra rooms of one id keep correct slots through every removal; leaving,
    /// changing room and closing give every count back.
    #[test]
    fn extra_rooms_beside_the_goim_room() {
        let (b, shared) = (Bucket::default(), Shared::default());
        let rooms = &shared.rooms;
        let chans: Vec<_> = (0..6).map(|i| ch(&format!("k{i}"))).collect();
        // Even ones have "r" as their goim room, odd ones join it as an extra room.
        for (i, c) in chans.iter().enumerate() {
            b.put(c, if i % 2 == 0 { "r" } else { "home" }, &shared);
            if i % 2 == 1 {
                assert_eq!(b.add_room(c, "r", rooms, 4), Ok(true));
            }
            assert_eq!(b.add_room(c, "news", rooms, 4), Ok(true));
        }
        assert_eq!(
            b.add_room(&chans[0], "r", rooms, 4),
            Ok(false),
            "its goim room"
        );
        assert_eq!(
            b.add_room(&chans[1], "news", rooms, 4),
            Ok(false),
            "joined already"
        );
        assert_eq!(b.room_members("r"), 6);
        let out = Outgoing::Raw(Bytes::from_static(b"x"));
        assert_eq!(b.push_room("r", &out, None, 64, false).queued, 6);
        assert_eq!(b.push_room("news", &out, None, 64, false).queued, 6);
        // Remove members in an order that moves goim-room members and extra members around.
        assert!(b.remove_room(&chans[1], "r", rooms));
        assert!(!b.remove_room(&chans[1], "r", rooms), "not in it any more");
        b.change_room(&chans[0], "", rooms);
        assert!(b.remove_room(&chans[3], "r", rooms));
        b.del(&chans[2], &shared);
        assert_eq!(b.room_members("r"), 2);
        assert_eq!(rooms.get("r").unwrap().local(), 2);
        assert_eq!(b.push_room("r", &out, None, 64, false).queued, 2);
        // An extra room made the goim room is held once.
        b.change_room(&chans[5], "news", rooms);
        assert_eq!(b.room_members("news"), 5);
        assert_eq!(rooms.get("news").unwrap().local(), 5);
        // The limit.
        for r in ["a", "b", "c"] {
            assert_eq!(b.add_room(&chans[4], r, rooms, 4), Ok(true));
        }
        assert_eq!(b.add_room(&chans[4], "d", rooms, 4), Err(()));
        for c in &chans {
            b.del(c, &shared);
        }
        assert_eq!(rooms.len(), 0, "every count given back");
        assert_eq!(
            b.room_members("r") + b.room_members("news") + b.room_members("a"),
            0
        );
    }

    #[test]
    fn duplicate_key_kicks_older() {
        let (b, shared) = (Bucket::default(), Shared::default());
        let (old, new) = (ch("same"), ch("same"));
        b.put(&old, "r", &shared);
        b.put(&new, "r", &shared);
        assert!(old.is_closed() && old.was_kicked());
        assert_eq!(shared.rooms.get("r").unwrap().local(), 1);
        assert_eq!(shared.ips.len(), 1);
        // The kicked one's own teardown must not remove the new one.
        b.del(&old, &shared);
        assert!(Arc::ptr_eq(&b.get("same").unwrap(), &new));
        b.del(&new, &shared);
        assert!(shared.ips.is_empty());
        assert!(shared.rooms.is_empty());
    }
}
