//! Authentication of the `OpAuth` token. The default is goim's: a JSON token taken at its word.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub mid: i64,
    /// Empty: logic assigns a UUID.
    pub key: String,
    pub room_id: String,
    pub accepts: Vec<i32>,
    /// When the token stops being valid, in Unix seconds (0: never).
    pub expires: u64,
    /// Rooms joined at auth beside `room_id` (a signed token's `rooms`).
    pub extra_rooms: Vec<String>,
}

/// Rooms a token may name beside its first.
pub const MAX_TOKEN_ROOMS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token is not valid JSON for goim's AuthToken: {0}")]
    Malformed(String),
    #[error("token refused: {0}")]
    Refused(String),
}

#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// Checks a token on the spot (local keys, no I/O).
    fn authenticate(&self, token: &[u8], cookie: &str) -> Result<Identity, AuthError>;
    /// What logic calls: the same check by default; an authenticator that must ask
    /// elsewhere (the connect hook) overrides it.
    async fn verify(&self, token: &[u8], cookie: &str) -> Result<Identity, AuthError> {
        self.authenticate(token, cookie)
    }
}

/// The authenticator `[logic] auth` names: goim's JSON token, or signed tokens checked
/// against `[logic.jwt]`'s keys (an error if none load).
pub fn from_config(
    cfg: &goim_config::LogicConfig,
) -> Result<std::sync::Arc<dyn Authenticator>, ConfigError> {
    Ok(match cfg.auth {
        goim_config::AuthMode::Json => std::sync::Arc::new(JsonTokenAuth),
        goim_config::AuthMode::Jwt => {
            std::sync::Arc::new(crate::jwt::JwtAuth::new(cfg.jwt.clone())?)
        }
        goim_config::AuthMode::Hook => std::sync::Arc::new(crate::hook::HookAuth::new(&cfg.hook)?),
    })
}

/// An authenticator that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("JWT keys: {0}")]
    Jwt(#[from] crate::jwt::KeyError),
    #[error("connect hook: {0}")]
    Hook(#[from] crate::webhook::WebhookError),
}

/// Longest key or room id accepted. They become etcd keys and room-count records; a client
/// must not be able to make those large.
pub use goim_proto::MAX_ID;

/// goim's development auth: `{"mid","key","room_id","platform","accepts"}`, not verified.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonTokenAuth;

#[derive(Deserialize)]
struct AuthToken {
    #[serde(default)]
    mid: i64,
    #[serde(default)]
    key: String,
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    #[allow(dead_code)]
    platform: String,
    #[serde(default)]
    accepts: Vec<i32>,
}

impl Authenticator for JsonTokenAuth {
    fn authenticate(&self, token: &[u8], _cookie: &str) -> Result<Identity, AuthError> {
        // serde would also read a struct from a JSON array; goim's decoder (and ours) wants an
        // object.
        if token.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(AuthError::Malformed("expected a JSON object".into()));
        }
        let t: AuthToken =
            serde_json::from_slice(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if t.key.len() > MAX_ID || t.room_id.len() > MAX_ID {
            return Err(AuthError::Malformed(format!(
                "key and room_id are limited to {MAX_ID} bytes"
            )));
        }
        Ok(Identity {
            mid: t.mid,
            key: t.key,
            room_id: t.room_id,
            accepts: t.accepts,
            expires: 0,
            extra_rooms: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goim_token() {
        let id = JsonTokenAuth
            .authenticate(
                br#"{"mid":123, "room_id":"live://1000", "platform":"web", "accepts":[1000,1001,1002]}"#,
                "",
            )
            .unwrap();
        assert_eq!(
            id,
            Identity {
                mid: 123,
                key: String::new(),
                room_id: "live://1000".into(),
                accepts: vec![1000, 1001, 1002],
                expires: 0,
                extra_rooms: Vec::new(),
            }
        );
    }

    #[test]
    fn bad_tokens() {
        for bad in [
            &b"not json"[..],
            br#"{"mid":"123"}"#,
            br#"{"accepts":[1.5]}"#,
            br#"{"accepts":[99999999999]}"#,
            br#"[]"#,
            b"",
            format!(r#"{{"room_id":"{}"}}"#, "r".repeat(MAX_ID + 1)).as_bytes(),
        ] {
            assert!(
                matches!(
                    JsonTokenAuth.authenticate(bad, ""),
                    Err(AuthError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
