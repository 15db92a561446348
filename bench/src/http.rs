//! A minimal keep-alive HTTP/1.1 client for pushing through logic's API, so the load
//! generator's own overhead per push stays small.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct Http {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Http { addr, conn: None }
    }

    /// POSTs and returns the response body; goim's envelope must say code 0.
    pub async fn push(&mut self, path: &str, body: &[u8]) -> anyhow::Result<()> {
        let text = match self.post(path, body).await {
            Ok(t) => t,
            Err(_) => {
                // The server may have closed an idle keep-alive connection: one retry.
                self.conn = None;
                self.post(path, body).await?
            }
        };
        if !text.contains("\"code\":0") {
            bail!("push {path} failed: {text}");
        }
        Ok(())
    }

    /// Any request; the response body, whatever the status (one retry on a closed
    /// keep-alive connection).
    pub async fn call(&mut self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<String> {
        match self.request(method, path, body).await {
            Ok(t) => Ok(t),
            Err(_) => {
                self.conn = None;
                self.request(method, path, body).await
            }
        }
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> anyhow::Result<String> {
        self.request("POST", path, body).await
    }

    async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().context("no connection")?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        conn.get_mut().write_all(&req).await?;
        let mut len = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if conn.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        let mut buf = vec![0u8; len];
        conn.read_exact(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}
