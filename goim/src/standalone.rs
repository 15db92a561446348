//! Standalone mode: comet, logic and job in one process, talking through the same service
//! traits distributed mode carries over gRPC, with in-memory presence and discovery.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use goim_comet::{Comet, CometMetrics, Transport};
use goim_job::{CometDirectory, Job, JobMetrics};
use goim_logic::nodes::{CometInstance, NodeSource};
use goim_logic::online::MemoryOnline;
use goim_logic::{Logic, LogicMetrics};
use goim_proto::service::CometService;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// The one local comet, as job's directory and logic's node source.
#[derive(Default)]
struct LocalCluster {
    comet: OnceLock<Arc<Comet>>,
}

impl CometDirectory for LocalCluster {
    fn get(&self, name: &str) -> Option<Arc<dyn CometService>> {
        self.comet
            .get()
            .filter(|c| c.name() == name)
            .map(|c| c.clone() as Arc<dyn CometService>)
    }

    fn names(&self) -> Vec<String> {
        self.comet
            .get()
            .map(|c| c.name().to_string())
            .into_iter()
            .collect()
    }
}

impl NodeSource for LocalCluster {
    fn instances(&self) -> Vec<CometInstance> {
        let Some(c) = self.comet.get() else {
            return Vec::new();
        };
        let cfg = c.config();
        let load = c.load();
        vec![CometInstance {
            name: c.name().to_string(),
            region: cfg.region.clone(),
            zone: cfg.zone.clone(),
            grpc_addr: String::new(),
            addrs: cfg.addrs.clone(),
            weight: cfg.weight,
            draining: c.is_shutting_down(),
            conn_count: load.conn_count as i64,
            ip_count: load.ip_count as i64,
            updated: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64),
        }]
    }
}

/// A running standalone server.
pub struct Standalone {
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    /// WebSocket over TLS, with `[comet] tls_dir`.
    pub wss: Option<SocketAddr>,
    /// goim's TCP protocol over TLS, with `tls_dir` and `tcp_tls`.
    pub tcp_tls: Option<SocketAddr>,
    pub http: SocketAddr,
    /// The conversations' gRPC API, with `[logic.conversations] grpc`.
    pub grpc: Option<SocketAddr>,
    comet: Arc<Comet>,
    job: Arc<Job>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    goim_comet::listen(addr)
        .await
        .with_context(|| format!("binding {what} listener on {addr}"))
}

impl Standalone {
    /// Binds every listener and starts serving.
    pub async fn start(cfg: Config) -> anyhow::Result<Standalone> {
        let mut registry = Registry::default();
        let comet_metrics = Arc::new(CometMetrics::default());
        let logic_metrics = Arc::new(LogicMetrics::default());
        let job_metrics = Arc::new(JobMetrics::default());
        comet_metrics.register(&mut registry);
        logic_metrics.register(&mut registry);
        job_metrics.register(&mut registry);

        let tcp = bind(&cfg.comet.tcp, "TCP").await?;
        let ws = bind(&cfg.comet.ws, "WebSocket").await?;
        let http = bind(&cfg.logic.http, "HTTP").await?;
        let secure = crate::tls::CometTls::bind(&cfg.comet).await?;
        let https = crate::tls::http(&cfg.logic.http_tls_dir)?;

        let cluster = Arc::new(LocalCluster::default());
        let job = Arc::new(Job::new(cfg.job, cluster.clone(), job_metrics));
        let auth = goim_logic::auth::from_config(&cfg.logic)?;
        let logic = Arc::new(
            Logic::new(
                cfg.logic,
                auth,
                Arc::new(MemoryOnline::default()),
                job.clone(),
                cluster.clone(),
                logic_metrics,
            )
            .with_business_hooks()?
            .with_conversations()
            .await
            .context("conversation store")?,
        );
        let comet = Comet::new(cfg.comet, logic.clone(), comet_metrics);
        let _ = cluster.comet.set(comet.clone());

        let stop = CancellationToken::new();
        let (tcp_addr, ws_addr, http_addr) =
            (tcp.local_addr()?, ws.local_addr()?, http.local_addr()?);
        let mut tasks = JoinSet::new();
        tasks.spawn(comet.clone().serve(tcp, Transport::Tcp));
        tasks.spawn(comet.clone().serve(ws, Transport::WebSocket));
        let (wss, tcp_tls) = match secure {
            Some(s) => {
                let addrs = (Some(s.wss_addr()?), s.tcp_addr());
                tasks.spawn(s.serve(comet.clone()));
                addrs
            }
            None => (None, None),
        };
        tasks.spawn(comet.clone().renew_online_loop());
        tasks.spawn(logic.clone().renotify_loop(stop.clone()));
        let refused = goim_logic::serve::refused_counter(&mut registry);
        let keys = goim_logic::ApiKeys::from_config(logic.config())?;
        keys.warn_if_open(http_addr);
        // The conversations' gRPC API, when an address is configured.
        let grpc_addr = match logic.config().conversations.grpc.as_str() {
            "" => None,
            addr => {
                let l = bind(addr, "conversations gRPC").await?;
                let a = l.local_addr()?;
                let svc = goim_logic::chat::grpc::server(logic.clone(), keys.clone());
                let routes = tonic::service::Routes::new(svc);
                crate::distributed::spawn_grpc(l, routes, None, stop.clone());
                Some(a)
            }
        };
        let router = goim_logic::http::router(logic, Arc::new(registry), Arc::new(|| true), keys)
            .merge(crate::demo::router(ws_addr.port()));
        tasks.spawn(goim_logic::serve::serve_maybe_tls(
            http,
            router,
            cfg.http,
            refused,
            stop.clone(),
            https,
        ));
        tracing::info!(name = comet.name(), tcp = %tcp_addr, ws = %ws_addr, wss = ?wss, tcp_tls = ?tcp_tls, http = %http_addr, "goim standalone started");
        Ok(Standalone {
            tcp: tcp_addr,
            ws: ws_addr,
            wss,
            tcp_tls,
            http: http_addr,
            grpc: grpc_addr,
            comet,
            job,
            stop,
            tasks,
        })
    }

    pub fn comet(&self) -> &Arc<Comet> {
        &self.comet
    }

    /// Stops the API (requests in flight get a grace period), delivers what job holds, closes
    /// every client, and waits for all of it; each step has a deadline.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        self.job.drain().await;
        self.comet.shutdown().await;
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("goim standalone stopped");
    }
}
