//! Client messages of ops the comet does not answer (outside goim's set), forwarded to the
//! business with the connection's identity; what it answers goes back to the connection.
//! Bounded: at most `max_in_flight` calls at once, and beyond that a message gets an
//! `overloaded` error at once rather than a queue.

use std::sync::Arc;

use base64::Engine;
use goim_config::ForwardConfig;
use goim_proto::logic::{ReceiveReply, ReceiveReq};
use tokio::sync::Semaphore;

use crate::webhook::{Webhook, WebhookError};

/// How a forwarded message ended, as `goim_logic_forwarded_total{outcome}` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The business answered 2xx; its body goes back.
    Replied,
    /// The business answered another status (its error goes back).
    Refused,
    /// Too many calls in flight.
    Overloaded,
    /// Timeout, unreachable, or a reply too large for a client packet.
    Failed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Replied => "replied",
            Outcome::Refused => "refused",
            Outcome::Overloaded => "overloaded",
            Outcome::Failed => "failed",
        }
    }
}

pub struct Forwarder {
    hook: Webhook,
    slots: Arc<Semaphore>,
    /// The largest reply a client may be sent (logic's `max_message`).
    max_reply: usize,
}

fn error(code: i32, msg: impl Into<String>) -> ReceiveReply {
    ReceiveReply {
        reply: Default::default(),
        error: msg.into(),
        code,
        op: 0,
    }
}

impl Forwarder {
    /// `None` when no URL is configured (goim's behaviour: logged and dropped).
    pub fn from_config(
        cfg: &ForwardConfig,
        max_reply: usize,
    ) -> Result<Option<Forwarder>, WebhookError> {
        if cfg.url.is_empty() {
            return Ok(None);
        }
        Ok(Some(Forwarder {
            hook: Webhook::new(&cfg.url, cfg.timeout, &cfg.secret_file)?,
            slots: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            max_reply,
        }))
    }

    pub async fn forward(&self, req: &ReceiveReq) -> (ReceiveReply, Outcome) {
        let Ok(_slot) = self.slots.try_acquire() else {
            return (error(503, "overloaded"), Outcome::Overloaded);
        };
        let p = req.proto.clone().unwrap_or_default();
        let body = serde_json::json!({
            "mid": req.mid,
            "key": req.key,
            "server": req.server,
            "op": p.op,
            "seq": p.seq,
            "body": base64::engine::general_purpose::STANDARD.encode(&p.body),
        });
        match self.hook.post(body.to_string().into_bytes(), None).await {
            Ok((status, reply)) if status.is_success() => {
                if reply.len() > self.max_reply {
                    tracing::warn!(
                        len = reply.len(),
                        "business reply too large for a client packet"
                    );
                    return (error(502, "reply too large"), Outcome::Failed);
                }
                (
                    ReceiveReply {
                        reply,
                        ..Default::default()
                    },
                    Outcome::Replied,
                )
            }
            Ok((status, reply)) => {
                // The business's own words, bounded, if it gave any.
                let text = String::from_utf8_lossy(&reply[..reply.len().min(256)]).to_string();
                let msg = if text.is_empty() {
                    status.canonical_reason().unwrap_or("refused").to_string()
                } else {
                    text
                };
                (error(i32::from(status.as_u16()), msg), Outcome::Refused)
            }
            Err(e) => {
                tracing::debug!(error = %e, "forwarding a client message failed");
                let code = if matches!(e, WebhookError::Timeout(_)) {
                    504
                } else {
                    502
                };
                (
                    error(code, "the business could not be reached"),
                    Outcome::Failed,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::routing::post;
    use goim_proto::protocol::Proto;

    use super::*;

    fn msg(body: &'static [u8]) -> ReceiveReq {
        ReceiveReq {
            mid: 3,
            key: "k".into(),
            server: "c".into(),
            proto: Some(Proto {
                ver: 1,
                op: 1500,
                seq: 1,
                body: bytes::Bytes::from_static(body),
            }),
        }
    }

    /// One call in flight at most: a second gets `overloaded` at once; a reply over the
    /// client packet limit and a hook that is down are errors, never a hang.
    #[tokio::test]
    async fn bounded_and_failing_clearly() {
        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let app = axum::Router::new().route(
            "/",
            post(move |body: axum::body::Bytes| {
                let got = got_tx.clone();
                async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    match v["body"].as_str() {
                        // "hang" in base64: hold the slot.
                        Some("aGFuZw==") => {
                            let _ = got.send(());
                            std::future::pending::<String>().await
                        }
                        _ => "x".repeat(100),
                    }
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let cfg = ForwardConfig {
            url: format!("http://{addr}/"),
            timeout: Duration::from_secs(5),
            secret_file: String::new(),
            max_in_flight: 1,
        };
        let f = Arc::new(Forwarder::from_config(&cfg, 50).unwrap().unwrap());
        let held = tokio::spawn({
            let f = f.clone();
            async move { f.forward(&msg(b"hang")).await }
        });
        got_rx.recv().await.unwrap();
        let (r, o) = f.forward(&msg(b"other")).await;
        assert_eq!(
            (o, r.code, r.error.as_str()),
            (Outcome::Overloaded, 503, "overloaded")
        );
        held.abort();
        let _ = held.await;
        // The slot is back; the 100-byte reply is over the 50-byte limit.
        let (r, o) = f.forward(&msg(b"other")).await;
        assert_eq!((o, r.code), (Outcome::Failed, 502));

        let down = ForwardConfig {
            url: "http://127.0.0.1:9/".into(),
            ..cfg
        };
        let f = Forwarder::from_config(&down, 50).unwrap().unwrap();
        let (r, o) = f.forward(&msg(b"x")).await;
        assert_eq!((o, r.code), (Outcome::Failed, 502));
        assert!(Forwarder::from_config(&ForwardConfig::default(), 50)
            .unwrap()
            .is_none());
    }
}
