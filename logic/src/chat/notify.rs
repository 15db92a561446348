//! The notification sink: offline members' notifications POSTed in batches to the business
//! (which sends the mobile pushes), at least once. A message's notifications are one job; the
//! message is marked notified in the store only after every batch holding them was taken,
//! so a sink that is down, a full queue or a restart leaves it to be notified again later
//! (`renotify_after`) instead of losing it. Each notification carries an `id` for the
//! business to drop repeats. Sends never wait for the sink: a full queue is counted.

use std::time::Duration;

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
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(send_loop(hook, rx, cfg.clone(), store, counts.clone()));
        Ok(Some(Notifier { tx, counts }))
    }

    /// Queues a message's notifications; false (counted) when the queue is full.
    pub fn offer(&self, job: Job) -> bool {
        let n = job.items.len() as u64;
        if self.tx.try_send(job).is_err() {
            self.count("queue_full", n);
            return false;
        }
        true
    }

    fn count(&self, outcome: &'static str, n: u64) {
        self.counts.get_or_create(&Outcome { outcome }).inc_by(n);
    }
}

async fn send_loop(
    hook: Webhook,
    mut rx: mpsc::Receiver<Job>,
    cfg: EventsConfig,
    store: Store,
    counts: Family<Outcome, Counter>,
) {
    let batch_max = cfg.batch.max(1);
    let count = |outcome: &'static str, n: usize| {
        counts.get_or_create(&Outcome { outcome }).inc_by(n as u64)
    };
    while let Some(first) = rx.recv().await {
        // Jobs until a batch is full or the linger ends; a big job fills many batches.
        let mut jobs = vec![first];
        let mut items = jobs[0].items.len();
        let linger = tokio::time::sleep(cfg.linger);
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
        let all: Vec<&Notification> = jobs.iter().flat_map(|j| &j.items).collect();
        let mut delivered = true;
        for batch in all.chunks(batch_max) {
            if !deliver(&hook, batch, &cfg).await {
                delivered = false;
                break;
            }
        }
        if !delivered {
            // Left unmarked: the message is notified again after `renotify_after`.
            count("failed", items);
            continue;
        }
        count("sent", items);
        for j in &jobs {
            if let Err(e) = store.mark_notified(&j.conversation, j.seq).await {
                count("stale", j.items.len());
                tracing::warn!(error = %e, conversation = %j.conversation, seq = j.seq,
                    "notified, but not marked: its notifications will repeat");
            }
        }
    }
}

/// One batch, retried with backoff under one idempotency key.
async fn deliver(hook: &Webhook, batch: &[&Notification], cfg: &EventsConfig) -> bool {
    let body = serde_json::json!({ "notifications": batch })
        .to_string()
        .into_bytes();
    let key = uuid::Uuid::new_v4().to_string();
    let mut backoff =
        goim_discovery::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let never = tokio_util::sync::CancellationToken::new();
    for attempt in 1..=cfg.max_attempts.max(1) {
        match hook.post(body.clone(), Some(&key)).await {
            Ok((status, _)) if status.is_success() => return true,
            Ok((status, _)) => tracing::warn!(%status, attempt, "notification batch refused"),
            Err(e) => tracing::warn!(error = %e, attempt, "notification batch not delivered"),
        }
        if attempt < cfg.max_attempts {
            backoff.wait(&never).await;
        }
    }
    false
}
