//! Test harness pieces shared by the integration tiers: a real etcd on free ports in a temp
//! dir, and waiting on conditions (never fixed sleeps).

mod control_plane;
pub mod pki;
mod postgres;
mod reaper;

pub use control_plane::{kubeconfig_text, tools_bin, ControlPlane, ADMIN_TOKEN};
pub use postgres::Postgres;
pub use reaper::{forget, reap_at_exit, remove_at_exit};

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago (etcd cannot bind port 0 and report it back).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    tls: bool,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl on PATH");
    assert!(ok.success(), "openssl {args:?}");
}

impl Etcd {
    pub fn start() -> Etcd {
        Self::start_with(false)
    }

    /// An etcd that speaks TLS only and requires client certificates, signed by a fresh CA.
    /// `ca.crt`, `tls.crt` and `tls.key` (the client's) are in [`Etcd::tls_dir`].
    pub fn start_tls() -> Etcd {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Etcd {
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            tls,
        };
        // A control plane's etcd lives in a `static` and is never dropped.
        remove_at_exit(e.dir.path());
        if tls {
            // One CA signs etcd's server certificate and the client's (in `tls_dir`).
            let ca = pki::TestCa::new("goim-test-ca");
            ca.issue(
                &e.server_tls_dir(),
                "127.0.0.1",
                &["IP:127.0.0.1", "DNS:localhost"],
            );
            ca.issue(&e.tls_dir(), "goim", &[]);
        }
        e.spawn();
        e
    }

    /// etcd's own certificate and key.
    fn server_tls_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("server-tls")
    }

    /// Client TLS files of a [`Etcd::start_tls`] etcd: `ca.crt`, `tls.crt`, `tls.key`.
    pub fn tls_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("tls")
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let mut cmd = Command::new("etcd");
        if self.tls {
            let d = self.server_tls_dir();
            cmd.arg(format!("--cert-file={}", d.join("tls.crt").display()))
                .arg(format!("--key-file={}", d.join("tls.key").display()))
                .arg(format!("--trusted-ca-file={}", d.join("ca.crt").display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd on PATH (Debian: etcd-server; scripts/setup.sh installs it)");
        reap_at_exit(child.id());
        self.child = Some(child);
        wait_until("etcd listening", || {
            std::net::TcpStream::connect(self.endpoint()).is_ok()
        });
    }

    /// The etcd process (to stall it with SIGSTOP in fault tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            forget(c.id());
        }
    }

    /// Starts again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls a condition every 20 ms until it holds, failing after 30 s.
/// Runs `cmd` with `stdin` written to it; returns success, stdout and stderr.
pub fn run_with_stdin(mut cmd: Command, stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
