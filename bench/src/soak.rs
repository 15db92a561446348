//! The soak: many connections held for a long time over several comets, with churn (clients
//! that close and reconnect), key and room pushes, while a script restarts comets. Every
//! message a client receives is checked against who it is (a key push names its key, a room
//! push its room): one that reaches anyone else is a misdelivery. Every accepted key push that
//! never arrived is put down to the connection end around it (the client's churn, or the
//! server closing it) or, failing that, reported unexplained.
//!
//! One loader process holds at most ~17k connections (the open-file limit); the coordinator
//! ([`coordinate`]) starts several, sums the lines they print each second, samples the server
//! processes' RSS and CPU, and writes the timeline as CSV (and a PNG, see `plot`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use goim_client::{token, Client, Transport};
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::http::Http;
use crate::OP;

/// What one loader does; the coordinator hands each its share.
#[derive(Debug, Clone, clap::Args)]
pub struct Load {
    /// Comet TCP addresses; slot i first connects to the (i mod n)-th, later to a random one.
    #[arg(long = "addr", required = true)]
    pub addrs: Vec<SocketAddr>,
    /// logic's HTTP address, for pushes.
    #[arg(long, default_value = "127.0.0.1:3111")]
    pub http: SocketAddr,
    /// Connections held (all loaders together for the coordinator).
    #[arg(long, default_value_t = 50_000)]
    pub conns: usize,
    /// Rooms the connections spread over (all loaders together).
    #[arg(long, default_value_t = 500)]
    pub rooms: usize,
    /// Client closes (each followed by a reconnect) per second, all loaders together.
    #[arg(long, default_value_t = 500)]
    pub churn: u64,
    /// Key pushes per second, all loaders together.
    #[arg(long, default_value_t = 100)]
    pub key_rate: u64,
    /// Room pushes per second, all loaders together.
    #[arg(long, default_value_t = 10)]
    pub room_rate: u64,
    /// How long pushes and churn run, after every connection is up.
    #[arg(long, default_value_t = 1800)]
    pub seconds: u64,
    /// Seconds between a connection's heartbeats (comet closes one silent for two of logic's
    /// heartbeat intervals).
    #[arg(long, default_value_t = 120)]
    pub heartbeat: u64,
}

/// A connection's end, as the loader saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum End {
    /// The loader closed it (churn).
    Client,
    /// The server closed it, or the socket failed (a comet restart).
    Server,
}

/// Counters a loader prints each second (cumulative).
#[derive(Default)]
struct Stats {
    live: AtomicI64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    closed_by_client: AtomicU64,
    closed_by_server: AtomicU64,
    key_accepted: AtomicU64,
    key_offline: AtomicU64,
    key_failed: AtomicU64,
    key_received: AtomicU64,
    key_duplicates: AtomicU64,
    room_pushes: AtomicU64,
    room_failed: AtomicU64,
    /// Members connected when each room push was accepted (what a perfect run delivers,
    /// give or take churn during the push).
    room_members_at_push: AtomicU64,
    room_received: AtomicU64,
    misdelivered: AtomicU64,
}

impl Stats {
    fn line(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "live": self.live.load(Ordering::Relaxed),
            "connects": g(&self.connects),
            "connect_failures": g(&self.connect_failures),
            "closed_by_client": g(&self.closed_by_client),
            "closed_by_server": g(&self.closed_by_server),
            "key_accepted": g(&self.key_accepted),
            "key_offline": g(&self.key_offline),
            "key_failed": g(&self.key_failed),
            "key_received": g(&self.key_received),
            "key_duplicates": g(&self.key_duplicates),
            "room_pushes": g(&self.room_pushes),
            "room_failed": g(&self.room_failed),
            "room_members_at_push": g(&self.room_members_at_push),
            "room_received": g(&self.room_received),
            "misdelivered": g(&self.misdelivered),
        })
    }
}

/// One connection slot: who it is, whether it is up, and how its recent connections ended.
struct Slot {
    key: String,
    room: usize,
    churn: Notify,
    ends: Mutex<VecDeque<(Instant, End)>>,
}

/// State a loader's tasks share.
struct Loader {
    index: usize,
    stats: Stats,
    slots: Vec<Slot>,
    room_live: Vec<AtomicI64>,
    /// Accepted key pushes: id -> (slot, when accepted).
    accepted: Mutex<HashMap<u64, (usize, Instant)>>,
    received: Mutex<HashSet<u64>>,
    stop: CancellationToken,
}

/// A small xorshift generator: churn and push targets need spread, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

fn room_name(loader: usize, room: usize) -> String {
    format!("{loader}-{room}")
}

/// Runs one loader: `load` is this loader's share; prints a JSON line of counters each
/// second and a final line with `"final": true` and the analysis of missing key pushes.
pub async fn run_loader(load: Load, index: usize, source_base: usize) -> anyhow::Result<()> {
    let rooms = load.rooms.max(1);
    let loader = Arc::new(Loader {
        index,
        stats: Stats::default(),
        slots: (0..load.conns)
            .map(|i| Slot {
                key: format!("soak{index}-{i}"),
                room: i % rooms,
                churn: Notify::new(),
                ends: Mutex::new(VecDeque::new()),
            })
            .collect(),
        room_live: (0..rooms).map(|_| AtomicI64::new(0)).collect(),
        accepted: Mutex::default(),
        received: Mutex::default(),
        stop: Default::default(),
    });
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..load.conns {
        let (l, load) = (loader.clone(), load.clone());
        tasks.spawn(slot(l, load, i, source_base));
    }
    let report = {
        let l = loader.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let mut v = l.stats.line();
                v["t"] = json!(started.elapsed().as_secs_f64());
                println!("{v}");
            }
        })
    };
    // Everyone up (or trying) before the clock starts.
    while (loader.stats.live.load(Ordering::Relaxed) as usize) < load.conns * 99 / 100 {
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!(
                "only {} connections up after 600 s",
                loader.stats.live.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let until = Instant::now() + Duration::from_secs(load.seconds);
    let mut work = tokio::task::JoinSet::new();
    work.spawn(churn(loader.clone(), load.churn, until));
    work.spawn(key_pushes(loader.clone(), load.clone(), until));
    work.spawn(room_pushes(loader.clone(), load.clone(), until));
    while let Some(r) = work.join_next().await {
        r??;
    }
    // What is still on its way arrives; then the slots stop.
    tokio::time::sleep(Duration::from_secs(5)).await;
    loader.stop.cancel();
    while tasks.join_next().await.is_some() {}
    report.abort();
    let mut v = loader.stats.line();
    v["t"] = json!(started.elapsed().as_secs_f64());
    v["final"] = json!(true);
    v["key_missing"] = missing(&loader);
    println!("{v}");
    Ok(())
}

/// Accepted key pushes that never arrived, each put down to a connection end of its slot
/// within 3 s around the push (after the 5 s drain, nothing else is on its way).
fn missing(l: &Loader) -> Value {
    let accepted = l.accepted.lock().map(|a| a.clone()).unwrap_or_default();
    let received = l.received.lock().map(|r| r.clone()).unwrap_or_default();
    let mut by: HashMap<&'static str, u64> = HashMap::new();
    for (id, (slot, at)) in &accepted {
        if received.contains(id) {
            continue;
        }
        let ends = l.slots[*slot]
            .ends
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        let near = ends.iter().find(|(t, _)| {
            let d = if *t > *at { *t - *at } else { *at - *t };
            d <= Duration::from_secs(3)
        });
        let why = match near {
            Some((_, End::Client)) => "client_closed",
            Some((_, End::Server)) => "server_closed",
            None => "unexplained",
        };
        *by.entry(why).or_default() += 1;
    }
    json!(by)
}

async fn slot(l: Arc<Loader>, load: Load, i: usize, source_base: usize) {
    let s = &l.slots[i];
    let mid = (l.index * 1_000_000 + i + 1) as i64;
    let room = format!("soak://{}", room_name(l.index, s.room));
    let tok = token(mid, &s.key, &room, &[OP]);
    // Four source addresses per loader: live ports plus the TIME_WAIT that churn leaves stay
    // well inside each address's ephemeral range.
    let local = SocketAddr::from(([127, 0, 0, (2 + source_base + i % 4) as u8], 0));
    // The first connection goes to comet i mod n; every later one (after churn, a server
    // close or a failed connect) to a random comet, as a balancer would spread reconnects.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (((l.index as u64) << 32) | (i as u64 + 1)));
    let mut next = i % load.addrs.len();
    let mut backoff = Duration::from_millis(100);
    while !l.stop.is_cancelled() {
        let addr = load.addrs[next];
        next = rng.below(load.addrs.len());
        let connected = async {
            let mut c = Client::connect(Transport::Tcp, addr, Some(local)).await?;
            c.auth(&tok).await?;
            anyhow::Ok(c)
        };
        let mut c = match tokio::time::timeout(Duration::from_secs(10), connected).await {
            Ok(Ok(c)) => c,
            _ => {
                l.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = l.stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        l.stats.connects.fetch_add(1, Ordering::Relaxed);
        l.stats.live.fetch_add(1, Ordering::Relaxed);
        l.room_live[s.room].fetch_add(1, Ordering::Relaxed);
        let every = Duration::from_secs(load.heartbeat.max(1));
        let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let end = loop {
            tokio::select! {
                p = c.recv() => match p {
                    Ok(p) if p.op == OP => l.check(i, &p.body),
                    Ok(_) => {}
                    Err(_) => break Some(End::Server),
                },
                _ = s.churn.notified() => break Some(End::Client),
                _ = hb.tick() => {
                    if c.send(goim_client::OP_HEARTBEAT, b"").await.is_err() {
                        break Some(End::Server);
                    }
                }
                _ = l.stop.cancelled() => break None,
            }
        };
        l.stats.live.fetch_sub(1, Ordering::Relaxed);
        l.room_live[s.room].fetch_sub(1, Ordering::Relaxed);
        drop(c);
        let Some(end) = end else { return };
        match end {
            End::Client => l.stats.closed_by_client.fetch_add(1, Ordering::Relaxed),
            End::Server => l.stats.closed_by_server.fetch_add(1, Ordering::Relaxed),
        };
        if let Ok(mut ends) = s.ends.lock() {
            ends.push_back((Instant::now(), end));
            if ends.len() > 64 {
                ends.pop_front();
            }
        }
    }
}

impl Loader {
    /// A message for slot `i`: `k|key|id` or `r|room|id`; anything for someone else is a
    /// misdelivery.
    fn check(&self, i: usize, body: &[u8]) {
        let s = &self.slots[i];
        let text = std::str::from_utf8(body).unwrap_or("");
        let mut parts = text.splitn(3, '|');
        let (kind, to, id) = (parts.next(), parts.next(), parts.next());
        let id = id.and_then(|n| n.parse::<u64>().ok());
        match (kind, to, id) {
            (Some("k"), Some(key), Some(id)) if key == s.key => {
                self.stats.key_received.fetch_add(1, Ordering::Relaxed);
                let fresh = self
                    .received
                    .lock()
                    .map(|mut r| r.insert(id))
                    .unwrap_or(true);
                if !fresh {
                    self.stats.key_duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            (Some("r"), Some(room), Some(_)) if room == room_name(self.index, s.room) => {
                self.stats.room_received.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.stats.misdelivered.fetch_add(1, Ordering::Relaxed);
                eprintln!("misdelivered to {}: {text:?}", s.key);
            }
        }
    }
}

/// Closes a random connection `rate` times a second until `until`; each reconnects at once.
async fn churn(l: Arc<Loader>, rate: u64, until: Instant) -> anyhow::Result<()> {
    if rate == 0 {
        return Ok(());
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (l.index as u64 + 1));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    while Instant::now() < until {
        tick.tick().await;
        let i = rng.below(l.slots.len());
        l.slots[i].churn.notify_one();
    }
    Ok(())
}

/// What logic answered a push: taken (found online), offline, or failed.
enum Answer {
    Taken,
    Offline,
    Failed,
}

async fn push(http: &mut Http, path: &str, body: &[u8]) -> Answer {
    let Ok(text) = http.call("POST", path, body).await else {
        return Answer::Failed;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return Answer::Failed;
    };
    if v["code"] != 0 {
        return Answer::Failed;
    }
    if v["data"]["keys_offline"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        return Answer::Offline;
    }
    Answer::Taken
}

async fn key_pushes(l: Arc<Loader>, load: Load, until: Instant) -> anyhow::Result<()> {
    if load.key_rate == 0 {
        return Ok(());
    }
    let mut http = Http::new(load.http);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (l.index as u64 + 1));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / load.key_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut id = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        let i = rng.below(l.slots.len());
        let key = &l.slots[i].key;
        id += 1;
        let path = format!("/goim/push/keys?operation={OP}&keys={key}");
        let body = format!("k|{key}|{id}");
        // Recorded before the push: the message may arrive before logic's answer does.
        let at = Instant::now();
        if let Ok(mut a) = l.accepted.lock() {
            a.insert(id, (i, at));
        }
        let answer = push(&mut http, &path, body.as_bytes()).await;
        let counter = match answer {
            Answer::Taken => &l.stats.key_accepted,
            Answer::Offline => &l.stats.key_offline,
            Answer::Failed => &l.stats.key_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !matches!(answer, Answer::Taken) {
            if let Ok(mut a) = l.accepted.lock() {
                a.remove(&id);
            }
        }
    }
    Ok(())
}

async fn room_pushes(l: Arc<Loader>, load: Load, until: Instant) -> anyhow::Result<()> {
    if load.room_rate == 0 {
        return Ok(());
    }
    let mut http = Http::new(load.http);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / load.room_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut id = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        let room = id as usize % l.room_live.len();
        id += 1;
        let name = room_name(l.index, room);
        let path = format!("/goim/push/room?operation={OP}&type=soak&room={name}");
        let members = l.room_live[room].load(Ordering::Relaxed).max(0) as u64;
        match push(&mut http, &path, format!("r|{name}|{id}").as_bytes()).await {
            Answer::Failed => l.stats.room_failed.fetch_add(1, Ordering::Relaxed),
            _ => {
                l.stats
                    .room_members_at_push
                    .fetch_add(members, Ordering::Relaxed);
                l.stats.room_pushes.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
    Ok(())
}

/// Sums the loaders' latest lines (numbers only).
pub fn sum(lines: &[Value]) -> Map<String, Value> {
    let mut out = Map::new();
    for l in lines {
        let Some(o) = l.as_object() else { continue };
        for (k, v) in o {
            if let Some(n) = v.as_f64() {
                let prev = out.get(k).and_then(Value::as_f64).unwrap_or(0.0);
                out.insert(k.clone(), json!(prev + n));
            }
        }
    }
    out
}

/// The coordinator's settings: the whole load, split over `loaders` processes.
#[derive(Debug, Clone, clap::Args)]
pub struct Plan {
    #[command(flatten)]
    pub load: Load,
    /// Loader processes; each holds conns / loaders connections (keep that under ~17k: the
    /// open-file limit is per process).
    #[arg(long, default_value_t = 3)]
    pub loaders: usize,
    /// Loader i takes its four source addresses from 127.0.0.(2 + base + 4i) up.
    #[arg(long, default_value_t = 10)]
    pub source_base: usize,
    /// A directory of pid files, one per server process named by its role (a restart script
    /// rewrites them), whose RSS and CPU go into the timeline.
    #[arg(long)]
    pub pid_dir: Option<std::path::PathBuf>,
}

/// Loader `i`'s share of `total` (the remainder goes to the first ones).
fn share(total: u64, i: usize, n: usize) -> u64 {
    let n = n.max(1) as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// Runs the loaders, samples every second, and writes `soak.csv` and `soak.png` into `out`;
/// returns the totals (with the missing key pushes by cause) and each process's RSS.
pub async fn coordinate(plan: Plan, out: &std::path::Path) -> anyhow::Result<Value> {
    use tokio::io::AsyncBufReadExt;
    let n = plan.loaders.max(1);
    let per = plan.load.conns.div_ceil(n);
    anyhow::ensure!(
        per <= 18_000,
        "{per} connections per loader: past the open-file limit; use more --loaders"
    );
    let exe = std::env::current_exe()?;
    let latest = Arc::new(Mutex::new(vec![Value::Null; n]));
    let finals = Arc::new(Mutex::new(vec![Value::Null; n]));
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for i in 0..n {
        let l = &plan.load;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("soak-load")
            .args(["--loader", &i.to_string()])
            .args(["--source-base", &(plan.source_base + 4 * i).to_string()]);
        for a in &l.addrs {
            cmd.args(["--addr", &a.to_string()]);
        }
        cmd.args(["--http", &l.http.to_string()])
            .args(["--conns", &per.to_string()])
            .args(["--rooms", &share(l.rooms as u64, i, n).max(1).to_string()])
            .args(["--churn", &share(l.churn, i, n).to_string()])
            .args(["--key-rate", &share(l.key_rate, i, n).to_string()])
            .args(["--room-rate", &share(l.room_rate, i, n).to_string()])
            .args(["--seconds", &l.seconds.to_string()])
            .args(["--heartbeat", &l.heartbeat.to_string()])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("start a loader")?;
        let stdout = child.stdout.take().context("loader stdout")?;
        let (latest, finals) = (latest.clone(), finals.clone());
        readers.push(tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let into = if v["final"] == true { &finals } else { &latest };
                if let Ok(mut slots) = into.lock() {
                    slots[i] = v;
                }
            }
        }));
        children.push(child);
    }
    let mut procs = match &plan.pid_dir {
        Some(d) => Some(crate::timeline::Procs::new(d)?),
        None => None,
    };
    let counters = [
        "live",
        "connects",
        "closed_by_client",
        "closed_by_server",
        "key_accepted",
        "key_received",
        "key_offline",
        "room_received",
        "misdelivered",
    ];
    let header = std::iter::once("t".to_string())
        .chain(counters.iter().map(|c| c.to_string()))
        .chain(procs.iter().flat_map(|p| {
            p.names
                .iter()
                .flat_map(|n| [format!("{n}_rss_mib"), format!("{n}_cpu_pct")])
        }))
        .collect();
    let mut table = crate::timeline::Table {
        header,
        rows: Vec::new(),
    };
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let mut running = false;
        for c in &mut children {
            running |= c.try_wait()?.is_none();
        }
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        let totals = sum(&latest.lock().map(|l| l.clone()).unwrap_or_default());
        let mut row = vec![start.elapsed().as_secs_f64()];
        row.extend(
            counters
                .iter()
                .map(|c| totals.get(*c).and_then(Value::as_f64).unwrap_or(0.0)),
        );
        if let Some(p) = &mut procs {
            row.extend(p.sample(dt).iter().flat_map(|s| [s.rss_mib, s.cpu_pct]));
        }
        table.rows.push(row);
        if !running {
            break;
        }
    }
    for c in &mut children {
        let status = c.wait().await?;
        anyhow::ensure!(status.success(), "a loader failed: {status}");
    }
    for r in readers {
        let _ = r.await;
    }
    let finals = finals.lock().map(|f| f.clone()).unwrap_or_default();
    let mut summary = sum(&finals);
    summary.remove("t");
    summary.remove("final");
    let mut missing = Map::new();
    for f in &finals {
        if let Some(o) = f["key_missing"].as_object() {
            for (k, v) in o {
                let prev = missing.get(k).and_then(Value::as_u64).unwrap_or(0);
                missing.insert(k.clone(), json!(prev + v.as_u64().unwrap_or(0)));
            }
        }
    }
    summary.insert("key_missing".into(), Value::Object(missing));
    // RSS from the first second every connection was up (the ramp is not growth) to the end
    // of the pushes; a process down at a sample (restarting) is left out.
    let up = table
        .rows
        .iter()
        .position(|r| r[1] as usize >= plan.load.conns * 99 / 100)
        .unwrap_or(0);
    let end = table.rows.len().saturating_sub(8).max(up + 1);
    let mut rss = Map::new();
    if let Some(p) = &procs {
        for (k, name) in p.names.iter().enumerate() {
            let col = 1 + counters.len() + 2 * k;
            let vals: Vec<f64> = table.rows[up..end.min(table.rows.len())]
                .iter()
                .map(|r| r[col])
                .filter(|v| *v > 0.0)
                .collect();
            let (first, last) = (vals.first().copied(), vals.last().copied());
            let max = vals.iter().copied().fold(0.0, f64::max);
            rss.insert(
                name.clone(),
                json!({"rss_mib_first": first, "rss_mib_max": max, "rss_mib_last": last}),
            );
        }
    }
    summary.insert("processes".into(), Value::Object(rss));
    summary.insert("scenario".into(), json!("soak"));
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("soak.csv"), table.csv())?;
    let cols = |suffix: &str| -> Vec<String> {
        table
            .header
            .iter()
            .filter(|h| h.ends_with(suffix))
            .cloned()
            .collect()
    };
    let panels = [
        ("RSS (MiB)", cols("_rss_mib")),
        ("CPU (% of one core)", cols("_cpu_pct")),
        ("connections held", vec!["live".to_string()]),
    ];
    if let Err(e) = table.plot(&out.join("soak.png"), &panels) {
        eprintln!("no soak.png: {e:#}");
    }
    Ok(Value::Object(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total() {
        for (total, n) in [(10, 3), (500, 3), (2, 3), (0, 4)] {
            let s: u64 = (0..n).map(|i| share(total, i, n)).sum();
            assert_eq!(s, total, "{total} over {n}");
        }
    }

    #[test]
    fn loader_lines_sum_per_counter() {
        let s = sum(&[
            json!({"live": 2, "t": 1.5}),
            json!({"live": 3, "x": "a"}),
            Value::Null,
        ]);
        assert_eq!(s.get("live"), Some(&json!(5.0)));
        assert!(!s.contains_key("x"));
    }

    #[test]
    fn a_message_for_someone_else_is_a_misdelivery() {
        let l = Loader {
            index: 0,
            stats: Stats::default(),
            slots: (0..2)
                .map(|i| Slot {
                    key: format!("soak0-{i}"),
                    room: i,
                    churn: Notify::new(),
                    ends: Mutex::default(),
                })
                .collect(),
            room_live: vec![AtomicI64::new(0), AtomicI64::new(0)],
            accepted: Mutex::default(),
            received: Mutex::default(),
            stop: CancellationToken::new(),
        };
        l.check(0, b"k|soak0-0|1");
        l.check(0, b"k|soak0-0|1");
        l.check(0, b"r|0-0|7");
        l.check(0, b"k|soak0-1|2");
        l.check(1, b"r|0-0|8");
        l.check(1, b"garbage");
        let v = l.stats.line();
        assert_eq!(v["key_received"], 2);
        assert_eq!(v["key_duplicates"], 1);
        assert_eq!(v["room_received"], 1);
        assert_eq!(v["misdelivered"], 3);
    }
}
