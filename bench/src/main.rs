//! `goim-bench`: see bench/README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use goim_bench::scenario::{self, Target};
use goim_bench::{raw, report, Conns};
use goim_client::Transport;

#[derive(Parser)]
#[command(name = "goim-bench", about = "Load generator for goim-rs and goim")]
struct Cli {
    /// Also write a JSON file and a Markdown row per run into this directory.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Label for the server under test in the report (goim-rs, goim, raw).
    #[arg(long, global = true, default_value = "goim-rs")]
    server: String,
    /// Also count the server's syscalls while it is measured (`--pid`), with Linux's
    /// `perf stat`, and report them per delivered message.
    #[arg(long, global = true)]
    syscalls: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Ws,
}

#[derive(Clone, Copy, ValueEnum)]
enum Writer {
    Epoll,
    IoUring,
}

#[derive(clap::Args, Clone)]
struct ConnArgs {
    /// Comet address (its TCP or WebSocket port, see --proto).
    #[arg(long, default_value = "127.0.0.1:3101")]
    addr: SocketAddr,
    /// More comets (repeat the flag): connections go round-robin over --addr and these.
    #[arg(long = "also-addr")]
    also: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value = "tcp")]
    proto: Proto,
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    #[arg(long, default_value_t = 500)]
    parallel: usize,
    /// Rooms the connections spread over (0: none).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    #[arg(long, default_value = "bench")]
    room_type: String,
    #[arg(long, default_value = "bench-")]
    key_prefix: String,
    /// Source addresses start at 127.0.0.(2+base); give each process its own. Without it the
    /// kernel picks the source (127.0.0.1, about 28k connections at most).
    #[arg(long)]
    source_base: Option<usize>,
    /// Server pid, for RSS and CPU from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Speak TLS (WSS, or TCP over TLS), trusting the CA certificate in this PEM file.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The server name TLS checks (with --tls-ca).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
}

impl ConnArgs {
    fn conns(&self) -> anyhow::Result<Conns> {
        let tls = match &self.tls_ca {
            Some(ca) => {
                let cfg = goim_client::tls_trusting(ca)
                    .map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", ca.display()))?;
                Some((cfg, self.tls_name.clone()))
            }
            None => None,
        };
        Ok(Conns {
            addr: self.addr,
            also: self.also.clone(),
            transport: match self.proto {
                Proto::Tcp => Transport::Tcp,
                Proto::Ws => Transport::WebSocket,
            },
            count: self.conns,
            parallel: self.parallel,
            rooms: self.rooms,
            room_type: self.room_type.clone(),
            key_prefix: self.key_prefix.clone(),
            source_base: self.source_base,
            tls,
        })
    }
}

#[derive(Subcommand)]
enum Scenario {
    /// Idle connections: connect rate and server RSS per connection.
    Idle {
        #[command(flatten)]
        conn: ConnArgs,
        /// Hold the connections this many seconds afterwards.
        #[arg(long, default_value_t = 0)]
        hold: u64,
        /// Then close them all at once and time how fast this logic (its HTTP address) counts
        /// their Disconnects (distributed mode).
        #[arg(long)]
        logic_http: Option<SocketAddr>,
    },
    /// Room fan-out through logic: delivered messages/s and per server CPU-second.
    Room {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value = "127.0.0.1:3111")]
        http: SocketAddr,
        /// Room pushes per second (all rooms together).
        #[arg(long, default_value_t = 40)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Single-key push latency through logic.
    Latency {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value = "127.0.0.1:3111")]
        http: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Keep-alive HTTP connections pushing at once, each at rate/pushers (one sequential
        /// pusher reaches at most 1 / round trip pushes a second).
        #[arg(long, default_value_t = 1)]
        pushers: usize,
    },
    /// Broadcast to all, with or without a speed limit.
    Broadcast {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value = "127.0.0.1:3111")]
        http: SocketAddr,
        #[arg(long, default_value_t = 10)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connections per second the comets pace a broadcast at (0: unpaced).
        #[arg(long, default_value_t = 0)]
        speed: u32,
    },
    /// Conversations: messages into one group with part of it online (pushes, and
    /// notifications to a sink this process serves), then a user's conversation list.
    Chat {
        #[arg(long, default_value = "127.0.0.1:3111")]
        http: SocketAddr,
        /// A comet's TCP address.
        #[arg(long, default_value = "127.0.0.1:3101")]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Members online (default: half).
        #[arg(long)]
        online: Option<usize>,
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        #[arg(long, default_value_t = 4)]
        senders: usize,
        /// Serve the notification sink here (point `[logic.conversations.notify] url` at it).
        #[arg(long)]
        sink: Option<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        inbox_conversations: usize,
        #[arg(long, default_value_t = 200)]
        inbox_queries: usize,
        /// The server's pid, for its CPU time.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Connect to a raw baseline server and count what it pushes.
    Raw {
        #[command(flatten)]
        conn: ConnArgs,
        /// The rate the raw server was started with.
        #[arg(long, default_value_t = 40)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// The soak: connections over several comets for a long time, with churn, key and room
    /// pushes, checked for misdeliveries; a timeline (CSV, PNG) of the servers' RSS and CPU.
    Soak {
        #[command(flatten)]
        plan: goim_bench::soak::Plan,
    },
    /// One soak loader process (the soak starts these).
    #[command(hide = true)]
    SoakLoad {
        #[command(flatten)]
        load: goim_bench::soak::Load,
        #[arg(long)]
        loader: usize,
        #[arg(long)]
        source_base: usize,
    },
    /// Run the raw fan-out baseline server.
    RawServer {
        #[arg(long, default_value = "127.0.0.1:3201")]
        listen: String,
        /// Pushes per second to every connection.
        #[arg(long, default_value_t = 40)]
        rate: u64,
        /// Writer tasks the sockets are sharded over.
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// What the clients speak: goim's TCP packets or WebSocket frames.
        #[arg(long, value_enum, default_value = "tcp")]
        proto: Proto,
        /// How pushes are written: one write per socket from epoll, or batched sends on an
        /// io_uring (Linux; fails at start where a seccomp profile blocks it).
        #[arg(long, value_enum, default_value = "epoll")]
        writer: Writer,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.syscalls {
        goim_bench::syscalls::enable();
    }
    let mut v = match cli.scenario {
        Scenario::Idle {
            conn,
            hold,
            logic_http,
        } => {
            let (mut v, clients) = scenario::idle(&conn.conns()?, conn.pid).await?;
            println!("{v}");
            tokio::time::sleep(Duration::from_secs(hold)).await;
            match logic_http {
                Some(logic) => {
                    v["disconnect_storm"] = scenario::disconnect_storm(clients, logic).await?;
                }
                None => drop(clients),
            }
            v
        }
        Scenario::Room {
            conn,
            http,
            rate,
            seconds,
        } => {
            scenario::fanout(
                &conn.conns()?,
                Some(http),
                Target::Rooms,
                rate,
                seconds,
                conn.pid,
            )
            .await?
        }
        Scenario::Soak { plan } => {
            let dir = cli
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("bench/results"));
            goim_bench::soak::coordinate(plan, &dir).await?
        }
        Scenario::SoakLoad {
            load,
            loader,
            source_base,
        } => {
            goim_bench::soak::run_loader(load, loader, source_base).await?;
            return Ok(());
        }
        Scenario::Latency {
            conn,
            http,
            rate,
            seconds,
            pushers,
        } => {
            scenario::fanout_with(
                &conn.conns()?,
                Some(http),
                Target::Keys,
                scenario::Pace {
                    rate,
                    seconds,
                    pushers,
                },
                conn.pid,
            )
            .await?
        }
        Scenario::Broadcast {
            conn,
            http,
            rate,
            seconds,
            speed,
        } => {
            scenario::fanout(
                &conn.conns()?,
                Some(http),
                Target::All { speed },
                rate,
                seconds,
                conn.pid,
            )
            .await?
        }
        Scenario::Raw {
            conn,
            rate,
            seconds,
        } => {
            scenario::fanout(
                &conn.conns()?,
                None,
                Target::ServerDriven { rate },
                rate,
                seconds,
                conn.pid,
            )
            .await?
        }
        Scenario::Chat {
            http,
            addr,
            members,
            online,
            messages,
            senders,
            sink,
            inbox_conversations,
            inbox_queries,
            pid,
        } => {
            let args = goim_bench::chat::ChatArgs {
                http,
                comet: addr,
                members,
                online: online.unwrap_or(members / 2).min(members),
                messages,
                senders,
                sink,
                inbox_conversations,
                inbox_queries,
                pid,
            };
            goim_bench::chat::chat(&args).await?
        }
        Scenario::RawServer {
            listen,
            rate,
            shards,
            proto,
            writer,
        } => {
            let addr: SocketAddr = listen.parse()?;
            let sock = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            sock.set_reuseaddr(true)?;
            sock.bind(addr)?;
            // The same deep accept queue comet uses, so connect storms compare fairly.
            let l = sock.listen(8192)?;
            eprintln!("raw baseline on {}", l.local_addr()?);
            let cfg = raw::RawConfig {
                rate,
                shards,
                transport: match proto {
                    Proto::Tcp => raw::RawTransport::Tcp,
                    Proto::Ws => raw::RawTransport::Ws,
                },
                writer: match writer {
                    Writer::Epoll => raw::RawWriter::Epoll,
                    Writer::IoUring => raw::RawWriter::IoUring,
                },
            };
            raw::serve(l, cfg).await?;
            return Ok(());
        }
    };
    v["server"] = cli.server.into();
    println!("{v}");
    if let Some(dir) = cli.out {
        report::write(&dir, &v)?;
    }
    Ok(())
}
