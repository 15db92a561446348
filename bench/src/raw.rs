//! The raw fan-out baseline: the simplest program that does comet's job for a room push.
//! It answers auth, keeps every socket, and pushes one pre-encoded packet to all of them at a
//! fixed rate with one send per socket, sharded over writers. No buckets, no queues, no
//! logic: the machine's practical limit for this delivery, per transport (goim's TCP
//! protocol or WebSocket frames) and per way of writing (one `write` per socket from epoll, or
//! many sends per `io_uring_enter`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::{now_ns, OP};

/// What the baseline speaks to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawTransport {
    /// goim's binary packets on TCP.
    Tcp,
    /// The same packets, one per binary WebSocket frame (as comet sends them).
    Ws,
}

/// How the baseline writes a push to its sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawWriter {
    /// One non-blocking write per socket from Tokio's epoll reactor.
    Epoll,
    /// Sends queued on an io_uring, [`RING_ENTRIES`] per submission.
    IoUring,
}

#[derive(Debug, Clone, Copy)]
pub struct RawConfig {
    /// Pushes per second to every connection.
    pub rate: u64,
    /// Writers the sockets are sharded over.
    pub shards: usize,
    pub transport: RawTransport,
    pub writer: RawWriter,
}

/// Sends per io_uring submission.
pub const RING_ENTRIES: u32 = 4096;

/// Largest client packet the baseline reads (goim's limit).
const MAX_PACKET: usize = 4112;

fn packet(op: i32, seq: i32, body: &[u8]) -> Vec<u8> {
    goim_client::encode(1, op, seq, body)
}

/// A packet as it goes on the wire for `transport`.
fn framed(transport: RawTransport, pkt: Vec<u8>) -> Bytes {
    match transport {
        RawTransport::Tcp => Bytes::from(pkt),
        RawTransport::Ws => {
            let (head, n) = goim_comet::ws::frame_header(2, pkt.len());
            let mut out = Vec::with_capacity(n + pkt.len());
            out.extend_from_slice(&head[..n]);
            out.extend_from_slice(&pkt);
            Bytes::from(out)
        }
    }
}

/// The push every tick carries: the send time, for the clients' latency.
fn push(transport: RawTransport) -> Bytes {
    framed(transport, packet(OP, 0, now_ns().to_string().as_bytes()))
}

/// Whether this process may use io_uring (the kernel has it and no seccomp profile blocks it).
pub fn io_uring_available() -> anyhow::Result<()> {
    uring::available()
}

type Shard<T> = Arc<Mutex<Vec<T>>>;

fn take<T>(shard: &Shard<T>) -> Vec<T> {
    std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()))
}

fn give<T>(shard: &Shard<T>, items: impl IntoIterator<Item = T>) {
    shard
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(items);
}

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, cfg: RawConfig) -> anyhow::Result<()> {
    let n = cfg.shards.max(1);
    match cfg.writer {
        RawWriter::Epoll => {
            let shards: Vec<Shard<OwnedWriteHalf>> = (0..n).map(|_| Shard::default()).collect();
            for shard in &shards {
                tokio::spawn(epoll_writer(shard.clone(), cfg));
            }
            accept(listener, cfg.transport, move |i, w: OwnedWriteHalf| {
                give(&shards[i % n], [w]);
                None::<()>
            })
            .await
        }
        RawWriter::IoUring => uring::serve(listener, cfg, n).await,
    }
}

/// Accepts clients, answers their auth and hands each write half to `register` (with the
/// connection's number); keeps reading (and discarding) so heartbeats do not pile up. What
/// `register` returns is held until the client goes.
async fn accept<T, F>(
    listener: TcpListener,
    transport: RawTransport,
    register: F,
) -> anyhow::Result<()>
where
    T: Send + 'static,
    F: Fn(usize, OwnedWriteHalf) -> Option<T> + Send + Sync + 'static,
{
    let register = Arc::new(register);
    let mut next = 0;
    loop {
        let (s, _): (TcpStream, SocketAddr) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        let (i, register) = (next, register.clone());
        next += 1;
        tokio::spawn(async move {
            let Some((mut r, w)) = handshake(s, transport).await else {
                return;
            };
            let held = register(i, w);
            let mut sink = [0u8; 256];
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
            drop(held);
        });
    }
}

/// The upgrade (WebSocket) and the auth packet; answers both. `None`: the client went or
/// sent something else.
async fn handshake(
    s: TcpStream,
    transport: RawTransport,
) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    let (mut r, mut w) = s.into_split();
    let mut buf = BytesMut::with_capacity(1024);
    if transport == RawTransport::Ws {
        let up = loop {
            if let Some(up) = goim_comet::ws::parse_upgrade(&mut buf).ok()? {
                break up;
            }
            if buf.len() > 8192 || r.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        };
        let reply = goim_comet::ws::upgrade_response(&up.key);
        w.write_all(reply.as_bytes()).await.ok()?;
    }
    let auth = loop {
        match transport {
            RawTransport::Tcp if buf.len() >= 16 => {
                let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| (16..=MAX_PACKET).contains(l))?;
                if buf.len() >= len {
                    break buf.split_to(len).freeze();
                }
            }
            RawTransport::Ws => {
                if let Some(f) = goim_comet::ws::decode_frame(&mut buf, MAX_PACKET).ok()? {
                    break f.payload;
                }
            }
            RawTransport::Tcp => {}
        }
        if r.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
    };
    let mut head = auth.get(12..16)?;
    let seq = head.get_i32();
    w.write_all(&framed(transport, packet(8, seq, &[])))
        .await
        .ok()?;
    Some((r, w))
}

/// One writer: every tick, one write per socket, in turn.
async fn epoll_writer(shard: Shard<OwnedWriteHalf>, cfg: RawConfig) {
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / cfg.rate.max(1)));
    loop {
        tick.tick().await;
        let pkt = push(cfg.transport);
        let mut alive = Vec::new();
        for mut s in take(&shard) {
            if s.write_all(&pkt).await.is_ok() {
                alive.push(s);
            }
        }
        give(&shard, alive);
    }
}

#[cfg(target_os = "linux")]
mod uring {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use io_uring::{opcode, types, IoUring};
    use tokio::net::tcp::OwnedWriteHalf;
    use tokio::net::TcpListener;

    use super::{accept, give, push, take, RawConfig, Shard, RING_ENTRIES};

    /// Sends that could not be made whole, since the start: the socket's buffer was full
    /// (`would_block`, the push is lost for that client) or the send failed or was cut short
    /// (the socket is dropped: a cut packet would corrupt its stream).
    #[derive(Default)]
    struct Losses {
        would_block: AtomicU64,
        dropped: AtomicU64,
    }

    const UNAVAILABLE: &str = "io_uring is not available here (a seccomp profile may block it)";

    pub(super) fn available() -> anyhow::Result<()> {
        IoUring::new(8).context(UNAVAILABLE).map(drop)
    }

    pub(super) async fn serve(
        listener: TcpListener,
        cfg: RawConfig,
        n: usize,
    ) -> anyhow::Result<()> {
        let losses = Arc::new(Losses::default());
        let shards: Vec<Shard<OwnedFd>> = (0..n).map(|_| Shard::default()).collect();
        for shard in &shards {
            // Made here so a kernel or seccomp profile that refuses io_uring is an error at
            // start, not a silent thread exit.
            let ring = IoUring::new(RING_ENTRIES).context(UNAVAILABLE)?;
            let (shard, losses) = (shard.clone(), losses.clone());
            std::thread::Builder::new()
                .name("raw-uring".into())
                .spawn(move || writer(ring, shard, cfg, &losses))?;
        }
        accept(listener, cfg.transport, move |i, w: OwnedWriteHalf| {
            // The ring writes a duplicate of the socket; the write half stays with the
            // reading task (dropping it would shut the socket's sending side).
            // SAFETY: dup of a descriptor this process owns; the result is owned here.
            let fd = unsafe { libc::dup(w.as_ref().as_raw_fd()) };
            if fd >= 0 {
                // SAFETY: `fd` is a fresh descriptor nobody else owns.
                give(&shards[i % n], [unsafe { OwnedFd::from_raw_fd(fd) }]);
            }
            Some(w)
        })
        .await
    }

    fn writer(mut ring: IoUring, shard: Shard<OwnedFd>, cfg: RawConfig, losses: &Losses) {
        let period = Duration::from_nanos(1_000_000_000 / cfg.rate.max(1));
        let mut next = Instant::now();
        let mut reported = (0, 0);
        loop {
            // Like Tokio's interval: late ticks fire at once until caught up.
            next += period;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let pkt = push(cfg.transport);
            let fds = take(&shard);
            let mut alive = vec![true; fds.len()];
            for (c, chunk) in fds.chunks(RING_ENTRIES as usize).enumerate() {
                for (i, fd) in chunk.iter().enumerate() {
                    let send = opcode::Send::new(
                        types::Fd(fd.as_raw_fd()),
                        pkt.as_ptr(),
                        pkt.len() as u32,
                    )
                    .build()
                    .user_data((c * RING_ENTRIES as usize + i) as u64);
                    // SAFETY: `pkt` and the descriptors outlive the send: every completion
                    // is reaped below before either is dropped. The queue has room: a chunk
                    // is at most its size and it is empty after each submission.
                    if unsafe { ring.submission().push(&send) }.is_err() {
                        alive[c * RING_ENTRIES as usize + i] = false;
                        losses.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Completions come only for what was queued.
                let mut want = ring.submission().len();
                while want > 0 {
                    if let Err(e) = ring.submit_and_wait(want) {
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        eprintln!("raw baseline: io_uring submit failed: {e}");
                        std::process::exit(1);
                    }
                    for cqe in ring.completion() {
                        want -= 1;
                        let i = cqe.user_data() as usize;
                        match cqe.result() {
                            r if r == -libc::EAGAIN => {
                                losses.would_block.fetch_add(1, Ordering::Relaxed);
                            }
                            r if r >= 0 && r as usize == pkt.len() => {}
                            _ => {
                                losses.dropped.fetch_add(1, Ordering::Relaxed);
                                alive[i] = false;
                            }
                        }
                    }
                }
            }
            give(
                &shard,
                fds.into_iter().zip(alive).filter(|p| p.1).map(|p| p.0),
            );
            let now = (
                losses.would_block.load(Ordering::Relaxed),
                losses.dropped.load(Ordering::Relaxed),
            );
            if now != reported {
                eprintln!(
                    "raw baseline: {} pushes lost to full socket buffers, {} sockets dropped",
                    now.0, now.1
                );
                reported = now;
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod uring {
    pub(super) fn available() -> anyhow::Result<()> {
        anyhow::bail!("io_uring is not available here: it needs Linux")
    }

    pub(super) async fn serve(
        _: tokio::net::TcpListener,
        _: super::RawConfig,
        _: usize,
    ) -> anyhow::Result<()> {
        anyhow::bail!("the io_uring writer needs Linux")
    }
}
