//! goim load generator. Scenarios:
//! - `idle`: open N authenticated connections, report connect rate and the server's RSS per
//!   connection (from /proc of the given pid);
//! - `latency`: N connections in one room (or each its own key), pushes at a fixed rate with a
//!   timestamp in the body, end-to-end latency percentiles.
//!
//! Connections come from 127.0.0.2, 127.0.0.3, ... so one process is not limited to one
//! source address's ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use goim_client::{token, Client, Transport};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(name = "goim-bench")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Ws,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Comet address (TCP or WebSocket port, see --proto).
    #[arg(long, default_value = "127.0.0.1:3101")]
    addr: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    proto: Proto,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    /// Room all connections join (empty: none).
    #[arg(long, default_value = "bench://1")]
    room: String,
    /// First source address index: connections come from 127.0.0.(2+index) upwards. Give each
    /// load-generator process its own range.
    #[arg(long, default_value_t = 0)]
    source_base: usize,
    /// Key prefix; connection i uses `{prefix}{i}`.
    #[arg(long, default_value = "bench-")]
    key_prefix: String,
}

#[derive(Subcommand)]
enum Scenario {
    /// Idle connections: connect rate and server memory per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Server pid whose RSS is measured before and after.
        #[arg(long)]
        pid: Option<u32>,
        /// Hold the connections this many seconds after measuring.
        #[arg(long, default_value_t = 0)]
        hold: u64,
    },
    /// Push latency through logic's HTTP API.
    Latency {
        #[command(flatten)]
        common: Common,
        /// Logic HTTP address.
        #[arg(long, default_value = "127.0.0.1:3111")]
        http: SocketAddr,
        /// `room` pushes to the room, `keys` to one key per push (round robin).
        #[arg(long, default_value = "room")]
        target: String,
        /// Pushes per second.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
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

/// Source address for connection i: 127.0.0.(2+base) upwards, 20000 connections each.
fn source(base: usize, i: usize) -> SocketAddr {
    let n = 2 + (base + i / 20000) as u32;
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + n);
    SocketAddr::new(IpAddr::V4(ip), 0)
}

async fn open(c: &Common) -> anyhow::Result<(Vec<Client>, Duration)> {
    let t = match c.proto {
        Proto::Tcp => Transport::Tcp,
        Proto::Ws => Transport::WebSocket,
    };
    let start = Instant::now();
    let mut clients = Vec::with_capacity(c.conns);
    let mut i = 0;
    while i < c.conns {
        let end = (i + c.parallel).min(c.conns);
        let mut set = tokio::task::JoinSet::new();
        for j in i..end {
            let (addr, room, key) = (c.addr, c.room.clone(), format!("{}{j}", c.key_prefix));
            let base = c.source_base;
            set.spawn(async move {
                let local = addr.ip().is_loopback().then(|| source(base, j));
                let mut cl = Client::connect(t, addr, local).await?;
                cl.auth(&token(j as i64 + 1, &key, &room, &[1000])).await?;
                anyhow::Ok(cl)
            });
        }
        while let Some(r) = set.join_next().await {
            clients.push(r??);
        }
        i = end;
        if i % 5000 < c.parallel {
            eprintln!("connected {i}/{}", c.conns);
        }
    }
    Ok((clients, start.elapsed()))
}

async fn post(http: SocketAddr, path: &str, body: &[u8]) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(http).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    if !text.contains("\"code\":0") {
        bail!("push failed: {text}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Idle { common, pid, hold } => {
            let before = pid.map(rss_kib).transpose()?;
            let (clients, took) = open(&common).await?;
            // Let the server settle (allocator, deferred frees) before reading RSS.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = pid.map(rss_kib).transpose()?;
            let per_conn = match (before, after) {
                (Some(b), Some(a)) => {
                    Some((a.saturating_sub(b) as f64 * 1024.0) / clients.len() as f64)
                }
                _ => None,
            };
            let out = json!({
                "scenario": "idle",
                "connections": clients.len(),
                "connect_seconds": took.as_secs_f64(),
                "connects_per_second": clients.len() as f64 / took.as_secs_f64(),
                "server_rss_kib_before": before,
                "server_rss_kib_after": after,
                "server_rss_bytes_per_connection": per_conn,
            });
            println!("{out}");
            tokio::time::sleep(Duration::from_secs(hold)).await;
        }
        Scenario::Latency {
            common,
            http,
            target,
            rate,
            seconds,
        } => {
            let (clients, _) = open(&common).await?;
            let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
            let received = Arc::new(AtomicU64::new(0));
            let total = rate * seconds;
            let expected = if target == "room" {
                total * clients.len() as u64
            } else {
                total
            };
            let mut readers = Vec::new();
            for mut c in clients {
                let (hist, received) = (hist.clone(), received.clone());
                readers.push(tokio::spawn(async move {
                    while let Ok(p) = c.recv().await {
                        if p.op != 1000 {
                            continue;
                        }
                        if let Some(ts) = std::str::from_utf8(&p.body)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                        {
                            let us = now_ns().saturating_sub(ts) / 1000;
                            let _ = hist.lock().map(|mut h| h.record(us.max(1)));
                        }
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
            let mut tick = tokio::time::interval(interval);
            for i in 0..total {
                tick.tick().await;
                let path = if target == "room" {
                    let (typ, room) = common.room.split_once("://").unwrap_or(("bench", "1"));
                    format!("/goim/push/room?operation=1000&type={typ}&room={room}")
                } else {
                    format!(
                        "/goim/push/keys?operation=1000&keys={}{}",
                        common.key_prefix,
                        i as usize % common.conns
                    )
                };
                post(http, &path, now_ns().to_string().as_bytes()).await?;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let h = hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let out = json!({
                "scenario": "latency",
                "target": target,
                "connections": common.conns,
                "pushes": total,
                "rate": rate,
                "expected": expected,
                "received": received.load(Ordering::Relaxed),
                "latency_us": {"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99), "p999": h.value_at_quantile(0.999), "max": h.max()},
            });
            println!("{out}");
            for r in readers {
                r.abort();
            }
        }
    }
    Ok(())
}
