//! goim role processes for multi-process tests, on top of the shared etcd harness.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub use goim_testkit::{wait_until, Etcd};

pub struct Role {
    pub ready: Value,
    child: Child,
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
        Role { ready, child }
    }

    pub fn addr(&self, what: &str) -> SocketAddr {
        self.ready[what].as_str().unwrap().parse().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.kill();
    }
}
