//! The command line against a running server, as a shell user runs it: `goim watch` prints
//! what `goim push` sends, `goim online` and `goim nodes` print JSON, and a refused call
//! exits non-zero with the API's reason.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;

fn goim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_goim"));
    c.env_remove("GOIM_API").env_remove("GOIM_API_KEY");
    c
}

/// Runs `goim args...` with `stdin`; returns (success, stdout, stderr).
fn run(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut cmd = goim();
    cmd.args(args);
    goim_testkit::run_with_stdin(cmd, stdin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_watch_online_and_nodes() {
    let server = common::start().await;
    let api = format!("http://{}", server.http);
    let ws = server.ws.to_string();
    // A watcher that stops after three messages.
    let mut watch = goim()
        .args([
            "watch", &ws, "--mid", "77", "--room", "live://5", "--count", "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says on stderr when it is connected (and so registered for pushes).
    let mut err = BufReader::new(watch.stderr.take().unwrap());
    let mut line = String::new();
    tokio::task::block_in_place(|| err.read_line(&mut line)).unwrap();
    assert!(line.contains("connected"), "{line}");

    let api_args = ["--api", api.as_str()];
    let push = |target: &[&str], stdin: &str| {
        let mut args = vec!["push"];
        args.extend(api_args);
        args.extend(target);
        tokio::task::block_in_place(|| run(&args, stdin))
    };
    let (ok, _, e) = push(&["mids", "77"], "from stdin");
    assert!(ok, "{e}");
    let (ok, _, e) = push(&["room", "live://5", "-m", "to the room"], "");
    assert!(ok, "{e}");
    let (ok, _, e) = push(&["all", "--message", "to everyone"], "");
    assert!(ok, "{e}");
    let out = tokio::task::block_in_place(|| watch.wait_with_output()).unwrap();
    assert!(out.status.success());
    let got: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bodies: Vec<&str> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(bodies.len(), 3, "{got:?}");
    for b in ["from stdin", "to the room", "to everyone"] {
        assert!(bodies.contains(&b), "{b:?} not in {bodies:?}");
    }
    assert!(got.iter().all(|v| v["op"] == 1000));

    let (ok, out, e) = tokio::task::block_in_place(|| run(&["online", "--api", &api, "total"], ""));
    assert!(ok, "{e}");
    let total: Value = serde_json::from_str(&out).unwrap();
    assert!(total["conn_count"].is_number());
    let (ok, out, e) = tokio::task::block_in_place(|| run(&["nodes", "--api", &api], ""));
    assert!(ok, "{e}");
    let nodes: Value = serde_json::from_str(&out).unwrap();
    assert!(nodes["heartbeat"].is_number());

    // goim kick: a user with no connection is found nowhere; naming nobody is a usage error.
    let (ok, out, e) = tokio::task::block_in_place(|| {
        run(
            &["kick", "--api", &api, "--mid", "404", "--reason", "test"],
            "",
        )
    });
    assert!(ok, "{e}");
    let kicked: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(kicked["keys_found"], 0);
    let (ok, _, e) = tokio::task::block_in_place(|| run(&["kick", "--api", &api], ""));
    assert!(!ok && e.contains("--key"), "{e}");

    // Usage errors and refusals: non-zero, with the reason on stderr.
    let (ok, _, e) = push(&["room", "no-type", "-m", "x"], "");
    assert!(!ok && e.contains("TYPE://ID"), "{e}");
    let (ok, _, e) = push(&["room", "live://5", "-m", &"x".repeat(5000)], "");
    assert!(!ok && e.contains("code -400"), "{e}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_api_needs_the_key() {
    let mut cfg = common::config();
    cfg.logic.api_keys = vec!["s3cret-key".into()];
    let server = common::start_with(cfg).await;
    let api = format!("http://{}", server.http);
    let (ok, _, e) =
        tokio::task::block_in_place(|| run(&["push", "--api", &api, "all", "-m", "x"], ""));
    assert!(!ok, "pushed without a key");
    assert!(e.contains("API key") && e.contains("-401"), "{e}");
    assert!(!e.contains("s3cret"), "the key leaked: {e}");
    let (ok, _, e) = tokio::task::block_in_place(|| {
        let mut c = goim();
        c.env("GOIM_API_KEY", "s3cret-key");
        let out = c
            .args(["push", "--api", &api, "all", "-m", "x"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::new(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    });
    assert!(ok, "{e}");
    server.shutdown().await;
}
