//! `auth = "hook"`: the business decides who a token is (EMQX's HTTP auth, Centrifugo's
//! connect proxy). Fails closed: a hook that is slow, down or answers nonsense refuses the
//! client, and says why in the log. Admissions are cached by a hash of token and cookie.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use goim_config::HookConfig;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::auth::{AuthError, Authenticator, Identity, MAX_ID};
use crate::webhook::{Webhook, WebhookError};

pub struct HookAuth {
    hook: Webhook,
    ttl: Duration,
    cap: usize,
    cache: Mutex<HashMap<[u8; 32], (Instant, Identity)>>,
}

#[derive(Deserialize)]
struct Admitted {
    mid: i64,
    #[serde(default)]
    key: String,
    #[serde(default, alias = "room_id")]
    room: String,
    #[serde(default)]
    accepts: Vec<i32>,
    #[serde(default)]
    expires: u64,
    /// Rooms beside `room`.
    #[serde(default)]
    rooms: Vec<String>,
}

impl HookAuth {
    pub fn new(cfg: &HookConfig) -> Result<HookAuth, WebhookError> {
        Ok(HookAuth {
            hook: Webhook::new(&cfg.url, cfg.timeout, &cfg.secret_file)?,
            ttl: cfg.cache_ttl,
            cap: cfg.cache_size,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, id: &[u8; 32]) -> Option<Identity> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(id)
            .filter(|(until, _)| Instant::now() < *until)
            .map(|(_, i)| i.clone())
    }

    fn remember(&self, id: [u8; 32], who: &Identity) {
        if self.cap == 0 || self.ttl.is_zero() {
            return;
        }
        let mut until = Instant::now() + self.ttl;
        // Never past the token's own expiry.
        if who.expires > 0 {
            let left = who.expires.saturating_sub(unix_now());
            until = until.min(Instant::now() + Duration::from_secs(left));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.cap {
            let now = Instant::now();
            cache.retain(|_, (u, _)| *u > now);
            // Still full of live entries: start over rather than grow (bounded memory).
            if cache.len() >= self.cap {
                cache.clear();
            }
        }
        cache.insert(id, (until, who.clone()));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait::async_trait]
impl Authenticator for HookAuth {
    fn authenticate(&self, _token: &[u8], _cookie: &str) -> Result<Identity, AuthError> {
        Err(AuthError::Refused(
            "the connect hook is asked asynchronously (verify)".into(),
        ))
    }

    async fn verify(&self, token: &[u8], cookie: &str) -> Result<Identity, AuthError> {
        let mut h = Sha256::new();
        h.update(token);
        h.update([0]);
        h.update(cookie.as_bytes());
        let id: [u8; 32] = h.finalize().into();
        if let Some(who) = self.cached(&id) {
            return Ok(who);
        }
        let body = match std::str::from_utf8(token) {
            Ok(t) => serde_json::json!({ "token": t, "cookie": cookie }),
            Err(_) => {
                use base64::Engine;
                let b = base64::engine::general_purpose::STANDARD.encode(token);
                serde_json::json!({ "token_base64": b, "cookie": cookie })
            }
        };
        let (status, reply) = self
            .hook
            .post(body.to_string().into_bytes(), None)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "connect hook failed; client refused");
                AuthError::Refused(format!("connect hook unavailable: {e}"))
            })?;
        match status.as_u16() {
            200 => {}
            401 | 403 => return Err(AuthError::Refused("the connect hook said no".into())),
            s => {
                tracing::warn!(
                    status = s,
                    "connect hook answered an unexpected status; client refused"
                );
                return Err(AuthError::Refused(format!("connect hook answered {s}")));
            }
        }
        let a: Admitted = serde_json::from_slice(&reply).map_err(|e| {
            tracing::warn!(error = %e, "connect hook reply is not the expected JSON; client refused");
            AuthError::Refused("connect hook reply not understood".into())
        })?;
        if a.key.len() > MAX_ID
            || a.room.len() > MAX_ID
            || a.rooms.iter().any(|r| r.len() > MAX_ID)
            || a.rooms.len() > crate::auth::MAX_TOKEN_ROOMS
        {
            return Err(AuthError::Refused(format!(
                "connect hook gave a key or room over {MAX_ID} bytes"
            )));
        }
        if a.expires > 0 && a.expires <= unix_now() {
            return Err(AuthError::Refused(
                "connect hook gave an expired identity".into(),
            ));
        }
        let who = Identity {
            mid: a.mid,
            key: a.key,
            room_id: a.room,
            accepts: a.accepts,
            expires: a.expires,
            extra_rooms: a.rooms,
        };
        self.remember(id, &who);
        Ok(who)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    use super::*;

    /// A business that admits `good`, refuses `no`, answers nonsense for `broken`, 500 for
    /// `fail` and never answers `slow`; it counts calls and checks the signature.
    async fn business(calls: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new().route(
            "/connect",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let sig = headers
                        .get(crate::webhook::SIGNATURE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let reply = |s: StatusCode, b: String| (s, b);
                    if !sig.starts_with("sha256=") {
                        return reply(StatusCode::BAD_REQUEST, "unsigned".into());
                    }
                    match v["token"].as_str().unwrap_or_default() {
                        "good" => reply(
                            StatusCode::OK,
                            serde_json::json!({"mid": 5, "key": "k5", "room": "live://1",
                                "accepts": [1000], "expires": unix_now() + 60})
                            .to_string(),
                        ),
                        "no" => reply(StatusCode::UNAUTHORIZED, String::new()),
                        "broken" => reply(StatusCode::OK, "{not json".into()),
                        "slow" => std::future::pending().await,
                        _ => reply(StatusCode::INTERNAL_SERVER_ERROR, String::new()),
                    }
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        format!("http://{addr}/connect")
    }

    fn hook(url: &str, secret: &std::path::Path) -> HookAuth {
        HookAuth::new(&HookConfig {
            url: url.into(),
            timeout: Duration::from_millis(300),
            secret_file: secret.display().to_string(),
            cache_ttl: Duration::from_secs(30),
            cache_size: 2,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn the_business_decides_and_a_broken_hook_refuses() {
        let calls = Arc::new(AtomicUsize::new(0));
        let url = business(calls.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "hook secret\n").unwrap();
        let auth = hook(&url, &secret);

        let who = auth.verify(b"good", "").await.unwrap();
        assert_eq!(
            (who.mid, who.key.as_str(), who.room_id.as_str()),
            (5, "k5", "live://1")
        );
        assert_eq!(who.accepts, [1000]);
        assert!(who.expires > unix_now());
        // Cached: a reconnect storm does not become a hook storm.
        auth.verify(b"good", "").await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another cookie is another question.
        auth.verify(b"good", "c=1").await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        for bad in [&b"no"[..], b"broken", b"fail", b"slow"] {
            let e = auth.verify(bad, "").await.unwrap_err();
            assert!(matches!(e, AuthError::Refused(_)), "{e}");
        }
        // Refusals are not cached.
        let before = calls.load(Ordering::SeqCst);
        let _ = auth.verify(b"no", "").await;
        assert_eq!(calls.load(Ordering::SeqCst), before + 1);

        // The cache stays within its size.
        auth.verify(b"good", "c=2").await.unwrap();
        auth.verify(b"good", "c=3").await.unwrap();
        assert!(auth.cache.lock().unwrap().len() <= 2);

        // A hook that is down refuses too.
        let down = hook("http://127.0.0.1:9/connect", &secret);
        assert!(matches!(
            down.verify(b"good", "").await,
            Err(AuthError::Refused(_))
        ));
    }

    #[test]
    fn bad_urls_and_the_signature() {
        for bad in ["", "ftp://x/", "not a url", "http://"] {
            assert!(
                Webhook::new(bad, Duration::from_secs(1), "").is_err(),
                "{bad}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "key\n").unwrap();
        let w = Webhook::new(
            "http://x/",
            Duration::from_secs(1),
            &secret.display().to_string(),
        )
        .unwrap();
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), RFC 4231 style.
        assert_eq!(
            w.sign(b"The quick brown fox jumps over the lazy dog")
                .unwrap(),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert!(Webhook::new("http://x/", Duration::from_secs(1), "")
            .unwrap()
            .sign(b"x")
            .is_none());
        let missing = Webhook::new("http://x/", Duration::from_secs(1), "/nonexistent/secret");
        assert!(matches!(missing, Err(WebhookError::Secret { .. })));
    }
}
