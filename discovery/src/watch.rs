//! A prefix mirrored from etcd: list, then watch from the listed revision; on any error,
//! cancellation or compaction, list again. etcd-client does not re-establish a watch after an
//! etcd restart, so this loop is what keeps every role's view current.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Backoff;

/// One mirrored key: its decoded value and the lease it hangs on.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry<T> {
    pub value: T,
    pub lease: i64,
}

/// The mirror of one prefix, keyed by the part after the prefix.
pub struct WatchCache<T> {
    map: Arc<RwLock<HashMap<String, Entry<T>>>>,
    synced: Arc<AtomicBool>,
    version: watch::Receiver<u64>,
}

impl<T> Clone for WatchCache<T> {
    fn clone(&self) -> Self {
        WatchCache {
            map: self.map.clone(),
            synced: self.synced.clone(),
            version: self.version.clone(),
        }
    }
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> WatchCache<T> {
    pub fn spawn(client: Client, prefix: String, stop: CancellationToken) -> Self {
        let map = Arc::new(RwLock::new(HashMap::new()));
        let synced = Arc::new(AtomicBool::new(false));
        let (tx, rx) = watch::channel(0u64);
        tokio::spawn(run(client, prefix, map.clone(), synced.clone(), tx, stop));
        WatchCache {
            map,
            synced,
            version: rx,
        }
    }

    pub fn get(&self, name: &str) -> Option<Entry<T>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn snapshot(&self) -> Vec<(String, Entry<T>)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, e)| (k.clone(), e.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The mirrored names, without copying their values.
    pub fn names(&self) -> Vec<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    /// How many names are mirrored, and how many of their values satisfy `f`, without
    /// copying anything (for checks on a hot path).
    pub fn count(&self, f: impl Fn(&T) -> bool) -> (usize, usize) {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        (map.len(), map.values().filter(|e| f(&e.value)).count())
    }

    /// Whether the last list succeeded and the watch since has not failed.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Resolves after the next change to the mirror (or its first sync).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.clone()
    }
}

fn decode<T: DeserializeOwned>(prefix: &str, kv: &KeyValue) -> Option<(String, Entry<T>)> {
    let key = std::str::from_utf8(kv.key()).ok()?;
    let name = key.strip_prefix(prefix)?.to_string();
    match serde_json::from_slice(kv.value()) {
        Ok(value) => Some((
            name,
            Entry {
                value,
                lease: kv.lease(),
            },
        )),
        Err(e) => {
            // A bad record is someone else's bug; skip it rather than stop the role.
            tracing::warn!(%key, error = %e, "skipping invalid etcd value");
            None
        }
    }
}

async fn run<T: DeserializeOwned + Send + Sync + 'static>(
    mut client: Client,
    prefix: String,
    map: Arc<RwLock<HashMap<String, Entry<T>>>>,
    synced: Arc<AtomicBool>,
    tx: watch::Sender<u64>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::standard();
    let bump = |tx: &watch::Sender<u64>| tx.send_modify(|v| *v += 1);
    loop {
        let listed = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())) => r,
        };
        let rev = match listed {
            Ok(resp) => {
                let fresh: HashMap<_, _> = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| decode(&prefix, kv))
                    .collect();
                *map.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                synced.store(true, Ordering::Relaxed);
                bump(&tx);
                resp.header().map_or(0, |h| h.revision())
            }
            Err(e) => {
                synced.store(false, Ordering::Relaxed);
                tracing::warn!(%prefix, error = %e, "etcd list failed; retrying");
                if !backoff.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let mut stream = match client.watch(prefix.as_str(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                synced.store(false, Ordering::Relaxed);
                tracing::warn!(%prefix, error = %e, "etcd watch failed; listing again");
                if !backoff.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.message() => m,
            };
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        tracing::info!(%prefix, compacted = resp.compact_revision(), "watch cancelled; listing again");
                        break;
                    }
                    if resp.events().is_empty() {
                        continue;
                    }
                    {
                        let mut m = map.write().unwrap_or_else(|e| e.into_inner());
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            match ev.event_type() {
                                EventType::Put => match decode(&prefix, kv) {
                                    Some((k, e)) => {
                                        m.insert(k, e);
                                    }
                                    None => {
                                        // An invalid new value replaces nothing usable.
                                        if let Some(k) = std::str::from_utf8(kv.key())
                                            .ok()
                                            .and_then(|k| k.strip_prefix(prefix.as_str()))
                                        {
                                            m.remove(k);
                                        }
                                    }
                                },
                                EventType::Delete => {
                                    if let Some(k) = std::str::from_utf8(kv.key())
                                        .ok()
                                        .and_then(|k| k.strip_prefix(prefix.as_str()))
                                    {
                                        m.remove(k);
                                    }
                                }
                            }
                        }
                    }
                    bump(&tx);
                    backoff.reset();
                }
                Ok(None) | Err(_) => {
                    synced.store(false, Ordering::Relaxed);
                    tracing::warn!(%prefix, "etcd watch ended; listing again");
                    break;
                }
            }
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}
