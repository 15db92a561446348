//! TLS for every listener and the roles' gRPC, on rustls with the `ring` provider.
//!
//! Certificates come from a directory laid out as cert-manager writes a Secret: `tls.crt`
//! (the chain, leaf first), `tls.key`, and `ca.crt` (the CA that client certificates, or
//! the servers a role dials, must chain to). The files are looked at again at most every
//! `reload`, and a changed set builds a new config for the connections made after it, so a
//! renewed certificate applies without a restart. A set that does not load keeps the old one.

mod connector;
mod incoming;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use connector::Connector;
pub use incoming::accept;
pub use rustls;
pub use tokio_rustls;

/// The certificate chain's file name in the directory.
pub const CERT: &str = "tls.crt";
/// The private key's file name.
pub const KEY: &str = "tls.key";
/// The CA's file name.
pub const CA: &str = "ca.crt";

/// How often the files are looked at unless told otherwise.
pub const DEFAULT_RELOAD: Duration = Duration::from_secs(10);

/// A TLS directory that cannot be used; names the file, never a key's content.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: no certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: the CA file holds no usable certificate")]
    NoCa { path: PathBuf },
    #[error("TLS configuration from {dir}: {source}")]
    Rustls { dir: PathBuf, source: rustls::Error },
    #[error("client certificate verifier from {dir}: {reason}")]
    Verifier { dir: PathBuf, reason: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let path = dir.join(name);
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate { path });
    }
    Ok(certs)
}

fn key(dir: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let path = dir.join(KEY);
    PrivateKeyDer::from_pem_file(&path).map_err(|source| Error::Read { path, source })
}

fn roots(dir: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs(dir, CA)?);
    if added == 0 {
        return Err(Error::NoCa { path: dir.join(CA) });
    }
    Ok(roots)
}

fn rustls_err(dir: &Path) -> impl FnOnce(rustls::Error) -> Error + '_ {
    move |source| Error::Rustls {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Size and mtime of each file: what tells a change without reading the keys. Metadata
/// follows symlinks, so a mounted Secret's atomic swap of `..data` shows.
type Stamp = [Option<(u64, SystemTime)>; 3];

fn stamp(dir: &Path) -> Stamp {
    [CERT, KEY, CA].map(|f| {
        std::fs::metadata(dir.join(f))
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
    })
}

type Build<T> = Box<dyn Fn(&Path) -> Result<T, Error> + Send + Sync>;

/// A config built from a directory's files, built again when they change.
pub struct Reloading<T> {
    dir: PathBuf,
    reload: Duration,
    build: Build<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    checked: Instant,
    stamp: Stamp,
    current: Arc<T>,
}

impl<T> Reloading<T> {
    fn new(dir: &Path, reload: Duration, build: Build<T>) -> Result<Self, Error> {
        let stamp = stamp(dir);
        let current = Arc::new(build(dir)?);
        Ok(Reloading {
            dir: dir.to_path_buf(),
            reload,
            build,
            state: Mutex::new(State {
                checked: Instant::now(),
                stamp,
                current,
            }),
        })
    }

    /// The config for a new connection: built again first if the files changed since the
    /// last look (at most every `reload`).
    pub fn config(&self) -> Arc<T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() >= self.reload {
            s.checked = Instant::now();
            let now = stamp(&self.dir);
            if now != s.stamp {
                match (self.build)(&self.dir) {
                    Ok(c) => {
                        s.current = Arc::new(c);
                        s.stamp = now;
                        tracing::info!(dir = %self.dir.display(), "TLS certificates reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS files changed but do not load; keeping the old ones"
                    ),
                }
            }
        }
        s.current.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A listener's TLS.
pub type ServerTls = Reloading<ServerConfig>;

/// How a listener speaks TLS.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Require a client certificate that chains to `ca.crt` (mutual TLS).
    pub client_auth: bool,
    /// ALPN protocols offered (`h2` for gRPC, `http/1.1` for HTTP and WebSocket).
    pub alpn: Vec<Vec<u8>>,
    /// How often the files are looked at (zero: [`DEFAULT_RELOAD`]).
    pub reload: Duration,
}

fn reload_or_default(d: Duration) -> Duration {
    if d.is_zero() {
        DEFAULT_RELOAD
    } else {
        d
    }
}

/// A listener's TLS from `dir`: `tls.crt` and `tls.key`, plus `ca.crt` with `client_auth`.
pub fn server(dir: impl AsRef<Path>, opts: ServerOptions) -> Result<Arc<ServerTls>, Error> {
    let reload = reload_or_default(opts.reload);
    let build = move |dir: &Path| -> Result<ServerConfig, Error> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err(dir))?;
        let builder = if opts.client_auth {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
                    .build()
                    .map_err(|e| Error::Verifier {
                        dir: dir.to_path_buf(),
                        reason: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder
            .with_single_cert(certs(dir, CERT)?, key(dir)?)
            .map_err(rustls_err(dir))?;
        cfg.alpn_protocols = opts.alpn.clone();
        Ok(cfg)
    };
    Ok(Arc::new(Reloading::new(
        dir.as_ref(),
        reload,
        Box::new(build),
    )?))
}

/// A role's TLS when it dials another (gRPC between roles).
pub type ClientTls = Reloading<ClientConfig>;

/// How a role dials: the server must chain to `ca.crt`; `tls.crt`/`tls.key` are presented
/// as the client certificate. With `server_name` empty the server's name is not checked
/// (roles dial pod IPs, which a certificate rarely names; the private CA is the trust);
/// otherwise the server's certificate must name it.
pub fn client(
    dir: impl AsRef<Path>,
    server_name: &str,
    reload: Duration,
) -> Result<Arc<ClientTls>, Error> {
    let server_name = server_name.to_string();
    let build = move |dir: &Path| -> Result<ClientConfig, Error> {
        let verifier = verify::ServerVerifier::new(roots(dir)?, provider(), &server_name).map_err(
            |reason| Error::Verifier {
                dir: dir.to_path_buf(),
                reason,
            },
        )?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err(dir))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(certs(dir, CERT)?, key(dir)?)
            .map_err(rustls_err(dir))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    };
    Ok(Arc::new(Reloading::new(
        dir.as_ref(),
        reload_or_default(reload),
        Box::new(build),
    )?))
}

#[cfg(test)]
mod tests;
