//! Distributed mode: each role its own process, talking gRPC, with etcd for discovery and
//! online state. Each role prints one JSON line on stdout once it listens (addresses included),
//! for scripts and tests; logs go to stderr.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use goim_comet::registry::Registrar;
use goim_comet::{listen, Comet, CometMetrics, Transport};
use goim_discovery::lease::keep_registered;
use goim_discovery::{CometRecord, CometState, JobRecord, Keys, LeaseHandle, WatchCache};
use goim_job::etcd::EtcdComets;
use goim_job::{CometDirectory, Job, JobMetrics};
use goim_logic::etcd::{EtcdNodes, EtcdOnline, JobRing};
use goim_logic::http::{ops_router, router, Ready};
use goim_logic::serve::{refused_counter, serve, serve_maybe_tls};
use goim_logic::ApiKeys;
use goim_logic::{Logic, LogicMetrics};
use goim_proto::grpc::{comet_server, job_server, logic_server, RemoteLogic};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The host other roles should dial for a listener bound to `listen`.
fn advertise(cfg: &Config, listen: SocketAddr) -> String {
    if !cfg.cluster.advertise.is_empty() {
        return cfg.cluster.advertise.clone();
    }
    if let Ok(ip) = std::env::var("POD_IP") {
        if !ip.is_empty() {
            return ip;
        }
    }
    if !listen.ip().is_unspecified() {
        return listen.ip().to_string();
    }
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn ready_line(v: serde_json::Value) {
    println!("{v}");
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    listen(addr)
        .await
        .with_context(|| format!("binding {what} on {addr}"))
}

fn spawn_http(
    listener: TcpListener,
    app: axum::Router,
    cfg: &Config,
    refused: Counter,
    stop: CancellationToken,
) {
    tokio::spawn(serve(listener, app, cfg.http.clone(), refused, stop));
}

/// Serves `routes` on `listener`, with mutual TLS when the cluster has `grpc_tls_dir`.
pub(crate) fn spawn_grpc(
    listener: TcpListener,
    routes: tonic::service::Routes,
    tls: Option<Arc<goim_tls::ServerTls>>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let server = tonic::transport::Server::builder().add_routes(routes);
        let served = match tls {
            None => {
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                server
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await
            }
            Some(tls) => {
                let incoming = crate::tls::incoming(listener, tls, stop.clone());
                server
                    .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
}

pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        r = tokio::signal::ctrl_c() => { r?; tracing::info!("SIGINT: shutting down") }
    }
    Ok(())
}

pub async fn run_comet(cfg: Config) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let mut client = crate::config::etcd(&cfg.cluster).await?;
    let keys = Keys::new(&cfg.cluster.name);
    let dialer = crate::tls::dialer(&cfg.cluster)?;
    let grpc_tls = crate::tls::grpc_server(&cfg.cluster)?;
    let logic = Arc::new(RemoteLogic::new(
        dialer
            .balanced(&cfg.cluster.logic)
            .context("logic endpoints")?,
    ));
    let mut registry = Registry::default();
    let metrics = Arc::new(CometMetrics::default());
    metrics.register(&mut registry);

    let tcp = bind(&cfg.comet.tcp, "TCP").await?;
    let ws = bind(&cfg.comet.ws, "WebSocket").await?;
    let grpc = bind(&cfg.cluster.comet_grpc, "gRPC").await?;
    let http = bind(&cfg.cluster.comet_http, "HTTP").await?;
    let secure = crate::tls::CometTls::bind(&cfg.comet).await?;
    let (tcp_a, ws_a, grpc_a, http_a) = (
        tcp.local_addr()?,
        ws.local_addr()?,
        grpc.local_addr()?,
        http.local_addr()?,
    );

    let comet = Comet::new(cfg.comet.clone(), logic, metrics);
    comet.require_lease();
    // Before any client: a new room waits until every job in etcd watches this comet.
    comet.set_jobs(None);
    tokio::spawn(follow_jobs(
        comet.clone(),
        WatchCache::spawn(client.clone(), keys.jobs(), stop.clone()),
        stop.clone(),
    ));
    let host = advertise(&cfg, grpc_a);
    let record = CometRecord {
        name: comet.name().to_string(),
        grpc: format!("{host}:{}", grpc_a.port()),
        tcp: format!("{}:{}", advertise(&cfg, tcp_a), tcp_a.port()),
        ws: format!("{}:{}", advertise(&cfg, ws_a), ws_a.port()),
        addrs: cfg.comet.addrs.clone(),
        weight: cfg.comet.weight,
        region: cfg.comet.region.clone(),
        zone: cfg.comet.zone.clone(),
        state: CometState::Active,
        drain_ms: 0,
        pod_uid: String::new(),
    };
    let lease = LeaseHandle::spawn(client.clone(), cfg.cluster.lease_ttl, stop.clone());
    let registrar = Arc::new(Registrar {
        comet: comet.clone(),
        client: client.clone(),
        keys,
        record,
        self_register: !cfg.cluster.operator_managed,
        lease: lease.clone(),
        load_interval: std::time::Duration::from_secs(5),
    });
    tokio::spawn(registrar.run(stop.clone()));
    tokio::spawn(comet.clone().serve(tcp, Transport::Tcp));
    tokio::spawn(comet.clone().serve(ws, Transport::WebSocket));
    let (wss_a, tcp_tls_a) = match secure {
        Some(s) => {
            let addrs = (Some(s.wss_addr()?), s.tcp_addr());
            tokio::spawn(s.serve(comet.clone()));
            addrs
        }
        None => (None, None),
    };
    let routes = tonic::service::Routes::new(comet_server(comet.clone()));
    spawn_grpc(grpc, routes, grpc_tls, stop.clone());
    let (l, c) = (lease.clone(), comet.clone());
    // Not ready while draining: the Service stops sending this pod new clients at once.
    let ready: Ready = Arc::new(move || l.id() != 0 && !c.is_draining());
    let refused = refused_counter(&mut registry);
    spawn_http(
        http,
        ops_router(Arc::new(registry), ready),
        &cfg,
        refused,
        stop.clone(),
    );
    ready_line(
        json!({"role": "comet", "name": comet.name(), "tcp": tcp_a, "ws": ws_a, "wss": wss_a, "tcp_tls": tcp_tls_a, "grpc": grpc_a, "http": http_a}),
    );
    tracing::info!(name = comet.name(), tcp = %tcp_a, ws = %ws_a, grpc = %grpc_a, "comet started");

    wait_for_signal().await?;
    // A drain, not a mass close: not ready at once, clients told to move and closed evenly
    // over `drain_period`; then the rest are closed, logic is told, and the lease goes,
    // taking this comet's keys.
    let left = comet
        .drain_and_wait(std::time::Duration::from_secs(1))
        .await;
    tracing::info!(left, "drained");
    comet.shutdown().await;
    lease.revoke(&mut client).await;
    stop.cancel();
    Ok(())
}

/// Keeps the comet's list of the jobs registered in etcd: a job that has not seen this comet
/// yet would skip it, so a new room waits until each of them watches it. Once listed, the
/// last list stands while the watch recovers.
async fn follow_jobs(comet: Arc<Comet>, jobs: WatchCache<JobRecord>, stop: CancellationToken) {
    let mut changes = jobs.subscribe();
    let mut listed = false;
    loop {
        listed |= jobs.synced();
        comet.set_jobs(listed.then(|| jobs.names()));
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

pub async fn run_logic(cfg: Config) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let client = crate::config::etcd(&cfg.cluster).await?;
    let keys = Keys::new(&cfg.cluster.name);
    let comets = WatchCache::<CometRecord>::spawn(client.clone(), keys.comets(), stop.clone());
    let loads = WatchCache::spawn(client.clone(), keys.loads(), stop.clone());
    let jobs = WatchCache::<JobRecord>::spawn(client.clone(), keys.jobs(), stop.clone());
    tokio::spawn(goim_logic::etcd::compact_loop(
        client.clone(),
        keys.comets(),
        cfg.cluster.etcd_compact_every,
        stop.clone(),
    ));
    let online = Arc::new(EtcdOnline::new(client.clone(), keys, stop.clone()));
    let ring = Arc::new(JobRing::new(jobs, crate::tls::dialer(&cfg.cluster)?));
    let grpc_tls = crate::tls::grpc_server(&cfg.cluster)?;
    let https = crate::tls::http(&cfg.logic.http_tls_dir)?;
    let mut registry = Registry::default();
    let metrics = Arc::new(LogicMetrics::default());
    metrics.register(&mut registry);
    registry.register(
        "goim_logic_rooms_left_out",
        "Rooms left out of comets' room counts for being over the per-comet limit",
        online.rooms_left_out.clone(),
    );

    let http = bind(&cfg.logic.http, "HTTP").await?;
    let grpc = bind(&cfg.cluster.logic_grpc, "gRPC").await?;
    let (http_a, grpc_a) = (http.local_addr()?, grpc.local_addr()?);
    let nodes = Arc::new(EtcdNodes {
        comets: comets.clone(),
        loads,
    });
    let http_cfg = cfg.clone();
    let auth = goim_logic::auth::from_config(&cfg.logic)?;
    let logic = Arc::new(
        Logic::new(
            cfg.logic,
            auth,
            online.clone(),
            ring.clone(),
            nodes,
            metrics,
        )
        .with_business_hooks()?
        .with_conversations()
        .await
        .context("conversation store")?,
    );
    tokio::spawn(logic.clone().renotify_loop(stop.clone()));
    let keys = ApiKeys::from_config(logic.config())?;
    // Comets' calls, and the conversations' API for backends.
    let routes = tonic::service::Routes::new(logic_server(logic.clone()))
        .add_service(goim_logic::chat::grpc::server(logic.clone(), keys.clone()));
    spawn_grpc(grpc, routes, grpc_tls, stop.clone());
    let ready: Ready = Arc::new(move || online.synced() && ring.synced() && comets.synced());
    let refused = refused_counter(&mut registry);
    keys.warn_if_open(http_a);
    let app = router(logic, Arc::new(registry), ready, keys);
    tokio::spawn(serve_maybe_tls(
        http,
        app,
        http_cfg.http.clone(),
        refused,
        stop.clone(),
        https,
    ));
    ready_line(json!({"role": "logic", "http": http_a, "grpc": grpc_a}));
    tracing::info!(http = %http_a, grpc = %grpc_a, "logic started");
    wait_for_signal().await?;
    stop.cancel();
    Ok(())
}

pub async fn run_job(cfg: Config) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let mut client = crate::config::etcd(&cfg.cluster).await?;
    let keys = Keys::new(&cfg.cluster.name);
    let comets = Arc::new(EtcdComets::new(
        WatchCache::spawn(client.clone(), keys.comets(), stop.clone()),
        WatchCache::spawn(client.clone(), keys.loads(), stop.clone()),
        crate::tls::dialer(&cfg.cluster)?,
    ));
    let mut registry = Registry::default();
    let metrics = Arc::new(JobMetrics::default());
    metrics.register(&mut registry);
    let job = Arc::new(Job::new(cfg.job.clone(), comets.clone(), metrics));

    let grpc = bind(&cfg.cluster.job_grpc, "gRPC").await?;
    let http = bind(&cfg.cluster.job_http, "HTTP").await?;
    let (grpc_a, http_a) = (grpc.local_addr()?, http.local_addr()?);
    let id = if cfg.cluster.job_id.is_empty() {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "job".into())
    } else {
        cfg.cluster.job_id.clone()
    };
    job.set_id(&id);
    let record = JobRecord {
        id: id.clone(),
        grpc: format!("{}:{}", advertise(&cfg, grpc_a), grpc_a.port()),
    };
    let lease = LeaseHandle::spawn(client.clone(), cfg.cluster.lease_ttl, stop.clone());
    tokio::spawn(keep_registered(
        client.clone(),
        lease.clone(),
        keys.job(&id),
        serde_json::to_vec(&record)?,
        stop.clone(),
    ));
    spawn_grpc(
        grpc,
        tonic::service::Routes::new(job_server(job.clone())),
        crate::tls::grpc_server(&cfg.cluster)?,
        stop.clone(),
    );
    let l = lease.clone();
    let c = comets.clone();
    let ready: Ready = Arc::new(move || l.id() != 0 && c.synced());
    let refused = refused_counter(&mut registry);
    // Which comets this job sees, for operators and tests.
    let app = ops_router(Arc::new(registry), ready).route(
        "/comets",
        axum::routing::get(move || {
            let names = comets.names();
            async move { axum::Json(names) }
        }),
    );
    spawn_http(http, app, &cfg, refused, stop.clone());
    ready_line(json!({"role": "job", "id": id, "grpc": grpc_a, "http": http_a}));
    tracing::info!(%id, grpc = %grpc_a, "job started");
    wait_for_signal().await?;
    // Leave the ring first so logic routes elsewhere, refuse what still arrives (logic
    // retries it on another job), deliver what is queued within the drain deadline.
    lease.revoke(&mut client).await;
    let left = job.drain().await;
    tracing::info!(left, "job drained");
    // Until logic has seen this job leave the ring (pushes stop arriving, each refused and
    // retried elsewhere until then): closing earlier breaks calls in flight.
    job.wait_quiet(
        std::time::Duration::from_millis(300),
        std::time::Duration::from_secs(5),
    )
    .await;
    stop.cancel();
    Ok(())
}
