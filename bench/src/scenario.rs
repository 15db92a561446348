//! The scenarios. Each returns a JSON report; speed is reported, never asserted.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::Http;
use crate::{drain, open, rss_kib, Conns, CpuMeter, Sink, OP};

fn transport_name(c: &Conns) -> &'static str {
    match c.transport {
        goim_client::Transport::Tcp => "tcp",
        goim_client::Transport::WebSocket => "ws",
    }
}

/// N idle connections: connect rate and server RSS per connection. Returns the clients too,
/// so a caller can hold them.
pub async fn idle(
    c: &Conns,
    pid: Option<u32>,
) -> anyhow::Result<(Value, Vec<goim_client::Client>)> {
    let before = pid.map(rss_kib).transpose()?;
    let (clients, took) = open(c).await?;
    // Let deferred frees settle before reading RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = pid.map(rss_kib).transpose()?;
    let per_conn = match (before, after) {
        (Some(b), Some(a)) => {
            Some((a.saturating_sub(b) as f64 * 1024.0) / clients.len().max(1) as f64)
        }
        _ => None,
    };
    let v = json!({
        "scenario": "idle",
        "transport": transport_name(c),
        "connections": clients.len(),
        "connect_seconds": took.as_secs_f64(),
        "connects_per_second": clients.len() as f64 / took.as_secs_f64().max(1e-9),
        "server_rss_kib_before": before,
        "server_rss_kib_after": after,
        "server_rss_bytes_per_connection": per_conn,
    });
    Ok((v, clients))
}

/// What is pushed in a fan-out run.
#[derive(Debug, Clone)]
pub enum Target {
    /// Room pushes through logic, round robin over the rooms.
    Rooms,
    /// Broadcast through logic, optionally paced (`speed` connections a second).
    All { speed: u32 },
    /// Key pushes through logic, round robin over the connections.
    Keys,
    /// The server pushes by itself (the raw baseline); nothing is sent.
    ServerDriven { rate: u64 },
}

/// Pushes at `rate` for `seconds` and measures what arrives.
pub async fn fanout(
    c: &Conns,
    http: Option<SocketAddr>,
    target: Target,
    rate: u64,
    seconds: u64,
    pid: Option<u32>,
) -> anyhow::Result<Value> {
    let (clients, took) = open(c).await?;
    let n = clients.len() as u64;
    let sink = Sink::new()?;
    let sample = (clients.len() / 1000).max(1);
    let readers = sink.attach(clients, sample);
    sink.reset();
    let cpu = CpuMeter::start(pid);
    let start = Instant::now();
    let (pushes, expected) = match &target {
        Target::ServerDriven { rate } => {
            let mut last = 0;
            for s in 1..=seconds {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = sink.received();
                eprintln!("t={s}s delivered/s={}", now - last);
                last = now;
            }
            let pushes = rate * seconds;
            (pushes, pushes * n)
        }
        _ => {
            let http = http.ok_or_else(|| anyhow::anyhow!("this target needs --http"))?;
            let mut client = Http::new(http);
            let total = rate * seconds;
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut last_report = Instant::now();
            let mut last_count = 0;
            for i in 0..total {
                tick.tick().await;
                let path = match &target {
                    Target::Rooms => format!(
                        "/goim/push/room?operation={OP}&type={}&room={}",
                        c.room_type,
                        i as usize % c.rooms.max(1)
                    ),
                    Target::All { speed } => format!("/goim/push/all?operation={OP}&speed={speed}"),
                    Target::Keys => format!(
                        "/goim/push/keys?operation={OP}&keys={}{}",
                        c.key_prefix,
                        i as usize % c.count
                    ),
                    Target::ServerDriven { .. } => unreachable!(),
                };
                client
                    .push(&path, crate::now_ns().to_string().as_bytes())
                    .await?;
                if last_report.elapsed() >= Duration::from_secs(1) {
                    let now = sink.received();
                    eprintln!(
                        "pushed={} delivered/s={:.0}",
                        i + 1,
                        (now - last_count) as f64 / last_report.elapsed().as_secs_f64()
                    );
                    last_count = now;
                    last_report = Instant::now();
                }
            }
            let per_push = match &target {
                Target::Rooms => n / c.rooms.max(1) as u64,
                Target::All { .. } => n,
                _ => 1,
            };
            (total, total * per_push)
        }
    };
    if !matches!(target, Target::ServerDriven { .. }) {
        drain(&sink, expected, Duration::from_secs(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_used = cpu.used();
    let delivered = sink.received();
    for r in readers {
        r.abort();
    }
    let (name, target_name) = match &target {
        Target::Rooms => ("room_fanout", "room".to_string()),
        Target::All { speed } => ("broadcast", format!("all speed={speed}")),
        Target::Keys => ("key_latency", "keys".to_string()),
        Target::ServerDriven { .. } => ("raw_baseline", "server-driven".to_string()),
    };
    Ok(json!({
        "scenario": name,
        "target": target_name,
        "transport": transport_name(c),
        "connections": n,
        "rooms": c.rooms,
        "connect_seconds": took.as_secs_f64(),
        "rate": rate,
        "seconds": seconds,
        "pushes": pushes,
        "expected": expected,
        "delivered": delivered,
        "delivered_per_second": delivered as f64 / elapsed,
        "bytes_per_second": sink.bytes.load(std::sync::atomic::Ordering::Relaxed) as f64 / elapsed,
        "server_cpu_seconds": cpu_used,
        "delivered_per_cpu_second": cpu_used.filter(|&c| c > 0.0).map(|c| delivered as f64 / c),
        "latency_us": sink.latency(),
    }))
}
