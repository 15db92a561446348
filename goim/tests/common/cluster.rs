//! goim role processes for multi-process tests, on top of the shared etcd harness: a cluster
//! of them, and the HTTP and client helpers the distributed tiers share.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use goim_client::{token, Client, Transport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::within;
pub use goim_testkit::{wait_until, Etcd};

pub struct Role {
    pub ready: Value,
    child: Child,
    log: std::path::PathBuf,
}

impl Role {
    /// Starts `goim <args>` and waits for its ready line.
    pub fn start(dir: &std::path::Path, name: &str, args: &[String]) -> Role {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_goim"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        goim_testkit::reap_at_exit(child.id());
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "{name} did not start ({e}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Role { ready, child, log }
    }

    pub fn addr(&self, what: &str) -> SocketAddr {
        self.ready[what].as_str().unwrap().parse().unwrap()
    }

    /// SIGTERM, then waits for the process to exit (bounded); returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        self.signal_term();
        self.wait_exit()
    }

    /// Sends SIGTERM and returns at once.
    pub fn signal_term(&self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
    }

    /// Waits (at most 30 s) for the process to exit; returns whether it exited 0.
    pub fn wait_exit(&mut self) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not exit",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process has exited (and with 0), without waiting.
    pub fn try_exit(&mut self) -> Option<bool> {
        self.child.try_wait().ok().flatten().map(|s| s.success())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        goim_testkit::forget(self.child.id());
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    pub logic: Role,
    pub jobs: Vec<Role>,
    pub comets: Vec<Role>,
}

pub fn etcd_args(etcd: &Etcd) -> Vec<String> {
    vec![
        "--etcd".into(),
        etcd.endpoint(),
        "--cluster".into(),
        "test".into(),
        "--lease-ttl".into(),
        "2".into(),
    ]
}

pub fn args(etcd: &Etcd, role: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![role.to_string()];
    a.extend(etcd_args(etcd));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

pub fn start_logic(etcd: &Etcd, dir: &std::path::Path, grpc: &str) -> Role {
    start_logic_with(etcd, dir, grpc, "")
}

/// A logic with extra `[logic]` settings from a config file.
pub fn start_logic_with(etcd: &Etcd, dir: &std::path::Path, grpc: &str, logic_toml: &str) -> Role {
    let file = dir.join("logic.toml");
    std::fs::write(&file, format!("[logic]\n{logic_toml}\n")).unwrap();
    let a = [
        "--config",
        file.to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--grpc",
        grpc,
    ];
    Role::start(dir, "logic", &args(etcd, "logic", &a))
}

pub fn start_job(etcd: &Etcd, dir: &std::path::Path, id: &str) -> Role {
    start_job_with(etcd, dir, id, "")
}

/// A job with extra settings from a config file (`[job]` and its sub-tables).
pub fn start_job_with(etcd: &Etcd, dir: &std::path::Path, id: &str, job_toml: &str) -> Role {
    let file = dir.join(format!("{id}.toml"));
    std::fs::write(&file, format!("[job]\n{job_toml}\n")).unwrap();
    let a = [
        "--config",
        file.to_str().unwrap(),
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--id",
        id,
    ];
    Role::start(dir, id, &args(etcd, "job", &a))
}

/// A comet with extra `[comet]` settings from a config file.
pub fn start_comet_with(
    etcd: &Etcd,
    dir: &std::path::Path,
    name: &str,
    logic: &str,
    comet_toml: &str,
) -> Role {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, format!("[comet]\n{comet_toml}\n")).unwrap();
    let a = [
        "--config",
        file.to_str().unwrap(),
        "--name",
        name,
        "--tcp",
        "127.0.0.1:0",
        "--ws",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--logic",
        logic,
    ];
    Role::start(dir, name, &args(etcd, "comet", &a))
}

pub fn start_comet(etcd: &Etcd, dir: &std::path::Path, name: &str, logic: &str) -> Role {
    start_comet_with(etcd, dir, name, logic, "")
}

impl Cluster {
    pub fn start(comets: usize, jobs: usize) -> Cluster {
        Cluster::start_with(comets, jobs, "", "")
    }

    /// With extra `[job]` settings for every job, and `[logic]` settings.
    pub fn start_with(comets: usize, jobs: usize, job_toml: &str, logic_toml: &str) -> Cluster {
        Cluster::start_configured(comets, jobs, job_toml, logic_toml, "")
    }

    /// With extra settings for every job, the logic and every comet (each file starts in
    /// the role's own table; later tables such as `[cluster]` may follow).
    pub fn start_configured(
        comets: usize,
        jobs: usize,
        job_toml: &str,
        logic_toml: &str,
        comet_toml: &str,
    ) -> Cluster {
        let etcd = Etcd::start();
        let dir = tempfile::tempdir().unwrap();
        let logic = start_logic_with(&etcd, dir.path(), "127.0.0.1:0", logic_toml);
        let logic_grpc = logic.addr("grpc").to_string();
        let jobs = (0..jobs)
            .map(|i| start_job_with(&etcd, dir.path(), &format!("job-{i}"), job_toml))
            .collect();
        let comets = (0..comets)
            .map(|i| {
                start_comet_with(
                    &etcd,
                    dir.path(),
                    &format!("comet-{i}"),
                    &logic_grpc,
                    comet_toml,
                )
            })
            .collect();
        let c = Cluster {
            etcd,
            dir,
            logic,
            jobs,
            comets,
        };
        let n = c.comets.len();
        wait_until("logic sees every comet", || {
            c.get("/goim/nodes/instances")["data"]
                .as_array()
                .is_some_and(|a| a.len() == n)
        });
        wait_until("logic ready", || {
            http_status(c.logic.addr("http"), "/readyz") == 200
        });
        // Jobs register in etcd after they print their ready line: logic must see one before
        // a push is expected to be taken (a push to a room nobody is in is harmless).
        if !c.jobs.is_empty() {
            wait_until("logic sees a job", || {
                blocking_api(
                    c.http(),
                    "POST",
                    "/goim/push/room?operation=1&type=probe&room=start",
                    b"",
                )["code"]
                    == 0
            });
        }
        // Every job must know every comet before pushes are expected to reach them.
        for j in &c.jobs {
            let addr = j.addr("http");
            wait_until("job sees every comet", || {
                blocking_get_json(addr, "/comets")
                    .as_array()
                    .is_some_and(|a| a.len() == n)
            });
        }
        c
    }

    pub fn http(&self) -> SocketAddr {
        self.logic.addr("http")
    }

    pub fn get(&self, path: &str) -> Value {
        blocking_api(self.http(), "GET", path, b"")
    }

    pub fn comet(&self, i: usize, t: Transport) -> SocketAddr {
        self.comets[i].addr(match t {
            Transport::Tcp => "tcp",
            Transport::WebSocket => "ws",
        })
    }
}

/// Runs a future to completion from blocking code (the cluster helpers run outside the
/// test's runtime).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn http_status(addr: SocketAddr, path: &str) -> u16 {
    block_on(async {
        match raw_http(addr, "GET", path, b"").await {
            Ok((s, _)) => s,
            Err(_) => 0,
        }
    })
}

pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A GET's body ("" when the request fails).
pub fn blocking_get_text(addr: SocketAddr, path: &str) -> String {
    block_on(async {
        match raw_http(addr, "GET", path, b"").await {
            Ok((200, body)) => body,
            _ => String::new(),
        }
    })
}

pub fn blocking_get_json(addr: SocketAddr, path: &str) -> Value {
    serde_json::from_str(&blocking_get_text(addr, path)).unwrap_or(Value::Null)
}

pub fn blocking_api(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Value {
    block_on(api(addr, method, path, body))
}

pub async fn api(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Value {
    let (status, body) = within(raw_http(addr, method, path, body)).await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

pub async fn push(addr: SocketAddr, path: &str, body: &[u8]) {
    let v = api(addr, "POST", path, body).await;
    assert_eq!(v["code"], 0, "{path}: {v}");
}

pub async fn connect(addr: SocketAddr, t: Transport, mid: i64, key: &str, room: &str) -> Client {
    within(async {
        let mut c = Client::connect(t, addr, None).await.unwrap();
        c.auth(&token(mid, key, room, &[1000])).await.unwrap();
        c
    })
    .await
}

pub async fn recv_body(c: &mut Client) -> Vec<u8> {
    within(c.recv()).await.unwrap().body
}

/// Pushes until a message arrives (the path may be warming up: a job or comet restarting).
pub async fn push_until_received(http: SocketAddr, path: &str, c: &mut Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = raw_http(http, "POST", path, b"probe").await.unwrap();
        assert_eq!(status, 200);
        let ok = serde_json::from_str::<Value>(&body).is_ok_and(|v| v["code"] == 0);
        if ok {
            if let Ok(Ok(p)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
                assert_eq!(p.body, b"probe");
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no push got through {path}"
        );
    }
}

/// Polls an async condition every 50 ms for up to 30 s.
pub async fn wait_until_async<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
