//! Signed tokens (`auth = "jwt"`): HS256, RS256 and ES256, with keys from files or a JWKS file
//! that are read again when they change. A token is never logged nor put in an error.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use goim_config::JwtConfig;
use jsonwebtoken::jwk::JwkSet;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use crate::auth::{AuthError, Authenticator, Identity, MAX_ID};

/// The claims goim-rs reads. `sub` (or `mid`) is the user id; `key` the device's connection
/// key; `room` (or the first of `rooms`) the room joined at auth; `accepts` the ops taken.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    mid: Option<i64>,
    #[serde(default)]
    key: String,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(default)]
    accepts: Vec<i32>,
    /// Checked by the validation (required); kept for the connection's expiry.
    #[serde(default)]
    exp: u64,
}

/// The keys as read from the files, by kind.
#[derive(Default)]
struct Keys {
    hmac: Vec<DecodingKey>,
    rsa: Vec<DecodingKey>,
    ec: Vec<DecodingKey>,
    /// JWKS keys, with their `kid`, converted once when loaded (not per connect).
    jwks: Vec<(Option<String>, DecodingKey)>,
}

/// What identifies the key files' contents without reading them: size and mtime of each.
type Stamp = Vec<(String, Option<(u64, SystemTime)>)>;

pub struct JwtAuth {
    cfg: JwtConfig,
    keys: RwLock<Arc<Keys>>,
    /// When the files were last looked at, and what they looked like.
    checked: Mutex<(Instant, Stamp)>,
}

/// A key file that cannot be used; names the file, never its content.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct KeyError {
    path: String,
    reason: String,
}

impl JwtAuth {
    /// Reads every key file once; a missing or unreadable file, or no key at all, is an error
    /// (a logic that could verify nothing would refuse every client).
    pub fn new(cfg: JwtConfig) -> Result<JwtAuth, KeyError> {
        let keys = load(&cfg)?;
        let stamp = stamp(&cfg);
        Ok(JwtAuth {
            cfg,
            keys: RwLock::new(Arc::new(keys)),
            checked: Mutex::new((Instant::now(), stamp)),
        })
    }

    /// Every key file: the ones named, then what `key_dir` holds now.
    fn files(cfg: &JwtConfig) -> Vec<String> {
        cfg.hs256_secret_files
            .iter()
            .chain(&cfg.public_key_files)
            .chain(std::iter::once(&cfg.jwks_file).filter(|f| !f.is_empty()))
            .cloned()
            .chain(dir_files(&cfg.key_dir))
            .collect()
    }

    /// The current keys, read again first if the files changed since the last look (at most
    /// every `reload`). A change that does not load keeps the old keys.
    fn keys(&self) -> Arc<Keys> {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            if checked.0.elapsed() >= self.cfg.reload {
                checked.0 = Instant::now();
                let now = stamp(&self.cfg);
                if now != checked.1 {
                    match load(&self.cfg) {
                        Ok(keys) => {
                            *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                            checked.1 = now;
                            tracing::info!("JWT keys reloaded");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "JWT keys changed but do not load; keeping the old ones")
                        }
                    }
                }
            }
        }
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.cfg.leeway.as_secs();
        v.required_spec_claims = HashSet::from(["exp".to_string()]);
        v.validate_nbf = true;
        if self.cfg.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.cfg.audience);
        }
        if !self.cfg.issuer.is_empty() {
            v.set_issuer(&self.cfg.issuer);
        }
        v
    }
}

/// The regular files in `dir`, sorted, without hidden ones (a mounted Secret's `..data`).
fn dir_files(dir: &str) -> Vec<String> {
    if dir.is_empty() {
        return Vec::new();
    }
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        // Follows symlinks, as a mounted Secret's entries are.
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_file()))
        .map(|e| e.path().display().to_string())
        .collect();
    files.sort();
    files
}

fn stamp(cfg: &JwtConfig) -> Stamp {
    JwtAuth::files(cfg)
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            (f, m)
        })
        .collect()
}

fn read(path: &str) -> Result<Vec<u8>, KeyError> {
    std::fs::read(Path::new(path)).map_err(|e| KeyError {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn load(cfg: &JwtConfig) -> Result<Keys, KeyError> {
    let mut keys = Keys::default();
    for f in &cfg.hs256_secret_files {
        let mut secret = read(f)?;
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        if secret.len() < 32 {
            return Err(KeyError {
                path: f.clone(),
                reason: "an HS256 secret needs at least 32 bytes".into(),
            });
        }
        keys.hmac.push(DecodingKey::from_secret(&secret));
    }
    for f in &cfg.public_key_files {
        let pem = read(f)?;
        if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
            keys.rsa.push(k);
        } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
            keys.ec.push(k);
        } else {
            return Err(KeyError {
                path: f.clone(),
                reason: "not a PEM RSA or EC public key".into(),
            });
        }
    }
    let mut jwks_files: Vec<String> = Vec::new();
    if !cfg.jwks_file.is_empty() {
        jwks_files.push(cfg.jwks_file.clone());
    }
    for f in dir_files(&cfg.key_dir) {
        let bytes = read(&f)?;
        if f.ends_with(".json") {
            jwks_files.push(f);
        } else if bytes.starts_with(b"-----BEGIN") {
            if let Ok(k) = DecodingKey::from_rsa_pem(&bytes) {
                keys.rsa.push(k);
            } else if let Ok(k) = DecodingKey::from_ec_pem(&bytes) {
                keys.ec.push(k);
            } else {
                return Err(KeyError {
                    path: f,
                    reason: "not a PEM RSA or EC public key".into(),
                });
            }
        } else {
            let secret = bytes.trim_ascii_end();
            if secret.len() < 32 {
                return Err(KeyError {
                    path: f,
                    reason: "an HS256 secret needs at least 32 bytes".into(),
                });
            }
            keys.hmac.push(DecodingKey::from_secret(secret));
        }
    }
    for f in jwks_files {
        let set: JwkSet = serde_json::from_slice(&read(&f)?).map_err(|e| KeyError {
            path: f.clone(),
            reason: format!("not a JWKS: {e}"),
        })?;
        // Keys this cannot verify with (encryption keys, other curves) are left out.
        let before = keys.jwks.len();
        keys.jwks.extend(set.keys.iter().filter_map(|j| {
            let k = DecodingKey::from_jwk(j).ok()?;
            Some((j.common.key_id.clone(), k))
        }));
        if keys.jwks.len() - before < set.keys.len() {
            tracing::warn!(path = %f, skipped = set.keys.len() - (keys.jwks.len() - before), "JWKS keys this cannot use are left out");
        }
    }
    let any = !keys.hmac.is_empty()
        || !keys.rsa.is_empty()
        || !keys.ec.is_empty()
        || !keys.jwks.is_empty();
    if !any {
        return Err(KeyError {
            path: "[logic.jwt]".into(),
            reason: "no keys configured".into(),
        });
    }
    Ok(keys)
}

fn refused(why: &str) -> AuthError {
    AuthError::Refused(why.into())
}

impl Authenticator for JwtAuth {
    fn authenticate(&self, token: &[u8], _cookie: &str) -> Result<Identity, AuthError> {
        let token = std::str::from_utf8(token)
            .map_err(|_| AuthError::Malformed("a JWT is ASCII".into()))?
            .trim();
        // Parses only the header, to pick the keys; `alg: none` and unknown algorithms fail
        // here or below.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Malformed("not a JWT".into()))?;
        let alg = header.alg;
        if !matches!(alg, Algorithm::HS256 | Algorithm::RS256 | Algorithm::ES256) {
            return Err(refused("algorithm not accepted (HS256, RS256, ES256)"));
        }
        let family = alg.family();
        let keys = self.keys();
        // The JWKS key the token names, if it names one; else every key of its algorithm's
        // kind. A key of another kind is never tried: an RSA public key is not an HMAC
        // secret (key confusion).
        let mut candidates: Vec<&DecodingKey> = Vec::new();
        if let Some(kid) = &header.kid {
            candidates.extend(
                keys.jwks
                    .iter()
                    .filter(|(id, _)| id.as_deref() == Some(kid.as_str()))
                    .map(|(_, k)| k),
            );
        }
        if candidates.is_empty() {
            let by_kind = match family {
                AlgorithmFamily::Hmac => &keys.hmac,
                AlgorithmFamily::Rsa => &keys.rsa,
                AlgorithmFamily::Ec => &keys.ec,
                _ => return Err(refused("algorithm not accepted")),
            };
            candidates.extend(by_kind.iter());
            candidates.extend(keys.jwks.iter().map(|(_, k)| k));
        }
        if candidates.is_empty() {
            return Err(refused("no key for the token's algorithm"));
        }
        let validation = self.validation(alg);
        let mut last = refused("bad signature");
        for key in candidates {
            if key.family() != family {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return identity(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::ExpiredSignature => refused("token expired"),
                        K::ImmatureSignature => refused("token not valid yet"),
                        K::InvalidAudience => refused("wrong audience"),
                        K::InvalidIssuer => refused("wrong issuer"),
                        K::MissingRequiredClaim(_) => refused("token has no exp"),
                        K::InvalidSignature => refused("bad signature"),
                        K::InvalidAlgorithm => refused("algorithm does not match the key"),
                        _ => refused("token refused"),
                    };
                    // Only a signature mismatch may be another key's token.
                    if !matches!(e.kind(), K::InvalidSignature) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn identity(c: Claims) -> Result<Identity, AuthError> {
    let mid = match (c.mid, c.sub.as_deref()) {
        (Some(m), _) => m,
        (None, Some(s)) => s
            .parse()
            .map_err(|_| AuthError::Malformed("sub must be a numeric user id".into()))?,
        (None, None) => return Err(AuthError::Malformed("no sub or mid".into())),
    };
    // `room` is goim's room; without it the first of `rooms` is. The others are joined
    // beside it.
    let mut rooms = c.rooms.into_iter();
    let room_id = c.room.or_else(|| rooms.next()).unwrap_or_default();
    let extra_rooms: Vec<String> = rooms.filter(|r| *r != room_id && !r.is_empty()).collect();
    if c.key.len() > MAX_ID
        || room_id.len() > MAX_ID
        || extra_rooms.iter().any(|r| r.len() > MAX_ID)
    {
        return Err(AuthError::Malformed(format!(
            "key and rooms are limited to {MAX_ID} bytes"
        )));
    }
    if extra_rooms.len() > crate::auth::MAX_TOKEN_ROOMS {
        return Err(AuthError::Malformed("too many rooms".into()));
    }
    Ok(Identity {
        mid,
        key: c.key,
        room_id,
        accepts: c.accepts,
        expires: c.exp,
        extra_rooms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::process::Command;
    use std::time::Duration;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
        encode(&Header::new(alg), &claims, key).unwrap()
    }

    /// An RSA or EC key pair made by openssl: (private PEM, public PEM file path).
    fn keypair(dir: &Path, name: &str, ec: bool) -> (Vec<u8>, String) {
        let private = dir.join(format!("{name}.key"));
        let public = dir.join(format!("{name}.pub"));
        let gen = if ec {
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                ])
                .arg(&private)
                .output()
        } else {
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&private)
                .output()
        }
        .expect("openssl (scripts/test.sh installs it)");
        assert!(
            gen.status.success(),
            "{}",
            String::from_utf8_lossy(&gen.stderr)
        );
        let out = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success());
        (
            std::fs::read(&private).unwrap(),
            public.display().to_string(),
        )
    }

    fn claims(mid: i64) -> serde_json::Value {
        json!({"sub": mid.to_string(), "key": "phone", "rooms": ["live://1", "live://2"], "accepts": [1000], "exp": now() + 60})
    }

    fn secret_file(dir: &Path, name: &str, secret: &[u8]) -> String {
        let p = dir.join(name);
        std::fs::write(&p, [secret, b"\n"].concat()).unwrap();
        p.display().to_string()
    }

    #[test]
    fn valid_expired_forged_none_and_confused_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (rsa_private, rsa_public) = keypair(dir.path(), "rsa", false);
        let (ec_private, ec_public) = keypair(dir.path(), "ec", true);
        let auth = JwtAuth::new(JwtConfig {
            hs256_secret_files: vec![secret_file(dir.path(), "hs", SECRET)],
            public_key_files: vec![rsa_public.clone(), ec_public],
            ..Default::default()
        })
        .unwrap();
        let hs = EncodingKey::from_secret(SECRET);
        let rs = EncodingKey::from_rsa_pem(&rsa_private).unwrap();
        let es = EncodingKey::from_ec_pem(&ec_private).unwrap();
        for (alg, key) in [
            (Algorithm::HS256, &hs),
            (Algorithm::RS256, &rs),
            (Algorithm::ES256, &es),
        ] {
            let c = claims(42);
            let id = auth
                .authenticate(sign(alg, key, c.clone()).as_bytes(), "")
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            assert_eq!(
                id,
                Identity {
                    mid: 42,
                    key: "phone".into(),
                    room_id: "live://1".into(),
                    accepts: vec![1000],
                    // The connection's expiry is the token's.
                    expires: c["exp"].as_u64().unwrap(),
                    extra_rooms: vec!["live://2".into()],
                }
            );
        }
        let refused = |t: &str| auth.authenticate(t.as_bytes(), "").unwrap_err();
        // Expired, beyond the leeway.
        let mut old = claims(1);
        old["exp"] = json!(now() - 120);
        assert_eq!(
            refused(&sign(Algorithm::HS256, &hs, old)),
            AuthError::Refused("token expired".into())
        );
        // No exp at all.
        assert_eq!(
            refused(&sign(Algorithm::HS256, &hs, json!({"sub": "1"}))),
            AuthError::Refused("token has no exp".into())
        );
        // Signed with another secret.
        let other = EncodingKey::from_secret(b"another secret of at least 32 bytes!");
        assert_eq!(
            refused(&sign(Algorithm::HS256, &other, claims(1))),
            AuthError::Refused("bad signature".into())
        );
        // A body changed after signing.
        let good = sign(Algorithm::RS256, &rs, claims(1));
        let mut parts: Vec<&str> = good.split('.').collect();
        let body = base64_url(&serde_json::to_vec(&claims(999)).unwrap());
        parts[1] = &body;
        assert!(matches!(refused(&parts.join(".")), AuthError::Refused(_)));
        // alg: none, unsigned.
        let none = format!(
            "{}.{}.",
            base64_url(br#"{"alg":"none","typ":"JWT"}"#),
            base64_url(&serde_json::to_vec(&claims(1)).unwrap())
        );
        assert!(auth.authenticate(none.as_bytes(), "").is_err());
        // Key confusion: HS256 with the RSA public key's PEM as the HMAC secret.
        let pem = std::fs::read(&rsa_public).unwrap();
        let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&pem), claims(1));
        assert_eq!(
            refused(&confused),
            AuthError::Refused("bad signature".into())
        );
        // An algorithm not accepted.
        let hs512 = sign(Algorithm::HS512, &hs, claims(1));
        assert!(matches!(refused(&hs512), AuthError::Refused(_)));
        // Not a JWT, and goim's JSON token.
        assert!(matches!(refused("garbage"), AuthError::Malformed(_)));
        assert!(matches!(refused(r#"{"mid":1}"#), AuthError::Malformed(_)));
        // No error names the token.
        assert!(!format!("{:?}", refused(&confused)).contains(&confused[..20]));
    }

    fn base64_url(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    #[test]
    fn keys_rotate_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = secret_file(dir.path(), "hs", SECRET);
        let auth = JwtAuth::new(JwtConfig {
            hs256_secret_files: vec![file.clone()],
            reload: Duration::ZERO,
            ..Default::default()
        })
        .unwrap();
        let old = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET),
            claims(5),
        );
        assert!(auth.authenticate(old.as_bytes(), "").is_ok());
        let next = b"the next secret, also 32 bytes or more";
        // A different length, so the change shows even within one mtime tick.
        std::fs::write(&file, next).unwrap();
        let new = sign(Algorithm::HS256, &EncodingKey::from_secret(next), claims(5));
        assert!(auth.authenticate(new.as_bytes(), "").is_ok());
        assert!(auth.authenticate(old.as_bytes(), "").is_err());
        // A broken file keeps the keys that work.
        std::fs::write(&file, b"short").unwrap();
        assert!(auth.authenticate(new.as_bytes(), "").is_ok());
    }

    #[test]
    fn jwks_keys_by_kid() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = keypair(dir.path(), "rsa", false);
        // The JWKS entry from the public key's components.
        let out = Command::new("openssl")
            .args(["rsa", "-pubin", "-in", &public, "-noout", "-modulus"])
            .output()
            .unwrap();
        let modulus = String::from_utf8(out.stdout).unwrap();
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": base64_url(&n), "e": "AQAB"}]});
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, jwks.to_string()).unwrap();
        let auth = JwtAuth::new(JwtConfig {
            jwks_file: file.display().to_string(),
            ..Default::default()
        })
        .unwrap();
        let key = EncodingKey::from_rsa_pem(&private).unwrap();
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("k1".into());
        let t = encode(&h, &claims(8), &key).unwrap();
        assert_eq!(auth.authenticate(t.as_bytes(), "").unwrap().mid, 8);
        // Without a kid, the set's keys of the right kind are tried.
        let t = sign(Algorithm::RS256, &key, claims(9));
        assert_eq!(auth.authenticate(t.as_bytes(), "").unwrap().mid, 9);
    }

    /// A mounted Secret: keys added to the directory are picked up, hidden entries skipped.
    #[test]
    fn a_key_directory_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hs256"), SECRET).unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let auth = JwtAuth::new(JwtConfig {
            key_dir: dir.path().display().to_string(),
            reload: Duration::ZERO,
            ..Default::default()
        })
        .unwrap();
        let hs = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET),
            claims(3),
        );
        assert!(auth.authenticate(hs.as_bytes(), "").is_ok());
        // An EC key pair made elsewhere; only its public half goes into the directory.
        let other = tempfile::tempdir().unwrap();
        let (private, public) = keypair(other.path(), "ec", true);
        std::fs::copy(&public, dir.path().join("ec.pem")).unwrap();
        let es = sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(&private).unwrap(),
            claims(4),
        );
        assert_eq!(auth.authenticate(es.as_bytes(), "").unwrap().mid, 4);
        assert!(auth.authenticate(hs.as_bytes(), "").is_ok());
    }

    #[test]
    fn no_keys_is_an_error_at_start() {
        assert!(JwtAuth::new(JwtConfig::default()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let short = secret_file(dir.path(), "hs", b"too short");
        assert!(JwtAuth::new(JwtConfig {
            hs256_secret_files: vec![short],
            ..Default::default()
        })
        .is_err());
    }
}
