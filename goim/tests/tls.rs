//! TLS on every listener users meet (standalone, real sockets): WSS and goim's TCP protocol
//! over TLS, and the HTTPS API, with rustls clients and with openssl's s_client; clients that
//! do not speak TLS, or trust another CA, get nowhere.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use common::*;
use goim_client::{token, Client, Transport};
use goim_testkit::pki::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};

const NAME: &str = "goim.test";

/// A client trusting only `ca`.
fn trusting(ca: &Path) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One HTTPS request; status and body.
async fn https(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
    method: &str,
    path: &str,
) -> (u16, String) {
    within(async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut s = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(ServerName::try_from(NAME).unwrap(), tcp)
            .await
            .expect("HTTPS handshake");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        // A peer that closes without close_notify is fine once the reply is whole.
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text[9..12].parse().unwrap();
        (status, text.split_once("\r\n\r\n").unwrap().1.to_string())
    })
    .await
}

struct Secured {
    s: goim::standalone::Standalone,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

async fn start_secured() -> Secured {
    let ca = TestCa::new("goim-test-ca");
    let dir = tempfile::tempdir().unwrap();
    ca.issue(dir.path(), "goim", &["DNS:goim.test", "IP:127.0.0.1"]);
    let mut cfg = config();
    let d = dir.path().display().to_string();
    cfg.comet.tls_dir = d.clone();
    cfg.comet.wss = "127.0.0.1:0".into();
    cfg.comet.tcp_tls = "127.0.0.1:0".into();
    cfg.logic.http_tls_dir = d;
    Secured {
        s: start_with(cfg).await,
        ca,
        _dir: dir,
    }
}

#[tokio::test]
async fn clients_connect_and_receive_over_tls() {
    let Secured { s, ca, _dir } = start_secured().await;
    let tls = trusting(&ca.cert());
    let (wss, tcp_tls) = (s.wss.unwrap(), s.tcp_tls.unwrap());
    let mut clients = Vec::new();
    for (i, (transport, addr)) in [(Transport::Tcp, tcp_tls), (Transport::WebSocket, wss)]
        .into_iter()
        .enumerate()
    {
        let mid = 40 + i as i64;
        let mut c = within(Client::connect_tls(transport, addr, tls.clone(), NAME))
            .await
            .unwrap();
        within(c.auth(&token(mid, &format!("k{i}"), "live://9", &[1000])))
            .await
            .expect("auth over TLS");
        let (status, body) = https(
            s.http,
            &tls,
            "POST",
            &format!("/goim/push/mids?operation=1000&mids={mid}"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(recv(&mut c).await.body, b"hi");
        // A heartbeat and its reply, both ways through the session.
        within(c.heartbeat()).await.unwrap();
        clients.push(c);
    }
    // Room pushes reach both.
    let (status, _) = https(
        s.http,
        &tls,
        "POST",
        "/goim/push/room?operation=1000&type=live&room=9",
    )
    .await;
    assert_eq!(status, 200);
    for c in &mut clients {
        assert_eq!(recv(c).await.body, b"hi");
    }

    // A client speaking plain TCP to a TLS port is closed and counted.
    let mut plain = within(Client::connect_plain(Transport::Tcp, tcp_tls))
        .await
        .unwrap();
    plain.send(7, &token(50, "p", "", &[])).await.unwrap();
    within(plain.read_to_close()).await.unwrap();
    // So is plain HTTP to the HTTPS API.
    let mut raw = TcpStream::connect(s.http).await.unwrap();
    raw.write_all(b"GET /goim/online/total HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = within(raw.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));

    // A client trusting another CA refuses the server.
    let other = TestCa::new("another-ca");
    let e = within(Client::connect_tls(
        Transport::WebSocket,
        wss,
        trusting(&other.cert()),
        NAME,
    ))
    .await
    .err()
    .expect("a server of another CA is refused");
    assert!(e.to_string().contains("certificate"), "{e}");

    let (status, metrics) = https(s.http, &tls, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"goim_comet_closed_total{reason="tls_error"}"#),
        "{metrics}"
    );
    s.shutdown().await;
}

/// `openssl s_client` against each TLS port: the chain verifies, and the server answers
/// what goes through the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_talks_to_every_tls_port() {
    let Secured { s, ca, _dir } = start_secured().await;
    let ca_file = ca.cert();
    // With `ign_eof`, s_client reads until the server closes; without, it ends once its
    // input is sent.
    let s_client = |addr: SocketAddr, input: Vec<u8>, ign_eof: bool| {
        let ca_file = ca_file.clone();
        async move {
            let mut child = tokio::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-servername",
                    NAME,
                ])
                .arg("-CAfile")
                .arg(&ca_file)
                .arg("-verify_return_error")
                .args(ign_eof.then_some("-ign_eof"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("openssl on PATH");
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(&input).await.unwrap();
            drop(stdin);
            let out = within(child.wait_with_output()).await.unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    };
    // HTTPS: a request, answered, then closed by the server.
    let out = s_client(
        s.http,
        format!("GET /goim/online/total HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n")
            .into_bytes(),
        true,
    )
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("HTTP/1.1 200 OK"), "{out}");

    // WSS: the upgrade, answered 101, then a close frame the server answers and closes on.
    let mut ws = format!(
        "GET /sub HTTP/1.1\r\nHost: {NAME}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    ws.extend_from_slice(&[0x88, 0x80, 1, 2, 3, 4]);
    let out = s_client(s.wss.unwrap(), ws, true).await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("HTTP/1.1 101 Switching Protocols"), "{out}");

    // TCP over TLS: the handshake (the protocol through it is the rustls test's).
    let out = s_client(s.tcp_tls.unwrap(), Vec::new(), false).await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    s.shutdown().await;
}
