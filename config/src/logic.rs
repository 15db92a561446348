//! Logic settings, with goim's example defaults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogicConfig {
    /// HTTP listen address (goim 3111).
    pub http: String,
    /// A directory with `tls.crt` and `tls.key` (a cert-manager Secret), read again when
    /// they change: the HTTP API is then served over TLS only. Empty: plain HTTP.
    pub http_tls_dir: String,
    /// Client heartbeat interval advertised to clients (goim `node.heartbeat`, 4m).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Missed heartbeats before comet closes a connection (goim `node.heartbeatMax`, 2).
    pub heartbeat_max: u32,
    /// Largest push body accepted by the HTTP API. goim clients refuse packets over 4112
    /// bytes, so a larger body would break every recipient; it is refused with -400 instead.
    pub max_message: usize,
    /// Number the pushes to each user (`/goim/push/mids`) in a stream of its own, so clients
    /// that speak the extensions can recover them after a reconnect (docs/PROTOCOL.md). The
    /// jobs keep them with `[job.history.user]`. Each user in a push is then its own job call.
    pub user_streams: bool,
    /// Keys the HTTP API's push routes require (`Authorization: Bearer KEY` or
    /// `X-Api-Key: KEY`); none: the API is open (fine on loopback only).
    pub api_keys: Vec<String>,
    /// A file with more keys, one per line (a mounted Secret); read again when it
    /// changes (keys rotate without a restart).
    pub api_keys_file: String,
    /// Whether the read-only routes (`/goim/online/*`, `/goim/nodes/*`) need a key too.
    /// goim's clients fetch `/goim/nodes/weighted` without one.
    pub protect_reads: bool,
    /// How client tokens are checked: `json` is goim's token taken at its word (anyone may
    /// claim any user); `jwt` verifies signed tokens with `[logic.jwt]`.
    pub auth: AuthMode,
    pub jwt: JwtConfig,
    /// The connect hook, for `auth = "hook"`.
    pub hook: HookConfig,
    /// Where client messages of ops the comet does not answer go (`[logic.forward]`).
    pub forward: ForwardConfig,
    /// Where connection lifecycle events go (`[logic.events]`).
    pub events: EventsConfig,
    /// Group and direct conversations with offline delivery (`[logic.conversations]`).
    pub conversations: ConversationsConfig,
    pub node: NodeConfig,
    pub backoff: BackoffConfig,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// goim's development token: JSON, not verified.
    #[default]
    Json,
    /// Signed tokens (HS256, RS256, ES256), checked against `[logic.jwt]`'s keys.
    Jwt,
    /// The business says: logic POSTs the token to `[logic.hook] url` and takes the identity
    /// it answers (EMQX's HTTP auth, Centrifugo's connect proxy).
    Hook,
}

/// `auth = "hook"`: `POST url` with `{"token":T,"cookie":C}` (`token_base64` instead when
/// the token is not UTF-8). A 200 reply `{"mid":N,"key":K,"room":R,"accepts":[...],
/// "expires":UNIX}` (all but `mid` optional) admits the client; 401 or 403 refuses it; any
/// other status, a timeout or an unreachable hook refuses it too (fail closed) and is logged.
/// Admissions are cached (`cache_ttl`, at most `cache_size` tokens) so reconnect storms do
/// not become hook storms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HookConfig {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A file whose content keys an HMAC-SHA256 of each body (`X-Goim-Signature:
    /// sha256=<hex>`); empty: unsigned.
    pub secret_file: String,
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            url: String::new(),
            timeout: Duration::from_secs(2),
            secret_file: String::new(),
            cache_ttl: Duration::from_secs(30),
            cache_size: 10_000,
        }
    }
}

/// Client messages the comet does not answer itself (ops outside goim's set): with `url`,
/// logic POSTs `{"mid","key","server","op","seq","body"}` (body base64) and sends the
/// business's reply back to the connection on the same op; without, they are logged and
/// dropped as goim does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub secret_file: String,
    /// Calls in flight at most; beyond, a message gets an `overloaded` error at once.
    pub max_in_flight: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            url: String::new(),
            timeout: Duration::from_secs(5),
            secret_file: String::new(),
            max_in_flight: 256,
        }
    }
}

/// Connection lifecycle events (connect, disconnect with its reason) POSTed in batches:
/// `{"events":[{"type","mid","key","server","room","reason","time"}...]}`, with an
/// `Idempotency-Key` per batch, retried with backoff until `max_attempts`; a full queue
/// drops and counts new events rather than slow connects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub secret_file: String,
    /// Events per POST at most.
    pub batch: usize,
    /// How long an event waits for others to fill its batch.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Events waiting at most.
    pub queue: usize,
    pub max_attempts: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            url: String::new(),
            timeout: Duration::from_secs(5),
            secret_file: String::new(),
            batch: 100,
            linger: Duration::from_millis(200),
            queue: 10_000,
            max_attempts: 5,
        }
    }
}

/// Conversations (docs/CONVERSATIONS.md): messages stored once per conversation, pushed to
/// members online, counted unread for the muted, and notified to the offline through
/// `notify`. Off unless a store is named (standalone names a SQLite file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConversationsConfig {
    /// `sqlite://path` (one process) or `postgres://user:password@host/db` (clusters: every
    /// logic replica shares it). Empty: conversations are off.
    pub store: String,
    /// A file holding the store URL instead (a mounted Secret with the PostgreSQL DSN).
    pub store_file: String,
    pub max_members: usize,
    /// Longest message body, in bytes (its push envelope must fit `max_message`).
    pub max_body: usize,
    /// Characters of the last message shown in conversation lists.
    pub preview_chars: usize,
    /// Most messages or conversations one page returns.
    pub max_page: usize,
    /// A message whose offline members are still not notified after this long is notified
    /// again (after a restart, or a sink that was down): at least once.
    #[serde(with = "humantime_serde")]
    pub renotify_after: Duration,
    /// Standalone: serve the conversations' gRPC API (`goim.chat.Conversations`) here (e.g.
    /// `127.0.0.1:3119`); empty: not served. Distributed logic serves it on its gRPC port.
    pub grpc: String,
    /// The notification sink: `{"notifications":[{"id","mid","conversation","seq","sender",
    /// "preview","time"}...]}` POSTed in batches, each notification's `id` its idempotency
    /// key.
    pub notify: EventsConfig,
}

impl Default for ConversationsConfig {
    fn default() -> Self {
        ConversationsConfig {
            store: String::new(),
            store_file: String::new(),
            max_members: 100_000,
            max_body: 2048,
            preview_chars: 100,
            max_page: 200,
            renotify_after: Duration::from_secs(30),
            grpc: String::new(),
            notify: EventsConfig::default(),
        }
    }
}

/// Keys and checks for `auth = "jwt"`. Key files are read again when they change (checked
/// every `reload`), so keys rotate without a restart; a token is accepted if any key of its
/// algorithm's kind verifies it (or the JWKS key its `kid` names), so old and new keys may
/// overlap during a rotation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Files each holding one HMAC secret (HS256), trailing newline ignored.
    pub hs256_secret_files: Vec<String>,
    /// PEM public keys: RSA for RS256, EC P-256 for ES256.
    pub public_key_files: Vec<String>,
    /// A JWKS file (`{"keys":[...]}`) with RS256 and ES256 keys.
    pub jwks_file: String,
    /// A directory of keys (a mounted Secret): `*.json` files are JWKS, PEM files public
    /// keys, anything else an HMAC secret; names starting with `.` are skipped. Files added
    /// or removed there are picked up without a restart too.
    pub key_dir: String,
    /// Accepted `aud` values (empty: not checked).
    pub audience: Vec<String>,
    /// Accepted `iss` values (empty: not checked).
    pub issuer: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// How often the key files are checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs256_secret_files: Vec::new(),
            public_key_files: Vec::new(),
            jwks_file: String::new(),
            key_dir: String::new(),
            audience: Vec::new(),
            issuer: Vec::new(),
            leeway: Duration::from_secs(30),
            reload: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub default_domain: String,
    pub host_domain: String,
    pub tcp_port: i32,
    pub ws_port: i32,
    pub wss_port: i32,
    pub region_weight: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    pub max_delay: i32,
    pub base_delay: i32,
    pub factor: f32,
    pub jitter: f32,
}

impl Default for LogicConfig {
    fn default() -> Self {
        LogicConfig {
            http: "0.0.0.0:3111".into(),
            http_tls_dir: String::new(),
            heartbeat: Duration::from_secs(240),
            heartbeat_max: 2,
            max_message: goim_proto::packet::MAX_BODY,
            user_streams: false,
            api_keys: Vec::new(),
            api_keys_file: String::new(),
            protect_reads: false,
            auth: AuthMode::Json,
            jwt: JwtConfig::default(),
            hook: HookConfig::default(),
            forward: ForwardConfig::default(),
            events: EventsConfig::default(),
            conversations: ConversationsConfig::default(),
            node: NodeConfig::default(),
            backoff: BackoffConfig::default(),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            default_domain: "conn.goim.io".into(),
            host_domain: ".goim.io".into(),
            tcp_port: 3101,
            ws_port: 3102,
            wss_port: 3103,
            region_weight: 1.6,
        }
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        // goim's example values (its code default jitter of 1.3 is a typo for 0.3).
        BackoffConfig {
            max_delay: 300,
            base_delay: 3,
            factor: 1.8,
            jitter: 0.3,
        }
    }
}

impl LogicConfig {
    /// The idle timeout comet applies: heartbeat x heartbeat_max.
    pub fn idle_timeout(&self) -> Duration {
        self.heartbeat * self.heartbeat_max.max(1)
    }
}
