//! API keys for logic's HTTP API (pushes and, when asked, the read-only routes). Keys come
//! from the config and a file (one per line: a Kubernetes Secret mounted as a file), are
//! compared in constant time, and are never logged.

use std::path::Path;
use std::sync::Arc;

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("reading API keys from {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

/// The keys a request may carry; none configured means the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Arc<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        let keys = keys
            .into_iter()
            .map(|k| k.trim().as_bytes().to_vec())
            .filter(|k| !k.is_empty())
            .collect();
        ApiKeys {
            keys: Arc::new(keys),
        }
    }

    /// `keys`, plus one per non-empty line of `file` (when given).
    pub fn load(keys: &[String], file: Option<&Path>) -> Result<Self, ApiKeyError> {
        let mut all = keys.to_vec();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ApiKeyError::File {
                path: path.display().to_string(),
                source,
            })?;
            all.extend(text.lines().map(String::from));
        }
        Ok(ApiKeys::new(all))
    }

    /// The keys `[logic]` configures (`api_keys`, `api_keys_file`).
    pub fn from_config(cfg: &crate::LogicConfig) -> Result<Self, ApiKeyError> {
        let file = (!cfg.api_keys_file.is_empty()).then(|| Path::new(&cfg.api_keys_file));
        Self::load(&cfg.api_keys, file)
    }

    /// Says so in the log when the push API is open beyond this machine.
    pub fn warn_if_open(&self, bound: std::net::SocketAddr) {
        if self.is_empty() && !bound.ip().is_loopback() {
            tracing::warn!(%bound, "the push API takes requests from anyone who reaches it: set [logic] api_keys or api_keys_file");
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the request carries one of the keys, as `Authorization: Bearer KEY` or
    /// `X-Api-Key: KEY`. Each key is compared in constant time (a key's length is not
    /// secret).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        if self.keys.is_empty() {
            return true;
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        let given = headers
            .get("x-api-key")
            .map(|v| v.as_bytes())
            .or(bearer)
            .map(<[u8]>::trim_ascii);
        let Some(given) = given else {
            return false;
        };
        // Every key is compared, so the time does not tell which one matched.
        self.keys
            .iter()
            .fold(subtle::Choice::from(0), |any, k| {
                any | k.as_slice().ct_eq(given)
            })
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn keys_are_checked_in_either_header() {
        let keys = ApiKeys::new(["k1".to_string(), " k2 ".into(), "".into()]);
        assert!(keys.allows(&headers("authorization", "Bearer k1")));
        assert!(keys.allows(&headers("x-api-key", "k2")));
        assert!(!keys.allows(&headers("x-api-key", "k3")));
        assert!(!keys.allows(&headers("authorization", "Basic k1")));
        assert!(!keys.allows(&headers("x-api-key", "")));
        assert!(!keys.allows(&HeaderMap::new()));
        assert!(
            ApiKeys::default().allows(&HeaderMap::new()),
            "no keys: open"
        );
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    #[test]
    fn a_file_adds_keys_and_a_missing_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("goim-keys-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n\n").unwrap();
        let keys = ApiKeys::load(&["inline".into()], Some(&dir)).unwrap();
        assert!(keys.allows(&headers("x-api-key", "from-file")));
        assert!(keys.allows(&headers("x-api-key", "inline")));
        std::fs::remove_file(&dir).unwrap();
        assert!(ApiKeys::load(&[], Some(&dir)).is_err());
    }
}
