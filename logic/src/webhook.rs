//! Calls to the business over HTTP (the connect hook, forwarded client messages, lifecycle
//! events): one JSON POST with a deadline, an optional HMAC-SHA256 signature of the body,
//! and a bounded reply. Errors say what failed, never what a token or secret was.

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

/// The header carrying `sha256=<hex>` of the body, keyed with the configured secret.
pub const SIGNATURE: &str = "x-goim-signature";
/// The largest reply read; a longer one is an error, not a memory hog.
pub const MAX_REPLY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {0:?} is not a valid http or https URL")]
    Url(String),
    #[error("webhook did not answer within {0:?}")]
    Timeout(Duration),
    #[error("webhook unreachable: {0}")]
    Unreachable(String),
    #[error("webhook reply over {MAX_REPLY} bytes or broken: {0}")]
    Reply(String),
    #[error("reading the webhook secret {path}: {source}")]
    Secret {
        path: String,
        source: std::io::Error,
    },
}

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// One business endpoint.
#[derive(Clone)]
pub struct Webhook {
    url: Uri,
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url).finish()
    }
}

impl Webhook {
    /// `secret_file`: empty for unsigned calls; its content (trailing newline dropped)
    /// keys the signature.
    pub fn new(url: &str, timeout: Duration, secret_file: &str) -> Result<Webhook, WebhookError> {
        let parsed: Uri = url.parse().map_err(|_| WebhookError::Url(url.into()))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            return Err(WebhookError::Url(url.into()));
        }
        let secret = if secret_file.is_empty() {
            None
        } else {
            let s = std::fs::read(secret_file).map_err(|source| WebhookError::Secret {
                path: secret_file.into(),
                source,
            })?;
            Some(s.strip_suffix(b"\n").unwrap_or(&s).to_vec())
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .map_err(|e| WebhookError::Unreachable(format!("TLS roots: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Webhook {
            url: parsed,
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout,
            secret,
        })
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// The signature header's value for `body`, if a secret is configured.
    pub fn sign(&self, body: &[u8]) -> Option<String> {
        let secret = self.secret.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(format!("sha256={hex}"))
    }

    /// POSTs `body` until a 2xx answers, at most `attempts` times with backoff between,
    /// under one idempotency key (at least once); false when every attempt failed. `what`
    /// names the batch in the logs.
    pub async fn post_with_retries(&self, body: Vec<u8>, attempts: u32, what: &str) -> bool {
        let key = uuid::Uuid::new_v4().to_string();
        let mut backoff =
            goim_discovery::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let never = tokio_util::sync::CancellationToken::new();
        let attempts = attempts.max(1);
        for attempt in 1..=attempts {
            match self.post(body.clone(), Some(&key)).await {
                Ok((status, _)) if status.is_success() => return true,
                Ok((status, _)) => tracing::warn!(%status, attempt, "{what} refused"),
                Err(e) => tracing::warn!(error = %e, attempt, "{what} not delivered"),
            }
            if attempt < attempts {
                backoff.wait(&never).await;
            }
        }
        false
    }

    /// POSTs `body` (JSON) with `idempotency_key` when given; the status and the reply.
    pub async fn post(
        &self,
        body: Vec<u8>,
        idempotency_key: Option<&str>,
    ) -> Result<(StatusCode, Bytes), WebhookError> {
        let mut req = Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, "goim-rs");
        if let Some(sig) = self.sign(&body) {
            req = req.header(SIGNATURE, sig);
        }
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| WebhookError::Url(e.to_string()))?;
        let call = async {
            let res = self
                .client
                .request(req)
                .await
                .map_err(|e| WebhookError::Unreachable(e.to_string()))?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_REPLY)
                .collect()
                .await
                .map_err(|e| WebhookError::Reply(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| WebhookError::Timeout(self.timeout))?
    }
}
