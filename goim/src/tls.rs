//! TLS from the config's directories, for each role: the comet's WSS and TCP-over-TLS
//! listeners, logic's HTTPS API, and mutual TLS on the gRPC between roles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use goim_comet::{Comet, CometConfig, Transport};
use goim_config::ClusterConfig;
use goim_proto::grpc::Dialer;
use goim_tls::{ServerOptions, ServerTls};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const HTTP1: &[u8] = b"http/1.1";
const H2: &[u8] = b"h2";

/// The comet's TLS listeners, bound.
pub struct CometTls {
    tls: Arc<ServerTls>,
    wss: TcpListener,
    tcp: Option<TcpListener>,
}

impl CometTls {
    /// Binds WSS (and TCP over TLS if configured) when `tls_dir` is set.
    pub async fn bind(cfg: &CometConfig) -> anyhow::Result<Option<CometTls>> {
        if cfg.tls_dir.is_empty() {
            return Ok(None);
        }
        let tls = goim_tls::server(
            &cfg.tls_dir,
            // No ALPN: goim's TCP clients offer none, and a WebSocket client's http/1.1
            // needs no answer.
            ServerOptions::default(),
        )
        .context("comet tls_dir")?;
        let wss = goim_comet::listen(&cfg.wss)
            .await
            .with_context(|| format!("binding WSS on {}", cfg.wss))?;
        let tcp = if cfg.tcp_tls.is_empty() {
            None
        } else {
            Some(
                goim_comet::listen(&cfg.tcp_tls)
                    .await
                    .with_context(|| format!("binding TCP over TLS on {}", cfg.tcp_tls))?,
            )
        };
        Ok(Some(CometTls { tls, wss, tcp }))
    }

    pub fn wss_addr(&self) -> std::io::Result<SocketAddr> {
        self.wss.local_addr()
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves both listeners until the comet stops.
    pub async fn serve(self, comet: Arc<Comet>) {
        let wss = comet
            .clone()
            .serve_tls(self.wss, Transport::WebSocket, self.tls.clone());
        match self.tcp {
            Some(tcp) => {
                let tcp = comet.serve_tls(tcp, Transport::Tcp, self.tls);
                tokio::join!(wss, tcp);
            }
            None => wss.await,
        }
    }
}

/// Logic's HTTPS, when `http_tls_dir` is set.
pub fn http(dir: &str) -> anyhow::Result<Option<Arc<ServerTls>>> {
    if dir.is_empty() {
        return Ok(None);
    }
    let opts = ServerOptions {
        alpn: vec![HTTP1.to_vec()],
        ..Default::default()
    };
    Ok(Some(
        goim_tls::server(dir, opts).context("logic http_tls_dir")?,
    ))
}

/// The gRPC servers' mutual TLS, when `grpc_tls_dir` is set.
pub fn grpc_server(cluster: &ClusterConfig) -> anyhow::Result<Option<Arc<ServerTls>>> {
    if cluster.grpc_tls_dir.is_empty() {
        return Ok(None);
    }
    let opts = ServerOptions {
        client_auth: true,
        alpn: vec![H2.to_vec()],
        ..Default::default()
    };
    Ok(Some(
        goim_tls::server(&cluster.grpc_tls_dir, opts).context("cluster grpc_tls_dir")?,
    ))
}

/// How this role dials the others' gRPC.
pub fn dialer(cluster: &ClusterConfig) -> anyhow::Result<Dialer> {
    if cluster.grpc_tls_dir.is_empty() {
        return Ok(Dialer::plain());
    }
    let name = &cluster.grpc_tls_server_name;
    let tls = goim_tls::client(&cluster.grpc_tls_dir, name, goim_tls::DEFAULT_RELOAD)
        .context("cluster grpc_tls_dir")?;
    Ok(Dialer::tls(goim_tls::Connector::new(tls, name)))
}

/// How long a gRPC client has to finish its TLS handshake.
const GRPC_HANDSHAKE: Duration = Duration::from_secs(10);

/// The connections of `listener` that completed a TLS handshake, for tonic. Each handshake
/// runs in its own task, so one that stalls holds up nobody; failed ones are counted out in
/// the log.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<goim_tls::tokio_rustls::server::TlsStream<TcpStream>>,
> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut backoff =
            goim_discovery::Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
        loop {
            let tcp = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                r = listener.accept() => r,
            };
            let tcp = match tcp {
                Ok((tcp, _)) => {
                    backoff.reset();
                    tcp
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match goim_tls::accept(&tls, tcp, GRPC_HANDSHAKE).await {
                    Ok(s) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Err(e) => tracing::info!(error = %e, "gRPC TLS handshake refused"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
