//! Online state: which comet holds a key, a user's keys, and room counts per comet. Behind a
//! trait so the etcd store (distributed mode) and the in-memory one (standalone) are
//! interchangeable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
    #[error("online store unavailable: {0}")]
    Unavailable(String),
}

/// Keys grouped by the comet holding them.
/// A user's keys grouped by the comet holding them, each with the user it was found for (the
/// comet checks it again before delivering).
pub type UserKeysByServer = BTreeMap<String, Vec<(String, i64)>>;

/// What a presence lookup found, and whether it can have missed connections: `complete` is
/// false while a comet puts its connections' presence back (after its etcd lease lapsed) or
/// has just vanished from the registry; connections there may be missing from `servers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found<T> {
    pub servers: T,
    pub complete: bool,
}

impl<T> Found<T> {
    /// A lookup that cannot miss anything (the in-memory store).
    pub fn complete(servers: T) -> Self {
        Found {
            servers,
            complete: true,
        }
    }
}

/// The comet a call comes from, and the etcd lease it says its state hangs on (0: it keeps
/// none, as goim's own comets).
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub server: &'a str,
    pub lease: i64,
}

impl<'a> Origin<'a> {
    pub fn new(server: &'a str, lease: i64) -> Self {
        Origin { server, lease }
    }
}

#[async_trait]
pub trait OnlineStore: Send + Sync + 'static {
    /// Records key -> server (and mid -> key when mid > 0); returns the version of what it
    /// stored (its presence revision).
    async fn add(
        &self,
        from: Origin<'_>,
        mid: i64,
        key: &str,
        room: &str,
    ) -> Result<i64, OnlineError>;
    /// Removes the mapping, but only while it still points at `server` and, when `revision`
    /// is not 0, is still the version that Connect stored (goim deletes blindly, so a late
    /// disconnect could erase a reconnect of the same key). Returns whether anything was
    /// removed.
    async fn del(
        &self,
        from: Origin<'_>,
        mid: i64,
        key: &str,
        revision: i64,
    ) -> Result<bool, OnlineError>;
    /// The comet of each key, with the user that connection belongs to.
    async fn servers_by_keys(
        &self,
        keys: &[String],
    ) -> Result<Found<UserKeysByServer>, OnlineError>;
    async fn servers_by_mids(&self, mids: &[i64]) -> Result<Found<UserKeysByServer>, OnlineError>;
    /// Stores one comet's room counts (replacing its previous report).
    async fn renew_rooms(
        &self,
        from: Origin<'_>,
        counts: HashMap<String, i32>,
    ) -> Result<(), OnlineError>;
    /// Cluster-wide room counts.
    async fn room_counts(&self) -> Result<HashMap<String, i32>, OnlineError>;
    /// A client heartbeat: presence normally needs nothing (it lives as long as its comet);
    /// a store may put back a mapping that lapsed.
    async fn touch(&self, _from: Origin<'_>, _mid: i64, _key: &str) -> Result<(), OnlineError> {
        Ok(())
    }
}

/// Cluster-wide room counts: the per-comet reports added up.
pub fn sum_room_counts<'a>(
    reports: impl Iterator<Item = &'a HashMap<String, i32>>,
) -> HashMap<String, i32> {
    let mut all: HashMap<String, i32> = HashMap::new();
    for counts in reports {
        for (room, n) in counts {
            let e = all.entry(room.clone()).or_default();
            *e = e.saturating_add(*n);
        }
    }
    all
}

#[derive(Debug, Default)]
struct Mem {
    /// key -> (server, mid, revision)
    keys: HashMap<String, (String, i64, i64)>,
    revision: i64,
    mids: HashMap<i64, HashSet<String>>,
    rooms: HashMap<String, HashMap<String, i32>>,
}

/// Standalone's store: everything in one process.
#[derive(Debug, Default)]
pub struct MemoryOnline {
    inner: Mutex<Mem>,
}

impl MemoryOnline {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl OnlineStore for MemoryOnline {
    async fn add(
        &self,
        from: Origin<'_>,
        mid: i64,
        key: &str,
        _room: &str,
    ) -> Result<i64, OnlineError> {
        let server = from.server;
        let mut m = self.lock();
        m.revision += 1;
        let rev = m.revision;
        if let Some((_, old_mid, _)) = m
            .keys
            .insert(key.to_string(), (server.to_string(), mid, rev))
        {
            if old_mid != mid {
                if let Some(set) = m.mids.get_mut(&old_mid) {
                    set.remove(key);
                    if set.is_empty() {
                        m.mids.remove(&old_mid);
                    }
                }
            }
        }
        if mid > 0 {
            m.mids.entry(mid).or_default().insert(key.to_string());
        }
        Ok(rev)
    }

    async fn del(
        &self,
        from: Origin<'_>,
        mid: i64,
        key: &str,
        revision: i64,
    ) -> Result<bool, OnlineError> {
        let server = from.server;
        let mut m = self.lock();
        if m.keys
            .get(key)
            .is_none_or(|(s, _, rev)| s != server || (revision != 0 && *rev != revision))
        {
            return Ok(false);
        }
        m.keys.remove(key);
        if let Some(set) = m.mids.get_mut(&mid) {
            set.remove(key);
            if set.is_empty() {
                m.mids.remove(&mid);
            }
        }
        Ok(true)
    }

    async fn servers_by_keys(
        &self,
        keys: &[String],
    ) -> Result<Found<UserKeysByServer>, OnlineError> {
        let m = self.lock();
        let mut out = UserKeysByServer::new();
        for k in keys {
            if let Some((server, mid, _)) = m.keys.get(k) {
                out.entry(server.clone())
                    .or_default()
                    .push((k.clone(), *mid));
            }
        }
        Ok(Found::complete(out))
    }

    async fn servers_by_mids(&self, mids: &[i64]) -> Result<Found<UserKeysByServer>, OnlineError> {
        let m = self.lock();
        let mut out = UserKeysByServer::new();
        for mid in mids {
            for k in m.mids.get(mid).into_iter().flatten() {
                if let Some((server, _, _)) = m.keys.get(k) {
                    out.entry(server.clone())
                        .or_default()
                        .push((k.clone(), *mid));
                }
            }
        }
        Ok(Found::complete(out))
    }

    async fn renew_rooms(
        &self,
        from: Origin<'_>,
        counts: HashMap<String, i32>,
    ) -> Result<(), OnlineError> {
        self.lock().rooms.insert(from.server.to_string(), counts);
        Ok(())
    }

    async fn room_counts(&self) -> Result<HashMap<String, i32>, OnlineError> {
        Ok(sum_room_counts(self.lock().rooms.values()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mappings_and_guarded_delete() {
        let s = MemoryOnline::default();
        s.add(Origin::new("a", 0), 1, "k1", "").await.unwrap();
        s.add(Origin::new("a", 0), 1, "k2", "").await.unwrap();
        s.add(Origin::new("b", 0), 2, "k3", "").await.unwrap();
        let by = s.servers_by_mids(&[1, 2, 9]).await.unwrap().servers;
        assert_eq!(by["a"].len(), 2);
        assert_eq!(by["b"], vec![("k3".to_string(), 2)]);
        // k1 reconnects on comet b; a's late disconnect must not erase it.
        let first = s.add(Origin::new("b", 0), 1, "k1", "").await.unwrap();
        assert!(!s.del(Origin::new("a", 0), 1, "k1", 0).await.unwrap());
        // Nor does a late disconnect of an earlier connection of k1 on b itself.
        let second = s.add(Origin::new("b", 0), 1, "k1", "").await.unwrap();
        assert!(!s.del(Origin::new("b", 0), 1, "k1", first).await.unwrap());
        assert!(second > first);
        let by = s
            .servers_by_keys(&["k1".into(), "nope".into()])
            .await
            .unwrap();
        assert!(by.complete);
        let by = by.servers;
        assert_eq!(by.len(), 1);
        assert_eq!(by["b"], vec![("k1".to_string(), 1)]);
        assert!(s.del(Origin::new("b", 0), 1, "k1", second).await.unwrap());
        assert!(s
            .servers_by_keys(&["k1".into()])
            .await
            .unwrap()
            .servers
            .is_empty());
    }

    #[tokio::test]
    async fn room_counts_sum_over_comets() {
        let s = MemoryOnline::default();
        s.renew_rooms(Origin::new("a", 0), HashMap::from([("r".into(), 2)]))
            .await
            .unwrap();
        s.renew_rooms(
            Origin::new("b", 0),
            HashMap::from([("r".into(), 3), ("q".into(), 1)]),
        )
        .await
        .unwrap();
        s.renew_rooms(Origin::new("a", 0), HashMap::new())
            .await
            .unwrap();
        let c = s.room_counts().await.unwrap();
        assert_eq!((c["r"], c["q"]), (3, 1));
    }
}
