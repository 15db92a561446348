//! Conversations under load: messages into one big group with part of its members online
//! (sends/s, send latency, pushes delivered, notifications taken by a sink this process
//! serves), then "list my conversations" for a user in many conversations.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use goim_client::{token, Client, Transport};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::http::Http;
use crate::CpuMeter;

/// The conversation push op (docs/PROTOCOL.md).
const CONV_MESSAGE: i32 = 41;

#[derive(Debug, Clone)]
pub struct ChatArgs {
    pub http: SocketAddr,
    /// A comet's TCP address, for the members online.
    pub comet: SocketAddr,
    pub members: usize,
    pub online: usize,
    pub messages: usize,
    /// Concurrent senders (each its own keep-alive connection to the API).
    pub senders: usize,
    /// The notification sink this process serves (the server's `notify.url` points here).
    pub sink: Option<SocketAddr>,
    /// A user in this many conversations, for the list timing.
    pub inbox_conversations: usize,
    pub inbox_queries: usize,
    pub pid: Option<u32>,
}

/// Notifications the sink took, and when the first and last arrived.
#[derive(Default)]
struct SinkCount {
    notifications: AtomicU64,
    posts: AtomicU64,
    first_last: Mutex<Option<(Instant, Instant)>>,
}

async fn serve_sink(addr: SocketAddr, count: Arc<SinkCount>) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("sink on {addr}"))?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match r.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let l = line.trim_end().to_ascii_lowercase();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let n = body.windows(6).filter(|w| w == b"\"mid\":").count() as u64;
                    count.notifications.fetch_add(n, Ordering::Relaxed);
                    count.posts.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if let Ok(mut fl) = count.first_last.lock() {
                        let first = fl.map_or(now, |(f, _)| f);
                        *fl = Some((first, now));
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if r.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(())
}

async fn api(h: &mut Http, method: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let text = h.call(method, path, body.to_string().as_bytes()).await?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{path}: {text}"))?;
    if v["code"] != 0 {
        bail!("{method} {path}: {v}");
    }
    Ok(v["data"].clone())
}

fn quantiles(h: &Histogram<u64>) -> Value {
    json!({
        "samples": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
    })
}

/// Waits until `f` reaches `want` or stops moving for `patience`.
async fn settle(f: impl Fn() -> u64, want: u64, patience: Duration) -> u64 {
    let (mut last, mut since) = (f(), Instant::now());
    while f() < want {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = f();
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > patience {
            break;
        }
    }
    f()
}

pub async fn chat(a: &ChatArgs) -> anyhow::Result<Value> {
    let sink = Arc::new(SinkCount::default());
    if let Some(addr) = a.sink {
        serve_sink(addr, sink.clone()).await?;
    }
    let mut h = Http::new(a.http);
    let tag = crate::now_ns() / 1_000_000;
    let id = format!("bench-{}-{tag}", a.members);
    let mids: Vec<i64> = (1..=a.members as i64).collect();
    api(&mut h, "POST", "/goim/conversations", &json!({"id": id})).await?;
    for chunk in mids.chunks(2000) {
        let path = format!("/goim/conversations/{id}/members");
        api(&mut h, "POST", &path, &json!({ "mids": chunk })).await?;
    }

    // Members 1..=online connect (member 1 sends: its own device gets its messages too).
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for start in (0..a.online).step_by(200) {
        let mut set = tokio::task::JoinSet::new();
        for i in start..(start + 200).min(a.online) {
            let addr = a.comet;
            set.spawn(async move {
                let mut c = Client::connect(Transport::Tcp, addr, None).await?;
                let mid = i as i64 + 1;
                c.auth(&token(mid, &format!("m{mid}"), "", &[CONV_MESSAGE]))
                    .await?;
                anyhow::Ok(c)
            });
        }
        while let Some(c) = set.join_next().await {
            let mut c = c??;
            let received = received.clone();
            readers.push(tokio::spawn(async move {
                while let Ok(p) = c.recv().await {
                    if p.op == CONV_MESSAGE {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    eprintln!("{} members, {} online", a.members, a.online);

    let cpu = CpuMeter::start(a.pid);
    let started = Instant::now();
    let per_sender = a.messages.div_ceil(a.senders.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..a.senders.max(1) {
        let (http, id) = (a.http, id.clone());
        let n = per_sender.min(a.messages.saturating_sub(s * per_sender));
        tasks.spawn(async move {
            let mut h = Http::new(http);
            let mut hist = Histogram::<u64>::new(3)?;
            let path = format!("/goim/conversations/{id}/messages");
            for i in 0..n {
                let body = json!({"sender": 1, "body": format!("bench message {s}-{i}")});
                let t = Instant::now();
                api(&mut h, "POST", &path, &body).await?;
                hist.record(t.elapsed().as_micros().max(1) as u64)?;
            }
            anyhow::Ok(hist)
        });
    }
    let mut send_us = Histogram::<u64>::new(3)?;
    while let Some(hist) = tasks.join_next().await {
        send_us.add(hist??)?;
    }
    let sent_in = started.elapsed();
    let want_pushes = (a.messages * a.online) as u64;
    let pushed = settle(
        || received.load(Ordering::Relaxed),
        want_pushes,
        Duration::from_secs(5),
    )
    .await;
    let pushed_in = started.elapsed();
    let server_cpu = cpu.used();
    let want_notes = (a.messages * (a.members - a.online)) as u64;
    let notes = if a.sink.is_some() {
        settle(
            || sink.notifications.load(Ordering::Relaxed),
            want_notes,
            // What the sink's queue could not take waits in the store for a renotify round.
            Duration::from_secs(20),
        )
        .await
    } else {
        0
    };
    let notes_span = sink
        .first_last
        .lock()
        .ok()
        .and_then(|fl| fl.map(|(f, l)| l.duration_since(f).as_secs_f64()));
    for r in readers {
        r.abort();
    }

    // A user in many conversations, each with a message: how long its list takes.
    let user = 10_000_000 + tag as i64 % 1_000_000;
    for i in 0..a.inbox_conversations {
        let cid = format!("inbox-{tag}-{i}");
        api(
            &mut h,
            "POST",
            "/goim/conversations",
            &json!({"id": cid, "members": [user, 1]}),
        )
        .await?;
        let path = format!("/goim/conversations/{cid}/messages");
        api(&mut h, "POST", &path, &json!({"sender": 1, "body": "hi"})).await?;
    }
    let mut lists = serde_json::Map::new();
    for limit in [100, 1000] {
        let mut hist = Histogram::<u64>::new(3)?;
        let path = format!("/goim/users/{user}/conversations?limit={limit}");
        for _ in 0..a.inbox_queries {
            let t = Instant::now();
            let v = api(&mut h, "GET", &path, &Value::Null).await?;
            hist.record(t.elapsed().as_micros().max(1) as u64)?;
            let unread = v["total_unread"].as_u64().unwrap_or(0);
            if unread != a.inbox_conversations as u64 {
                bail!("list says {unread} unread, want {}", a.inbox_conversations);
            }
        }
        lists.insert(format!("limit_{limit}"), quantiles(&hist));
    }

    let msgs_per_s = a.messages as f64 / sent_in.as_secs_f64();
    Ok(json!({
        "scenario": "chat",
        "connections": a.online,
        "members": a.members,
        "online": a.online,
        "messages": a.messages,
        "senders": a.senders,
        "rate": (msgs_per_s * 10.0).round() / 10.0,
        "messages_per_second": (msgs_per_s * 10.0).round() / 10.0,
        "send_latency_us": quantiles(&send_us),
        "latency_us": quantiles(&send_us),
        "pushes_expected": want_pushes,
        "pushes_received": pushed,
        "delivered_per_second": (pushed as f64 / pushed_in.as_secs_f64()).round(),
        "delivered_per_cpu_second": server_cpu.map(|c| (pushed as f64 / c).round()),
        "server_cpu_seconds": server_cpu,
        "server_cpu_ms_per_message": server_cpu.map(|c| c * 1000.0 / a.messages as f64),
        "notifications_expected": if a.sink.is_some() { Some(want_notes) } else { None },
        "notifications_received": notes,
        "notification_posts": sink.posts.load(Ordering::Relaxed),
        "notifications_per_second": notes_span
            .filter(|s| *s > 0.0)
            .map(|s| (notes as f64 / s).round()),
        // What a write-diffusion design would write per message: a row per member (the
        // rows this store writes are measured from PostgreSQL's statistics by bench/chat.sh).
        "write_diffusion_rows_per_message": a.members,
        "inbox_conversations": a.inbox_conversations,
        "list_latency_us": Value::Object(lists),
    }))
}
