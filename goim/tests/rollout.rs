//! Issue 9, scenario 1 through the operator: a PushCluster on a real kube-apiserver, its
//! logic, job and comets as real processes on a real etcd. There is no kubelet and no
//! StatefulSet controller: the test plays both. It runs a comet for each comet pod (on a
//! loopback address of its own, as its pod IP), reports its readiness from `/readyz`, sends
//! SIGTERM to a pod being deleted and removes the pod once its comet has exited, and creates
//! missing pods from the StatefulSet's template. A spec change then makes the operator roll
//! all three comets while a room and every client's user get a steady stream of pushes; the
//! clients follow the drain advice and come back with their positions.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/ext.rs"]
mod ext;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::*;
use ext::Ext;
use goim_client::Transport;
use goim_operator::crd::PushCluster;
use goim_testkit::{kubeconfig_text, ControlPlane, ADMIN_TOKEN};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

const CLIENTS: usize = 1000;
const COMETS: usize = 3;
const NS: &str = "rollout";
const PC: &str = "live";
const ROOM: &str = "chat://1";
/// Pushes a second: to the room, and to users (4 users a request).
const ROOM_RATE: u64 = 50;
const USER_RATE: u64 = 200;
const USERS_PER_PUSH: usize = 4;
const FIRST_MID: i64 = 10_000;

async fn admin(cp: &ControlPlane) -> Client {
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig_text(cp.port, ADMIN_TOKEN, "admin"))
        .unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

/// What every comet listens on, each on its own loopback address (its pod IP).
#[derive(Debug, Clone, Copy)]
struct Ports {
    tcp: u16,
    ws: u16,
    grpc: u16,
    metrics: u16,
}

impl Ports {
    /// Ports free on every comet's address, below the kernel's ephemeral range (32768 and
    /// up by default): a port taken from that range could become some outgoing connection's
    /// source port on a pod address before the comet binds it (CI saw "address in use").
    fn free() -> Ports {
        let mut taken = Vec::new();
        let mut pick = || loop {
            let p = fastrand::u16(20_000..32_000);
            let free_everywhere =
                (0..COMETS).all(|i| std::net::TcpListener::bind((pod_ip(i).as_str(), p)).is_ok());
            if !taken.contains(&p) && free_everywhere {
                taken.push(p);
                return p;
            }
        };
        Ports {
            tcp: pick(),
            ws: pick(),
            grpc: pick(),
            metrics: pick(),
        }
    }
}

/// Prints the non-zero loss, failure and drop counters of logic and of each comet (those
/// that answer), to explain a failed run.
async fn print_losses(logic: SocketAddr, ports: Ports) {
    let mut targets = vec![("logic".to_string(), logic)];
    for i in 0..COMETS {
        if let Ok(addr) = format!("{}:{}", pod_ip(i), ports.metrics).parse() {
            targets.push((format!("comet {i}"), addr));
        }
    }
    for (name, addr) in targets {
        let Ok((_, metrics)) = raw_http(addr, "GET", "/metrics", b"").await else {
            println!("  {name}: no metrics");
            continue;
        };
        let counts = [
            "dropped",
            "failure",
            "unwatched",
            "undeliver",
            "not_recovered",
        ];
        for line in metrics.lines().filter(|l| {
            !l.starts_with('#') && !l.ends_with(" 0") && counts.iter().any(|c| l.contains(c))
        }) {
            println!("  {name}: {line}");
        }
    }
}

fn pod_ip(i: usize) -> String {
    format!("127.0.0.{}", i + 2)
}

fn comet_addr(i: usize, ports: Ports) -> SocketAddr {
    format!("{}:{}", pod_ip(i), ports.tcp).parse().unwrap()
}

/// The ConfigMap's goim.toml, written where a pod would mount it.
async fn mount_config(c: &Client, dir: &Path, file: &str) -> PathBuf {
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), NS);
    let name = format!("{PC}-config");
    wait_until_async(|| async { cms.get_opt(&name).await.unwrap().is_some() }).await;
    let text = cms.get(&name).await.unwrap().data.unwrap()["goim.toml"].clone();
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

struct Running {
    role: Role,
    ordinal: usize,
    ready: bool,
    signalled: bool,
    /// Readiness probes failed in a row (a kubelet's failureThreshold is 3).
    failures: u32,
}

/// The kubelet and the StatefulSet controller, for the comet pods.
struct Kubelet {
    c: Client,
    dir: PathBuf,
    logic_grpc: String,
    ports: Ports,
    running: HashMap<String, Running>,
    started: usize,
}

impl Kubelet {
    async fn set_status(&self, name: &str, i: usize, ready: bool) {
        let status = json!({"status": {"phase": "Running", "podIP": pod_ip(i),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        let _ = Api::<Pod>::namespaced(self.c.clone(), NS)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await;
    }

    async fn start(&mut self, name: &str, i: usize) -> Role {
        self.started += 1;
        let config = mount_config(&self.c, &self.dir, &format!("{name}.toml")).await;
        let ip = pod_ip(i);
        let p = self.ports;
        let args: Vec<String> = [
            "comet",
            "--config",
            config.to_str().unwrap(),
            "--name",
            name,
            "--tcp",
            &format!("{ip}:{}", p.tcp),
            "--ws",
            &format!("{ip}:{}", p.ws),
            "--grpc",
            &format!("{ip}:{}", p.grpc),
            "--http",
            &format!("{ip}:{}", p.metrics),
            "--logic",
            &self.logic_grpc,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (dir, log) = (self.dir.clone(), format!("{name}-{}", self.started));
        tokio::task::block_in_place(|| Role::start(&dir, &log, &args))
    }

    /// One pass over the comet pods.
    async fn step(&mut self) {
        let pods: Api<Pod> = Api::namespaced(self.c.clone(), NS);
        let Some(sts) = Api::<StatefulSet>::namespaced(self.c.clone(), NS)
            .get_opt(&format!("{PC}-comet"))
            .await
            .unwrap()
        else {
            return;
        };
        let spec = sts.spec.unwrap();
        let list = pods
            .list(&ListParams::default().labels(&format!(
                "app.kubernetes.io/component=comet,app.kubernetes.io/instance={PC}"
            )))
            .await
            .unwrap();
        let mut seen = HashSet::new();
        for p in &list.items {
            let name = p.name_any();
            seen.insert(name.clone());
            let deleting = p.metadata.deletion_timestamp.is_some();
            if !self.running.contains_key(&name) {
                if deleting {
                    let _ = pods
                        .delete(&name, &DeleteParams::default().grace_period(0))
                        .await;
                    continue;
                }
                let ordinal: usize = name.rsplit('-').next().unwrap().parse().unwrap();
                let role = self.start(&name, ordinal).await;
                self.set_status(&name, ordinal, false).await;
                self.running.insert(
                    name.clone(),
                    Running {
                        role,
                        ordinal,
                        ready: false,
                        signalled: false,
                        failures: 0,
                    },
                );
            }
            let r = self.running.get_mut(&name).unwrap();
            if deleting {
                if !r.signalled {
                    r.role.signal_term();
                    r.signalled = true;
                }
                if let Some(clean) = r.role.try_exit() {
                    assert!(clean, "{name} drains and exits 0");
                    self.running.remove(&name);
                    let _ = pods
                        .delete(&name, &DeleteParams::default().grace_period(0))
                        .await;
                    continue;
                }
            }
            // A kubelet's readiness probe: 1 s timeout, unready after 3 failures in a row.
            let probe = tokio::time::timeout(
                Duration::from_secs(1),
                raw_http(r.role.addr("http"), "GET", "/readyz", b""),
            )
            .await;
            r.failures = match probe {
                Ok(Ok((200, _))) => 0,
                _ => r.failures + 1,
            };
            let ready = r.failures == 0 || (r.ready && r.failures < 3);
            if ready != r.ready {
                r.ready = ready;
                let i = r.ordinal;
                self.set_status(&name, i, ready).await;
            }
        }
        // The StatefulSet controller: a missing pod is created from the current template.
        for i in 0..spec.replicas.unwrap_or(0) as usize {
            let name = format!("{PC}-comet-{i}");
            if seen.contains(&name) {
                continue;
            }
            let meta = spec.template.metadata.clone().unwrap_or_default();
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": meta.labels, "annotations": meta.annotations},
                "spec": {"nodeName": "node-a", "containers": [{"name": "comet", "image": "goim:test"}]}
            }))
            .unwrap();
            let _ = pods.create(&PostParams::default(), &pod).await;
        }
    }
}

/// What the clients saw, over the whole run.
#[derive(Default)]
struct Seen {
    not_recovered: AtomicU64,
    /// The first few replies that said "not recovered", for the summary.
    not_recovered_replies: Mutex<Vec<String>>,
    reconnects: AtomicU64,
    /// Connections that went away without drain advice first.
    unadvised: AtomicU64,
    /// The longest `after_ms` advised.
    max_after_ms: AtomicU64,
}

/// One client: its user's stream and the room's, followed across every drain. Told to
/// reconnect, it waits the advised delay, then comes back on the next comet that takes it
/// with both positions.
async fn follow(mut ext: Ext, mid: i64, mut at: usize, ports: Ports, seen: Arc<Seen>) -> Ext {
    let key = format!("dev{mid}");
    let (mut room_done, mut user_done, mut key_done) = (false, false, false);
    loop {
        let had = ext.got.len();
        let advice = match ext.try_recv().await {
            Ok(p) if p.op == goim_proto::op::RECONNECT => {
                let v: Value = serde_json::from_slice(&p.body).unwrap();
                Some(v["after_ms"].as_u64().unwrap_or(0))
            }
            Ok(_) => None,
            Err(_) => {
                seen.unadvised.fetch_add(1, Ordering::SeqCst);
                Some(0)
            }
        };
        if let Some(after_ms) = advice {
            seen.max_after_ms.fetch_max(after_ms, Ordering::SeqCst);
            // The client's side of the advice: reconnect after the delay it was given.
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
            ext = reconnect(ext, mid, &key, &mut at, ports, &seen).await;
        }
        // Only what arrived since the last look (a reconnect may bring several).
        let from = had.min(ext.got.len());
        for ((_, _, body), stream) in ext.got[from..].iter().zip(&ext.streams[from..]) {
            room_done |= stream == ROOM && body == "end";
            user_done |= stream == "user" && body == "uend";
            key_done |= stream == "key" && body == "kend";
        }
        if room_done && user_done && key_done {
            return ext;
        }
    }
}

async fn reconnect(
    mut old: Ext,
    mid: i64,
    key: &str,
    at: &mut usize,
    ports: Ports,
    seen: &Seen,
) -> Ext {
    seen.reconnects.fetch_add(1, Ordering::SeqCst);
    let (ue, uo) = old.at["user"].clone();
    let (ke, ko) = old.at["key"].clone();
    let (re, ro) = old.at[ROOM].clone();
    let positions =
        json!({"user": {"epoch": ue, "offset": uo}, "key": {"epoch": ke, "offset": ko}});
    for attempt in 0..300 {
        *at = (*at + 1) % COMETS;
        if attempt > 0 && attempt % COMETS == 0 {
            // Every comet refused (one restarting, one draining): back off a little.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Ok((mut next, mut replies)) =
            Ext::try_recovering(comet_addr(*at, ports), mid, key, positions.clone()).await
        else {
            continue;
        };
        if replies.len() != 2 {
            continue;
        }
        let Ok(joined) = next.try_join(ROOM, Some((&re, ro))).await else {
            continue;
        };
        if joined.get("error").is_some() {
            continue;
        }
        replies.push(joined);
        for r in &replies {
            if r["recovered"] != true {
                seen.not_recovered.fetch_add(1, Ordering::SeqCst);
                let mut first = seen.not_recovered_replies.lock().unwrap();
                if first.len() < 5 {
                    first.push(format!("client {mid} on comet {at}: {r} (had user {ue}/{uo}, key {ke}/{ko}, room {re}/{ro})"));
                }
            }
        }
        // What the new connection got before the JOIN's reply goes after what the old one got.
        let mut got = std::mem::take(&mut old.got);
        let mut streams = std::mem::take(&mut old.streams);
        got.append(&mut next.got);
        streams.append(&mut next.streams);
        next.got = got;
        next.streams = streams;
        return next;
    }
    panic!("client {mid}: no comet took it back");
}

/// Pushes sent, by what they were sent to.
#[derive(Default)]
struct Sent {
    room: Mutex<Vec<String>>,
    users: Mutex<HashMap<i64, Vec<String>>>,
    /// Pushes to each client's key, by its user.
    keys: Mutex<HashMap<i64, Vec<String>>>,
    /// Key pushes logic answered with the key not online (so not sent).
    offline: AtomicU64,
    failed: AtomicU64,
}

/// `rate` requests a second until `stop`, each its own task (at most 64 at once), so a slow
/// push does not slow the stream.
async fn pace(
    rate: u64,
    stop: Arc<AtomicBool>,
    one: impl Fn(u64) -> tokio::task::JoinHandle<()>,
) -> Arc<tokio::sync::Semaphore> {
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        n += 1;
        let permit = slots.clone().acquire_owned().await.unwrap();
        let task = one(n);
        tokio::spawn(async move {
            let _ = task.await;
            drop(permit);
        });
    }
    slots
}

/// Polls `f` every 50 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn push_ok(http: SocketAddr, path: &str, body: &str) -> bool {
    pushed(http, path, body).await.is_some()
}

/// A push's `data` when logic took it (`code` 0), else None.
async fn pushed(http: SocketAddr, path: &str, body: &str) -> Option<Value> {
    let (status, reply) = raw_http(http, "POST", path, body.as_bytes()).await.ok()?;
    let v: Value = serde_json::from_str(&reply).ok()?;
    (status == 200 && v["code"] == 0).then(|| v["data"].clone())
}

/// The keys a key push's reply named as not online: nothing was sent to them.
fn offline_keys(data: &Value) -> HashSet<String> {
    data["keys_offline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(String::from))
        .collect()
}

/// The room at [`ROOM_RATE`] until `stop`: bodies `r1`, `r2`, …, each recorded once logic
/// took it (or counted as failed).
async fn room_stream(
    http: SocketAddr,
    sent: Arc<Sent>,
    stop: Arc<AtomicBool>,
) -> Arc<tokio::sync::Semaphore> {
    pace(ROOM_RATE, stop, move |n| {
        let sent = sent.clone();
        tokio::spawn(async move {
            let body = format!("r{n}");
            if push_ok(
                http,
                "/goim/push/room?operation=1000&type=chat&room=1",
                &body,
            )
            .await
            {
                sent.room.lock().unwrap().push(body);
            } else {
                sent.failed.fetch_add(1, Ordering::SeqCst);
            }
        })
    })
    .await
}

/// Stops the pacers, waits for the pushes in flight, then ends the room with `end`.
async fn end_streams(
    http: SocketAddr,
    stop: &AtomicBool,
    pacers: Vec<tokio::task::JoinHandle<Arc<tokio::sync::Semaphore>>>,
) {
    stop.store(true, Ordering::SeqCst);
    for pacer in pacers {
        let slots = pacer.await.unwrap();
        let _all = slots.acquire_many(64).await.unwrap();
    }
    assert!(
        push_ok(
            http,
            "/goim/push/room?operation=1000&type=chat&room=1",
            "end"
        )
        .await
    );
}

fn mids_of(n: u64) -> Vec<i64> {
    (0..USERS_PER_PUSH)
        .map(|j| FIRST_MID + ((n as usize * USERS_PER_PUSH + j) % CLIENTS) as i64)
        .collect()
}

/// Scenario 1's traffic around a roll: 1,000 clients, each its own user, spread over the
/// comets (at `comet_addr`) and in the room; a room stream at 50/s and user pushes at 200/s
/// through logic at `http`; `roll` runs once the streams flow; then the streams end and
/// every client must have every room message and every push to its user exactly once and in
/// order, never told "not recovered". Returns the counts.
async fn around_a_roll(
    what: &str,
    http: SocketAddr,
    ports: Ports,
    roll: impl std::future::Future<Output = ()>,
) -> String {
    // 1,000 clients, each its own user, spread over the comets, in the room.
    let seen = Arc::new(Seen::default());
    let mut clients = Vec::new();
    let mut connecting = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let mid = FIRST_MID + i as i64;
        let at = i % COMETS;
        connecting.spawn(async move {
            let addr = comet_addr(at, ports);
            let fresh =
                json!({"user": {"epoch": "", "offset": 0}, "key": {"epoch": "", "offset": 0}});
            let (mut ext, _) = Ext::try_recovering(addr, mid, &format!("dev{mid}"), fresh)
                .await
                .unwrap();
            ext.join(ROOM, None).await;
            (i, ext)
        });
        if connecting.len() >= 50 {
            let (i, ext) = connecting.join_next().await.unwrap().unwrap();
            clients.push((i, ext));
        }
    }
    while let Some(r) = connecting.join_next().await {
        clients.push(r.unwrap());
    }
    clients.sort_by_key(|(i, _)| *i);
    let followers: Vec<_> = clients
        .into_iter()
        .map(|(i, ext)| {
            let mid = FIRST_MID + i as i64;
            tokio::spawn(follow(ext, mid, i % COMETS, ports, seen.clone()))
        })
        .collect();

    // Steady streams: the room, and users four at a time.
    let sent = Arc::new(Sent::default());
    let stop = Arc::new(AtomicBool::new(false));
    let began = std::time::Instant::now();
    let rooms = tokio::spawn(room_stream(http, sent.clone(), stop.clone()));
    let users = tokio::spawn(pace(USER_RATE / USERS_PER_PUSH as u64, stop.clone(), {
        let sent = sent.clone();
        move |n| {
            let sent = sent.clone();
            tokio::spawn(async move {
                // Users and keys in turn: both are numbered per user (or connection).
                let mids = mids_of(n);
                let by_key = n % 2 == 1;
                let list: Vec<String> = mids
                    .iter()
                    .map(|m| {
                        if by_key {
                            format!("keys=dev{m}")
                        } else {
                            format!("mids={m}")
                        }
                    })
                    .collect();
                let (kind, body) = if by_key {
                    ("keys", format!("k{n}"))
                } else {
                    ("mids", format!("u{n}"))
                };
                let path = format!("/goim/push/{kind}?operation=1000&{}", list.join("&"));
                if let Some(data) = pushed(http, &path, &body).await {
                    // A key between its connections (the old one closed before the client
                    // came back) is not online: the reply names it, and nothing is sent.
                    let offline = offline_keys(&data);
                    sent.offline
                        .fetch_add(offline.len() as u64, Ordering::SeqCst);
                    let mut u = if by_key {
                        sent.keys.lock().unwrap()
                    } else {
                        sent.users.lock().unwrap()
                    };
                    for m in mids {
                        if !offline.contains(&format!("dev{m}")) {
                            u.entry(m).or_default().push(body.clone());
                        }
                    }
                } else {
                    sent.failed.fetch_add(1, Ordering::SeqCst);
                }
            })
        }
    }));
    let room_sent = |s: &Sent| s.room.lock().unwrap().len();
    wait_until_async(|| async { room_sent(&sent) >= 25 }).await;

    let rolled_at = room_sent(&sent);
    let roll_began = std::time::Instant::now();
    roll.await;
    let roll_secs = roll_began.elapsed().as_secs_f64();
    // A little more after the roll, then the streams stop and end.
    let done_at = room_sent(&sent);
    wait_until_async(|| async { room_sent(&sent) >= done_at + 25 }).await;
    let push_secs = began.elapsed().as_secs_f64();
    end_streams(http, &stop, vec![rooms, users]).await;
    for chunk in (0..CLIENTS).collect::<Vec<_>>().chunks(100) {
        let list: Vec<String> = chunk
            .iter()
            .map(|i| format!("mids={}", FIRST_MID + *i as i64))
            .collect();
        let path = format!("/goim/push/mids?operation=1000&{}", list.join("&"));
        let r = raw_http(http, "POST", &path, b"uend").await;
        assert!(
            matches!(&r, Ok((200, b)) if b.contains("\"code\":0")),
            "{r:?}"
        );
        // The last key push reaches every key: one not online yet (its client still on its
        // way back) is pushed again once it is.
        let mut keys: Vec<String> = chunk
            .iter()
            .map(|i| format!("dev{}", FIRST_MID + *i as i64))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !keys.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "keys never back online: {keys:?}"
            );
            let list: Vec<String> = keys.iter().map(|k| format!("keys={k}")).collect();
            let path = format!("/goim/push/keys?operation=1000&{}", list.join("&"));
            let data = pushed(http, &path, "kend")
                .await
                .expect("the last key push");
            let offline = offline_keys(&data);
            keys.retain(|k| offline.contains(k));
            if !keys.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    // Every client: every room message and every push to its user, exactly once, in order.
    let room_want: HashSet<String> = sent.room.lock().unwrap().iter().cloned().collect();
    let users_want = sent.users.lock().unwrap().clone();
    let keys_want = sent.keys.lock().unwrap().clone();
    let (mut delivered, mut duplicated, mut missing, mut unexpected, mut gaps) =
        (0usize, 0, 0, 0, 0);
    let mut lost_detail: Vec<String> = Vec::new();
    for (i, f) in followers.into_iter().enumerate() {
        let ext = f.await.unwrap();
        let mid = FIRST_MID + i as i64;
        let user_want: HashSet<String> = users_want
            .get(&mid)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default();
        let key_want: HashSet<String> = keys_want
            .get(&mid)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default();
        for (stream, want) in [(ROOM, &room_want), ("user", &user_want), ("key", &key_want)] {
            let (bodies, offsets) = ext.of(stream);
            gaps += offsets.windows(2).filter(|w| w[1] != w[0] + 1).count();
            let got: Vec<&String> = bodies[..bodies.len() - 1].iter().collect();
            let distinct: HashSet<&String> = got.iter().copied().collect();
            delivered += got.len();
            duplicated += got.len() - distinct.len();
            let lost: Vec<&String> = want.iter().filter(|b| !distinct.contains(b)).collect();
            if !lost.is_empty() && lost_detail.len() < 5 {
                lost_detail.push(format!(
                    "client {i} {stream}: lost {lost:?}; got offsets {:?}",
                    &offsets[offsets.len().saturating_sub(8)..]
                ));
            }
            missing += lost.len();
            unexpected += distinct.iter().filter(|b| !want.contains(**b)).count();
        }
    }
    let users_sent: usize = users_want.values().map(Vec::len).sum();
    let keys_sent: usize = keys_want.values().map(Vec::len).sum();
    let room_count = room_want.len();
    let summary = format!(
        "{what}: {room_count} room messages ({:.0}/s), {users_sent} user and {keys_sent} key pushes ({:.0}/s) over {push_secs:.1}s; the roll began after {rolled_at} room messages and took {roll_secs:.1}s; {CLIENTS} clients: delivered {delivered}, duplicated {duplicated}, missing {missing}, unexpected {unexpected}, offset gaps {gaps}, not recovered {}, reconnects {}, closed without advice {}, longest advised delay {} ms, failed pushes {}, key pushes answered offline {}",
        room_count as f64 / push_secs,
        (users_sent + keys_sent) as f64 / push_secs,
        seen.not_recovered.load(Ordering::SeqCst),
        seen.reconnects.load(Ordering::SeqCst),
        seen.unadvised.load(Ordering::SeqCst),
        seen.max_after_ms.load(Ordering::SeqCst),
        sent.failed.load(Ordering::SeqCst),
        sent.offline.load(Ordering::SeqCst),
    );
    println!("{summary}");
    for line in lost_detail
        .iter()
        .chain(seen.not_recovered_replies.lock().unwrap().iter())
    {
        println!("  {line}");
    }
    let clean = (duplicated, missing, unexpected, gaps) == (0, 0, 0, 0)
        && seen.not_recovered.load(Ordering::SeqCst) == 0;
    if !clean {
        // For the next reader of a failure: what logic and the comets counted.
        print_losses(http, ports).await;
    }
    assert_eq!(
        (duplicated, missing, unexpected, gaps),
        (0, 0, 0, 0),
        "{summary}"
    );
    assert_eq!(seen.not_recovered.load(Ordering::SeqCst), 0, "{summary}");
    assert_eq!(sent.failed.load(Ordering::SeqCst), 0, "{summary}");
    // The drain time the comets follow: advice fits in 3 s.
    assert!(seen.max_after_ms.load(Ordering::SeqCst) < 3000, "{summary}");
    assert!(
        seen.reconnects.load(Ordering::SeqCst) >= CLIENTS as u64,
        "{summary}"
    );

    summary
}

/// Issue 9, scenario 1 through the operator (see the top of this file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    debug_assertions,
    ignore = "the issue's scale needs optimized processes: scripts/test.sh runs it with --release"
)]
async fn an_operator_rollout_loses_nothing_for_clients_that_recover() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/goim");
    let cp = tokio::task::spawn_blocking(move || ControlPlane::start(&chart))
        .await
        .unwrap();
    let c = admin(&cp).await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let op = tokio::spawn(goim_operator::controller::run(
        c.clone(),
        goim_operator::controller::Options {
            namespace: Some(NS.into()),
            metrics: Default::default(),
            election: None,
        },
    ));
    let ports = Ports::free();
    // A long drain to start with; shortened below without a restart.
    let pc: PushCluster = serde_json::from_value(json!({
        "apiVersion": "goim.rs/v1beta1", "kind": "PushCluster",
        "metadata": {"name": PC},
        "spec": {"image": "goim:test", "etcd": {"endpoints": [cp.etcd.endpoint()]}, "auth": {"mode": "json"},
            "comet": {"replicas": COMETS, "drainSeconds": 120,
                "ports": {"tcp": ports.tcp, "ws": ports.ws, "grpc": ports.grpc, "metrics": ports.metrics}},
            "history": {"rooms": {"chat": {"size": 20000, "ttlSeconds": 600}},
                "users": {"size": 1000, "ttlSeconds": 600}}}
    }))
    .unwrap();
    let pcs: Api<PushCluster> = Api::namespaced(c.clone(), NS);
    pcs.create(&PostParams::default(), &pc).await.unwrap();

    // logic and job, as their Deployments run them: the ConfigMap's config, their own ports.
    let dir = tempfile::tempdir().unwrap();
    let config = mount_config(&c, dir.path(), "goim.toml").await;
    let config = config.to_str().unwrap().to_string();
    let (logic, job) = tokio::task::block_in_place(|| {
        let logic = Role::start(
            dir.path(),
            "logic",
            &[
                "logic",
                "--config",
                &config,
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
            ]
            .map(String::from),
        );
        let job = Role::start(
            dir.path(),
            "job",
            &[
                "job",
                "--config",
                &config,
                "--grpc",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--id",
                "job-0",
            ]
            .map(String::from),
        );
        (logic, job)
    });
    let http = logic.addr("http");
    let stop_kubelet = Arc::new(AtomicBool::new(false));
    let kubelet = tokio::spawn({
        let mut k = Kubelet {
            c: c.clone(),
            dir: dir.path().to_path_buf(),
            logic_grpc: logic.addr("grpc").to_string(),
            ports,
            running: HashMap::new(),
            started: 0,
        };
        let stop = stop_kubelet.clone();
        async move {
            while !stop.load(Ordering::SeqCst) {
                k.step().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            k
        }
    });
    wait_until_async(|| async {
        api(http, "GET", "/goim/nodes/instances", b"").await["data"]
            .as_array()
            .is_some_and(|a| a.len() == COMETS)
    })
    .await;
    let job_http = job.addr("http");
    wait_until_async(|| async {
        api(job_http, "GET", "/comets", b"")
            .await
            .as_array()
            .is_some_and(|a| a.len() == COMETS)
    })
    .await;
    let uids = |pods: Vec<Pod>| -> Vec<String> {
        let mut u: Vec<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        u.sort();
        u
    };
    let pods: Api<Pod> = Api::namespaced(c.clone(), NS);
    let before = uids(pods.list(&Default::default()).await.unwrap().items);

    // The drain is shortened live: every comet record carries it, no pod is replaced.
    pcs.patch(
        PC,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"comet": {"drainSeconds": 3}}})),
    )
    .await
    .unwrap();
    let etcd = cp.etcd.endpoint();
    wait_until_async(|| async {
        let mut e = goim_discovery::connect(std::slice::from_ref(&etcd))
            .await
            .unwrap();
        let r = e
            .get(
                format!("/goim/{NS}.{PC}/comets/"),
                Some(goim_discovery::etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        r.kvs().len() == COMETS
            && r.kvs()
                .iter()
                .all(|kv| serde_json::from_slice::<Value>(kv.value()).unwrap()["drain_ms"] == 3000)
    })
    .await;

    let rollout = async {
        // A restart setting: the operator rolls every comet, one at a time, drained first.
        pcs.patch(
            PC,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"comet": {"buckets": 64}}})),
        )
        .await
        .unwrap();
        let roll_began = std::time::Instant::now();
        let last = Mutex::new(String::new());
        eventually("the roll", Duration::from_secs(180), || async {
            let pc = pcs.get(PC).await.unwrap();
            let now = format!(
                "{:?}",
                pc.status
                    .as_ref()
                    .map(|s| (&s.comet.rolling, s.comet.updated_replicas))
            );
            let mut last = last.lock().unwrap();
            if now != *last {
                println!(
                    "{:.1}s: rolling, updated: {now}",
                    roll_began.elapsed().as_secs_f64()
                );
                *last = now;
            }
            drop(last);
            let generation = pc.metadata.generation;
            let st = pc.status.unwrap_or_default();
            let progressing = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Progressing" && c.status == "True");
            st.observed_generation == generation
                && st.comet.updated_replicas == COMETS as i32
                && st.comet.registered == COMETS as i32
                && !progressing
        })
        .await;
        let after = uids(pods.list(&Default::default()).await.unwrap().items);
        assert!(
            after.iter().all(|u| !before.contains(u)),
            "every comet was replaced"
        );
    };
    around_a_roll("operator rollout", http, ports, rollout).await;
    stop_kubelet.store(true, Ordering::SeqCst);
    let k = kubelet.await.unwrap();
    drop(k.running);
    op.abort();
    drop((logic, job));
}

/// A self-registering comet (distributed mode) at pod address `i`, draining over 3 s.
fn distributed_comet(
    etcd: &Etcd,
    dir: &Path,
    i: usize,
    run: usize,
    ports: Ports,
    logic: &str,
) -> Role {
    let file = dir.join("comet.toml");
    std::fs::write(&file, "[comet]\ndrain_period = \"3s\"\n").unwrap();
    let ip = pod_ip(i);
    let a: Vec<String> = [
        "--config".to_string(),
        file.to_str().unwrap().to_string(),
        "--name".into(),
        format!("{PC}-comet-{i}"),
        "--tcp".into(),
        format!("{ip}:{}", ports.tcp),
        "--ws".into(),
        format!("{ip}:{}", ports.ws),
        "--grpc".into(),
        format!("{ip}:{}", ports.grpc),
        "--http".into(),
        format!("{ip}:{}", ports.metrics),
        "--logic".into(),
        logic.to_string(),
    ]
    .into();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Role::start(dir, &format!("comet-{i}-{run}"), &args(etcd, "comet", &a))
}

/// Issue 9, scenario 1 in distributed mode: the same traffic while each comet in turn gets
/// SIGTERM (it drains: not ready, clients advised and closed over 3 s, then exits 0) and
/// comes back under its name; the next goes once logic and job know the replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    debug_assertions,
    ignore = "the issue's scale needs optimized processes: scripts/test.sh runs it with --release"
)]
async fn a_sigterm_roll_in_distributed_mode_loses_nothing_for_clients_that_recover() {
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let (logic, job, mut comets) = tokio::task::block_in_place(|| {
        let logic = start_logic_with(&etcd, dir.path(), "127.0.0.1:0", "user_streams = true");
        let job = start_job_with(
            &etcd,
            dir.path(),
            "job-0",
            "[job.history.chat]\nsize = 20000\nttl = \"10m\"\n[job.history.user]\nsize = 1000\nttl = \"10m\"",
        );
        let grpc = logic.addr("grpc").to_string();
        let comets: Vec<Role> = (0..COMETS)
            .map(|i| distributed_comet(&etcd, dir.path(), i, 0, ports, &grpc))
            .collect();
        (logic, job, comets)
    });
    let (http, job_http) = (logic.addr("http"), job.addr("http"));
    let logic_grpc = logic.addr("grpc").to_string();
    let all_known = || async {
        let offered = api(http, "GET", "/goim/nodes/instances", b"").await["data"]
            .as_array()
            .is_some_and(|a| a.len() == COMETS);
        let dialled = api(job_http, "GET", "/comets", b"")
            .await
            .as_array()
            .is_some_and(|a| a.len() == COMETS);
        offered && dialled
    };
    wait_until_async(all_known).await;
    let roll = async {
        for i in (0..COMETS).rev() {
            let old = &mut comets[i];
            tokio::task::block_in_place(|| {
                assert!(old.terminate(), "comet {i} drains and exits 0")
            });
            *old = tokio::task::block_in_place(|| {
                distributed_comet(&etcd, dir.path(), i, 1, ports, &logic_grpc)
            });
            let ops = old.addr("http");
            eventually(
                "the replacement is ready",
                Duration::from_secs(60),
                || async { matches!(raw_http(ops, "GET", "/readyz", b"").await, Ok((200, _))) },
            )
            .await;
            eventually("logic and job know it", Duration::from_secs(60), all_known).await;
        }
    };
    around_a_roll("SIGTERM roll (distributed)", http, ports, roll).await;
    drop((comets, logic, job));
}

/// Issue 9, scenario 2 at scale: the job that numbers a room is killed while the room gets
/// 50 pushes a second and 1,000 clients listen. Messages that job had taken may be lost, but
/// never silently: a client that misses one sees the room's epoch change, and a client that
/// asks to recover from its position in the old epoch is told "not recovered".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    debug_assertions,
    ignore = "the issue's scale needs optimized processes: scripts/test.sh runs it with --release"
)]
async fn a_killed_job_leaves_no_client_silently_behind() {
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let history = "[job.history.chat]\nsize = 20000\nttl = \"10m\"";
    let (logic, mut jobs, comets) = tokio::task::block_in_place(|| {
        let logic = start_logic_with(&etcd, dir.path(), "127.0.0.1:0", "");
        let jobs: Vec<Role> = (0..2)
            .map(|i| start_job_with(&etcd, dir.path(), &format!("job-{i}"), history))
            .collect();
        let grpc = logic.addr("grpc").to_string();
        let comets: Vec<Role> = (0..COMETS)
            .map(|i| distributed_comet(&etcd, dir.path(), i, 0, ports, &grpc))
            .collect();
        (logic, jobs, comets)
    });
    let http = logic.addr("http");
    let job_https: Vec<SocketAddr> = jobs.iter().map(|j| j.addr("http")).collect();
    wait_until_async(|| async {
        let mut known = 0;
        for j in &job_https {
            known += usize::from(
                api(*j, "GET", "/comets", b"")
                    .await
                    .as_array()
                    .is_some_and(|a| a.len() == COMETS),
            );
        }
        known == jobs.len()
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut ext = Ext::connect(
            comet_addr(i % COMETS, ports),
            Transport::Tcp,
            &format!("k{i}"),
        )
        .await;
        ext.join(ROOM, None).await;
        clients.push(ext);
    }
    let followers: Vec<_> = clients
        .into_iter()
        .map(|mut ext| {
            tokio::spawn(async move {
                while ext.got.last().is_none_or(|g| g.2 != "end") {
                    ext.recv().await;
                }
                ext
            })
        })
        .collect();
    let sent = Arc::new(Sent::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rooms = tokio::spawn(room_stream(http, sent.clone(), stop.clone()));
    let room_sent = |s: &Sent| s.room.lock().unwrap().len();
    wait_until_async(|| async { room_sent(&sent) >= 25 }).await;
    // The job that numbers the room is the one holding its history.
    let owner = tokio::task::block_in_place(|| {
        job_https.iter().position(|j| {
            blocking_get_text(*j, "/metrics")
                .lines()
                .any(|l| l.starts_with("goim_job_history_rooms ") && !l.ends_with(" 0"))
        })
    })
    .expect("a job numbers the room");
    jobs[owner].kill();
    let killed_at = room_sent(&sent);
    wait_until_async(|| async { room_sent(&sent) >= killed_at + 50 }).await;
    end_streams(http, &stop, vec![rooms]).await;

    let acked: HashSet<String> = sent.room.lock().unwrap().iter().cloned().collect();
    let (mut delivered, mut missed, mut silent, mut gaps, mut duplicated) = (0usize, 0, 0, 0, 0);
    let mut changed = 0;
    let mut not_recovered = 0;
    for f in followers {
        let mut ext = f.await.unwrap();
        let got: Vec<(String, u64, String)> = ext.got[..ext.got.len() - 1].to_vec();
        let epochs: Vec<&String> = got.iter().map(|g| &g.0).collect::<Vec<_>>();
        let mut distinct_epochs = epochs.clone();
        distinct_epochs.dedup();
        // Within an epoch, offsets go up by one.
        gaps += got
            .windows(2)
            .filter(|w| w[0].0 == w[1].0 && w[1].1 != w[0].1 + 1)
            .count();
        let bodies: HashSet<&String> = got.iter().map(|g| &g.2).collect();
        duplicated += got.len() - bodies.len();
        delivered += got.len();
        let lost = acked.iter().filter(|b| !bodies.contains(b)).count();
        missed += lost;
        if distinct_epochs.len() > 1 {
            changed += 1;
        } else if lost > 0 {
            silent += 1;
        }
        // Back to where it was in the first epoch: not recoverable any more.
        let first = got.iter().take_while(|g| g.0 == got[0].0).last().cloned();
        if let Some((epoch, offset, _)) = first.filter(|_| distinct_epochs.len() > 1) {
            let reply = ext.join(ROOM, Some((&epoch, offset))).await;
            if reply["recovered"] == false {
                not_recovered += 1;
            }
        }
    }
    let summary = format!(
        "job killed: {} room messages acknowledged ({} before the kill), {} refused; {CLIENTS} clients: delivered {delivered}, duplicated {duplicated}, offset gaps within an epoch {gaps}, missed {missed}, clients that saw the epoch change {changed}, missed without an epoch change {silent}, told not recovered when rejoining from the old epoch {not_recovered}",
        acked.len(),
        killed_at,
        sent.failed.load(Ordering::SeqCst),
    );
    println!("{summary}");
    assert_eq!((duplicated, gaps, silent), (0, 0, 0), "{summary}");
    assert_eq!(changed, CLIENTS, "{summary}");
    assert_eq!(not_recovered, CLIENTS, "{summary}");
    drop((comets, logic, jobs));
}
