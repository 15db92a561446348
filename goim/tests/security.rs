//! The push API behind keys (standalone, real sockets): pushes need a key when keys are
//! configured, the read-only routes only when asked, the ops routes never.

mod common;

use common::*;

/// The HS256 secret of [`jwt_config`].
const SECRET: &[u8] = b"a test secret of thirty-two bytes or more";

/// A standalone config with `auth = "jwt"` and [`SECRET`] in a key file (kept while the
/// returned directory lives).
fn jwt_config() -> (tempfile::TempDir, goim::config::Config) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hs256");
    std::fs::write(&file, SECRET).unwrap();
    let mut cfg = config();
    cfg.logic.auth = goim_config::AuthMode::Jwt;
    cfg.logic.jwt.hs256_secret_files = vec![file.display().to_string()];
    (dir, cfg)
}

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

/// `auth = "jwt"` over real sockets: a signed token connects as its `sub`, with its room; an
/// expired one, one signed with another key and goim's JSON token are closed without a reply.
#[tokio::test]
async fn signed_tokens_only_with_jwt_auth() {
    use goim_client::{Client, Transport};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let (_dir, cfg) = jwt_config();
    let secret = SECRET;
    let s = start_with(cfg).await;
    let now = jsonwebtoken::get_current_timestamp();
    let token = |key: &[u8], exp: u64| {
        encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "77", "key": "tab", "room": "live://3", "rooms": ["chat://8"], "accepts": [1000], "exp": exp}),
            &EncodingKey::from_secret(key),
        )
        .unwrap()
    };
    for transport in [Transport::Tcp, Transport::WebSocket] {
        let mut c = within(Client::connect(transport, addr(&s, transport), None))
            .await
            .unwrap();
        within(c.auth(token(secret, now + 60).as_bytes()))
            .await
            .expect("a valid token connects");
        push_ok(
            &s,
            "/goim/push/room?operation=1000&type=live&room=3",
            b"to 3",
        )
        .await;
        assert_eq!(recv(&mut c).await.body, b"to 3");
        // The token's other rooms are joined beside goim's.
        push_ok(
            &s,
            "/goim/push/room?operation=1000&type=chat&room=8",
            b"to 8",
        )
        .await;
        assert_eq!(recv(&mut c).await.body, b"to 8");
        push_ok(&s, "/goim/push/mids?operation=1000&mids=77", b"to 77").await;
        assert_eq!(recv(&mut c).await.body, b"to 77");
    }
    let goim_json = br#"{"mid":77,"key":"x","room_id":"","accepts":[1000]}"#.to_vec();
    for bad in [
        token(secret, now - 3600).into_bytes(),
        token(b"some other secret, also long enough!!", now + 60).into_bytes(),
        goim_json,
    ] {
        let mut c = within(Client::connect(Transport::Tcp, s.tcp, None))
            .await
            .unwrap();
        c.send(7, &bad).await.unwrap();
        assert_eq!(within(c.read_to_close()).await.unwrap(), 0);
    }
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_logic_auth_failures_total 3"),
        "{metrics}"
    );
    s.shutdown().await;
}

/// `[comet] ws_origins`: a browser from another origin gets 403 and no WebSocket; an allowed
/// origin and a client that sends none (not a browser) upgrade.
#[tokio::test]
async fn websocket_origins_are_checked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config();
    cfg.comet.ws_origins = vec!["https://app.example.com".into()];
    let s = start_with(cfg).await;
    let upgrade = |origin: Option<&str>| {
        let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        format!("GET /sub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n")
    };
    for (origin, status) in [
        (Some("https://evil.example"), "HTTP/1.1 403 "),
        (Some("https://app.example.com"), "HTTP/1.1 101 "),
        (None, "HTTP/1.1 101 "),
    ] {
        let mut sock = tokio::net::TcpStream::connect(s.ws).await.unwrap();
        sock.write_all(upgrade(origin).as_bytes()).await.unwrap();
        let mut head = vec![0u8; 13];
        within(sock.read_exact(&mut head)).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&head), status, "{origin:?}");
    }
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_comet_closed_total{reason=\"origin\"} 1"),
        "{metrics}"
    );
    s.shutdown().await;
}

/// `[comet] max_connections_per_ip`: one address holds at most so many connections; a slot
/// frees when its connection ends.
#[tokio::test]
async fn connections_per_address_are_capped() {
    use goim_client::{token, Client, Transport};
    let mut cfg = config();
    cfg.comet.max_connections_per_ip = 2;
    let s = start_with(cfg).await;
    let connect = |key: &'static str| async move {
        let mut c = Client::connect(Transport::Tcp, s.tcp, None).await.unwrap();
        let ok = c.auth(&token(1, key, "", &[])).await.is_ok();
        (c, ok)
    };
    let (first, ok1) = within(connect("one")).await;
    let (_second, ok2) = within(connect("two")).await;
    assert!(ok1 && ok2);
    let (_, ok3) = within(connect("three")).await;
    assert!(!ok3, "a third connection from one address was taken");
    drop(first);
    // The slot frees once the server has seen the first connection end.
    within(async {
        loop {
            if connect("four").await.1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_comet_closed_total{reason=\"ip_limit\"}"),
        "{metrics}"
    );
    s.shutdown().await;
}

/// `/goim/kick`: the connections of a user, or a key, are closed; a client that speaks the
/// extensions is told why first (op 29); others are not touched; the API needs its key.
#[tokio::test]
async fn kick_closes_connections_with_a_reason() {
    use goim_client::{token, Client, Transport};
    use goim_proto::op;
    let mut cfg = config();
    cfg.logic.api_keys = vec!["admin-key".into()];
    let s = start_with(cfg).await;
    let connect = |mid: i64, key: &'static str, hello: bool| async move {
        let mut c = Client::connect(Transport::WebSocket, s.ws, None)
            .await
            .unwrap();
        c.auth(&token(mid, key, "", &[1000])).await.unwrap();
        if hello {
            c.send(op::HELLO, br#"{"v":1}"#).await.unwrap();
            assert_eq!(c.recv().await.unwrap().op, op::HELLO_REPLY);
        }
        c
    };
    let mut ext = within(connect(5, "phone", true)).await;
    let mut plain = within(connect(5, "laptop", false)).await;
    let mut other = within(connect(6, "tablet", false)).await;
    let mut by_key = within(connect(7, "tv", false)).await;
    let key = ("X-Api-Key", "admin-key");
    let kick = |path: &'static str, key: Option<(&'static str, &'static str)>| async move {
        let extra = key.map_or(String::new(), |(h, v)| format!("{h}: {v}\r\n"));
        let (status, body) = http_with_headers(s.http, "POST", path, &extra, b"").await;
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        )
    };
    let (status, _) = kick("/goim/kick?mids=5", None).await;
    assert_eq!(status, 401, "a kick without the key");
    let (status, v) = kick("/goim/kick?mids=5&reason=maintenance", Some(key)).await;
    assert_eq!((status, v["code"].as_i64()), (200, Some(0)), "{v}");
    assert_eq!(v["data"]["keys_found"], 2);
    let notice = within(ext.recv()).await.unwrap();
    assert_eq!(notice.op, op::KICKED);
    let body: serde_json::Value = serde_json::from_slice(&notice.body).unwrap();
    assert_eq!(body["reason"], "maintenance");
    assert_eq!(within(ext.read_to_close()).await.unwrap(), 0);
    assert_eq!(within(plain.read_to_close()).await.unwrap(), 0);
    let (_, v) = kick("/goim/kick?keys=tv", Some(key)).await;
    assert_eq!(v["data"]["keys_found"], 1, "{v}");
    assert_eq!(within(by_key.read_to_close()).await.unwrap(), 0);
    // The user not named is still connected and served.
    assert!(within(other.heartbeat()).await.is_ok());
    let (_, v) = kick("/goim/kick", Some(key)).await;
    assert_eq!(v["code"], -400, "{v}");
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("goim_comet_closed_total{reason=\"admin_kick\"} 3"),
        "{metrics}"
    );
    s.shutdown().await;
}

/// A token that expires while connected (JWT `exp`): an extension client is told, may send a
/// new token for the same user and stays; one naming another user is refused; a client that
/// does not refresh is closed when the grace period ends, and counted.
#[tokio::test]
async fn expiring_tokens_are_refreshed_or_closed() {
    use goim_client::{Client, Transport};
    use goim_proto::op;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let (_dir, mut cfg) = jwt_config();
    let secret = SECRET;
    cfg.logic.jwt.leeway = std::time::Duration::ZERO;
    cfg.comet.token_grace = std::time::Duration::from_secs(1);
    let s = start_with(cfg).await;
    let now = jsonwebtoken::get_current_timestamp();
    let token = |mid: i64, key: &str, exp: u64| {
        encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": mid.to_string(), "key": key, "accepts": [1000], "exp": exp}),
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let exp = now + 2;
    let connect = |mid: i64, key: &'static str| {
        let t = token(mid, key, exp);
        let addr = s.tcp;
        async move {
            let mut c = within(Client::connect(Transport::Tcp, addr, None))
                .await
                .unwrap();
            within(c.auth(t.as_bytes())).await.unwrap();
            c.send(op::HELLO, br#"{"v":1}"#).await.unwrap();
            assert_eq!(recv(&mut c).await.op, op::HELLO_REPLY);
            c
        }
    };
    let mut keeper = connect(81, "keeper").await;
    let mut lapser = connect(82, "lapser").await;
    // One that refreshes before its token expires is never told.
    let mut early = connect(83, "early").await;
    early
        .send(op::REFRESH, token(83, "early", now + 3600).as_bytes())
        .await
        .unwrap();
    let r = recv(&mut early).await;
    assert_eq!(r.op, op::REFRESH_REPLY);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["expires"].as_u64(), Some(now + 3600), "{v}");

    // Told at expiry, with the expiry and the grace period.
    let told = recv(&mut keeper).await;
    assert_eq!(told.op, op::TOKEN_EXPIRING);
    let v: serde_json::Value = serde_json::from_slice(&told.body).unwrap();
    assert_eq!(
        (v["expires"].as_u64(), v["grace_ms"].as_u64()),
        (Some(exp), Some(1000))
    );
    // Another user's token is refused; the connection's own is taken.
    keeper
        .send(op::REFRESH, token(99, "keeper", now + 3600).as_bytes())
        .await
        .unwrap();
    let r = recv(&mut keeper).await;
    assert_eq!(r.op, op::REFRESH_REPLY);
    assert!(String::from_utf8_lossy(&r.body).contains("error"));
    keeper
        .send(op::REFRESH, token(81, "keeper", now + 3600).as_bytes())
        .await
        .unwrap();
    let r = recv(&mut keeper).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["expires"].as_u64(), Some(now + 3600), "{v}");

    // The one that did not refresh: told, then closed.
    assert_eq!(recv(&mut lapser).await.op, op::TOKEN_EXPIRING);
    within(lapser.read_to_close()).await.unwrap();
    // Past the same grace period, the refreshed one still gets pushes.
    push_ok(&s, "/goim/push/mids?operation=1000&mids=81", b"still here").await;
    assert_eq!(recv(&mut keeper).await.body, b"still here");
    push_ok(&s, "/goim/push/mids?operation=1000&mids=83", b"never told").await;
    let p = recv(&mut early).await;
    assert_eq!((p.op, &p.body[..]), (1000, &b"never told"[..]));
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains(r#"goim_comet_closed_total{reason="token_expired"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("goim_logic_refreshes_total 2"),
        "{metrics}"
    );
    s.shutdown().await;
}

/// The business takes part over HTTP (real sockets): clients admitted by the connect hook,
/// their messages forwarded with their identity and answered, refusals and overload told to
/// extension clients, lifecycle events delivered in batches with the disconnect's reason.
#[tokio::test]
async fn the_business_admits_answers_and_hears_of_connections() {
    use axum::routing::post;
    use goim_client::{Client, Transport};
    use goim_proto::op;
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let app = axum::Router::new()
        .route(
            "/connect",
            post(|body: axum::body::Bytes| async move {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                match v["token"].as_str() {
                    Some("alice") => (
                        axum::http::StatusCode::OK,
                        r#"{"mid":71,"key":"alice-phone","accepts":[1000]}"#.to_string(),
                    ),
                    _ => (axum::http::StatusCode::FORBIDDEN, String::new()),
                }
            }),
        )
        .route(
            "/messages",
            post(|body: axum::body::Bytes| async move {
                use base64::Engine;
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let text = base64::engine::general_purpose::STANDARD
                    .decode(v["body"].as_str().unwrap())
                    .unwrap();
                if text == b"forbidden" {
                    return (axum::http::StatusCode::FORBIDDEN, "not for you".to_string());
                }
                let reply = format!(
                    "{}/{}/{}/{}",
                    v["mid"],
                    v["key"].as_str().unwrap(),
                    v["op"],
                    String::from_utf8_lossy(&text)
                );
                (axum::http::StatusCode::OK, reply)
            }),
        )
        .route(
            "/events",
            post(move |body: axum::body::Bytes| {
                let tx = events_tx.clone();
                async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    for e in v["events"].as_array().unwrap() {
                        let _ = tx.send(e.clone());
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let biz = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let mut cfg = config();
    cfg.logic.auth = goim_config::AuthMode::Hook;
    cfg.logic.hook.url = format!("http://{biz}/connect");
    cfg.logic.forward.url = format!("http://{biz}/messages");
    cfg.logic.events.url = format!("http://{biz}/events");
    cfg.logic.events.linger = std::time::Duration::from_millis(10);
    cfg.comet.room_events = true;
    let s = start_with(cfg).await;

    // Refused by the hook: closed without a reply.
    let mut mallory = within(Client::connect(Transport::Tcp, s.tcp, None))
        .await
        .unwrap();
    mallory.send(op::AUTH, b"mallory").await.unwrap();
    assert_eq!(within(mallory.read_to_close()).await.unwrap(), 0);

    let mut alice = within(Client::connect(Transport::WebSocket, s.ws, None))
        .await
        .unwrap();
    within(alice.auth(b"alice"))
        .await
        .expect("the hook admits alice");
    push_ok(&s, "/goim/push/mids?operation=1000&mids=71", b"hi alice").await;
    assert_eq!(recv(&mut alice).await.body, b"hi alice");

    // A message of an app op: forwarded with the connection's identity, answered.
    let seq = alice.send(1500, b"ping").await.unwrap();
    let r = recv(&mut alice).await;
    assert_eq!((r.op, r.seq), (1500, seq));
    assert_eq!(r.body, b"71/alice-phone/1500/ping");
    // Refused: a goim client gets goim's empty echo; an extension client the error.
    alice.send(1500, b"forbidden").await.unwrap();
    assert!(recv(&mut alice).await.body.is_empty());
    alice.send(op::HELLO, br#"{"v":1}"#).await.unwrap();
    assert_eq!(recv(&mut alice).await.op, op::HELLO_REPLY);
    alice.send(1500, b"forbidden").await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&recv(&mut alice).await.body).unwrap();
    assert_eq!(
        (v["code"].as_i64(), v["error"].as_str()),
        (Some(403), Some("not for you"))
    );
    drop(alice);

    // Events: alice's connect, then her disconnect with its reason (mallory never connected).
    let connect = within(events_rx.recv()).await.unwrap();
    assert_eq!(
        (connect["type"].as_str(), connect["mid"].as_i64()),
        (Some("connect"), Some(71))
    );
    assert_eq!(connect["key"], "alice-phone");
    let gone = within(events_rx.recv()).await.unwrap();
    assert_eq!(
        (gone["type"].as_str(), gone["reason"].as_str()),
        (Some("disconnect"), Some("client_closed"))
    );

    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    for line in [
        r#"goim_logic_forwarded_total{outcome="replied"} 1"#,
        r#"goim_logic_forwarded_total{outcome="refused"} 2"#,
        "goim_logic_auth_failures_total 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    s.shutdown().await;
}

/// Behind a PROXY-protocol balancer (v1 and v2, plain and TLS): the address in the header is
/// the client's for the per-address limits; a connection without a header is closed.
/// Handshakes per address per second are capped.
#[tokio::test]
async fn proxy_protocol_and_handshake_rate() {
    use goim_client::token;
    use goim_testkit::pki::TestCa;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::new("proxy-test-ca");
    let dir = tempfile::tempdir().unwrap();
    ca.issue(dir.path(), "goim", &["DNS:goim.test"]);
    let mut cfg = config();
    cfg.comet.proxy_protocol = true;
    cfg.comet.max_connections_per_ip = 1;
    cfg.comet.tls_dir = dir.path().display().to_string();
    cfg.comet.wss = "127.0.0.1:0".into();
    cfg.comet.tcp_tls = "127.0.0.1:0".into();
    let s = start_with(cfg).await;
    let auth = |mid: i64| goim_client::encode(1, 7, 1, &token(mid, &format!("p{mid}"), "", &[]));
    // Sends `header` and AUTH on a plain socket; whether the auth reply came.
    let plain = |header: Vec<u8>, mid: i64| {
        let addr = s.tcp;
        async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut out = header;
            out.extend(auth(mid));
            c.write_all(&out).await.unwrap();
            let mut reply = [0u8; 16];
            let ok = within(c.read_exact(&mut reply)).await.is_ok();
            (ok, c)
        }
    };
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 10.0.0.1 5555 3101\r\n").into_bytes();
    let (ok, _a) = plain(v1("203.0.113.1"), 1).await;
    assert!(ok, "v1 header then auth");
    // Same TCP peer (127.0.0.1), another client address: its own slot.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend([
        0x21, 0x11, 0, 12, 203, 0, 113, 2, 10, 0, 0, 1, 0x15, 0xb3, 0x0c, 0x1d,
    ]);
    let (ok, _b) = plain(v2, 2).await;
    assert!(ok, "v2 header then auth");
    // The first client's address again: over its one connection.
    let (ok, _c) = plain(v1("203.0.113.1"), 3).await;
    assert!(
        !ok,
        "a second connection from 203.0.113.1 is over the limit"
    );
    // No header at all.
    let (ok, _d) = plain(Vec::new(), 4).await;
    assert!(!ok);

    // TLS behind the balancer: the header, then the TLS session on the same socket.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        for c in tokio_rustls::rustls::pki_types::CertificateDer::pem_file_iter(ca.cert()).unwrap()
        {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let client = std::sync::Arc::new(
        tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let mut tcp = tokio::net::TcpStream::connect(s.tcp_tls.unwrap())
        .await
        .unwrap();
    tcp.write_all(&v1("203.0.113.5")).await.unwrap();
    let mut tls = within(tokio_rustls::TlsConnector::from(client).connect(
        tokio_rustls::rustls::pki_types::ServerName::try_from("goim.test").unwrap(),
        tcp,
    ))
    .await
    .expect("TLS after the PROXY header");
    tls.write_all(&auth(5)).await.unwrap();
    let mut reply = [0u8; 16];
    within(tls.read_exact(&mut reply)).await.unwrap();
    assert_eq!(&reply[8..12], &8i32.to_be_bytes(), "auth reply over TLS");

    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    for line in [
        r#"goim_comet_closed_total{reason="ip_limit"} 1"#,
        r#"goim_comet_closed_total{reason="proxy_header"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    s.shutdown().await;

    // One new connection a second per address, one at once: twenty in a row cannot all pass.
    let mut cfg = config();
    cfg.comet.handshakes_per_ip_per_sec = 1;
    cfg.comet.handshakes_per_ip_burst = 1;
    let s = start_with(cfg).await;
    let mut refused = 0;
    for i in 0..20 {
        let mut c = tokio::net::TcpStream::connect(s.tcp).await.unwrap();
        c.write_all(&auth(100 + i)).await.unwrap();
        let mut reply = [0u8; 16];
        if within(c.read_exact(&mut reply)).await.is_err() {
            refused += 1;
        }
    }
    assert!(refused >= 1, "no handshake was refused");
    let (_, metrics) = http(s.http, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains(&format!(
            r#"goim_comet_closed_total{{reason="handshake_rate"}} {refused}"#
        )),
        "{metrics}"
    );
    s.shutdown().await;
}

/// "Is this user online, on which devices": every connection's key and comet.
#[tokio::test]
async fn a_users_devices() {
    let s = start().await;
    let _phone = raw_client(&s, goim_client::Transport::Tcp, 91, "phone").await;
    let _laptop = raw_client(&s, goim_client::Transport::WebSocket, 91, "laptop").await;
    let _other = raw_client(&s, goim_client::Transport::Tcp, 92, "other").await;
    let v = api(&s, "GET", "/goim/online/user?mid=91", b"").await;
    assert_eq!(v["data"]["online"], true, "{v}");
    assert_eq!(
        v["data"]["devices"],
        serde_json::json!([
            {"key": "laptop", "server": "comet-test"},
            {"key": "phone", "server": "comet-test"}
        ])
    );
    let v = api(&s, "GET", "/goim/online/user?mid=93", b"").await;
    assert_eq!(
        (
            v["data"]["online"].as_bool(),
            v["data"]["devices"].as_array().map(Vec::len)
        ),
        (Some(false), Some(0))
    );
    let (_, body) = http(s.http, "GET", "/goim/online/user?mid=x", b"").await;
    assert!(body.contains("-400"), "{body}");
    s.shutdown().await;
}

/// Several rooms per connection over real sockets: pushes to goim's room and to each room
/// joined beside it arrive; after a leave, that room's pushes stop; the limit holds.
#[tokio::test]
async fn a_connection_in_several_rooms() {
    use goim_client::{token, Client, Transport};
    use goim_proto::op;
    let mut cfg = config();
    cfg.comet.max_extra_rooms = 2;
    let s = start_with(cfg).await;
    let mut c = within(Client::connect(Transport::WebSocket, s.ws, None))
        .await
        .unwrap();
    within(c.auth(&token(95, "rooms", "live://1", &[])))
        .await
        .unwrap();
    c.send(op::HELLO, br#"{"v":1}"#).await.unwrap();
    assert_eq!(recv(&mut c).await.op, op::HELLO_REPLY);
    for room in ["chat://2", "chat://3", "chat://4"] {
        c.send(op::ROOM_JOIN, format!(r#"{{"room":"{room}"}}"#).as_bytes())
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = recv(&mut c).await;
        assert_eq!(p.op, op::ROOM_JOIN_REPLY);
        got.push(serde_json::from_slice::<serde_json::Value>(&p.body).unwrap());
    }
    assert_eq!(got[0]["joined"], true);
    assert_eq!(got[1]["joined"], true);
    assert_eq!(got[2]["error"], "too many rooms", "{}", got[2]);
    for (t, r) in [("live", "1"), ("chat", "2"), ("chat", "3")] {
        push_ok(
            &s,
            &format!("/goim/push/room?operation=1000&type={t}&room={r}"),
            format!("{t}{r}").as_bytes(),
        )
        .await;
        assert_eq!(recv(&mut c).await.body, format!("{t}{r}").as_bytes());
    }
    c.send(op::ROOM_LEAVE, br#"{"room":"chat://2"}"#)
        .await
        .unwrap();
    let left = recv(&mut c).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&left.body).unwrap()["left"],
        true
    );
    push_ok(
        &s,
        "/goim/push/room?operation=1000&type=chat&room=2",
        b"gone",
    )
    .await;
    push_ok(
        &s,
        "/goim/push/room?operation=1000&type=chat&room=3",
        b"still",
    )
    .await;
    assert_eq!(recv(&mut c).await.body, b"still");
    s.shutdown().await;
}
