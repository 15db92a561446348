//! Accepting TLS on a socket under a deadline, so a client that stalls mid-handshake is
//! dropped instead of held.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::ServerTls;

/// One handshake on an accepted socket, within `timeout`.
pub async fn accept(
    tls: &ServerTls,
    tcp: TcpStream,
    timeout: Duration,
) -> io::Result<TlsStream<TcpStream>> {
    let acceptor = TlsAcceptor::from(tls.config());
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}
