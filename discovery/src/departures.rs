//! Who left a listing a moment ago: a comet whose lease lapsed while etcd stalled drops out
//! of every mirror at once and comes back a second later. Job keeps sending it room batches
//! meanwhile; logic tells push callers that presence may be incomplete.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Names listed now, and those that stopped being listed within `keep`, with when.
#[derive(Debug)]
pub struct Departures {
    /// `None`: listed at the last look; `Some(t)`: not listed since `t`.
    seen: Mutex<HashMap<String, Option<Instant>>>,
    keep: Duration,
}

impl Departures {
    pub fn new(keep: Duration) -> Self {
        Departures {
            seen: Mutex::new(HashMap::new()),
            keep,
        }
    }

    /// Takes `listed` as the names listed now; returns them and the names that left within
    /// `keep`, sorted. The time a name left is the first look that missed it, so look on
    /// every change of the listing (see [`Departures::follow`]), not only when asked.
    pub fn observe(&self, listed: impl IntoIterator<Item = String>) -> Vec<String> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Every name listed before and not now left now; earlier departures keep their time.
        for left in seen.values_mut() {
            left.get_or_insert(now);
        }
        for name in listed {
            seen.insert(name, None);
        }
        let keep = self.keep;
        seen.retain(|_, left| left.is_none_or(|t| now.duration_since(t) <= keep));
        let mut names: Vec<String> = seen.keys().cloned().collect();
        names.sort();
        names
    }

    /// As of the last look: how many names were listed, and whether one left within `keep`.
    /// Copies nothing, for a check on every request while [`Departures::follow`] keeps the
    /// looks current; a caller that sees fewer names listed now than then knows of a
    /// departure the follower has not noted yet.
    pub fn last_look(&self) -> (usize, bool) {
        let now = Instant::now();
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let listed = seen.values().filter(|left| left.is_none()).count();
        let left = seen
            .values()
            .any(|left| left.is_some_and(|t| now.duration_since(t) <= self.keep));
        (listed, left)
    }

    /// Calls `observe(list())` on every change `changes` announces, until `this` is dropped or
    /// the sender is. Needs a Tokio runtime.
    pub fn follow<F>(this: Weak<Self>, mut changes: watch::Receiver<u64>, list: F)
    where
        F: Fn() -> Vec<String> + Send + 'static,
    {
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(d) = this.upgrade() else { return };
                d.observe(list());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_that_left_is_kept_for_a_while_from_when_it_left() {
        let d = Departures::new(Duration::from_secs(2));
        assert_eq!(d.observe(names(&["a", "b"])), names(&["a", "b"]));
        // Long listed, then gone: kept for `keep` counted from the look that missed it.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(d.observe(names(&["b"])), names(&["a", "b"]));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(d.observe(names(&["b"])), names(&["a", "b"]));
        assert_eq!(d.last_look(), (1, true));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(d.last_look(), (1, false), "kept no longer than keep");
        assert_eq!(d.observe(names(&["b"])), names(&["b"]));
        // Back again: listed.
        assert_eq!(d.observe(names(&["a", "b"])), names(&["a", "b"]));
    }

    #[tokio::test(start_paused = true)]
    async fn following_a_listing_notes_departures_as_they_happen() {
        let d = Arc::new(Departures::new(Duration::from_secs(2)));
        let listing = Arc::new(Mutex::new(names(&["a", "b"])));
        let (tx, rx) = watch::channel(0u64);
        let l = listing.clone();
        Departures::follow(Arc::downgrade(&d), rx, move || l.lock().unwrap().clone());
        tx.send_modify(|v| *v += 1);
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(60)).await;
        listing.lock().unwrap().retain(|n| n != "a");
        tx.send_modify(|v| *v += 1);
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        // Gone 3 s ago, noticed then: no longer kept.
        assert_eq!(d.observe(names(&["b"])), names(&["b"]));
    }
}
