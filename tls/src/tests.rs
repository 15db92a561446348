use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use goim_testkit::pki::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower_service::Service;

use super::*;

/// Files looked at on every new connection.
const ALWAYS: Duration = Duration::from_nanos(1);

fn mtls() -> ServerOptions {
    ServerOptions {
        client_auth: true,
        alpn: vec![b"h2".to_vec()],
        reload: ALWAYS,
    }
}

/// Serves one connection: handshake, then echoes one line. The handshake's result is
/// returned.
async fn serve_once(tls: Arc<ServerTls>) -> (String, tokio::task::JoinHandle<io::Result<()>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = l.accept().await?;
        let mut s = accept(&tls, tcp, Duration::from_secs(5)).await?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await?;
        s.write_all(&buf).await?;
        s.flush().await?;
        Ok(())
    });
    (format!("http://{addr}"), task)
}

use std::io;

/// Dials `uri` and echoes "hello"; the peer certificate's DER on success.
async fn dial(c: &mut Connector, uri: &str) -> io::Result<Vec<u8>> {
    let io = c.call(uri.parse().unwrap()).await?;
    let mut s = io.into_inner();
    s.write_all(b"hello").await?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"hello");
    let peer = s.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok(peer)
}

fn leaf(ca: &TestCa, dir: &Path, cn: &str) {
    ca.issue(dir, cn, &["DNS:goim.test", "IP:127.0.0.1"]);
}

#[tokio::test]
async fn mutual_tls_accepts_the_cluster_ca_only() {
    let (ca, other) = (TestCa::new("cluster"), TestCa::new("other"));
    let dirs = tempfile::tempdir().unwrap();
    let (srv, cli, stranger) = (
        dirs.path().join("server"),
        dirs.path().join("client"),
        dirs.path().join("stranger"),
    );
    leaf(&ca, &srv, "server");
    leaf(&ca, &cli, "client");
    leaf(&other, &stranger, "stranger");
    let server_tls = server(&srv, mtls()).unwrap();

    // A client of the same CA, name not checked: served.
    let (uri, task) = serve_once(server_tls.clone()).await;
    let mut c = Connector::new(client(&cli, "", ALWAYS).unwrap(), "");
    dial(&mut c, &uri).await.unwrap();
    task.await.unwrap().unwrap();

    // A client whose certificate another CA signed: refused by the server.
    let (uri, task) = serve_once(server_tls.clone()).await;
    // It trusts the cluster CA for the server, but presents the stranger's certificate.
    std::fs::copy(ca.cert(), stranger.join(CA)).unwrap();
    let mut s = Connector::new(client(&stranger, "", ALWAYS).unwrap(), "");
    let r = dial(&mut s, &uri).await;
    let served = task.await.unwrap();
    assert!(
        r.is_err() || served.is_err(),
        "a foreign client certificate was served"
    );
    assert!(served.is_err());

    // A client without a certificate: refused.
    let (uri, task) = serve_once(server_tls.clone()).await;
    let bare = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&cli).unwrap())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(uri.trim_start_matches("http://"))
        .await
        .unwrap();
    let r = tokio_rustls::TlsConnector::from(Arc::new(bare))
        .connect(ServerName::try_from("goim.test").unwrap(), tcp)
        .await;
    if let Ok(mut s) = r {
        // TLS 1.3: the refusal arrives after the client's handshake ends.
        let _ = s.write_all(b"hello").await;
        let mut buf = [0u8; 5];
        assert!(s.read_exact(&mut buf).await.is_err());
    }
    assert!(task.await.unwrap().is_err());

    // A server whose certificate another CA signed: refused by the client.
    let (uri, task) = serve_once(server(&stranger, ServerOptions::default()).unwrap()).await;
    assert!(dial(&mut c, &uri).await.is_err());
    assert!(task.await.unwrap().is_err());
}

use rustls_pki_types::ServerName;

#[tokio::test]
async fn the_server_name_is_checked_when_configured() {
    let ca = TestCa::new("cluster");
    let dirs = tempfile::tempdir().unwrap();
    let (srv, cli) = (dirs.path().join("server"), dirs.path().join("client"));
    leaf(&ca, &srv, "server");
    leaf(&ca, &cli, "client");
    let server_tls = server(&srv, mtls()).unwrap();

    let (uri, task) = serve_once(server_tls.clone()).await;
    let mut named = Connector::new(client(&cli, "goim.test", ALWAYS).unwrap(), "goim.test");
    dial(&mut named, &uri).await.unwrap();
    task.await.unwrap().unwrap();

    let (uri, task) = serve_once(server_tls.clone()).await;
    let mut wrong = Connector::new(client(&cli, "other.test", ALWAYS).unwrap(), "other.test");
    let e = dial(&mut wrong, &uri).await.unwrap_err();
    assert!(e.to_string().contains("not valid for name"), "{e}");
    let _ = task.await;
}

#[tokio::test]
async fn renewed_certificates_apply_to_new_connections() {
    let ca = TestCa::new("cluster");
    let dirs = tempfile::tempdir().unwrap();
    let (srv, cli) = (dirs.path().join("server"), dirs.path().join("client"));
    leaf(&ca, &srv, "first");
    leaf(&ca, &cli, "client");
    let server_tls = server(&srv, mtls()).unwrap();
    let mut c = Connector::new(client(&cli, "", ALWAYS).unwrap(), "");

    let (uri, task) = serve_once(server_tls.clone()).await;
    let first = dial(&mut c, &uri).await.unwrap();
    task.await.unwrap().unwrap();

    // Renewed (a longer name, so the size differs even within one mtime tick).
    leaf(&ca, &srv, "second-and-longer");
    let (uri, task) = serve_once(server_tls.clone()).await;
    let second = dial(&mut c, &uri).await.unwrap();
    task.await.unwrap().unwrap();
    assert_ne!(first, second, "the old certificate is still served");

    // A broken renewal keeps the last good one.
    let before = server_tls.config();
    std::fs::write(
        srv.join(CERT),
        "not a certificate, and longer than before it was",
    )
    .unwrap();
    assert!(Arc::ptr_eq(&before, &server_tls.config()));
    let (uri, task) = serve_once(server_tls.clone()).await;
    assert_eq!(dial(&mut c, &uri).await.unwrap(), second);
    task.await.unwrap().unwrap();
}

#[test]
fn unusable_files_are_errors_that_name_the_file() {
    let dirs = tempfile::tempdir().unwrap();
    let e = server(dirs.path(), ServerOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tls.crt"), "{e}");

    let ca = TestCa::new("cluster");
    let d = dirs.path().join("leaf");
    leaf(&ca, &d, "leaf");
    std::fs::write(
        d.join(KEY),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = server(&d, ServerOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tls.key") || e.contains("TLS configuration"),
        "{e}"
    );
    assert!(!e.contains("AAAA"), "{e}");

    leaf(&ca, &d, "leaf");
    std::fs::write(d.join(CA), "").unwrap();
    let e = server(&d, mtls()).err().unwrap().to_string();
    assert!(e.contains("ca.crt"), "{e}");
    // Without client auth the CA is not needed.
    server(&d, ServerOptions::default()).unwrap();
}
