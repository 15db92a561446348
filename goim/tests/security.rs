//! The push API behind keys (standalone, real sockets): pushes need a key when keys are
//! configured, the read-only routes only when asked, the ops routes never.

mod common;

use common::*;

async fn status_and_code(
    s: &goim::standalone::Standalone,
    path: &str,
    key: Option<(&str, &str)>,
) -> (u16, serde_json::Value) {
    let (method, body) = if path.starts_with("/goim/push") {
        ("POST", &b"hi"[..])
    } else {
        ("GET", &b""[..])
    };
    let extra = key.map_or(String::new(), |(h, v)| format!("{h}: {v}\r\n"));
    let (status, text) = http_with_headers(s.http, method, path, &extra, body).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn pushes_need_a_key_when_keys_are_configured() {
    let mut cfg = config();
    cfg.logic.api_keys = vec!["s3cret".into()];
    let s = start_with(cfg).await;
    let push = "/goim/push/all?operation=1000";
    let (status, v) = status_and_code(&s, push, None).await;
    assert_eq!((status, v["code"].as_i64()), (401, Some(-401)), "{v}");
    let (status, _) = status_and_code(&s, push, Some(("X-Api-Key", "wrong"))).await;
    assert_eq!(status, 401);
    for key in [("X-Api-Key", "s3cret"), ("Authorization", "Bearer s3cret")] {
        let (status, v) = status_and_code(&s, push, Some(key)).await;
        assert_eq!((status, v["code"].as_i64()), (200, Some(0)), "{key:?}: {v}");
    }
    // Reads stay open (goim's clients fetch nodes with no key), and so do the ops routes.
    let (status, v) = status_and_code(&s, "/goim/online/total", None).await;
    assert_eq!((status, v["code"].as_i64()), (200, Some(0)));
    let (status, _) = http(s.http, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn reads_need_a_key_when_asked() {
    let mut cfg = config();
    cfg.logic.api_keys = vec!["s3cret".into()];
    cfg.logic.protect_reads = true;
    let s = start_with(cfg).await;
    let (status, _) = status_and_code(&s, "/goim/nodes/weighted", None).await;
    assert_eq!(status, 401);
    let key = Some(("X-Api-Key", "s3cret"));
    let (status, _) = status_and_code(&s, "/goim/nodes/weighted", key).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn no_keys_leave_the_api_open() {
    let s = start().await;
    let (status, v) = status_and_code(&s, "/goim/push/all?operation=1000", None).await;
    assert_eq!((status, v["code"].as_i64()), (200, Some(0)));
}
