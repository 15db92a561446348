//! The raw fan-out baseline: the simplest program that does comet's job for a room push.
//! It answers auth, keeps every socket, and pushes one pre-encoded packet to all of them at a
//! fixed rate with one write per socket, sharded over the runtime's threads. No buckets, no
//! queues, no logic: the machine's practical limit for this delivery.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpListener;

use crate::{now_ns, OP};

fn packet(op: i32, seq: i32, body: &[u8]) -> Vec<u8> {
    goim_client::encode(1, op, seq, body)
}

/// Serves until the process ends. `rate`: pushes per second to every connection.
pub async fn serve(listener: TcpListener, rate: u64, shards: usize) -> anyhow::Result<()> {
    let shards: Vec<Arc<Mutex<Vec<OwnedWriteHalf>>>> = (0..shards.max(1))
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    for (i, shard) in shards.iter().enumerate() {
        let shard = shard.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
            loop {
                tick.tick().await;
                let body = now_ns().to_string();
                let pkt = bytes::Bytes::from(packet(OP, 0, body.as_bytes()));
                let mut socks =
                    std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
                let mut alive = Vec::with_capacity(socks.len());
                for mut s in socks.drain(..) {
                    if s.write_all(&pkt).await.is_ok() {
                        alive.push(s);
                    }
                }
                shard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(alive);
                let _ = i;
            }
        });
    }
    let mut next = 0;
    loop {
        let (s, _): (tokio::net::TcpStream, SocketAddr) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        let shard = shards[next % shards.len()].clone();
        next += 1;
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let mut head = [0u8; 16];
            if r.read_exact(&mut head).await.is_err() {
                return;
            }
            let len =
                i32::from_be_bytes([head[0], head[1], head[2], head[3]]).clamp(16, 4112) as usize;
            let mut body = vec![0u8; len - 16];
            if r.read_exact(&mut body).await.is_err() {
                return;
            }
            let seq = i32::from_be_bytes([head[12], head[13], head[14], head[15]]);
            if w.write_all(&packet(8, seq, &[])).await.is_err() {
                return;
            }
            shard.lock().unwrap_or_else(|e| e.into_inner()).push(w);
            // Keep reading (and discarding) so the client's heartbeats do not pile up.
            let mut sink = [0u8; 256];
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        });
    }
}
