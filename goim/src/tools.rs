//! The operator's command line for a running cluster: `goim push`, `goim online`,
//! `goim nodes` talk to logic's HTTP API; `goim watch` connects as a client and prints what
//! arrives as JSON lines. Errors go to stderr with a non-zero exit.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use goim_client::{Client, Transport};
use serde_json::{json, Value};

/// Where logic's HTTP API is and the key its push routes may need.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// logic's HTTP API.
    #[arg(long, env = "GOIM_API", default_value = "http://127.0.0.1:3111")]
    pub api: String,
    /// API key for the push routes (sent as `Authorization: Bearer KEY`).
    #[arg(long, env = "GOIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The operation clients receive the message as (goim's `operation`).
    #[arg(long, default_value_t = 1000)]
    pub op: i32,
    #[command(subcommand)]
    pub target: PushTarget,
}

#[derive(Debug, Subcommand)]
pub enum PushTarget {
    /// To connections by key.
    Keys {
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        body: Body,
    },
    /// To every connection of these users.
    Mids {
        #[arg(required = true)]
        mids: Vec<i64>,
        #[command(flatten)]
        body: Body,
    },
    /// To a room, `TYPE://ID` (e.g. `live://1000`).
    Room {
        room: String,
        #[command(flatten)]
        body: Body,
    },
    /// To every connection.
    All {
        /// Connections per second the broadcast is paced at (0: goim's default).
        #[arg(long, default_value_t = 0)]
        speed: i32,
        #[command(flatten)]
        body: Body,
    },
}

#[derive(Debug, Args)]
pub struct Body {
    /// The message; without it (or with `-`) it is read from stdin.
    #[arg(long, short)]
    pub message: Option<String>,
}

impl Body {
    fn read(&self) -> anyhow::Result<Vec<u8>> {
        match self.message.as_deref() {
            Some(m) if m != "-" => Ok(m.as_bytes().to_vec()),
            _ => {
                let mut b = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut b)
                    .context("reading the message from stdin")?;
                Ok(b)
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct KickArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Connection keys to close.
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// Users whose every connection is closed.
    #[arg(long = "mid")]
    pub mids: Vec<i64>,
    /// What clients that speak the extensions are told.
    #[arg(long, default_value = "kicked")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct OnlineArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub what: Online,
}

#[derive(Debug, Subcommand)]
pub enum Online {
    /// Connections and addresses in the whole cluster.
    Total,
    /// The rooms of a type with the most connections.
    Top {
        /// Room type (the part before `://`).
        #[arg(long = "type", default_value = "live")]
        type_: String,
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Connections in rooms, `TYPE://ID` each.
    Room {
        #[arg(required = true)]
        rooms: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The platform asking (`web` gets domains, others addresses).
    #[arg(long, default_value = "web")]
    pub platform: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WatchTransport {
    Tcp,
    Ws,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// A comet's client address, `host:port`.
    pub addr: String,
    /// TCP (goim's port 3101) or WebSocket (3102, path /sub).
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: WatchTransport,
    /// User id to connect as.
    #[arg(long, default_value_t = 1)]
    pub mid: i64,
    /// Connection key (default: a random one).
    #[arg(long)]
    pub key: Option<String>,
    /// Room to join, `TYPE://ID`.
    #[arg(long, default_value = "")]
    pub room: String,
    /// Operations to receive (goim's `accepts`).
    #[arg(long, value_delimiter = ',', default_value = "1000,1001,1002")]
    pub accepts: Vec<i32>,
    /// A whole token instead (JSON, or a signed token), sent as it is.
    #[arg(long, env = "GOIM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
}

/// POST or GET `path` on logic's API; the `data` of goim's envelope, or an error with its
/// message when `code` is not 0.
fn call(api: &ApiArgs, method: &str, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<Value> {
    let url = format!("{}{path}", api.api.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let auth = api.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let mut response = match (method, body) {
        ("POST", Some(b)) => {
            let mut req = agent.post(&url);
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.send(&b[..])
        }
        _ => {
            let mut req = agent.get(&url);
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        }
    }
    .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let text = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the reply of {url}"))?;
    let reply: Value = serde_json::from_str(&text)
        .with_context(|| format!("{url} answered {status} with no JSON: {text:.200}"))?;
    let code = reply["code"].as_i64().unwrap_or(-1);
    if code != 0 {
        bail!(
            "{url}: {} (code {code})",
            reply["message"].as_str().unwrap_or("refused")
        );
    }
    Ok(reply.get("data").cloned().unwrap_or(Value::Null))
}

fn query(pairs: &[(&str, String)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    q.finish()
}

pub fn push(args: PushArgs) -> anyhow::Result<()> {
    let op = ("operation", args.op.to_string());
    let (path, body) = match &args.target {
        PushTarget::Keys { keys, body } => {
            let mut q = vec![op];
            q.extend(keys.iter().map(|k| ("keys", k.clone())));
            (format!("/goim/push/keys?{}", query(&q)), body)
        }
        PushTarget::Mids { mids, body } => {
            let mut q = vec![op];
            q.extend(mids.iter().map(|m| ("mids", m.to_string())));
            (format!("/goim/push/mids?{}", query(&q)), body)
        }
        PushTarget::Room { room, body } => {
            let Some((type_, id)) = room.split_once("://") else {
                bail!("room {room:?} is not TYPE://ID");
            };
            let q = [op, ("type", type_.to_string()), ("room", id.to_string())];
            (format!("/goim/push/room?{}", query(&q)), body)
        }
        PushTarget::All { speed, body } => {
            let q = [op, ("speed", speed.to_string())];
            (format!("/goim/push/all?{}", query(&q)), body)
        }
    };
    call(&args.api, "POST", &path, Some(body.read()?))?;
    Ok(())
}

pub fn kick(args: KickArgs) -> anyhow::Result<()> {
    if args.keys.is_empty() && args.mids.is_empty() {
        bail!("name connections to close: --key KEY or --mid MID (repeatable)");
    }
    let mut q: Vec<(&str, String)> = args.keys.iter().map(|k| ("keys", k.clone())).collect();
    q.extend(args.mids.iter().map(|m| ("mids", m.to_string())));
    q.push(("reason", args.reason.clone()));
    let data = call(
        &args.api,
        "POST",
        &format!("/goim/kick?{}", query(&q)),
        Some(Vec::new()),
    )?;
    print_json(&data)
}

pub fn online(args: OnlineArgs) -> anyhow::Result<()> {
    let path = match &args.what {
        Online::Total => "/goim/online/total".to_string(),
        Online::Top { type_, limit } => format!(
            "/goim/online/top?{}",
            query(&[("type", type_.clone()), ("limit", limit.to_string())])
        ),
        Online::Room { rooms } => {
            let mut q = Vec::new();
            let mut type_ = None;
            for r in rooms {
                let Some((t, id)) = r.split_once("://") else {
                    bail!("room {r:?} is not TYPE://ID");
                };
                if type_.is_some_and(|seen| seen != t) {
                    bail!("rooms of one type at a time (goim's API takes one type)");
                }
                type_ = Some(t);
                q.push(("rooms", id.to_string()));
            }
            q.push(("type", type_.unwrap_or_default().to_string()));
            format!("/goim/online/room?{}", query(&q))
        }
    };
    print_json(&call(&args.api, "GET", &path, None)?)
}

pub fn nodes(args: NodesArgs) -> anyhow::Result<()> {
    let path = format!(
        "/goim/nodes/weighted?{}",
        query(&[("platform", args.platform.clone())])
    );
    print_json(&call(&args.api, "GET", &path, None)?)
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// One JSON line per message: its op, its body (UTF-8 text, else base64 in `body_base64`).
fn line(op: i32, body: &[u8]) -> Value {
    match std::str::from_utf8(body) {
        Ok(text) => json!({"op": op, "body": text}),
        Err(_) => {
            use base64::Engine;
            json!({"op": op, "body_base64": base64::engine::general_purpose::STANDARD.encode(body)})
        }
    }
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(&args.addr)
        .await
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} has no address", args.addr))?;
    let transport = match args.transport {
        WatchTransport::Tcp => Transport::Tcp,
        WatchTransport::Ws => Transport::WebSocket,
    };
    let mut client = Client::connect(transport, addr, None)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let token = match &args.token {
        Some(t) => t.clone().into_bytes(),
        None => serde_json::to_vec(&json!({
            "mid": args.mid,
            "key": args.key.clone().unwrap_or_else(|| format!("watch-{:x}", fastrand::u64(..))),
            "room_id": args.room,
            "platform": "cli",
            "accepts": args.accepts,
        }))?,
    };
    tokio::time::timeout(Duration::from_secs(10), client.auth(&token))
        .await
        .context("no auth reply within 10 s (is the token valid?)")?
        .context("authenticating")?;
    eprintln!("goim watch: connected to {addr} as mid {}", args.mid);
    let mut beat = tokio::time::interval(Duration::from_secs(30));
    let mut seen = 0u64;
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            _ = beat.tick() => {
                client.send(goim_client::OP_HEARTBEAT, &[]).await.context("heartbeat")?;
            }
            p = client.recv() => {
                let p = p.context("connection closed")?;
                if matches!(p.op, goim_client::OP_HEARTBEAT_REPLY | goim_client::OP_AUTH_REPLY) {
                    continue;
                }
                writeln!(out, "{}", line(p.op, &p.body))?;
                out.flush()?;
                seen += 1;
                if args.count.is_some_and(|n| seen >= n) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_text_or_base64() {
        assert_eq!(line(1000, b"hi"), json!({"op": 1000, "body": "hi"}));
        assert_eq!(
            line(1000, &[0xff, 0]),
            json!({"op": 1000, "body_base64": "/wA="})
        );
    }

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            query(&[("keys", "a b&c".into()), ("keys", "d".into())]),
            "keys=a+b%26c&keys=d"
        );
    }
}
