//! Fault injection: a real cluster (etcd, 2 logics, 2 jobs, 3 comets, ~150 clients with known
//! keys, users and rooms) takes a numbered stream of key, user and room pushes while the faults
//! users meet happen to it. After each fault: no message reached a connection it was not
//! addressed to; every client that stayed connected got every accepted message (where the
//! fault leaves the delivery path intact) or the loss shows in a counter; presence in etcd
//! equals the connections that exist; pushes reach every client again; no process panicked;
//! memory stayed bounded. Each fault prints one line: accepted, delivered, lost, counted.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::*;
use goim_client::{token, Client, Transport};
use goim_discovery::etcd_client::GetOptions;
use serde_json::Value;
use tokio::task::JoinHandle;

const USERS: i64 = 12;
const ROOMS: usize = 4;
const PER_COMET: usize = 48;

/// What a connection is: its key, user and room.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Identity {
    key: String,
    mid: i64,
    room: String,
}

/// One client connection and what it received.
struct Conn {
    id: Identity,
    comet: usize,
    /// Message ids received (`phase:n`), in order.
    got: Arc<Mutex<Vec<String>>>,
    /// Closed by the server (or stopped reading on purpose).
    closed: Arc<std::sync::atomic::AtomicBool>,
    reader: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Messages that reached a connection they were not addressed to.
static MISDELIVERED: AtomicU64 = AtomicU64::new(0);

/// Body: `kind|target|phase:n` with kind K (key), M (mid) or R (room).
fn check(id: &Identity, body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let mut parts = text.splitn(3, '|');
    let (kind, target, msg) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = match kind {
        "K" => target == id.key,
        "M" => target == id.mid.to_string(),
        "R" => target == id.room,
        _ => return None,
    };
    if !ok {
        MISDELIVERED.fetch_add(1, Ordering::SeqCst);
        eprintln!("MISDELIVERED {text} to {id:?}");
    }
    Some(msg.to_string())
}

async fn open(addr: SocketAddr, comet: usize, id: Identity, read: bool) -> Option<Conn> {
    let t = if id.key.ends_with('w') {
        Transport::WebSocket
    } else {
        Transport::Tcp
    };
    let mut c = tokio::time::timeout(Duration::from_secs(5), async {
        let mut c = Client::connect(t, addr, None).await.ok()?;
        c.auth(&token(id.mid, &id.key, &id.room, &[1000]))
            .await
            .ok()?;
        Some(c)
    })
    .await
    .ok()??;
    let got = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, cl, me) = (got.clone(), closed.clone(), id.clone());
    let reader = tokio::spawn(async move {
        if !read {
            // A client that stops reading: it holds its socket and never drains it.
            std::future::pending::<()>().await;
        }
        while let Ok(p) = c.recv().await {
            if let Some(m) = check(&me, &p.body) {
                g.lock().unwrap().push(m);
            }
        }
        cl.store(true, Ordering::SeqCst);
    });
    Some(Conn {
        id,
        comet,
        got,
        closed,
        reader,
    })
}

struct Faulty {
    etcd: Etcd,
    dir: tempfile::TempDir,
    logic_grpc: Vec<String>,
    logics: Vec<Role>,
    jobs: Vec<Role>,
    comets: Vec<Option<Role>>,
    jobs_started: usize,
}

impl Faulty {
    fn start() -> Faulty {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let logic_grpc: Vec<String> = (0..2)
            .map(|_| format!("127.0.0.1:{}", goim_testkit::free_port()))
            .collect();
        let logics = logic_grpc
            .iter()
            .enumerate()
            .map(|(i, g)| start_named_logic(&etcd, dir.path(), i, g))
            .collect();
        let mut f = Faulty {
            etcd,
            dir,
            logic_grpc,
            logics,
            jobs: Vec::new(),
            comets: Vec::new(),
            jobs_started: 0,
        };
        for _ in 0..2 {
            f.add_job();
        }
        for i in 0..3 {
            let c = f.start_comet(i);
            f.comets.push(Some(c));
        }
        f.wait_converged();
        f
    }

    fn add_job(&mut self) {
        let id = format!("job-{}", self.jobs_started);
        self.jobs_started += 1;
        self.jobs.push(start_job(&self.etcd, self.dir.path(), &id));
    }

    fn start_comet(&self, i: usize) -> Role {
        let logics = self.logic_grpc.join(",");
        let c = start_comet_with(
            &self.etcd,
            self.dir.path(),
            &format!("comet-{i}"),
            &logics,
            // A SIGTERM drains the comet's clients over a second, not the default 30 s.
            "presence_sweep = \"500ms\"\ndrain_period = \"1s\"",
        );
        let http = c.addr("http");
        wait_until("comet ready", || http_status(http, "/readyz") == 200);
        c
    }

    fn http(&self, n: usize) -> SocketAddr {
        self.logics[n % self.logics.len()].addr("http")
    }

    /// Every job and logic sees every live comet.
    fn wait_converged(&self) {
        let n = self.comets.iter().flatten().count();
        for j in &self.jobs {
            let addr = j.addr("http");
            wait_until("jobs see the comets", || {
                blocking_get_json(addr, "/comets")
                    .as_array()
                    .is_some_and(|a| a.len() == n)
            });
        }
        for l in &self.logics {
            let addr = l.addr("http");
            wait_until("logic ready", || http_status(addr, "/readyz") == 200);
        }
    }

    fn comet_addr(&self, i: usize, t: Transport) -> Option<SocketAddr> {
        self.comets[i].as_ref().map(|c| {
            c.addr(match t {
                Transport::Tcp => "tcp",
                Transport::WebSocket => "ws",
            })
        })
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for r in self
            .logics
            .iter()
            .chain(&self.jobs)
            .chain(self.comets.iter().flatten())
        {
            all.push_str(&r.log());
        }
        all
    }

    /// Sum of a counter family over every live process's /metrics.
    fn counted(&self) -> u64 {
        let mut total = 0.0;
        let addrs = self
            .logics
            .iter()
            .chain(&self.jobs)
            .chain(self.comets.iter().flatten())
            .map(|r| r.addr("http"));
        for addr in addrs {
            let text = blocking_get_text(addr, "/metrics");
            for line in text.lines() {
                if line.starts_with("goim_comet_pushes_dropped_total")
                    || line.starts_with("goim_job_undeliverable_total")
                {
                    total += line
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0);
                }
            }
        }
        total as u64
    }

    fn rss_kb(&self) -> u64 {
        self.logics
            .iter()
            .chain(&self.jobs)
            .chain(self.comets.iter().flatten())
            .map(|r| rss_kb(r.pid()))
            .sum()
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn start_named_logic(etcd: &Etcd, dir: &std::path::Path, i: usize, grpc: &str) -> Role {
    Role::start(
        dir,
        &format!("logic-{i}"),
        &args(etcd, "logic", &["--http", "127.0.0.1:0", "--grpc", grpc]),
    )
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// A push that logic accepted (code 0), and whom it was for.
struct Sent {
    id: String,
    target: Target,
    /// Logic said presence could have missed connections (and counted the push).
    incomplete: bool,
}

enum Target {
    Key(String),
    Mid(i64),
    Room(String),
}

impl Target {
    fn wants(&self, id: &Identity) -> bool {
        match self {
            Target::Key(k) => *k == id.key,
            Target::Mid(m) => *m == id.mid,
            Target::Room(r) => *r == id.room,
        }
    }
}

/// Pushes one round: a key, a user and a room, through alternating logics.
async fn push_round(
    http: SocketAddr,
    phase: &str,
    n: usize,
    keys: &[String],
    sent: &mut Vec<Sent>,
) -> usize {
    let mut accepted = 0;
    let key = &keys[n % keys.len()];
    let mid = (n as i64 % USERS) + 1;
    let room = format!("live://{}", n % ROOMS);
    let pushes = [
        (
            format!("/goim/push/keys?operation=1000&keys={key}"),
            format!("K|{key}|{phase}:{n}k"),
            Target::Key(key.clone()),
        ),
        (
            format!("/goim/push/mids?operation=1000&mids={mid}"),
            format!("M|{mid}|{phase}:{n}m"),
            Target::Mid(mid),
        ),
        (
            format!(
                "/goim/push/room?operation=1000&type=live&room={}",
                n % ROOMS
            ),
            format!("R|{room}|{phase}:{n}r"),
            Target::Room(room.clone()),
        ),
    ];
    for (path, body, target) in pushes {
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            raw_http(http, "POST", &path, body.as_bytes()),
        )
        .await;
        let reply = match &r {
            Ok(Ok((200, b))) => serde_json::from_str::<Value>(b).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        if reply["code"] != 0 {
            continue;
        }
        accepted += 1;
        // A key or user push that logic found no connection for says so in its reply
        // (`keys_found: 0`, presence lost with a lease during etcd trouble): nothing
        // is owed to anyone then.
        if reply["data"]["keys_found"] == 0 {
            continue;
        }
        let id = body.rsplit('|').next().unwrap().to_string();
        let incomplete = reply["data"]["presence_complete"] == false;
        sent.push(Sent {
            id,
            target,
            incomplete,
        });
    }
    accepted
}

struct World {
    f: Faulty,
    conns: Vec<Conn>,
    keys: Vec<String>,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for r in self
                .f
                .logics
                .iter()
                .chain(&self.f.jobs)
                .chain(self.f.comets.iter().flatten())
            {
                let log = r.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {} ----", r.ready);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl World {
    /// Reconnects every client whose connection is gone, to a live comet.
    async fn reconnect(&mut self) {
        let live: Vec<usize> = (0..self.f.comets.len())
            .filter(|&i| self.f.comets[i].is_some())
            .collect();
        for c in self.conns.iter_mut() {
            if !c.closed.load(Ordering::SeqCst) && self.f.comets[c.comet].is_some() {
                continue;
            }
            let mut done = None;
            for attempt in 0..50 {
                let comet = live[(c.comet + attempt) % live.len()];
                let t = if c.id.key.ends_with('w') {
                    Transport::WebSocket
                } else {
                    Transport::Tcp
                };
                let addr = self.f.comet_addr(comet, t).unwrap();
                if let Some(n) = open(addr, comet, c.id.clone(), true).await {
                    done = Some(n);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            *c = done.expect("client reconnects");
        }
    }

    /// Pushes a probe to every client by key until each has one (the path works again).
    async fn probe(&self, phase: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        for (i, c) in self.conns.iter().enumerate() {
            loop {
                n += 1;
                let id = format!("{phase}-probe:{n}");
                let body = format!("K|{}|{id}", c.id.key);
                let path = format!("/goim/push/keys?operation=1000&keys={}", c.id.key);
                let _ = raw_http(self.f.http(i), "POST", &path, body.as_bytes()).await;
                let arrived = tokio::time::timeout(Duration::from_secs(2), async {
                    loop {
                        if c.got.lock().unwrap().contains(&id) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .is_ok();
                if arrived {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{phase}: no probe reached {:?}",
                    c.id
                );
            }
        }
    }

    /// Presence in etcd equals the connections that exist.
    async fn presence_converges(&self, phase: &str) {
        let want: HashSet<String> = self.conns.iter().map(|c| c.id.key.clone()).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut e = goim_discovery::connect(&[self.f.etcd.endpoint()])
                .await
                .unwrap();
            let got: HashSet<String> = e
                .get(
                    "/goim/test/online/key/",
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
                .map(|r| {
                    r.kvs()
                        .iter()
                        .filter_map(|kv| {
                            kv.key_str()
                                .ok()?
                                .strip_prefix("/goim/test/online/key/")
                                .map(String::from)
                        })
                        .collect()
                })
                .unwrap_or_default();
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{phase}: presence {} keys, connections {}; extra {:?}, missing {:?}",
                got.len(),
                want.len(),
                got.difference(&want).take(5).collect::<Vec<_>>(),
                want.difference(&got).take(5).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What one fault did, for the report and the assertions.
struct Outcome {
    accepted: usize,
    /// Deliveries owed to clients that stayed connected, made and missed.
    delivered: usize,
    lost: usize,
    /// Distinct messages with at least one missed delivery.
    lost_messages: u64,
    /// Of those, the ones logic had said presence could be incomplete for (counted there).
    lost_incomplete: u64,
    /// Messages counted as undeliverable (comets and jobs, every reason) meanwhile.
    counted: u64,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    CometKill,
    CometTerm,
    JobTerm,
    JobKill,
    LogicRestart,
    EtcdRestart,
    EtcdStall,
    AccountSwitch,
}

async fn inject(w: &mut World, fault: Fault) {
    match fault {
        Fault::CometKill => w.f.comets[2].take().unwrap().kill(),
        Fault::CometTerm => {
            let mut c = w.f.comets[1].take().unwrap();
            let clean = tokio::task::block_in_place(|| c.terminate());
            assert!(clean, "comet exits cleanly on SIGTERM");
        }
        Fault::JobTerm => {
            let mut j = w.f.jobs.remove(0);
            let clean = tokio::task::block_in_place(|| j.terminate());
            assert!(clean, "job drains and exits cleanly on SIGTERM");
        }
        Fault::JobKill => w.f.jobs.remove(0).kill(),
        Fault::LogicRestart => {
            w.f.logics[0].kill();
            let l = tokio::task::block_in_place(|| {
                start_named_logic(&w.f.etcd, w.f.dir.path(), 9, &w.f.logic_grpc[0])
            });
            w.f.logics[0] = l;
        }
        Fault::EtcdRestart => tokio::task::block_in_place(|| w.f.etcd.restart()),
        Fault::EtcdStall => {
            let pid = w.f.etcd.pid().unwrap();
            signal(pid, "-STOP");
            // Pushes go on while etcd does not answer; it resumes 5 s later.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                signal(pid, "-CONT");
            });
        }
        Fault::AccountSwitch => {
            // Live keys move to another user on the same comet (the old connection is
            // kicked): the previous user's pushes must never reach the new one.
            for i in (0..8).map(|i| i * 7) {
                let mut id = w.conns[i].id.clone();
                id.mid = (id.mid % USERS) + 1;
                let comet = w.conns[i].comet;
                let t = if id.key.ends_with('w') {
                    Transport::WebSocket
                } else {
                    Transport::Tcp
                };
                let addr = w.f.comet_addr(comet, t).unwrap();
                w.conns[i] = open(addr, comet, id, true).await.expect("switch");
            }
        }
    }
}

/// Runs `rounds` push rounds around `fault` and accounts for every accepted message to the
/// clients that stayed connected throughout.
async fn phase(w: &mut World, name: &str, rounds: usize, fault: Fault) -> Outcome {
    let counted_before = tokio::task::block_in_place(|| w.f.counted());
    let mut sent = Vec::new();
    let mut accepted = 0;
    for n in 0..rounds / 2 {
        accepted += push_round(w.f.http(n), name, n, &w.keys, &mut sent).await;
    }
    // Connections open now that are still open at the end stayed through the fault.
    let before: Vec<(usize, Arc<Mutex<Vec<String>>>)> = w
        .conns
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.got.clone()))
        .collect();
    inject(w, fault).await;
    for n in rounds / 2..rounds {
        accepted += push_round(w.f.http(n), name, n, &w.keys, &mut sent).await;
    }
    w.reconnect().await;
    w.probe(name).await;
    w.presence_converges(name).await;
    let mut delivered = 0;
    let mut lost = 0;
    let mut missed: HashSet<String> = HashSet::new();
    let mut missed_incomplete: HashSet<String> = HashSet::new();
    for (i, got) in before {
        let c = &w.conns[i];
        // Replaced (reconnected) or switched clients did not stay.
        if !Arc::ptr_eq(&c.got, &got) {
            continue;
        }
        let got: HashSet<String> = got.lock().unwrap().iter().cloned().collect();
        for s in sent.iter().filter(|s| s.target.wants(&c.id)) {
            if got.contains(&s.id) {
                delivered += 1;
            } else {
                lost += 1;
                missed.insert(s.id.clone());
                if s.incomplete {
                    missed_incomplete.insert(s.id.clone());
                }
                println!(
                    "  {name}: {} missed by {} on comet {}{}",
                    s.id,
                    c.id.key,
                    c.comet,
                    if s.incomplete {
                        " (presence was incomplete)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    let counted = tokio::task::block_in_place(|| w.f.counted()).saturating_sub(counted_before);
    let o = Outcome {
        accepted,
        delivered,
        lost,
        lost_messages: missed.len() as u64,
        lost_incomplete: missed_incomplete.len() as u64,
        counted,
    };
    println!(
        "fault {name:<22} accepted {:>4} delivered {:>5} lost {:>3} ({} messages, {} said incomplete) counted {:>4} misdelivered {}",
        o.accepted,
        o.delivered,
        o.lost,
        o.lost_messages,
        o.lost_incomplete,
        o.counted,
        MISDELIVERED.load(Ordering::SeqCst)
    );
    assert_eq!(
        MISDELIVERED.load(Ordering::SeqCst),
        0,
        "{name}: misdelivered"
    );
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_survives_what_users_meet() {
    let f = tokio::task::spawn_blocking(Faulty::start).await.unwrap();
    let mut conns = Vec::new();
    let mut keys = Vec::new();
    for comet in 0..3 {
        for j in 0..PER_COMET {
            let n = comet * PER_COMET + j;
            // Every third client on WebSocket.
            let key = format!("c{n}{}", if n.is_multiple_of(3) { "w" } else { "t" });
            let id = Identity {
                key: key.clone(),
                mid: (n as i64 % USERS) + 1,
                room: format!("live://{}", n % ROOMS),
            };
            let t = if key.ends_with('w') {
                Transport::WebSocket
            } else {
                Transport::Tcp
            };
            let addr = f.comet_addr(comet, t).unwrap();
            conns.push(open(addr, comet, id, true).await.expect("client connects"));
            keys.push(key);
        }
    }
    let mut w = World { f, conns, keys };
    w.probe("warmup").await;
    let rss_start = w.f.rss_kb();
    let rounds = 20;

    let o = phase(&mut w, "comet SIGKILL", rounds, Fault::CometKill).await;
    assert_eq!(o.lost, 0, "clients of the other comets lose nothing");
    let c = tokio::task::block_in_place(|| w.f.start_comet(2));
    w.f.comets[2] = Some(c);
    tokio::task::block_in_place(|| w.f.wait_converged());

    let o = phase(&mut w, "comet SIGTERM", rounds, Fault::CometTerm).await;
    assert_eq!(o.lost, 0);
    let c = tokio::task::block_in_place(|| w.f.start_comet(1));
    w.f.comets[1] = Some(c);
    tokio::task::block_in_place(|| w.f.wait_converged());

    let o = phase(&mut w, "job SIGTERM", rounds, Fault::JobTerm).await;
    assert_eq!(o.lost, 0, "a draining job hands over everything");
    tokio::task::block_in_place(|| {
        w.f.add_job();
        w.f.wait_converged();
    });

    let o = phase(&mut w, "job SIGKILL", rounds, Fault::JobKill).await;
    // What the killed job held is lost with it (in memory, at most once) and no live process
    // can count it: the README says so. Everything else arrives.
    assert!(o.lost <= o.accepted, "accounted");
    tokio::task::block_in_place(|| {
        w.f.add_job();
        w.f.wait_converged();
    });

    let o = phase(&mut w, "logic restart", rounds, Fault::LogicRestart).await;
    assert_eq!(o.lost, 0);
    tokio::task::block_in_place(|| w.f.wait_converged());

    let o = phase(&mut w, "etcd restart", rounds, Fault::EtcdRestart).await;
    assert_eq!(
        o.lost, 0,
        "accepted pushes are delivered across an etcd restart"
    );
    tokio::task::block_in_place(|| w.f.wait_converged());

    let o = phase(&mut w, "etcd stalled 5s", rounds, Fault::EtcdStall).await;
    // Leases lapse during a stall longer than their TTL (2 s here) and every role
    // re-registers once etcd answers: a comet back within `unknown_comet_wait` gets room
    // batches meant for it meanwhile; a key or user push made while a comet was putting its
    // presence back said so in its reply (and logic counted it); anything else that missed a
    // client was counted by job or comet.
    assert!(
        o.lost_messages - o.lost_incomplete <= o.counted,
        "{} messages lost ({} said incomplete), {} counted",
        o.lost_messages,
        o.lost_incomplete,
        o.counted
    );
    tokio::task::block_in_place(|| w.f.wait_converged());

    // A client that stops reading: its queue fills and what does not fit is counted.
    let stuck_id = w.conns[0].id.clone();
    let addr = w.f.comet_addr(w.conns[0].comet, Transport::Tcp).unwrap();
    let stuck_key = format!("{}-stuck", stuck_id.key);
    let stuck = open(
        addr,
        w.conns[0].comet,
        Identity {
            key: stuck_key.clone(),
            ..stuck_id
        },
        false,
    )
    .await
    .unwrap();
    let body = vec![b'x'; 4000];
    let before = tokio::task::block_in_place(|| w.f.counted());
    // Until the socket buffers and the connection's queue are full and pushes start to
    // drop: each one dropped is counted.
    let mut pushed = 0;
    while tokio::task::block_in_place(|| w.f.counted()) == before {
        assert!(pushed < 20_000, "a stuck client's losses are counted");
        for _ in 0..100 {
            push(
                w.f.http(0),
                &format!("/goim/push/keys?operation=1000&keys={stuck_key}"),
                &body,
            )
            .await;
        }
        pushed += 100;
    }
    println!(
        "fault {:<22} pushed {pushed}, counted {}",
        "client stops reading",
        tokio::task::block_in_place(|| w.f.counted()) - before
    );
    drop(stuck);

    let o = phase(&mut w, "account switch", rounds, Fault::AccountSwitch).await;
    assert_eq!(o.lost, 0);

    let rss_end = w.f.rss_kb();
    println!("rss of all roles: {rss_start} kB at the start, {rss_end} kB at the end");
    assert!(
        rss_end < rss_start * 3 + 200_000,
        "memory grew without bound: {rss_start} -> {rss_end} kB"
    );
    let logs = w.f.logs();
    assert!(!logs.contains("panicked"), "a process panicked:\n{logs}");
    let users: HashMap<i64, usize> = w.conns.iter().fold(HashMap::new(), |mut m, c| {
        *m.entry(c.id.mid).or_default() += 1;
        m
    });
    assert!(users.len() as i64 == USERS);
}
