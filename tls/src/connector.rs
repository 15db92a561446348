//! Dialing another role over TLS, as a connector tonic's channels take: a TCP connection,
//! then a handshake with the config current at that moment (so a reconnect after a
//! certificate renewal presents the new one).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::ClientTls;

#[derive(Clone)]
pub struct Connector {
    tls: Arc<ClientTls>,
    /// The name sent and checked; empty: the URI's host (sent, not checked).
    server_name: String,
}

impl Connector {
    pub fn new(tls: Arc<ClientTls>, server_name: &str) -> Self {
        Connector {
            tls,
            server_name: server_name.to_string(),
        }
    }

    async fn connect(self, uri: Uri) -> io::Result<TokioIo<TlsStream<TcpStream>>> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {why}"));
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
        // `[::1]` in a URI is `::1` on the wire and in a certificate.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = if self.server_name.is_empty() {
            host
        } else {
            &self.server_name
        };
        let name =
            ServerName::try_from(name.to_string()).map_err(|_| bad("not a valid server name"))?;
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(self.tls.config())
            .connect(name, tcp)
            .await?;
        Ok(TokioIo::new(tls))
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}
