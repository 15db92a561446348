//! logic's HTTP API, driven in-process over a standalone-like Logic (in-memory presence, a job
//! that takes everything, no comets).
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, Uri};
use axum::Router;
use goim_logic::auth::JsonTokenAuth;
use goim_logic::nodes::{CometInstance, NodeSource};
use goim_logic::online::{MemoryOnline, OnlineStore, Origin};
use goim_logic::{Logic, LogicConfig, LogicMetrics};
use goim_proto::job::PushReply;
use goim_proto::logic::PushMsg;
use goim_proto::packet::MAX_BODY;
use goim_proto::service::JobService;
use libfuzzer_sys::fuzz_target;
use prometheus_client::registry::Registry;
use serde::de::IgnoredAny;
use serde::Deserialize;
use tokio::runtime::Runtime;
use tonic::Status;
use tower::ServiceExt;

/// Takes every push; logic must never hand job a message over its configured limit.
struct AcceptAll;

#[async_trait]
impl JobService for AcceptAll {
    async fn push(&self, msg: PushMsg) -> Result<PushReply, Status> {
        assert!(msg.msg.len() <= MAX_BODY, "job got {} bytes", msg.msg.len());
        Ok(PushReply {})
    }
}

struct NoComets;

impl NodeSource for NoComets {
    fn instances(&self) -> Vec<CometInstance> {
        Vec::new()
    }
}

/// goim's JSON API: always 200 with `{"code","message"}`.
const API: &[(&str, Method)] = &[
    ("/goim/push/keys", Method::POST),
    ("/goim/push/mids", Method::POST),
    ("/goim/push/room", Method::POST),
    ("/goim/push/all", Method::POST),
    ("/goim/online/top", Method::GET),
    ("/goim/online/room", Method::GET),
    ("/goim/online/total", Method::GET),
    ("/goim/nodes/weighted", Method::GET),
    ("/goim/nodes/instances", Method::GET),
];

/// The reply's envelope; `data` must be well-formed JSON of any shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    code: i64,
    #[allow(dead_code)]
    message: String,
    #[serde(default)]
    #[allow(dead_code)]
    data: Option<IgnoredAny>,
}

/// The input reads like a request: `METHOD TARGET\nBODY`.
fn parse(data: &[u8]) -> Option<(Method, Uri, Vec<u8>)> {
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let sp = line.iter().position(|&b| b == b' ')?;
    let method = Method::from_bytes(&line[..sp]).ok()?;
    // Percent-encode what a URI cannot hold, so most inputs still become a request.
    let mut target = String::new();
    for &b in &line[sp + 1..] {
        if b.is_ascii_alphanumeric() || b"!$%&'()*+,-./:;=?@_~".contains(&b) {
            target.push(char::from(b));
        } else {
            target.push_str(&format!("%{b:02X}"));
        }
    }
    if !target.starts_with('/') {
        target.insert(0, '/');
    }
    let uri = target.parse().ok()?;
    Some((method, uri, body.to_vec()))
}

fn setup() -> (Runtime, Router) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let online = Arc::new(MemoryOnline::default());
    rt.block_on(async {
        // Some presence, so pushes and counts find something.
        let conns = [
            ("comet-1", 1, "k1"),
            ("comet-2", 2, "k2"),
            ("comet-1", 0, "k3"),
        ];
        for (server, mid, key) in conns {
            let from = Origin::new(server, 0);
            online.add(from, mid, key, "live://1000").await.unwrap();
        }
        let counts = HashMap::from([("live://1000".into(), 2), ("live://1".into(), 1)]);
        let from = Origin::new("comet-1", 0);
        online.renew_rooms(from, counts).await.unwrap();
    });
    let metrics = Arc::new(LogicMetrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let logic = Arc::new(Logic::new(
        LogicConfig::default(),
        Arc::new(JsonTokenAuth),
        online,
        Arc::new(AcceptAll),
        Arc::new(NoComets),
        metrics,
    ));
    // No keys: the routes behind them are what is fuzzed.
    let keys = goim_logic::ApiKeys::default();
    let router = goim_logic::http::router(logic, Arc::new(registry), Arc::new(|| true), keys);
    (rt, router)
}

fuzz_target!(|data: &[u8]| {
    static APP: OnceLock<(Runtime, Router)> = OnceLock::new();
    let (rt, router) = APP.get_or_init(setup);
    let Some((method, uri, body)) = parse(data) else {
        return;
    };
    let api = API.iter().any(|(p, m)| *p == uri.path() && *m == method);
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::from(body))
        .expect("request");

    rt.block_on(async {
        let resp = match router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("response body");
        if !api {
            assert!(!status.is_server_error(), "{status}");
            return;
        }
        assert_eq!(status, StatusCode::OK);
        // Not `serde_json::Value`: with serde_json's `raw_value` feature (enabled by a dependency)
        // a Value refuses valid JSON whose object has the key `$serde_json::private::RawValue`,
        // and a room count reply is keyed by the caller's room ids.
        let reply: Reply = serde_json::from_slice(&body).expect("API reply is JSON");
        // Presence and job here never fail, so only the request can be wrong.
        assert!(
            reply.code == 0 || reply.code == -400,
            "code {}: {}",
            reply.code,
            String::from_utf8_lossy(&body)
        );
    });
});
