//! Conversations end to end: real connections, a real notification receiver, SQLite and a
//! real PostgreSQL, standalone and distributed with a logic restart.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use goim_client::{Client, Packet, Transport};
use goim_proto::op;
use serde_json::{json, Value};

fn postgres() -> &'static goim_testkit::Postgres {
    static PG: OnceLock<goim_testkit::Postgres> = OnceLock::new();
    PG.get_or_init(goim_testkit::Postgres::start)
}

/// The business's notification endpoint: records every notification, answers `status`.
#[derive(Clone)]
struct Sink {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Value>>>,
    calls: Arc<AtomicU16>,
    status: Arc<AtomicU16>,
    changed: Arc<tokio::sync::Notify>,
}

impl Sink {
    async fn start() -> Sink {
        let got = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let calls = Arc::new(AtomicU16::new(0));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (g, st, ca, ch) = (got.clone(), status.clone(), calls.clone(), changed.clone());
        let app = axum::Router::new().route(
            "/notify",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (g, st, ca, ch) = (g.clone(), st.clone(), ca.clone(), ch.clone());
                async move {
                    ca.fetch_add(1, Ordering::SeqCst);
                    let code = st.load(Ordering::SeqCst);
                    if code == 0 {
                        // A sink that hangs: never answers.
                        ch.notify_waiters();
                        std::future::pending::<()>().await;
                    }
                    if code == 200 {
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        let items = v["notifications"].as_array().unwrap().clone();
                        g.lock().unwrap().extend(items);
                    }
                    ch.notify_waiters();
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        Sink {
            addr,
            got,
            calls,
            status,
            changed,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/notify", self.addr)
    }

    /// (mid, seq) of every notification so far.
    fn seen(&self) -> Vec<(i64, i64)> {
        let mut v: Vec<(i64, i64)> = self
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|n| (n["mid"].as_i64().unwrap(), n["seq"].as_i64().unwrap()))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Waits until `f` holds of what arrived (bounded).
    async fn until(&self, what: &str, f: impl Fn(&[(i64, i64)]) -> bool) {
        within(async {
            loop {
                let wake = self.changed.notified();
                if f(&self.seen()) {
                    return;
                }
                // A poll as well: a notification may land between the check and the wait.
                let _ = tokio::time::timeout(Duration::from_millis(50), wake).await;
            }
        })
        .await;
        assert!(f(&self.seen()), "{what}");
    }
}

/// A connection of a member: conversation requests, and what was pushed meanwhile.
struct Device {
    c: Client,
    pushed: VecDeque<Packet>,
}

impl Device {
    async fn connect(addr: SocketAddr, mid: i64, key: &str) -> Device {
        within(Self::try_connect(addr, mid, key))
            .await
            .expect("auth")
    }

    async fn try_connect(addr: SocketAddr, mid: i64, key: &str) -> std::io::Result<Device> {
        let mut c = Client::connect(Transport::Tcp, addr, None).await?;
        // goim delivers a user's pushes only on the ops its connection watches: a client
        // that takes conversations watches their two push ops.
        let watch = [1000, op::CONV_MESSAGE, op::CONV_READ_SYNC];
        c.auth(&goim_client::token(mid, key, "", &watch)).await?;
        Ok(Device {
            c,
            pushed: VecDeque::new(),
        })
    }

    /// Connects as a client does after its comet restarted: again until it is admitted
    /// (the new comet may still be putting itself in place).
    async fn reconnect(addr: SocketAddr, mid: i64, key: &str) -> Device {
        within(async {
            loop {
                match Self::try_connect(addr, mid, key).await {
                    Ok(d) => return d,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .await
    }

    /// Sends a request and returns its reply (parsed), keeping pushes that came first.
    async fn request(&mut self, request_op: i32, body: Value) -> Value {
        let seq = self
            .c
            .send(request_op, body.to_string().as_bytes())
            .await
            .unwrap();
        loop {
            let p = within(self.c.recv()).await.unwrap();
            if p.op == request_op + 1 && p.seq == seq {
                return serde_json::from_slice(&p.body).unwrap();
            }
            self.pushed.push_back(p);
        }
    }

    /// The bodies of a conversation's messages after `after`, asked over the connection.
    async fn history_bodies(&mut self, conversation: &str, after: i64) -> Vec<String> {
        let body = json!({"conversation": conversation, "after": after});
        let hist = self.request(op::CONV_HISTORY, body).await;
        hist["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("{hist}"))
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_string())
            .collect()
    }

    async fn next(&mut self) -> Packet {
        match self.pushed.pop_front() {
            Some(p) => p,
            None => within(self.c.recv()).await.unwrap(),
        }
    }

    async fn next_json(&mut self) -> (i32, Value) {
        let p = self.next().await;
        (p.op, serde_json::from_slice(&p.body).unwrap_or(Value::Null))
    }
}

async fn call(http: SocketAddr, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = common::http(http, method, path, body.to_string().as_bytes()).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
    (status, v)
}

async fn ok(http: SocketAddr, method: &str, path: &str, body: Value) -> Value {
    let (status, v) = call(http, method, path, body).await;
    assert_eq!(
        (status, &v["code"]),
        (200, &json!(0)),
        "{method} {path}: {v}"
    );
    v["data"].clone()
}

/// A push to one user on op 1000, to show that nothing else was pushed before it.
async fn sentinel(http: SocketAddr, mid: i64) {
    let v = ok(
        http,
        "POST",
        &format!("/goim/push/mids?operation=1000&mids={mid}"),
        Value::Null,
    )
    .await;
    assert!(v["keys_found"].as_i64().unwrap() >= 1);
}

fn chat_config(store: &str, sink: &Sink) -> goim::config::Config {
    let mut cfg = config();
    let chat = &mut cfg.logic.conversations;
    chat.store = store.into();
    chat.notify.url = sink.url();
    chat.notify.linger = Duration::from_millis(5);
    chat.max_body = 100;
    chat.preview_chars = 8;
    cfg
}

/// One sender, two members online, one muted, one offline, one offline with do-not-disturb:
/// push, push, unread only, notification, nothing; then multi-device read sync, resends,
/// history, lists and bad input, over the connection and the HTTP API.
async fn policy_scenario(store: &str) {
    let sink = Sink::start().await;
    let s = start_with(chat_config(store, &sink)).await;
    let h = s.http;
    let created = ok(
        h,
        "POST",
        "/goim/conversations",
        json!({"id": "team", "members": [1, 2, 3, 4, 5]}),
    )
    .await;
    assert_eq!(
        (created["id"].as_str(), created["members"].as_i64()),
        (Some("team"), Some(5))
    );
    ok(
        h,
        "PATCH",
        "/goim/conversations/team/members/3",
        json!({"muted": true}),
    )
    .await;
    let m5 = ok(
        h,
        "PATCH",
        "/goim/conversations/team/members/5",
        json!({"dnd": true}),
    )
    .await;
    assert_eq!(
        (m5["dnd"].as_bool(), m5["muted"].as_bool()),
        (Some(true), Some(false))
    );

    let mut alice = Device::connect(s.tcp, 1, "alice-phone").await;
    let mut bob = Device::connect(s.tcp, 2, "bob-phone").await;
    let mut bob_laptop = Device::connect(s.tcp, 2, "bob-laptop").await;
    let mut carol = Device::connect(s.tcp, 3, "carol-phone").await;
    let mut eve = Device::connect(s.tcp, 9, "eve").await;

    let sent = alice
        .request(
            op::CONV_SEND,
            json!({"conversation": "team", "body": "lunch at noon?", "op": 7, "client_id": "a-1"}),
        )
        .await;
    assert_eq!(
        (sent["seq"].as_i64(), sent["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    for dev in [&mut bob, &mut bob_laptop, &mut alice] {
        let (o, m) = dev.next_json().await;
        assert_eq!(o, op::CONV_MESSAGE);
        assert_eq!(
            (
                m["conversation"].as_str(),
                m["seq"].as_i64(),
                m["sender"].as_i64()
            ),
            (Some("team"), Some(1), Some(1))
        );
        assert_eq!(
            (m["body"].as_str(), m["op"].as_i64()),
            (Some("lunch at noon?"), Some(7))
        );
    }
    // The muted member got no push: the next thing it gets is the sentinel.
    sentinel(h, 3).await;
    assert_eq!(carol.next().await.op, 1000);
    // The offline member without dnd is notified; the one with dnd is not.
    sink.until("mid 4 notified of seq 1", |n| n.contains(&(4, 1)))
        .await;
    let first = sink.got.lock().unwrap()[0].clone();
    assert_eq!(first["id"], "team/1/4");
    assert_eq!(first["preview"], "lunch at");

    // A resend with the same client id: the first seq back, nothing delivered again.
    let again = alice
        .request(
            op::CONV_SEND,
            json!({"conversation": "team", "body": "lunch at noon?", "client_id": "a-1"}),
        )
        .await;
    assert_eq!(
        (again["seq"].as_i64(), again["duplicate"].as_bool()),
        (Some(1), Some(true))
    );
    // A backend's message over HTTP.
    let by_api = ok(
        h,
        "POST",
        "/goim/conversations/team/messages",
        json!({"body": "room 4 booked"}),
    )
    .await;
    assert_eq!(
        (
            by_api["seq"].as_i64(),
            by_api["pushed"].as_i64(),
            by_api["notified"].as_i64()
        ),
        (Some(2), Some(2), Some(1))
    );
    sentinel(h, 2).await;
    for dev in [&mut bob, &mut bob_laptop] {
        let (o, m) = dev.next_json().await;
        assert_eq!(
            (o, m["seq"].as_i64(), m["sender"].as_i64()),
            (op::CONV_MESSAGE, Some(2), Some(0))
        );
        assert_eq!(dev.next().await.op, 1000, "the resend was not pushed");
    }
    sink.until("mid 4 notified of seq 2", |n| n.contains(&(4, 2)))
        .await;
    assert_eq!(sink.seen(), [(4, 1), (4, 2)], "nobody else is notified");

    // Unread counts and previews: the muted member's stay right, outside its total.
    let carol_list = ok(h, "GET", "/goim/users/3/conversations", Value::Null).await;
    let line = &carol_list["conversations"][0];
    assert_eq!(
        (line["unread"].as_i64(), line["muted"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(
        line["last"]["text"], "room 4 b",
        "preview cut at 8 characters"
    );
    assert_eq!(carol_list["total_unread"], 0);
    let dnd_list = ok(h, "GET", "/goim/users/5/conversations", Value::Null).await;
    assert_eq!(dnd_list["total_unread"], 2);

    // Reading on one device moves the cursor on the user's others.
    let read = bob
        .request(op::CONV_READ, json!({"conversation": "team", "seq": 1}))
        .await;
    assert_eq!(read["read_seq"], 1);
    let (o, sync) = bob_laptop.next_json().await;
    assert_eq!(
        (o, sync["conversation"].as_str(), sync["read_seq"].as_i64()),
        (op::CONV_READ_SYNC, Some("team"), Some(1))
    );
    let list = bob.request(op::CONV_LIST, json!({})).await;
    assert_eq!(
        (
            list["total_unread"].as_i64(),
            list["conversations"][0]["unread"].as_i64()
        ),
        (Some(1), Some(1))
    );
    // Catching up after a reconnect: history after the last seen seq.
    let hist = bob_laptop
        .request(
            op::CONV_HISTORY,
            json!({"conversation": "team", "after": 1}),
        )
        .await;
    let seqs: Vec<i64> = hist["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [2]);
    let page = ok(
        h,
        "GET",
        "/goim/conversations/team/messages?before=3&limit=1&mid=4",
        Value::Null,
    )
    .await;
    assert_eq!(page["messages"][0]["body"], "room 4 booked");

    // Bad input: a clear error on the reply op; nothing stored.
    let refused = [
        (
            eve.request(op::CONV_SEND, json!({"conversation": "team", "body": "hi"}))
                .await,
            403,
        ),
        (
            alice
                .request(op::CONV_SEND, json!({"conversation": "nope", "body": "hi"}))
                .await,
            404,
        ),
        (
            alice
                .request(
                    op::CONV_SEND,
                    json!({"conversation": "team", "body": "x".repeat(101)}),
                )
                .await,
            400,
        ),
        (
            alice
                .request(op::CONV_READ, json!({"conversation": "team", "seq": 99}))
                .await,
            400,
        ),
        (
            alice
                .request(
                    op::CONV_HISTORY,
                    json!({"conversation": "team", "after": -1}),
                )
                .await,
            400,
        ),
        (
            alice.request(op::CONV_SEND, json!({"to": "team"})).await,
            400,
        ),
    ];
    for (reply, code) in refused {
        assert_eq!(reply["code"], code, "{reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(
        ok(h, "GET", "/goim/conversations/team", Value::Null).await["conversation"]["last_seq"],
        2
    );
    for (method, path, body, status) in [
        (
            "POST",
            "/goim/conversations",
            json!({"id": "team", "members": [1]}),
            409,
        ),
        ("POST", "/goim/conversations", json!({"members": [-1]}), 400),
        ("POST", "/goim/conversations", json!("not an object"), 400),
        ("GET", "/goim/conversations/none", Value::Null, 404),
        (
            "POST",
            "/goim/conversations/team/messages",
            json!({"sender": 9, "body": "x"}),
            403,
        ),
        (
            "PATCH",
            "/goim/conversations/team/members/9",
            json!({"muted": true}),
            403,
        ),
        (
            "GET",
            "/goim/conversations/team/messages?after=x",
            Value::Null,
            400,
        ),
    ] {
        let (got, v) = call(h, method, path, body).await;
        assert_eq!(got, status, "{method} {path}: {v}");
        assert_eq!(v["code"], -i64::from(status));
    }
    let metrics = common::http(h, "GET", "/metrics", b"").await.1;
    assert!(
        metrics.contains("goim_logic_conversation_messages_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains(r#"goim_logic_notifications_total{outcome="sent"} 2"#));
    s.shutdown().await;
}

#[tokio::test]
async fn each_member_gets_what_the_policy_says_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    policy_scenario(&format!(
        "sqlite://{}",
        dir.path().join("chat.db").display()
    ))
    .await;
}

#[tokio::test]
async fn each_member_gets_what_the_policy_says_postgres() {
    policy_scenario(&postgres().database()).await;
}

/// A sink that fails, then hangs, then recovers: sends never wait for it, and every offline
/// member is notified once it is back (again after a restart, from the store).
#[tokio::test]
async fn notifications_survive_a_failing_sink_and_a_restart() {
    let sink = Sink::start().await;
    // First it hangs (each call ends at the timeout), then it answers 500.
    sink.status.store(0, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("chat.db").display());
    let mut cfg = chat_config(&store, &sink);
    cfg.logic.conversations.notify.max_attempts = 1;
    cfg.logic.conversations.notify.timeout = Duration::from_millis(100);
    cfg.logic.conversations.renotify_after = Duration::from_millis(200);
    let s = start_with(cfg.clone()).await;
    let h = s.http;
    ok(
        h,
        "POST",
        "/goim/conversations",
        json!({"id": "g", "members": [1, 2, 3]}),
    )
    .await;
    for i in 1..=3 {
        let sent = ok(
            h,
            "POST",
            "/goim/conversations/g/messages",
            json!({"sender": 1, "body": format!("m{i}")}),
        )
        .await;
        assert_eq!(sent["seq"], i);
    }
    let calls = |n| {
        let sink = sink.clone();
        within(async move {
            while sink.calls.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    calls(1).await;
    sink.status.store(500, Ordering::SeqCst);
    let hung = sink.calls.load(Ordering::SeqCst);
    calls(hung + 1).await;
    let metrics = common::http(h, "GET", "/metrics", b"").await.1;
    assert!(
        metrics.contains(r#"goim_logic_notifications_total{outcome="failed"}"#),
        "{metrics}"
    );
    assert!(sink.seen().is_empty());
    s.shutdown().await;

    // Back up, on the same store: what was acknowledged and not notified is notified now.
    sink.status.store(200, Ordering::SeqCst);
    let s = start_with(cfg).await;
    let want: Vec<(i64, i64)> = [2, 3]
        .into_iter()
        .flat_map(|mid| (1..=3).map(move |seq| (mid, seq)))
        .collect();
    sink.until("every offline member notified of every message", |n| {
        n == want
    })
    .await;
    let list = ok(s.http, "GET", "/goim/users/2/conversations", Value::Null).await;
    assert_eq!(list["total_unread"], 3);
    s.shutdown().await;
}

/// Without a store, the API and the ops say conversations are off.
#[tokio::test]
async fn without_a_store_conversations_are_off() {
    let s = start().await;
    let (status, v) = call(
        s.http,
        "POST",
        "/goim/conversations",
        json!({"members": [1]}),
    )
    .await;
    assert_eq!((status, v["code"].as_i64()), (501, Some(-501)), "{v}");
    let mut dev = Device::connect(s.tcp, 1, "k").await;
    let r = dev.request(op::CONV_LIST, json!({})).await;
    assert_eq!(r["code"], 501, "{r}");
    s.shutdown().await;
}

/// Distributed, on PostgreSQL: logic killed and started again loses nothing that was
/// acknowledged; sequence numbers, unread counts and notifications carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logic_restart_loses_nothing_acknowledged() {
    let sink = Sink::start().await;
    let toml = format!(
        "[logic.conversations]\nstore = {:?}\nrenotify_after = \"300ms\"\n\
         [logic.conversations.notify]\nurl = {:?}\nlinger = \"5ms\"\n",
        postgres().database(),
        sink.url()
    );
    let t = toml.clone();
    let mut c = tokio::task::spawn_blocking(move || cluster::Cluster::start_with(1, 1, "", &t))
        .await
        .unwrap();
    let h = c.http();
    ok(
        h,
        "POST",
        "/goim/conversations",
        json!({"id": "d", "members": [1, 2, 3]}),
    )
    .await;
    let comet = c.comet(0, Transport::Tcp);
    let mut alice = Device::connect(comet, 1, "alice").await;
    let mut bob = Device::connect(comet, 2, "bob").await;
    let sent = alice
        .request(op::CONV_SEND, json!({"conversation": "d", "body": "one"}))
        .await;
    assert_eq!(sent["seq"], 1, "{sent}");
    assert_eq!(bob.next_json().await.1["seq"], 1);
    sink.until("mid 3 notified of seq 1", |n| n == [(3, 1)])
        .await;

    // Logic dies at once and comes back on the same address.
    let grpc = c.logic.addr("grpc").to_string();
    c.logic.kill();
    let (etcd_dir, t) = (c.dir.path().to_path_buf(), toml.clone());
    let etcd = &c.etcd;
    c.logic = cluster::start_logic_with(etcd, &etcd_dir, &grpc, &t);
    let h = c.http();
    let logic_http = h;
    tokio::task::spawn_blocking(move || {
        goim_testkit::wait_until("logic ready again", || {
            cluster::http_status(logic_http, "/readyz") == 200
        })
    })
    .await
    .unwrap();
    // The comet's channel to logic reconnects; until then a send is refused, not stored.
    let seq = within(async {
        loop {
            let r = alice
                .request(
                    op::CONV_SEND,
                    json!({"conversation": "d", "body": "two", "client_id": "a2"}),
                )
                .await;
            if r["code"] == 503 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            return r["seq"].as_i64().unwrap();
        }
    })
    .await;
    assert_eq!(seq, 2);
    let pushed = bob.next_json().await.1;
    assert_eq!(
        (pushed["seq"].as_i64(), pushed["body"].as_str()),
        (Some(2), Some("two"))
    );
    assert_eq!(bob.history_bodies("d", 0).await, ["one", "two"]);
    let list = ok(h, "GET", "/goim/users/3/conversations", Value::Null).await;
    assert_eq!(list["total_unread"], 2);
    // Backends reach the same over gRPC, on logic's gRPC port.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut api = goim_proto::chat::conversations_client::ConversationsClient::new(channel);
    let inbox = goim_proto::chat::InboxReq { mid: 3, limit: 0 };
    let inbox = api.inbox(inbox).await.unwrap().into_inner();
    assert_eq!(inbox.total_unread, 2);
    sink.until("mid 3 notified of seq 2", |n| n == [(3, 1), (3, 2)])
        .await;

    // A second logic replica on the same store: it caches members by version, so a change
    // made through the first one applies to its very next message.
    let second = cluster::start_logic_with(&c.etcd, c.dir.path(), "127.0.0.1:0", &toml);
    let h2 = second.addr("http");
    tokio::task::spawn_blocking(move || {
        goim_testkit::wait_until("second logic ready", || {
            cluster::http_status(h2, "/readyz") == 200
        })
    })
    .await
    .unwrap();
    let path = "/goim/conversations/d/messages";
    let sent = ok(h2, "POST", path, json!({"sender": 1, "body": "three"})).await;
    assert_eq!(sent["pushed"], 2, "alice and bob: {sent}");
    assert_eq!(bob.next_json().await.1["seq"], 3);
    ok(
        h,
        "PATCH",
        "/goim/conversations/d/members/2",
        json!({"muted": true}),
    )
    .await;
    let sent = ok(h2, "POST", path, json!({"sender": 1, "body": "four"})).await;
    assert_eq!(
        sent["pushed"], 1,
        "bob muted it on the other replica: {sent}"
    );
    ok(h, "DELETE", "/goim/conversations/d/members/2", Value::Null).await;
    let sent = ok(h2, "POST", path, json!({"sender": 1, "body": "five"})).await;
    assert_eq!(sent["pushed"], 1, "bob left: {sent}");
    // Bob got nothing of four and five: the next thing is a push to him alone.
    sentinel(h2, 2).await;
    assert_eq!(bob.next().await.op, 1000);

    // Job down: a message is still stored and acknowledged (its pushes are counted as
    // undelivered); the comet restarted: its clients come back and pull what they missed.
    c.jobs[0].kill();
    let sent = ok(h, "POST", path, json!({"sender": 1, "body": "six"})).await;
    assert_eq!(sent["seq"], 6);
    let metrics = common::http(h, "GET", "/metrics", b"").await.1;
    assert!(
        metrics.contains(r#"goim_logic_conversation_undelivered_total{reason="push_failed"}"#),
        "{metrics}"
    );
    c.jobs[0] = cluster::start_job(&c.etcd, c.dir.path(), "job-0");
    c.comets[0].kill();
    c.comets[0] = cluster::start_comet(&c.etcd, c.dir.path(), "comet-0", &grpc);
    let comet = c.comets[0].addr("tcp");
    let mut alice = Device::reconnect(comet, 1, "alice").await;
    assert_eq!(
        alice.history_bodies("d", 2).await,
        ["three", "four", "five", "six"]
    );
}

/// The gRPC API for backends does what the HTTP API does, behind the same keys, with errors
/// as gRPC codes.
#[tokio::test]
async fn the_grpc_api_is_the_http_apis_twin() {
    use goim_proto::chat as pb;
    use pb::conversations_client::ConversationsClient;
    use tonic::Code;

    let sink = Sink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = chat_config(
        &format!("sqlite://{}", dir.path().join("chat.db").display()),
        &sink,
    );
    cfg.logic.conversations.grpc = "127.0.0.1:0".into();
    cfg.logic.api_keys = vec!["backend-key".into()];
    let s = start_with(cfg).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut api = ConversationsClient::new(channel);
    fn keyed<T>(msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut()
            .insert("authorization", "Bearer backend-key".parse().unwrap());
        r
    }
    let create = pb::CreateReq {
        id: "ops".into(),
        kind: String::new(),
        members: vec![1, 2, 3],
    };
    let refused = api.create(tonic::Request::new(create.clone())).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
    let c = api
        .create(keyed(create.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (c.id.as_str(), c.kind.as_str(), c.members),
        ("ops", "group", 3)
    );
    let again = api.create(keyed(create)).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);

    let mut bob = Device::connect(s.tcp, 2, "bob").await;
    let muted = pb::SetMemberReq {
        id: "ops".into(),
        mid: 3,
        muted: Some(true),
        dnd: None,
    };
    let m = api.set_member(keyed(muted)).await.unwrap().into_inner();
    assert!(m.muted && !m.dnd);
    let send = |body: &str, sender| pb::SendReq {
        conversation: "ops".into(),
        sender,
        op: 3,
        body: body.into(),
        client_id: "c-1".into(),
    };
    let sent = api
        .send(keyed(send("deploy at 5", 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((sent.seq, sent.duplicate, sent.pushed), (1, false, 1));
    let (o, pushed) = bob.next_json().await;
    assert_eq!(
        (o, pushed["body"].as_str()),
        (op::CONV_MESSAGE, Some("deploy at 5"))
    );
    let dup = api
        .send(keyed(send("deploy at 5", 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dup.seq, dup.duplicate), (1, true));
    let outsider = api.send(keyed(send("hi", 9))).await.unwrap_err();
    assert_eq!(outsider.code(), Code::PermissionDenied);

    let inbox = pb::InboxReq { mid: 3, limit: 0 };
    let inbox = api.inbox(keyed(inbox)).await.unwrap().into_inner();
    assert_eq!(inbox.total_unread, 0, "muted");
    let line = &inbox.conversations[0];
    assert_eq!(
        (line.unread, line.last.as_ref().unwrap().text.as_str()),
        (1, "deploy a")
    );
    let read = pb::ReadReq {
        conversation: "ops".into(),
        mid: 2,
        seq: 1,
    };
    assert_eq!(
        api.mark_read(keyed(read))
            .await
            .unwrap()
            .into_inner()
            .read_seq,
        1
    );
    let hist = pb::HistoryReq {
        conversation: "ops".into(),
        mid: 2,
        cursor: Some(pb::history_req::Cursor::After(0)),
        limit: 0,
    };
    let hist = api.history(keyed(hist)).await.unwrap().into_inner();
    assert_eq!(hist.messages.len(), 1);
    assert_eq!(hist.messages[0].client_id, "c-1");
    let gone = pb::MembersReq {
        id: "ops".into(),
        mids: vec![3, 4],
    };
    assert_eq!(
        api.remove_members(keyed(gone))
            .await
            .unwrap()
            .into_inner()
            .changed,
        1
    );
    let got = api
        .get(keyed(pb::GetReq { id: "ops".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.members.len(), 2);
    api.delete(keyed(pb::DeleteReq { id: "ops".into() }))
        .await
        .unwrap();
    let missing = api.get(keyed(pb::GetReq { id: "ops".into() })).await;
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    let bad = pb::CreateReq {
        id: String::new(),
        kind: "channel".into(),
        members: vec![1],
    };
    assert_eq!(
        api.create(keyed(bad)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    s.shutdown().await;
}
