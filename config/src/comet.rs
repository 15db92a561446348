//! Comet settings, with goim's defaults where goim has one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CometConfig {
    /// Server id sent to logic and used for routing; must be unique and stable (a StatefulSet
    /// pod name). Empty: the host name.
    pub name: String,
    /// TCP listen address (goim 3101).
    pub tcp: String,
    /// WebSocket listen address (goim 3102); the upgrade path is `/sub`.
    pub ws: String,
    /// A directory with `tls.crt` and `tls.key` (as cert-manager writes a Secret), read
    /// again when they change. Set, the comet also serves WebSocket over TLS on `wss`, and
    /// TCP over TLS on `tcp_tls` if that is set. Empty: no TLS listener.
    pub tls_dir: String,
    /// WebSocket over TLS listen address (goim 3103), with `tls_dir`.
    pub wss: String,
    /// goim's TCP protocol over TLS listen address, with `tls_dir`. Empty: not served.
    pub tcp_tls: String,
    /// From accept to auth reply, including the WebSocket upgrade (goim's example: 8s).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection whose token expired is told so (extension clients) and closed this much
    /// later unless it sends a new token (`REFRESH`).
    #[serde(with = "humantime_serde")]
    pub token_grace: Duration,
    /// How long one write to a client may stall before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Connection shards (goim 32).
    pub buckets: usize,
    /// Pushes queued per connection before further ones are dropped for it (goim 10; larger so
    /// a burst of single pushes is not lost, and memory is only used while queued).
    pub push_queue: usize,
    /// Room and broadcast jobs queued per bucket before job calls wait.
    pub bucket_queue: usize,
    /// Pushes are written to a plain socket by the fan-out itself when nothing is queued for
    /// it and the fan-out keeps up, instead of waking the connection's task (less CPU per
    /// delivery); off, every push goes through the connection's queue, as in goim.
    pub direct_writes: bool,
    /// How often room counts go to logic (goim 10s).
    #[serde(with = "humantime_serde")]
    pub renew_interval: Duration,
    /// A connection renews its presence in logic on a heartbeat at most this often; each
    /// connection draws its interval in [min, 3*min) as goim draws [10m, 30m).
    #[serde(with = "humantime_serde")]
    pub presence_renew: Duration,
    /// Distributed mode: how often the comet removes presence on its etcd lease that no live
    /// connection backs. A key goes only if it was already there one sweep earlier.
    #[serde(with = "humantime_serde")]
    pub presence_sweep: Duration,
    /// Origins allowed to open a WebSocket (`https://app.example.com`, or
    /// `https://*.example.com` for one subdomain level). Empty: any. Requests without an
    /// Origin (not from a browser) are always allowed; a refused one gets HTTP 403.
    pub ws_origins: Vec<String>,
    /// Rooms a connection may join beside goim's one (`ROOM_JOIN`).
    pub max_extra_rooms: usize,
    /// Tell logic when a connection joins or leaves a room, for `[logic.events]` (one call
    /// per change; leave off unless the business wants room events).
    pub room_events: bool,
    /// Largest WebSocket frame payload (goim's read buffer, 8 KiB).
    pub ws_max_frame: usize,
    /// Most continuation frames in one message (goim 100).
    pub ws_max_fragments: usize,
    /// Connections held at once; beyond it new ones are closed at accept.
    pub max_connections: usize,
    /// Connections held at once per client address; beyond it new ones from that address are
    /// closed at accept (`ip_limit`). 0: no limit (users behind one NAT share an address).
    pub max_connections_per_ip: usize,
    /// New connections per client address per second, on average (0: no limit); over it
    /// they are closed at accept (`handshake_rate`).
    pub handshakes_per_ip_per_sec: u32,
    /// New connections an address may open in one burst before the average applies.
    pub handshakes_per_ip_burst: u32,
    /// Every client listener expects HAProxy's PROXY protocol header (v1 or v2) first, as a
    /// load balancer sends it, and takes the client's address from it for limits, logs and
    /// hooks. Only turn on when every connection comes through such a balancer: a
    /// connection without the header is closed (`proxy_header`).
    pub proxy_protocol: bool,
    /// Packets a client may send after auth, per second on average (heartbeats, room
    /// changes, subs); a client over it is closed (`rate_limited`).
    pub client_ops_per_sec: u32,
    /// Packets a client may send in one burst before the average applies.
    pub client_ops_burst: u32,
    /// On shutdown, how long clients get to close and logic to hear of it.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a drain spreads the closing of clients over.
    #[serde(with = "humantime_serde")]
    pub drain_period: Duration,
    /// Clients that ask for acks (`HELLO` with `"acks":true`): a numbered push to the user
    /// not acknowledged within this long is sent again ...
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// ... at most this many times, then given up and counted (`unacked`) ...
    pub ack_retries: u32,
    /// ... and at most this many wait for an ack per connection; beyond, the oldest is given up.
    pub ack_window: usize,
    /// Public addresses advertised to non-web clients by `/goim/nodes/weighted` (goim -addrs).
    pub addrs: Vec<String>,
    /// Node weight for client balancing (goim -weight).
    pub weight: i64,
    pub region: String,
    pub zone: String,
}

impl Default for CometConfig {
    fn default() -> Self {
        CometConfig {
            name: String::new(),
            tcp: "0.0.0.0:3101".into(),
            ws: "0.0.0.0:3102".into(),
            tls_dir: String::new(),
            wss: "0.0.0.0:3103".into(),
            tcp_tls: String::new(),
            handshake_timeout: Duration::from_secs(8),
            token_grace: Duration::from_secs(30),
            write_timeout: Duration::from_secs(20),
            buckets: 32,
            push_queue: 64,
            bucket_queue: 1024,
            direct_writes: true,
            renew_interval: Duration::from_secs(10),
            presence_renew: Duration::from_secs(600),
            presence_sweep: Duration::from_secs(60),
            ws_origins: Vec::new(),
            max_extra_rooms: 16,
            room_events: false,
            ws_max_frame: 8192,
            ws_max_fragments: 100,
            max_connections: 1_000_000,
            max_connections_per_ip: 0,
            handshakes_per_ip_per_sec: 0,
            handshakes_per_ip_burst: 20,
            proxy_protocol: false,
            client_ops_per_sec: 64,
            client_ops_burst: 256,
            shutdown_timeout: Duration::from_secs(10),
            drain_period: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
            ack_retries: 3,
            ack_window: 64,
            addrs: Vec::new(),
            weight: 10,
            region: String::new(),
            zone: String::new(),
        }
    }
}

impl CometConfig {
    /// Fixes values that would break the server (zero sizes) and fills the name.
    pub fn normalized(mut self) -> Self {
        self.buckets = self.buckets.max(1);
        self.push_queue = self.push_queue.max(1);
        self.bucket_queue = self.bucket_queue.max(1);
        self.ws_max_frame = self.ws_max_frame.max(goim_proto::packet::MAX_PACK);
        // Periods of loops: zero would spin (tokio's interval refuses it outright).
        let min = std::time::Duration::from_millis(10);
        self.presence_sweep = self.presence_sweep.max(min);
        self.renew_interval = self.renew_interval.max(min);
        self.ack_timeout = self.ack_timeout.max(min);
        self.ack_window = self.ack_window.max(1);
        if self.name.is_empty() {
            self.name = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "comet".into());
        }
        self
    }
}
