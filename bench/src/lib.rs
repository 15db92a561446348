//! goim load generator: scenarios as functions returning a JSON report, so the CLI, the CI
//! smoke test and scripts share them.
//!
//! Connections come from 127.0.0.(2+base), one address per 20,000 connections, so the
//! per-source-address port range is never the limit; the kernel picks ports at connect time.

pub mod chat;
pub mod http;
pub mod raw;
pub mod report;
pub mod scenario;
pub mod soak;
pub mod syscalls;
pub mod timeline;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use goim_client::{token, Client, Transport};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Business op every bench push uses.
pub const OP: i32 = 1000;

#[derive(Debug, Clone)]
pub struct Conns {
    pub addr: SocketAddr,
    /// More comets: connection i goes to the (i mod n)-th of `addr` and these.
    pub also: Vec<SocketAddr>,
    pub transport: Transport,
    pub count: usize,
    /// Connections opened at once.
    pub parallel: usize,
    /// Connection i joins room `{room_type}://{i % rooms}`; 0 rooms: none.
    pub rooms: usize,
    pub room_type: String,
    pub key_prefix: String,
    /// First source address index, 127.0.0.(2+base) upwards (give each load-generator process
    /// its own); `None`: let the kernel choose (one address, ~28k ports).
    pub source_base: Option<usize>,
    /// Speak TLS, trusting this config, naming this server.
    pub tls: Option<(Arc<goim_client::rustls::ClientConfig>, String)>,
}

impl Conns {
    /// The comet connection `i` goes to.
    pub fn addr_of(&self, i: usize) -> SocketAddr {
        match i % (1 + self.also.len()) {
            0 => self.addr,
            n => self.also[n - 1],
        }
    }

    pub fn room_of(&self, i: usize) -> String {
        if self.rooms == 0 {
            String::new()
        } else {
            format!("{}://{}", self.room_type, i % self.rooms)
        }
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?)
}

/// User + system CPU seconds a process has used.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let (u, s) = cpu_times(pid)?;
    Ok(u + s)
}

/// User and system CPU seconds a process has used, apart: loopback charges the receiver's
/// kernel work to the sender, so the split says how much of a server's cost is its own code.
pub fn cpu_times(pid: u32) -> anyhow::Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command; utime and stime are the 14th and 15th overall.
    let rest = s.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field =
        |i: usize| -> anyhow::Result<f64> { Ok(f.get(i).context("short stat")?.parse::<f64>()?) };
    // SAFETY: sysconf has no preconditions.
    let tck = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64).max(1.0);
    Ok((field(11)? / tck, field(12)? / tck))
}

fn source(base: usize, i: usize) -> SocketAddr {
    let n = 2 + (base + i / 20000) as u32;
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + n)),
        0,
    )
}

/// Opens and authenticates every connection; returns them and how long it took.
pub async fn open(c: &Conns) -> anyhow::Result<(Vec<Client>, Duration)> {
    let start = Instant::now();
    let mut clients = Vec::with_capacity(c.count);
    let mut i = 0;
    let mut last_report = Instant::now();
    while i < c.count {
        let end = (i + c.parallel.max(1)).min(c.count);
        let mut set = tokio::task::JoinSet::new();
        for j in i..end {
            let (addr, t, room, key) = (
                c.addr_of(j),
                c.transport,
                c.room_of(j),
                format!("{}{j}", c.key_prefix),
            );
            let local = c
                .source_base
                .filter(|_| addr.ip().is_loopback())
                .map(|b| source(b, j));
            let tls = c.tls.clone();
            set.spawn(async move {
                let mut cl = match tls {
                    Some((cfg, name)) => Client::connect_tls(t, addr, cfg, &name).await?,
                    None => Client::connect(t, addr, local).await?,
                };
                cl.auth(&token(j as i64 + 1, &key, &room, &[OP])).await?;
                anyhow::Ok(cl)
            });
        }
        while let Some(r) = set.join_next().await {
            clients
                .push(r?.with_context(|| format!("connection {} of {}", clients.len(), c.count))?);
        }
        i = end;
        if last_report.elapsed() > Duration::from_secs(1) {
            eprintln!("connected {i}/{}", c.count);
            last_report = Instant::now();
        }
    }
    Ok((clients, start.elapsed()))
}

/// Counts what arrives on every connection; records latency from a nanosecond timestamp body.
#[derive(Clone)]
pub struct Sink {
    pub messages: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    pub hist: Arc<Mutex<Histogram<u64>>>,
}

impl Sink {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Sink {
            messages: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
            hist: Arc::new(Mutex::new(Histogram::new(3)?)),
        })
    }

    /// Spawns a reader per client. Latency is sampled on every `sample`th connection to keep
    /// the histogram lock off the hot path.
    pub fn attach(&self, clients: Vec<Client>, sample: usize) -> Vec<tokio::task::JoinHandle<()>> {
        clients
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let s = self.clone();
                let timed = i % sample.max(1) == 0;
                tokio::spawn(async move {
                    while let Ok(p) = c.recv().await {
                        if p.op != OP {
                            continue;
                        }
                        s.messages.fetch_add(1, Ordering::Relaxed);
                        s.bytes
                            .fetch_add(16 + p.body.len() as u64, Ordering::Relaxed);
                        if timed {
                            if let Some(ts) = std::str::from_utf8(&p.body)
                                .ok()
                                .and_then(|b| b.parse::<u64>().ok())
                            {
                                let us = (now_ns().saturating_sub(ts) / 1000).max(1);
                                if let Ok(mut h) = s.hist.lock() {
                                    let _ = h.record(us);
                                }
                            }
                        }
                    }
                })
            })
            .collect()
    }

    /// Forgets what arrived so far (connect phases of server-driven runs).
    pub fn reset(&self) {
        self.messages.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        if let Ok(mut h) = self.hist.lock() {
            h.reset();
        }
    }

    pub fn received(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    pub fn latency(&self) -> Value {
        let h = self
            .hist
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| Histogram::new(3).expect("histogram"));
        json!({
            "samples": h.len(),
            "p50": h.value_at_quantile(0.5),
            "p99": h.value_at_quantile(0.99),
            "p999": h.value_at_quantile(0.999),
            "max": h.max(),
        })
    }
}

/// Waits until `want` messages arrived or `patience` passed without progress.
pub async fn drain(sink: &Sink, want: u64, patience: Duration) {
    let mut last = sink.received();
    let mut since = Instant::now();
    while sink.received() < want {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = sink.received();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() > patience {
            break;
        }
    }
}

/// CPU seconds of `pid` over a closure's run, if a pid is given.
pub struct CpuMeter {
    pid: Option<u32>,
    start: (f64, f64),
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> Self {
        CpuMeter {
            pid,
            start: pid.and_then(|p| cpu_times(p).ok()).unwrap_or_default(),
        }
    }

    pub fn used(&self) -> Option<f64> {
        self.split().map(|(u, s)| u + s)
    }

    /// User and system seconds since the start.
    pub fn split(&self) -> Option<(f64, f64)> {
        let (u, s) = cpu_times(self.pid?).ok()?;
        Some((u - self.start.0, s - self.start.1))
    }
}
