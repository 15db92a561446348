//! API keys for logic's HTTP API (pushes and, when asked, the read-only routes). Keys come
//! from the config and a file (one per line: a Kubernetes Secret mounted as a file), are
//! compared in constant time, and are never logged. The file is read again when it changes
//! (looked at every [`RELOAD`] at most), so keys rotate without a restart: add the new key,
//! move clients over, remove the old one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

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

/// How often the keys file is looked at for changes.
pub const RELOAD: Duration = Duration::from_secs(10);

type Stamp = Option<(u64, SystemTime)>;

/// The keys a request may carry; none configured means the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Arc<RwLock<Arc<Vec<Vec<u8>>>>>,
    /// The keys file, with the inline keys, and when and how it was last seen.
    file: Option<Arc<KeysFile>>,
}

struct KeysFile {
    path: PathBuf,
    inline: Vec<String>,
    reload: Duration,
    checked: Mutex<(Instant, Stamp)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        write!(f, "ApiKeys({} keys)", self.current().len())
    }
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

fn parse(keys: impl IntoIterator<Item = String>) -> Vec<Vec<u8>> {
    keys.into_iter()
        .map(|k| k.trim().as_bytes().to_vec())
        .filter(|k| !k.is_empty())
        .collect()
}

fn read(inline: &[String], path: &Path) -> Result<Vec<Vec<u8>>, ApiKeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| ApiKeyError::File {
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse(
        inline.iter().cloned().chain(text.lines().map(String::from)),
    ))
}

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        ApiKeys {
            keys: Arc::new(RwLock::new(Arc::new(parse(keys)))),
            file: None,
        }
    }

    /// `keys`, plus one per non-empty line of `file` (when given), read again when it
    /// changes.
    pub fn load(keys: &[String], file: Option<&Path>) -> Result<Self, ApiKeyError> {
        Self::load_every(keys, file, RELOAD)
    }

    fn load_every(
        keys: &[String],
        file: Option<&Path>,
        reload: Duration,
    ) -> Result<Self, ApiKeyError> {
        let Some(path) = file else {
            return Ok(ApiKeys::new(keys.to_vec()));
        };
        let all = read(keys, path)?;
        Ok(ApiKeys {
            keys: Arc::new(RwLock::new(Arc::new(all))),
            file: Some(Arc::new(KeysFile {
                path: path.to_path_buf(),
                inline: keys.to_vec(),
                reload,
                checked: Mutex::new((Instant::now(), stamp(path))),
            })),
        })
    }

    /// The keys now: read again first if the file changed since the last look. A change
    /// that cannot be read, or that would leave no key at all (which would open the API),
    /// keeps the old keys.
    fn current(&self) -> Arc<Vec<Vec<u8>>> {
        if let Some(f) = &self.file {
            let mut checked = f.checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.0.elapsed() >= f.reload {
                checked.0 = Instant::now();
                let now = stamp(&f.path);
                if now != checked.1 {
                    match read(&f.inline, &f.path) {
                        Ok(keys) if !keys.is_empty() => {
                            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                            checked.1 = now;
                            tracing::info!("API keys reloaded");
                        }
                        Ok(_) => tracing::warn!(
                            "the API keys file changed to no key at all; keeping the old keys"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "API keys file changed but cannot be read; keeping the old keys")
                        }
                    }
                }
            }
        }
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
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
        self.current().is_empty()
    }

    /// Whether the request carries one of the keys, as `Authorization: Bearer KEY` or
    /// `X-Api-Key: KEY`. Each key is compared in constant time (a key's length is not
    /// secret).
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let keys = self.current();
        if keys.is_empty() {
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
        keys.iter()
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

    /// Rotation: a key added to the file works and a removed one stops, without a restart;
    /// a file emptied or gone keeps the last keys (the API never opens by accident).
    #[test]
    fn keys_rotate_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(
            &file, "old
",
        )
        .unwrap();
        let keys = ApiKeys::load_every(&[], Some(&file), Duration::ZERO).unwrap();
        assert!(keys.allows(&headers("x-api-key", "old")));
        std::fs::write(
            &file,
            "old
new-and-longer
",
        )
        .unwrap();
        assert!(keys.allows(&headers("x-api-key", "new-and-longer")));
        std::fs::write(
            &file,
            "new-and-longer
",
        )
        .unwrap();
        assert!(!keys.allows(&headers("x-api-key", "old")));
        std::fs::write(&file, "").unwrap();
        assert!(keys.allows(&headers("x-api-key", "new-and-longer")));
        assert!(
            !keys.allows(&HeaderMap::new()),
            "an empty file must not open the API"
        );
        std::fs::remove_file(&file).unwrap();
        assert!(keys.allows(&headers("x-api-key", "new-and-longer")));
    }
}
