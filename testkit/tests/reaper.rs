//! Servers kept in a `static` (never dropped) still die with the test process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use goim_testkit::{wait_until, Etcd};

/// Run by the test below in a process of its own: leaves an etcd in a static and exits.
#[test]
fn leaves_an_etcd_behind() {
    if std::env::var_os("GOIM_REAPER_CHILD").is_none() {
        return;
    }
    static KEPT: OnceLock<Etcd> = OnceLock::new();
    let etcd = KEPT.get_or_init(Etcd::start);
    println!("etcd pid {}", etcd.pid().unwrap());
}

fn alive(pid: u32) -> bool {
    // Gone, or a zombie nobody has reaped yet: not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn servers_in_statics_die_with_the_test_process() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "leaves_an_etcd_behind", "--nocapture"])
        .env("GOIM_REAPER_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read to the end: the child writes its summary after the pid.
    let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    let pid: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("etcd pid ").map(|p| p.parse().unwrap()))
        .expect("the child printed its etcd's pid");
    assert!(child.wait().unwrap().success());
    wait_until("the etcd the child left is gone", || !alive(pid));
}
