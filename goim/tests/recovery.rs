//! Recovery (distributed mode, real etcd and processes): a client that speaks the extensions
//! (docs/PROTOCOL.md) and reconnects gets every room message it missed exactly once and in
//! order, then the live ones; when that is impossible (the job numbering the room died) it is
//! told "not recovered", never left to miss messages silently.

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[path = "common/ext.rs"]
mod ext;

use std::net::SocketAddr;

use cluster::*;
use ext::Ext;
use goim_client::{token, Client, Transport};
use goim_proto::op;
use serde_json::{json, Value};

/// Clients in the rolling test, spread over 3 comets.
const CLIENTS: usize = 90;

const HISTORY: &str = "[job.history.chat]\nsize = 1000\nttl = \"5m\"";

/// Pushes room messages "1", "2", … paced at 50/s until `stop`; returns how many.
async fn room_stream(http: SocketAddr, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u32 {
    let mut n = 0u32;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        n += 1;
        push_room(http, n).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    n
}

async fn push_room(http: SocketAddr, n: u32) {
    push(
        http,
        "/goim/push/room?operation=1000&type=chat&room=1",
        n.to_string().as_bytes(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_gets_what_it_missed_once_and_in_order() {
    let c = tokio::task::spawn_blocking(|| Cluster::start_with(2, 2, HISTORY, ""))
        .await
        .unwrap();
    let http = c.http();
    let mut a = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "a").await;
    let joined = a.join("chat://1", None).await;
    assert_eq!(joined["room"], "chat://1");
    assert!(joined.get("recovered").is_none(), "{joined}");
    for n in 1..=10 {
        push_room(http, n).await;
    }
    a.until("10").await;
    let (epoch, seen) = a.last();
    let offsets: Vec<u64> = a.got.iter().map(|g| g.1).collect();
    assert_eq!(
        offsets,
        (seen - 9..=seen).collect::<Vec<_>>(),
        "numbered by one"
    );
    drop(a);

    // Missed while away, then more pushed while it rejoins (on the other comet, over
    // WebSocket): history and live messages meet during the JOIN.
    for n in 11..=20 {
        push_room(http, n).await;
    }
    let pusher = tokio::spawn(async move {
        for n in 21..=80 {
            push_room(http, n).await;
        }
    });
    let mut b = Ext::connect(c.comet(1, Transport::WebSocket), Transport::WebSocket, "a").await;
    let reply = b.join("chat://1", Some((&epoch, seen))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["epoch"], epoch.as_str());
    pusher.await.unwrap();
    b.until("80").await;
    let bodies: Vec<String> = b.got.iter().map(|g| g.2.clone()).collect();
    let want: Vec<String> = (11..=80).map(|n| n.to_string()).collect();
    assert_eq!(bodies, want, "every missed and live message once, in order");
    let offsets: Vec<u64> = b.got.iter().map(|g| g.1).collect();
    assert_eq!(offsets, (seen + 1..=seen + 70).collect::<Vec<_>>());
    assert!(b.got.iter().all(|g| g.0 == epoch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_rooms_job_dies_a_rejoining_client_is_told_not_recovered() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start_with(1, 2, HISTORY, ""))
        .await
        .unwrap();
    let http = c.http();
    let mut a = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "a").await;
    a.join("chat://1", None).await;
    for n in 1..=5 {
        push_room(http, n).await;
    }
    a.until("5").await;
    let (epoch, seen) = a.last();
    drop(a);
    // The job numbering the room is the one keeping its history.
    let owner = tokio::task::block_in_place(|| {
        c.jobs.iter().position(|j| {
            blocking_get_text(j.addr("http"), "/metrics")
                .lines()
                .any(|l| l.starts_with("goim_job_history_rooms ") && !l.ends_with(" 0"))
        })
    })
    .expect("a job numbers the room");
    c.jobs[owner].kill();
    // The next job on the ring takes the room, under a new epoch.
    let mut probe = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "probe").await;
    probe.join("chat://1", None).await;
    wait_until_async(|| async {
        let (status, body) = raw_http(
            http,
            "POST",
            "/goim/push/room?operation=1000&type=chat&room=1",
            b"after",
        )
        .await
        .unwrap();
        status == 200 && body.contains("\"code\":0")
    })
    .await;
    probe.until("after").await;
    let (new_epoch, _) = probe.last();
    assert_ne!(
        new_epoch, epoch,
        "another job numbers the room under a new epoch"
    );

    let mut b = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "a").await;
    let reply = b.join("chat://1", Some((&epoch, seen))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["epoch"], new_epoch.as_str());
    // Live messages still come, numbered in the new epoch.
    push_room(http, 99).await;
    b.until("99").await;
    assert_eq!(b.last().0, new_epoch);

    // With no job left, a recovery cannot be had at all: answered "not recovered", and the
    // comet counts the failed history read.
    for j in &mut c.jobs {
        j.kill();
    }
    let mut d = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "d").await;
    let reply = d.join("chat://1", Some((&new_epoch, 1))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    let ops = c.comets[0].addr("http");
    let failures = tokio::task::block_in_place(|| blocking_get_text(ops, "/metrics"))
        .lines()
        .filter(|l| l.starts_with("goim_comet_history_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum::<u64>();
    assert!(failures >= 1, "a failed history read is counted");
}

/// Three comets (drain period 1 s) under one logic and job, to be drained and restarted in
/// turn; clients reach them through `addrs`, which follows each restart.
struct Roll {
    c: Cluster,
    comets: Vec<Role>,
    addrs: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl Roll {
    async fn start(jobs_toml: String, logic_toml: &'static str) -> Roll {
        let c =
            tokio::task::spawn_blocking(move || Cluster::start_with(0, 1, &jobs_toml, logic_toml))
                .await
                .unwrap();
        let comets: Vec<Role> = (0..3).map(|i| Roll::comet(&c, i)).collect();
        let job_http = c.jobs[0].addr("http");
        wait_until_async(|| async {
            api(job_http, "GET", "/comets", b"")
                .await
                .as_array()
                .is_some_and(|a| a.len() == 3)
        })
        .await;
        let addrs = comets.iter().map(|r| r.addr("tcp")).collect::<Vec<_>>();
        Roll {
            c,
            comets,
            addrs: std::sync::Arc::new(std::sync::Mutex::new(addrs)),
        }
    }

    /// Comet `roll-{i}`, ready.
    fn comet(c: &Cluster, i: usize) -> Role {
        tokio::task::block_in_place(|| {
            let logic_grpc = c.logic.addr("grpc").to_string();
            let r = start_comet_with(
                &c.etcd,
                c.dir.path(),
                &format!("roll-{i}"),
                &logic_grpc,
                "drain_period = \"1s\"",
            );
            let http = r.addr("http");
            wait_until("comet ready", || http_status(http, "/readyz") == 200);
            r
        })
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.addrs.lock().unwrap()[i]
    }

    /// Each comet in turn: SIGTERM (it drains and exits 0), then a new one under its name.
    fn roll(&mut self) {
        for i in 0..self.comets.len() {
            let comet = &mut self.comets[i];
            tokio::task::block_in_place(|| {
                assert!(comet.terminate(), "roll-{i} drains and exits 0")
            });
            *comet = Roll::comet(&self.c, i);
            self.addrs.lock().unwrap()[i] = comet.addr("tcp");
        }
    }
}

/// Where a client told to reconnect goes: straight to the next comet, live by the rolling
/// order.
fn next_comet(addrs: &std::sync::Mutex<Vec<SocketAddr>>, at: &mut usize) -> SocketAddr {
    let addrs = addrs.lock().unwrap();
    *at = (*at + 1) % addrs.len();
    addrs[*at]
}

/// One extension client for the roll: follows RECONNECT advice to `next_comet`, rejoining
/// the room from the last position it saw.
async fn follow(
    mut ext: Ext,
    key: String,
    addrs: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    start: usize,
    not_recovered: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Vec<(String, u64, String)> {
    let mut at = start;
    loop {
        let p = ext.recv().await;
        if p.op == op::RECONNECT {
            let addr = next_comet(&addrs, &mut at);
            let (epoch, seen) = ext.last();
            let mut next = Ext::connect(addr, Transport::Tcp, &key).await;
            next.got = std::mem::take(&mut ext.got);
            let reply = next.join("chat://1", Some((&epoch, seen))).await;
            if reply["recovered"] != true {
                not_recovered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            ext = next;
        }
        if ext.got.last().is_some_and(|g| g.2 == "end") {
            return ext.got;
        }
    }
}

/// Issue 9, scenario 1 (rooms): every comet is stopped and restarted in turn while a room
/// gets a steady stream of pushes (50/s); clients that follow the drain advice and rejoin with
/// their position get every message exactly once, in order, and are never told "not
/// recovered".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_every_comet_loses_nothing_for_clients_that_recover() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let mut roll = Roll::start(HISTORY.to_string(), "").await;
    let http = roll.c.http();
    let addrs = roll.addrs.clone();

    let not_recovered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let at = i % 3;
        let key = format!("k{i}");
        let mut ext = Ext::connect(roll.addr(at), Transport::Tcp, &key).await;
        ext.join("chat://1", None).await;
        let follower = follow(ext, key, addrs.clone(), at, not_recovered.clone());
        clients.push(tokio::spawn(follower));
    }
    // A steady stream, numbered by its bodies.
    let stop = Arc::new(AtomicBool::new(false));
    let began = std::time::Instant::now();
    let pusher = tokio::spawn(room_stream(http, stop.clone()));
    // The roll: each comet drains and exits, and comes back under its name.
    roll.roll();
    stop.store(true, Ordering::SeqCst);
    let sent = pusher.await.unwrap();
    push(
        http,
        "/goim/push/room?operation=1000&type=chat&room=1",
        b"end",
    )
    .await;
    for (i, cl) in clients.into_iter().enumerate() {
        let got = cl.await.unwrap();
        let bodies: Vec<&str> = got.iter().map(|g| g.2.as_str()).collect();
        let first: u32 = bodies[0].parse().unwrap_or(1);
        let mut want: Vec<String> = (first..=sent).map(|n| n.to_string()).collect();
        want.push("end".into());
        assert_eq!(bodies, want, "client {i}: exactly once, in order: {got:?}");
        let offsets: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert!(
            offsets.windows(2).all(|w| w[1] == w[0] + 1),
            "client {i}: no gap"
        );
    }
    assert_eq!(not_recovered.load(Ordering::SeqCst), 0);
    println!(
        "roll: {sent} room messages over {:.1}s while 3 comets restarted, {CLIENTS} clients: each got every one once, in order; not recovered 0",
        began.elapsed().as_secs_f64()
    );
}

const USER_STREAMS: &str = "[job.history.user]\nsize = 1000\nttl = \"5m\"";

async fn push_user(http: SocketAddr, mid: i64, n: u32) {
    push(
        http,
        &format!("/goim/push/mids?operation=1000&mids={mid}"),
        n.to_string().as_bytes(),
    )
    .await;
}

/// Issue 9 for users: pushes to a user are numbered in the user's stream (also while the
/// user is offline); a client that comes back with its last position gets what it missed,
/// once and in order, then the live pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_reconnects_gets_the_pushes_it_missed_once_and_in_order() {
    let c = tokio::task::spawn_blocking(|| {
        Cluster::start_with(2, 2, USER_STREAMS, "user_streams = true")
    })
    .await
    .unwrap();
    let http = c.http();
    let (mut a, reply) =
        Ext::recovering_user(c.comet(0, Transport::Tcp), 7, "phone", ("", 0)).await;
    // Nothing to recover the first time, but the stream's position is known from here on.
    assert_eq!(reply["recovered"], false, "{reply}");
    for n in 1..=5 {
        push_user(http, 7, n).await;
    }
    a.until("5").await;
    let (epoch, seen) = a.last();
    assert_eq!(seen, 5);
    drop(a);
    // Missed while offline, then more while it comes back on the other comet.
    for n in 6..=10 {
        push_user(http, 7, n).await;
    }
    let pusher = tokio::spawn(async move {
        for n in 11..=40 {
            push_user(http, 7, n).await;
        }
    });
    let (mut b, reply) =
        Ext::recovering_user(c.comet(1, Transport::Tcp), 7, "phone", (&epoch, seen)).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["stream"], "user");
    pusher.await.unwrap();
    b.until("40").await;
    let bodies: Vec<String> = b.got.iter().map(|g| g.2.clone()).collect();
    let want: Vec<String> = (6..=40).map(|n| n.to_string()).collect();
    assert_eq!(bodies, want, "every missed and live push once, in order");
    let offsets: Vec<u64> = b.got.iter().map(|g| g.1).collect();
    assert_eq!(offsets, (6..=40).collect::<Vec<u64>>());

    // Another user can neither read user 7's stream with a JOIN nor write into it with a
    // room push.
    let mut other = Ext::connect(c.comet(0, Transport::Tcp), Transport::Tcp, "other").await;
    let reply = other.join("user://7", Some((&epoch, 0))).await;
    assert!(reply["error"].is_string(), "{reply}");
    assert!(other.got.is_empty());
    let v = api(
        http,
        "POST",
        "/goim/push/room?operation=1000&type=user&room=7",
        b"forged",
    )
    .await;
    assert_eq!(v["code"], -400, "{v}");
}

/// Key pushes with user streams on: numbered in the connection's own stream (bound to its
/// user and key); a connection that comes back with the same key while pushes go on gets
/// everything after its position once and in order; another user who takes the key over
/// reads none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_reconnects_gets_its_pushes_once_and_in_order() {
    let c = tokio::task::spawn_blocking(|| {
        Cluster::start_with(2, 2, USER_STREAMS, "user_streams = true")
    })
    .await
    .unwrap();
    let http = c.http();
    let fresh = json!({"user": {"epoch": "", "offset": 0}, "key": {"epoch": "", "offset": 0}});
    let (mut a, replies) =
        Ext::try_recovering(c.comet(0, Transport::Tcp), 7, "phone", fresh.clone())
            .await
            .unwrap();
    assert_eq!(
        replies
            .iter()
            .map(|r| r["stream"].clone())
            .collect::<Vec<_>>(),
        vec![json!("user"), json!("key")]
    );
    let push_key = move |n: u32| async move {
        push(
            http,
            "/goim/push/keys?operation=1000&keys=phone",
            format!("k{n}").as_bytes(),
        )
        .await
    };
    for n in 1..=5 {
        push_key(n).await;
    }
    a.until("k5").await;
    let (bodies, offsets) = a.of("key");
    assert_eq!(bodies, (1..=5).map(|n| format!("k{n}")).collect::<Vec<_>>());
    assert_eq!(offsets, (1..=5).collect::<Vec<u64>>());
    let (epoch, seen) = a.at["key"].clone();
    // The same key comes back on the other comet while pushes go on.
    let pusher = tokio::spawn(async move {
        for n in 6..=30 {
            push_key(n).await;
        }
    });
    let back = json!({"key": {"epoch": epoch, "offset": seen}});
    let (mut b, replies) = Ext::try_recovering(c.comet(1, Transport::Tcp), 7, "phone", back)
        .await
        .unwrap();
    assert_eq!(replies[0]["recovered"], true, "{replies:?}");
    pusher.await.unwrap();
    b.until("k30").await;
    let (bodies, offsets) = b.of("key");
    assert_eq!(
        bodies,
        (6..=30).map(|n| format!("k{n}")).collect::<Vec<_>>(),
        "every push after its position, once, in order"
    );
    assert_eq!(offsets, (6..=30).collect::<Vec<u64>>());
    drop(a);
    // Another user with the same key has a stream of its own: nothing of user 7's.
    let steal = json!({"key": {"epoch": epoch, "offset": 0}});
    let (other, replies) = Ext::try_recovering(c.comet(0, Transport::Tcp), 8, "phone", steal)
        .await
        .unwrap();
    assert_eq!(replies[0]["recovered"], false, "{replies:?}");
    assert_ne!(replies[0]["epoch"], json!(epoch));
    assert!(other.got.is_empty());
    // Rooms may not write into key streams.
    let v = api(
        http,
        "POST",
        "/goim/push/room?operation=1000&type=key&room=7/phone",
        b"forged",
    )
    .await;
    assert_eq!(v["code"], -400, "{v}");
}

/// A client of the full roll: its own user's stream and the room's, both followed across
/// every drain by reconnecting to the next comet with both positions.
async fn follow_both(
    mut ext: Ext,
    mid: i64,
    addrs: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    start: usize,
    not_recovered: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Ext {
    use std::sync::atomic::Ordering;
    let mut at = start;
    let key = format!("dev{mid}");
    loop {
        let p = ext.recv().await;
        if p.op == op::RECONNECT {
            let addr = next_comet(&addrs, &mut at);
            let (ue, uo) = ext.at["user"].clone();
            let (re, ro) = ext.at["chat://1"].clone();
            let (mut next, reply) = Ext::recovering_user(addr, mid, &key, (&ue, uo)).await;
            if reply["recovered"] != true {
                not_recovered.fetch_add(1, Ordering::SeqCst);
            }
            let reply = next.join("chat://1", Some((&re, ro))).await;
            if reply["recovered"] != true {
                not_recovered.fetch_add(1, Ordering::SeqCst);
            }
            // What the new connection got before the JOIN's reply (user pushes) goes after
            // what the old one got.
            let mut got = std::mem::take(&mut ext.got);
            let mut streams = std::mem::take(&mut ext.streams);
            got.append(&mut next.got);
            streams.append(&mut next.streams);
            next.got = got;
            next.streams = streams;
            ext = next;
        }
        let (room, _) = ext.of("chat://1");
        let (user, _) = ext.of("user");
        if room.last().is_some_and(|b| b == "end") && user.last().is_some_and(|b| b == "uend") {
            return ext;
        }
    }
}

/// Issue 9, scenario 1: every comet drains and restarts in turn while a room gets a steady
/// stream and every client's user gets pushes of its own; clients follow the drain advice
/// and come back with both positions. Each gets every room message and every push to its
/// user exactly once and in order, and none is told "not recovered".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_every_comet_loses_nothing_for_rooms_or_users() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const USERS: usize = 60;

    let mut roll = Roll::start(format!("{HISTORY}\n{USER_STREAMS}"), "user_streams = true").await;
    let http = roll.c.http();
    let addrs = roll.addrs.clone();
    let not_recovered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..USERS {
        let at = i % 3;
        let mid = 1000 + i as i64;
        let key = format!("dev{mid}");
        let (mut ext, _) = Ext::recovering_user(roll.addr(at), mid, &key, ("", 0)).await;
        ext.join("chat://1", None).await;
        let f = follow_both(ext, mid, addrs.clone(), at, not_recovered.clone());
        clients.push(tokio::spawn(f));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let began = std::time::Instant::now();
    let rooms = tokio::spawn(room_stream(http, stop.clone()));
    let users = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let mid = 1000 + (n % USERS) as i64;
                push(
                    http,
                    &format!("/goim/push/mids?operation=1000&mids={mid}"),
                    format!("u{n}").as_bytes(),
                )
                .await;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            n
        }
    });
    roll.roll();
    stop.store(true, Ordering::SeqCst);
    let room_sent = rooms.await.unwrap();
    let user_sent = users.await.unwrap();
    push(
        http,
        "/goim/push/room?operation=1000&type=chat&room=1",
        b"end",
    )
    .await;
    for i in 0..USERS {
        let mid = 1000 + i as i64;
        push(
            http,
            &format!("/goim/push/mids?operation=1000&mids={mid}"),
            b"uend",
        )
        .await;
    }
    for (i, cl) in clients.into_iter().enumerate() {
        let ext = cl.await.unwrap();
        let (room, room_offsets) = ext.of("chat://1");
        let mut want: Vec<String> = (1..=room_sent).map(|n| n.to_string()).collect();
        want.push("end".into());
        assert_eq!(room, want, "client {i}: room messages once, in order");
        assert!(room_offsets.windows(2).all(|w| w[1] == w[0] + 1));
        let (user, user_offsets) = ext.of("user");
        let mut want: Vec<String> = (1..=user_sent)
            .filter(|n| n % USERS == i)
            .map(|n| format!("u{n}"))
            .collect();
        want.push("uend".into());
        assert_eq!(user, want, "client {i}: its user's pushes once, in order");
        assert!(user_offsets.windows(2).all(|w| w[1] == w[0] + 1));
    }
    assert_eq!(not_recovered.load(Ordering::SeqCst), 0);
    println!(
        "roll (rooms and users): {room_sent} room messages and {user_sent} user pushes over {:.1}s while 3 comets restarted, {USERS} clients: each got all of its messages once, in order; not recovered 0",
        began.elapsed().as_secs_f64()
    );
}

/// Optional acks (standalone): a client that asks for them in HELLO gets a numbered push to
/// its user again when it does not ack it in time, at most `ack_retries` times (then it is
/// given up and counted); an acked push is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_user_pushes_are_sent_again_and_then_counted() {
    use goim_job::HistoryConfig;
    let mut cfg = common::config();
    cfg.logic.user_streams = true;
    cfg.job
        .history
        .insert("user".into(), HistoryConfig::default());
    cfg.comet.ack_timeout = std::time::Duration::from_millis(200);
    cfg.comet.ack_retries = 2;
    let s = common::start_with(cfg).await;
    let mut c = Client::connect(Transport::Tcp, s.tcp, None).await.unwrap();
    let mut hello = goim_client::encode(1, op::AUTH, 1, &token(5, "k", "", &[]));
    hello.extend(goim_client::encode(
        1,
        op::HELLO,
        2,
        br#"{"v":1,"acks":true}"#,
    ));
    hello.extend(goim_client::encode(
        1,
        op::RECOVER,
        3,
        br#"{"user":{"epoch":"","offset":0}}"#,
    ));
    c.send_bytes(&hello).await.unwrap();
    // Until the recovery's reply.
    while common::recv(&mut c).await.op != op::RECOVER_REPLY {}
    let push =
        |body: &'static [u8]| common::push_ok(&s, "/goim/push/mids?operation=1000&mids=5", body);
    // The next user push (and its position), skipping nothing else.
    async fn next_push(c: &mut Client) -> (u64, Vec<u8>) {
        let p = common::recv(c).await;
        assert_eq!(p.op, op::POSITION, "{p:?}");
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["stream"], "user");
        let m = common::recv(c).await;
        assert_eq!(m.op, 1000);
        (v["offset"].as_u64().unwrap(), m.body)
    }
    push(b"one").await;
    assert_eq!(next_push(&mut c).await, (1, b"one".to_vec()));
    c.send(op::ACK, br#"{"user":1}"#).await.unwrap();
    push(b"two").await;
    assert_eq!(next_push(&mut c).await, (2, b"two".to_vec()));
    // Not acked: sent again twice (after 200 ms each), with its position; "one" never again.
    assert_eq!(next_push(&mut c).await, (2, b"two".to_vec()));
    assert_eq!(next_push(&mut c).await, (2, b"two".to_vec()));
    // Then given up and counted.
    let dropped = || async {
        let (_, m) = common::http(s.http, "GET", "/metrics", b"").await;
        m.lines()
            .any(|l| l.starts_with("goim_comet_pushes_dropped_total{reason=\"unacked\"} 1"))
    };
    cluster::wait_until_async(dropped).await;
    // The connection is fine: the next push comes, acked at once, and nothing follows it.
    push(b"three").await;
    assert_eq!(next_push(&mut c).await, (3, b"three".to_vec()));
    c.send(op::ACK, br#"{"user":3}"#).await.unwrap();
    push(b"four").await;
    assert_eq!(next_push(&mut c).await, (4, b"four".to_vec()));
}
