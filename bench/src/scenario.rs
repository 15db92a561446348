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

/// Closes every client at once and times until `logic` has counted as many Disconnects
/// (`goim_logic_disconnects_total`, read from its /metrics every 20 ms; gives up after 60 s
/// without progress).
pub async fn disconnect_storm(
    clients: Vec<goim_client::Client>,
    logic: SocketAddr,
) -> anyhow::Result<Value> {
    let mut http = Http::new(logic);
    let n = clients.len() as f64;
    let read = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let metrics = http.call("GET", "/metrics", b"").await?;
    let (before, batches_before) = (
        read(&metrics, "goim_logic_disconnects_total"),
        read(&metrics, "goim_logic_disconnect_batches_total"),
    );
    let start = Instant::now();
    drop(clients);
    let (mut done, mut batches, mut progress) = (before, batches_before, Instant::now());
    while done - before < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let metrics = http.call("GET", "/metrics", b"").await?;
        let now = read(&metrics, "goim_logic_disconnects_total");
        batches = read(&metrics, "goim_logic_disconnect_batches_total");
        if now > done {
            (done, progress) = (now, Instant::now());
        } else if progress.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("logic counted {} of {n} disconnects", done - before);
        }
    }
    let took = start.elapsed().as_secs_f64();
    Ok(json!({
        "disconnects": done - before,
        "seconds": took,
        "disconnects_per_second": (done - before) / took.max(1e-9),
        "disconnect_batch_calls": batches - batches_before,
    }))
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

/// How pushes are sent: `rate` a second for `seconds`, spread over `pushers` keep-alive
/// connections pushing at once.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub rate: u64,
    pub seconds: u64,
    pub pushers: usize,
}

/// Pushes at `rate` for `seconds` from one sequential pusher and measures what arrives.
pub async fn fanout(
    c: &Conns,
    http: Option<SocketAddr>,
    target: Target,
    rate: u64,
    seconds: u64,
    pid: Option<u32>,
) -> anyhow::Result<Value> {
    let pace = Pace {
        rate,
        seconds,
        pushers: 1,
    };
    fanout_with(c, http, target, pace, pid).await
}

/// One pusher's share: pushes `first`, `first + step`, … below `total`, at `rate / step`.
async fn pusher(
    http: SocketAddr,
    paths: std::sync::Arc<dyn Fn(u64) -> String + Send + Sync>,
    (first, step, total): (u64, u64, u64),
    rate: u64,
    sink: Sink,
) -> anyhow::Result<u64> {
    let mut client = Http::new(http);
    let every = Duration::from_nanos(1_000_000_000 * step / rate.max(1));
    // Pushers start spread over one interval, so together they pace evenly.
    tokio::time::sleep(every * first as u32 / step as u32).await;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut last_report, mut last_count, mut sent) = (Instant::now(), 0, 0);
    for i in (first..total).step_by(step as usize) {
        tick.tick().await;
        client
            .push(&paths(i), crate::now_ns().to_string().as_bytes())
            .await?;
        sent += 1;
        if first == 0 && last_report.elapsed() >= Duration::from_secs(1) {
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
    Ok(sent)
}

/// Pushes as `pace` says and measures what arrives.
pub async fn fanout_with(
    c: &Conns,
    http: Option<SocketAddr>,
    target: Target,
    pace: Pace,
    pid: Option<u32>,
) -> anyhow::Result<Value> {
    let Pace {
        rate,
        seconds,
        pushers,
    } = pace;
    let (clients, took) = open(c).await?;
    let n = clients.len() as u64;
    let sink = Sink::new()?;
    let sample = (clients.len() / 1000).max(1);
    let readers = sink.attach(clients, sample);
    sink.reset();
    let cpu = CpuMeter::start(pid);
    let syscalls = crate::syscalls::Counter::start(pid).unwrap_or_else(|e| {
        eprintln!("no syscall count: {e:#}");
        None
    });
    let start = Instant::now();
    let mut push_secs = seconds as f64;
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
            let total = rate * seconds;
            let paths: std::sync::Arc<dyn Fn(u64) -> String + Send + Sync> = {
                let (target, c_rooms) = (target.clone(), c.rooms.max(1));
                let (room_type, key_prefix, count) =
                    (c.room_type.clone(), c.key_prefix.clone(), c.count);
                std::sync::Arc::new(move |i| match &target {
                    Target::Rooms => format!(
                        "/goim/push/room?operation={OP}&type={room_type}&room={}",
                        i as usize % c_rooms
                    ),
                    Target::All { speed } => {
                        format!("/goim/push/all?operation={OP}&speed={speed}")
                    }
                    Target::Keys => format!(
                        "/goim/push/keys?operation={OP}&keys={key_prefix}{}",
                        i as usize % count
                    ),
                    Target::ServerDriven { .. } => unreachable!(),
                })
            };
            let step = pushers.max(1) as u64;
            let tasks: Vec<_> = (0..step)
                .map(|first| {
                    tokio::spawn(pusher(
                        http,
                        paths.clone(),
                        (first, step, total),
                        rate,
                        sink.clone(),
                    ))
                })
                .collect();
            for t in tasks {
                t.await??;
            }
            push_secs = start.elapsed().as_secs_f64();
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
    let cpu_split = cpu.split();
    let cpu_used = cpu_split.map(|(u, s)| u + s);
    let syscalls = syscalls.and_then(|c| {
        c.finish()
            .map_err(|e| eprintln!("no syscall count: {e:#}"))
            .ok()
    });
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
        "pushers": pushers.max(1),
        "pushes_per_second": pushes as f64 / push_secs.max(1e-9),
        "expected": expected,
        "delivered": delivered,
        "delivered_per_second": delivered as f64 / elapsed,
        "bytes_per_second": sink.bytes.load(std::sync::atomic::Ordering::Relaxed) as f64 / elapsed,
        "server_cpu_seconds": cpu_used,
        "server_user_seconds": cpu_split.map(|c| c.0),
        "server_sys_seconds": cpu_split.map(|c| c.1),
        "server_syscalls": syscalls,
        "syscalls_per_delivery": syscalls.filter(|_| delivered > 0).map(|s| s as f64 / delivered as f64),
        "delivered_per_cpu_second": cpu_used.filter(|&c| c > 0.0).map(|c| delivered as f64 / c),
        "latency_us": sink.latency(),
    }))
}
