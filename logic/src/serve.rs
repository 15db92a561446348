//! The HTTP listener every role serves its API and ops routes on. Unlike a bare
//! `axum::serve`: a client that sends nothing or half a header is closed after
//! `header_timeout` (idle keep-alive connections too); open connections are capped (beyond
//! the cap a new one is closed at once and counted, so the port cannot eat the process's file
//! descriptors); a request has a deadline; shutdown lets requests in flight finish for at
//! most `shutdown_grace`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use goim_discovery::Backoff;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use goim_config::HttpLimits;

/// Registers the counter [`serve`] takes, as `goim_http_refused_connections`.
pub fn refused_counter(registry: &mut prometheus_client::registry::Registry) -> Counter {
    let c = Counter::default();
    registry.register(
        "goim_http_refused_connections",
        "HTTP connections closed at once for being over the connection cap",
        c.clone(),
    );
    c
}

/// Serves `app` until `stop`, then drains within the grace period. `refused` counts
/// connections closed for being over the cap.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    refused: Counter,
    stop: CancellationToken,
) {
    serve_maybe_tls(listener, app, limits, refused, stop, None).await
}

/// As [`serve`], over TLS when `tls` is given (HTTPS only: a plain request fails the
/// handshake). The handshake counts against `header_timeout`.
pub async fn serve_maybe_tls(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    refused: Counter,
    stop: CancellationToken,
    tls: Option<Arc<goim_tls::ServerTls>>,
) {
    let deadline = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| async move {
            match tokio::time::timeout(deadline, next.run(req)).await {
                Ok(r) => r,
                Err(_) => timed_out(),
            }
        },
    ));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff.reset();
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                if !backoff.wait(&stop).await {
                    break;
                }
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.inc();
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        let header_timeout = limits.header_timeout;
        let tls = tls.clone();
        conns.spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, svc, header_timeout, stop).await,
                Some(tls) => match goim_tls::accept(&tls, stream, header_timeout).await {
                    Ok(s) => serve_connection(s, svc, header_timeout, stop).await,
                    Err(e) => tracing::debug!(error = %e, "HTTPS handshake failed"),
                },
            }
        });
    }
    drop(listener);
    conns.close();
    if tokio::time::timeout(limits.shutdown_grace, conns.wait())
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still in flight at the shutdown deadline were dropped");
    }
}

async fn serve_connection<S>(
    stream: S,
    svc: TowerToHyperService<Router>,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn timed_out() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "request timed out").into_response()
}
