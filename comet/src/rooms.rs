//! Comet-wide room counts: the local member count per room and the cluster-wide count logic
//! returns from `RenewOnline`. Heartbeat replies read them without touching any bucket. A
//! room appearing or emptying is told to the jobs watching ([`Watchers`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::room_watch::{Event, Watchers};

#[derive(Debug)]
pub struct RoomInfo {
    pub id: Arc<str>,
    /// The number of the change that made it appear: its first member waits until every
    /// watching job has it ([`Watchers::announced`]).
    pub added: u64,
    local: AtomicI32,
    all: AtomicI32,
}

impl RoomInfo {
    pub fn local(&self) -> i32 {
        self.local.load(Ordering::Relaxed)
    }

    /// Cluster-wide count if logic reported one, else the local count (goim's `OnlineNum`).
    pub fn online(&self) -> i32 {
        match self.all.load(Ordering::Relaxed) {
            n if n > 0 => n,
            _ => self.local(),
        }
    }
}

#[derive(Debug, Default)]
pub struct Rooms {
    map: Mutex<HashMap<Arc<str>, Arc<RoomInfo>>>,
    pub watchers: Watchers,
}

impl Rooms {
    /// Rooms whose dropped watchers are counted in `dropped` (by reason).
    pub fn counting_drops(
        dropped: crate::room_watch::DropCounter,
        unwatched: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Rooms {
            map: Mutex::default(),
            watchers: Watchers::counting(dropped, unwatched),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<RoomInfo>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more member, creating the room if needed.
    pub fn join(&self, id: &str) -> Arc<RoomInfo> {
        let mut map = self.lock();
        let room = match map.get(id) {
            Some(r) => r.clone(),
            None => {
                let id: Arc<str> = id.into();
                let added = self.watchers.room_changed(&id, true);
                let r = Arc::new(RoomInfo {
                    id: id.clone(),
                    added,
                    local: AtomicI32::new(0),
                    all: AtomicI32::new(0),
                });
                map.insert(id, r.clone());
                r
            }
        };
        room.local.fetch_add(1, Ordering::Relaxed);
        room
    }

    /// Counts one member less; the room goes when empty.
    pub fn leave(&self, room: &RoomInfo) {
        let mut map = self.lock();
        if room.local.fetch_sub(1, Ordering::Relaxed) <= 1 && map.remove(&room.id).is_some() {
            self.watchers.room_changed(&room.id, false);
        }
    }

    /// A new watcher of the rooms: its id, its snapshot (every room, numbered up to the
    /// second value) and the changes after it.
    pub fn watch(&self) -> (u64, Vec<String>, u64, mpsc::Receiver<Event>) {
        let map = self.lock();
        let (id, base, events) = self.watchers.watch();
        let rooms = map.keys().map(|r| r.to_string()).collect();
        (id, rooms, base, events)
    }

    /// Local counts of non-empty rooms, for `RenewOnline`.
    pub fn counts(&self) -> HashMap<String, i32> {
        self.lock()
            .values()
            .filter(|r| r.local() > 0)
            .map(|r| (r.id.to_string(), r.local()))
            .collect()
    }

    /// Applies logic's cluster-wide counts; rooms it does not know fall back to local.
    pub fn set_all(&self, all: &HashMap<String, i32>) {
        for r in self.lock().values() {
            let n = all.get(&*r.id).copied().unwrap_or(0);
            r.all.store(n, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub fn get(&self, id: &str) -> Option<Arc<RoomInfo>> {
        self.lock().get(id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_fallback() {
        let rooms = Rooms::default();
        let a = rooms.join("live://1");
        let b = rooms.join("live://1");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.online(), 2);
        rooms.set_all(&HashMap::from([("live://1".to_string(), 7)]));
        assert_eq!(a.online(), 7);
        rooms.set_all(&HashMap::new());
        assert_eq!(a.online(), 2);
        rooms.leave(&a);
        rooms.leave(&b);
        assert!(rooms.is_empty());
        assert!(rooms.counts().is_empty());
    }
}
