//! What every role shares about etcd: the key layout and record types, a lease kept alive (and
//! re-granted if it expires), and a watched prefix that survives etcd restarts and compactions.

pub mod backoff;
pub mod departures;
pub mod keys;
pub mod lease;
pub mod watch;

pub use backoff::Backoff;
pub use departures::Departures;
pub use etcd_client;
pub use etcd_client::Client;
pub use keys::{CometRecord, CometState, JobRecord, Keys, LoadRecord, OnlineRecord};
pub use lease::LeaseHandle;
pub use watch::{Entry, WatchCache};

use std::time::Duration;

/// Client TLS for etcd, in PEM: the CA that signed etcd's certificate and, for client-cert
/// auth, a certificate and key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tls {
    pub ca: Vec<u8>,
    pub cert: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
}

impl Tls {
    /// Reads `ca.crt`, and `tls.crt` + `tls.key` when present (a Kubernetes TLS secret's keys).
    pub fn from_dir(dir: &std::path::Path) -> std::io::Result<Tls> {
        let opt = |name: &str| match std::fs::read(dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        Ok(Tls {
            ca: std::fs::read(dir.join("ca.crt"))?,
            cert: opt("tls.crt")?,
            key: opt("tls.key")?,
        })
    }
}

/// Connects to etcd. The channel is lazy: an unreachable etcd is an error on first use, not
/// here, so roles start and retry rather than crash.
pub async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    connect_tls(endpoints, None).await
}

/// [`connect`], over TLS when `tls` is given (endpoints then default to https).
pub async fn connect_tls(
    endpoints: &[String],
    tls: Option<&Tls>,
) -> Result<Client, etcd_client::Error> {
    let mut opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some(t) = tls {
        let mut o = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(&t.ca));
        if let (Some(c), Some(k)) = (&t.cert, &t.key) {
            o = o.identity(etcd_client::Identity::from_pem(c, k));
        }
        opts = opts.with_tls(o);
    }
    Client::connect(endpoints, Some(opts)).await
}

/// etcd's default limit of operations in one transaction.
pub const MAX_TXN_OPS: usize = 128;
