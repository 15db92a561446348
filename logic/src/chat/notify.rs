//! The notification sink: offline members' notifications POSTed in batches to the business
//! (which sends the mobile pushes), at least once. A message's notifications are one job; the
//! message is marked notified in the store only after every batch holding them was taken,
//! so a sink that is down, a full queue or a restart leaves it to be notified again later
//! (`renotify_after`) instead of losing it. Each notification carries an `id` for the
//! business to drop repeats. Sends never wait for the sink: a full queue is counted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use goim_chat::Store;
use goim_config::EventsConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::events::Outcome;
use crate::webhook::{Webhook, WebhookError};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Notification {
    /// `conversation/seq/mid`: the same notification always has the same id.
    pub id: String,
    pub mid: i64,
    pub conversation: String,
    pub seq: i64,
    pub sender: i64,
    pub preview: String,
    /// The message's time, Unix milliseconds.
    pub time: i64,
}

/// One message's notifications.
#[derive(Debug, Clone)]
pub struct Job {
    pub conversation: String,
    pub seq: i64,
    pub items: Vec<Notification>,
}

#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Job>,
    counts: Family<Outcome, Counter>,
    /// Notifications queued: the bound is on them, not on messages, since one message to
    /// a big group carries thousands.
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl Notifier {
    /// Starts the sender task; `None` without a URL. `counts` is
    /// `goim_logic_notifications_total{outcome}` (per notification): `sent`, `queue_full`
    /// and `failed` (both left to be notified again), `stale` (marking it done failed).
    pub fn start(
        cfg: &EventsConfig,
        store: Store,
        counts: Family<Outcome, Counter>,
    ) -> Result<Option<Notifier>, WebhookError> {
        if cfg.url.is_empty() {
            return Ok(None);
        }
        let hook = Webhook::new(&cfg.url, cfg.timeout, &cfg.secret_file)?;
        let limit = cfg.queue.max(1);
        // Every job holds at least one notification: the channel never holds more jobs.
        let (tx, rx) = mpsc::channel(limit);
        let queued = Arc::new(AtomicUsize::new(0));
        let sender = Sender {
            hook,
            cfg: cfg.clone(),
            store,
            counts: counts.clone(),
            queued: queued.clone(),
        };
        tokio::spawn(sender.run(rx));
        Ok(Some(Notifier {
            tx,
            counts,
            queued,
            limit,
        }))
    }

    /// Queues a message's notifications; false (counted `queue_full`; the message is
    /// notified again later) when `queue` notifications are waiting already. A message
    /// bigger than the whole queue is taken when the queue is empty.
    pub fn offer(&self, job: Job) -> bool {
        let n = job.items.len();
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q == 0 || q + n <= self.limit).then_some(q + n)
            })
            .is_ok();
        if !taken {
            self.count("queue_full", n as u64);
            return false;
        }
        if self.tx.try_send(job).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.count("queue_full", n as u64);
            return false;
        }
        true
    }

    fn count(&self, outcome: &'static str, n: u64) {
        self.counts.get_or_create(&Outcome { outcome }).inc_by(n);
    }
}

/// The sink's sending task.
struct Sender {
    hook: Webhook,
    cfg: EventsConfig,
    store: Store,
    counts: Family<Outcome, Counter>,
    queued: Arc<AtomicUsize>,
}

impl Sender {
    fn count(&self, outcome: &'static str, n: usize) {
        self.counts
            .get_or_create(&Outcome { outcome })
            .inc_by(n as u64);
    }

    async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let batch_max = self.cfg.batch.max(1);
        while let Some(first) = rx.recv().await {
            // Jobs until a batch is full or the linger ends; a big job fills many batches.
            let mut jobs = vec![first];
            let mut items = jobs[0].items.len();
            let linger = tokio::time::sleep(self.cfg.linger);
            tokio::pin!(linger);
            while items < batch_max {
                tokio::select! {
                    j = rx.recv() => match j {
                        Some(j) => {
                            items += j.items.len();
                            jobs.push(j);
                        }
                        None => break,
                    },
                    _ = &mut linger => break,
                }
            }
            self.queued.fetch_sub(items, Ordering::AcqRel);
            let all: Vec<&Notification> = jobs.iter().flat_map(|j| &j.items).collect();
            let mut delivered = true;
            for batch in all.chunks(batch_max) {
                if !deliver(&self.hook, batch, &self.cfg).await {
                    delivered = false;
                    break;
                }
            }
            if !delivered {
                // Left unmarked: the message is notified again after `renotify_after`.
                self.count("failed", items);
                continue;
            }
            self.count("sent", items);
            for j in &jobs {
                if let Err(e) = self.store.mark_notified(&j.conversation, j.seq).await {
                    self.count("stale", j.items.len());
                    tracing::warn!(error = %e, conversation = %j.conversation, seq = j.seq,
                        "notified, but not marked: its notifications will repeat");
                }
            }
        }
    }
}

/// One batch, retried with backoff under one idempotency key.
async fn deliver(hook: &Webhook, batch: &[&Notification], cfg: &EventsConfig) -> bool {
    let body = serde_json::json!({ "notifications": batch })
        .to_string()
        .into_bytes();
    hook.post_with_retries(body, cfg.max_attempts, "notification batch")
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: usize) -> Job {
        let items = (0..n as i64)
            .map(|mid| Notification {
                id: format!("c/1/{mid}"),
                mid,
                conversation: "c".into(),
                seq: 1,
                sender: 0,
                preview: String::new(),
                time: 0,
            })
            .collect();
        Job {
            conversation: "c".into(),
            seq: 1,
            items,
        }
    }

    /// The queue holds `queue` notifications, however they are spread over messages; a
    /// message bigger than the queue still goes when the queue is empty.
    #[tokio::test]
    async fn the_queue_is_bounded_in_notifications() {
        let store = Store::open("sqlite::memory:", Default::default())
            .await
            .unwrap();
        let counts = Family::<Outcome, Counter>::default();
        let cfg = EventsConfig {
            url: "http://127.0.0.1:9/".into(),
            queue: 10,
            ..Default::default()
        };
        // No await between offers: the sender task has not taken anything yet.
        let n = Notifier::start(&cfg, store.clone(), counts.clone())
            .unwrap()
            .unwrap();
        assert!(n.offer(job(6)));
        assert!(!n.offer(job(6)));
        assert!(n.offer(job(4)));
        assert!(!n.offer(job(1)));
        let full = counts.get_or_create(&Outcome {
            outcome: "queue_full",
        });
        assert_eq!(full.get(), 7);
        let big = Notifier::start(&cfg, store, counts.clone())
            .unwrap()
            .unwrap();
        assert!(big.offer(job(25)), "an empty queue takes any message");
        assert!(!big.offer(job(1)));
    }
}
