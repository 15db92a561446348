//! Connection lifecycle events for the business (connect, disconnect with its reason),
//! batched and POSTed from a background task. Never in a connect's way: the queue is bounded
//! and a full one drops the new event and counts it; a batch the business does not take is
//! retried with backoff under one idempotency key, then dropped and counted.

use std::time::{SystemTime, UNIX_EPOCH};

use goim_config::EventsConfig;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::webhook::{Webhook, WebhookError};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub mid: i64,
    pub key: String,
    pub server: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub room: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Unix milliseconds.
    pub time: u64,
}

impl Event {
    pub fn new(kind: &'static str, mid: i64, key: &str, server: &str) -> Event {
        Event {
            kind,
            mid,
            key: key.into(),
            server: server.into(),
            room: String::new(),
            reason: String::new(),
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Where events are queued.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Event>,
    counts: Family<Outcome, Counter>,
}

impl EventSink {
    /// Starts the sender task; `None` without a URL. `counts` is
    /// `goim_logic_events_total{outcome}`: `sent`, `queue_full`, `failed`.
    pub fn from_config(
        cfg: &EventsConfig,
        counts: Family<Outcome, Counter>,
    ) -> Result<Option<EventSink>, WebhookError> {
        if cfg.url.is_empty() {
            return Ok(None);
        }
        let hook = Webhook::new(&cfg.url, cfg.timeout, &cfg.secret_file)?;
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        tokio::spawn(send_loop(hook, rx, cfg.clone(), counts.clone()));
        Ok(Some(EventSink { tx, counts }))
    }

    /// Queues `e`; a full queue drops it (counted).
    pub fn emit(&self, e: Event) {
        if self.tx.try_send(e).is_err() {
            self.counts
                .get_or_create(&Outcome {
                    outcome: "queue_full",
                })
                .inc();
        }
    }
}

async fn send_loop(
    hook: Webhook,
    mut rx: mpsc::Receiver<Event>,
    cfg: EventsConfig,
    counts: Family<Outcome, Counter>,
) {
    let batch_max = cfg.batch.max(1);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let linger = tokio::time::sleep(cfg.linger);
        tokio::pin!(linger);
        while batch.len() < batch_max {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => batch.push(e),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        let n = batch.len() as u64;
        let outcome = if deliver(&hook, &batch, &cfg).await {
            "sent"
        } else {
            "failed"
        };
        counts.get_or_create(&Outcome { outcome }).inc_by(n);
    }
}

/// One batch, retried with backoff under one idempotency key (at least once).
async fn deliver(hook: &Webhook, batch: &[Event], cfg: &EventsConfig) -> bool {
    let body = serde_json::json!({ "events": batch })
        .to_string()
        .into_bytes();
    hook.post_with_retries(body, cfg.max_attempts, "event batch")
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A business that is down: the batch is tried `max_attempts` times, then counted
    /// `failed`; a full queue counts `queue_full` instead of waiting.
    #[tokio::test(start_paused = true)]
    async fn undeliverable_events_are_counted() {
        let counts = Family::<Outcome, Counter>::default();
        let cfg = EventsConfig {
            url: "http://127.0.0.1:9/".into(),
            queue: 1,
            max_attempts: 2,
            ..Default::default()
        };
        let sink = EventSink::from_config(&cfg, counts.clone())
            .unwrap()
            .unwrap();
        for i in 0..50 {
            sink.emit(Event::new("connect", i, "k", "c"));
        }
        let get = |o: &'static str| counts.get_or_create(&Outcome { outcome: o }).get();
        assert!(get("queue_full") > 0);
        // The paused clock runs the linger and the backoff at once.
        while get("failed") == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(get("failed") >= 1);
        assert_eq!(get("sent"), 0);
    }
}
