//! goim's HTTP API (GOIM.md §4): always HTTP 200 with `{"code","message","data"?}`, query
//! parameters bound from the URL with list parameters repeating the key, and the raw request
//! body as the pushed message. Plus `/metrics`, `/healthz` and `/readyz`.

use std::str::FromStr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};

use crate::api_keys::ApiKeys;
use crate::logic::{Logic, PushError, Targeted};

const OK: i32 = 0;
const REQUEST_ERR: i32 = -400;
const SERVER_ERR: i32 = -500;
const UNAUTHORIZED: i32 = -401;

/// Readiness of the process behind the API (standalone: always; distributed: etcd synced).
pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct AppState {
    logic: Arc<Logic>,
}

#[derive(Clone)]
struct OpsState {
    registry: Arc<Registry>,
    ready: Ready,
}

/// `/metrics`, `/healthz` and `/readyz`, which every role serves.
pub fn ops_router(registry: Arc<Registry>, ready: Ready) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry, ready })
}

/// goim's HTTP API plus the ops routes. With `keys`, pushes need one (and the read-only
/// routes too when `protect_reads` is set); the ops routes never do.
pub fn router(logic: Arc<Logic>, registry: Arc<Registry>, ready: Ready, keys: ApiKeys) -> Router {
    // The body is a goim message; anything far beyond the configured limit is cut off early.
    let body_limit = logic.config().max_message.saturating_mul(2).max(64 * 1024);
    let guard = || middleware::from_fn_with_state(keys.clone(), require_key);
    let pushes = Router::new()
        .route("/goim/push/keys", post(push_keys))
        .route("/goim/push/mids", post(push_mids))
        .route("/goim/push/room", post(push_room))
        .route("/goim/push/all", post(push_all))
        .route("/goim/kick", post(kick))
        .route_layer(guard());
    let mut reads = Router::new()
        .route("/goim/online/top", get(online_top))
        .route("/goim/online/room", get(online_room))
        .route("/goim/online/total", get(online_total))
        .route("/goim/online/user", get(online_user))
        .route("/goim/nodes/weighted", get(nodes_weighted))
        .route("/goim/nodes/instances", get(nodes_instances));
    if logic.config().protect_reads {
        reads = reads.route_layer(guard());
    }
    // Conversations hold private messages: every route needs a key (when keys are set).
    let chat = crate::chat::http::router(logic.clone()).route_layer(guard());
    pushes
        .merge(reads)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(AppState { logic })
        .merge(chat.layer(DefaultBodyLimit::max(body_limit)))
        .merge(ops_router(registry, ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found") })
}

/// 401 with goim's envelope unless the request carries one of the keys.
async fn require_key(State(keys): State<ApiKeys>, req: Request, next: Next) -> Response {
    if keys.allows(req.headers()) {
        return next.run(req).await;
    }
    let mut r = reply(UNAUTHORIZED, "missing or wrong API key", None);
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r
}

pub(crate) fn reply(code: i32, message: impl Into<String>, data: Option<Value>) -> Response {
    let mut body = Map::new();
    body.insert("code".into(), code.into());
    body.insert("message".into(), Value::String(message.into()));
    if let Some(d) = data {
        body.insert("data".into(), d);
    }
    (
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        Value::Object(body).to_string(),
    )
        .into_response()
}

fn ok(data: Option<Value>) -> Response {
    reply(OK, "", data)
}

fn bad(msg: impl Into<String>) -> Response {
    reply(REQUEST_ERR, msg, None)
}

fn push_result(r: Result<(), PushError>) -> Response {
    match r {
        Ok(()) => ok(None),
        Err(PushError::BadRequest(m)) => bad(m),
        Err(e) => reply(SERVER_ERR, e.to_string(), None),
    }
}

/// A key or mid push: goim's envelope, plus how many connections logic found for it
/// (`data.keys_found`), whether presence could have missed some (`data.presence_complete`)
/// and, for a key push, which keys were not online (`data.keys_offline`, only when some
/// were not); goim's callers ignore `data`.
fn targeted_result(r: Result<Targeted, PushError>) -> Response {
    match r {
        Ok(t) => {
            let mut data = json!({
                "keys_found": t.keys_found,
                "presence_complete": t.presence_complete,
            });
            if !t.keys_offline.is_empty() {
                data["keys_offline"] = json!(t.keys_offline);
            }
            ok(Some(data))
        }
        Err(e) => push_result(Err(e)),
    }
}

/// Query parameters in order, repeated keys kept.
struct Params(Vec<(String, String)>);

impl Params {
    fn from_uri(uri: &Uri) -> Self {
        Params(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn str(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    fn required_str(&self, name: &str) -> Result<&str, String> {
        self.str(name)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{name}: required"))
    }

    /// A number; absent means `None`. goim's `binding:"required"` on a number means non-zero.
    fn num<T: FromStr + Default + PartialEq>(
        &self,
        name: &str,
        required: bool,
    ) -> Result<Option<T>, String> {
        let v = match self.str(name) {
            None | Some("") if required => return Err(format!("{name}: required")),
            None | Some("") => return Ok(None),
            Some(v) => v,
        };
        let n: T = v
            .parse()
            .map_err(|_| format!("{name}: {v:?} is not a valid number"))?;
        if required && n == T::default() {
            return Err(format!("{name}: required (must not be 0)"));
        }
        Ok(Some(n))
    }

    fn nums<T: FromStr>(&self, name: &str) -> Result<Vec<T>, String> {
        self.all(name)
            .into_iter()
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("{name}: {v:?} is not a valid number"))
            })
            .collect()
    }
}

macro_rules! try_param {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(m) => return bad(m),
        }
    };
}

async fn push_keys(State(s): State<AppState>, uri: Uri, body: Bytes) -> Response {
    let p = Params::from_uri(&uri);
    let op = try_param!(p.num::<i32>("operation", false)).unwrap_or(0);
    let keys = p.all("keys").into_iter().map(String::from).collect();
    let started = std::time::Instant::now();
    let r = s.logic.push_keys(op, keys, body).await;
    s.logic.push_took("keys", started);
    targeted_result(r)
}

async fn push_mids(State(s): State<AppState>, uri: Uri, body: Bytes) -> Response {
    let p = Params::from_uri(&uri);
    let op = try_param!(p.num::<i32>("operation", false)).unwrap_or(0);
    let mids = try_param!(p.nums::<i64>("mids"));
    let started = std::time::Instant::now();
    let r = s.logic.push_mids(op, mids, body).await;
    s.logic.push_took("mids", started);
    targeted_result(r)
}

async fn push_room(State(s): State<AppState>, uri: Uri, body: Bytes) -> Response {
    let p = Params::from_uri(&uri);
    let op = try_param!(p.num::<i32>("operation", true)).unwrap_or(0);
    let typ = try_param!(p.required_str("type"));
    let room = try_param!(p.required_str("room"));
    let started = std::time::Instant::now();
    let r = s.logic.push_room(op, typ, room, body).await;
    s.logic.push_took("room", started);
    push_result(r)
}

async fn push_all(State(s): State<AppState>, uri: Uri, body: Bytes) -> Response {
    let p = Params::from_uri(&uri);
    let op = try_param!(p.num::<i32>("operation", true)).unwrap_or(0);
    let speed = try_param!(p.num::<i32>("speed", false)).unwrap_or(0);
    if speed < 0 {
        return bad("speed: must not be negative");
    }
    let started = std::time::Instant::now();
    let r = s.logic.push_all(op, speed, body).await;
    s.logic.push_took("all", started);
    push_result(r)
}

/// Closes connections by key and by user, with a reason clients that speak the extensions
/// see (op `KICKED`).
async fn kick(State(s): State<AppState>, uri: Uri) -> Response {
    let p = Params::from_uri(&uri);
    let keys = p.all("keys").into_iter().map(String::from).collect();
    let mids = try_param!(p.nums::<i64>("mids"));
    let reason = p.str("reason").unwrap_or("").to_string();
    let started = std::time::Instant::now();
    let r = s.logic.kick(keys, mids, reason).await;
    s.logic.push_took("kick", started);
    targeted_result(r)
}

/// The bare room id of a room key (`live://1000` -> `1000`).
fn room_id(key: &str) -> &str {
    let rest = key.split_once("://").map_or(key, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

async fn online_top(State(s): State<AppState>, uri: Uri) -> Response {
    let p = Params::from_uri(&uri);
    let typ = try_param!(p.required_str("type"));
    let limit = try_param!(p.num::<i64>("limit", true)).unwrap_or(0);
    let counts = match s.logic.room_counts().await {
        Ok(c) => c,
        Err(e) => return reply(SERVER_ERR, e.to_string(), None),
    };
    // goim matches the room key by prefix `type`, not `type://`.
    let mut top: Vec<(&String, i32)> = counts
        .iter()
        .filter(|(k, _)| k.starts_with(typ))
        .map(|(k, v)| (k, *v))
        .collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    top.truncate(usize::try_from(limit).unwrap_or(0));
    let data: Vec<Value> = top
        .into_iter()
        .map(|(k, n)| json!({"room_id": room_id(k), "count": n}))
        .collect();
    ok(Some(Value::Array(data)))
}

async fn online_room(State(s): State<AppState>, uri: Uri) -> Response {
    let p = Params::from_uri(&uri);
    let typ = try_param!(p.required_str("type"));
    let rooms = p.all("rooms");
    if rooms.is_empty() {
        return bad("rooms: required");
    }
    let counts = match s.logic.room_counts().await {
        Ok(c) => c,
        Err(e) => return reply(SERVER_ERR, e.to_string(), None),
    };
    let data: Map<String, Value> = rooms
        .into_iter()
        .map(|r| {
            let n = counts
                .get(&crate::logic::room_key(typ, r))
                .copied()
                .unwrap_or(0);
            (r.to_string(), n.into())
        })
        .collect();
    ok(Some(Value::Object(data)))
}

/// goim-rs: is this user online, and on which devices (connection keys) and comets.
async fn online_user(State(s): State<AppState>, uri: Uri) -> Response {
    let p = Params::from_uri(&uri);
    let Some(mid) = p.str("mid").and_then(|m| m.parse::<i64>().ok()) else {
        return bad("mid: required, a number");
    };
    match s.logic.devices(mid).await {
        Ok((devices, complete)) => {
            let list: Vec<Value> = devices
                .into_iter()
                .map(|(key, server)| json!({"key": key, "server": server}))
                .collect();
            ok(Some(json!({
                "mid": mid,
                "online": !list.is_empty(),
                "devices": list,
                "complete": complete,
            })))
        }
        Err(e) => reply(SERVER_ERR, e.to_string(), None),
    }
}

async fn online_total(State(s): State<AppState>) -> Response {
    let (ips, conns) = s.logic.totals();
    ok(Some(json!({"ip_count": ips, "conn_count": conns})))
}

async fn nodes_weighted(State(s): State<AppState>, uri: Uri) -> Response {
    let p = Params::from_uri(&uri);
    let r = s.logic.nodes_weighted(p.str("platform").unwrap_or(""));
    // goim serialises NodesReply with omitempty.
    let mut m = Map::new();
    let mut put = |k: &str, v: Value, empty: bool| {
        if !empty {
            m.insert(k.into(), v);
        }
    };
    put("domain", r.domain.clone().into(), r.domain.is_empty());
    put("tcp_port", r.tcp_port.into(), r.tcp_port == 0);
    put("ws_port", r.ws_port.into(), r.ws_port == 0);
    put("wss_port", r.wss_port.into(), r.wss_port == 0);
    put("heartbeat", r.heartbeat.into(), r.heartbeat == 0);
    put("nodes", json!(r.nodes), r.nodes.is_empty());
    if let Some(b) = &r.backoff {
        put(
            "backoff",
            json!({"max_delay": b.max_delay, "base_delay": b.base_delay, "factor": f32_json(b.factor), "jitter": f32_json(b.jitter)}),
            false,
        );
    }
    put(
        "heartbeat_max",
        r.heartbeat_max.into(),
        r.heartbeat_max == 0,
    );
    ok(Some(Value::Object(m)))
}

/// A float32 as Go prints it (1.8, not 1.7999999523162842).
fn f32_json(v: f32) -> Value {
    v.to_string()
        .parse::<f64>()
        .map_or(Value::Null, Value::from)
}

async fn nodes_instances(State(s): State<AppState>) -> Response {
    let data: Vec<Value> = s
        .logic
        .instances()
        .into_iter()
        .filter(|n| !n.draining)
        .map(|n| {
            json!({
                "region": n.region,
                "zone": n.zone,
                "env": "",
                "appid": "goim.comet",
                "hostname": n.name,
                "addrs": if n.grpc_addr.is_empty() { vec![] } else { vec![n.grpc_addr.clone()] },
                "version": "",
                "latest_timestamp": n.updated,
                "metadata": {
                    "addrs": n.addrs.join(","),
                    "conn_count": n.conn_count.to_string(),
                    "ip_count": n.ip_count.to_string(),
                    "offline": "false",
                    "weight": n.weight.to_string(),
                },
            })
        })
        .collect();
    ok(Some(Value::Array(data)))
}

async fn metrics(State(s): State<OpsState>) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn readyz(State(s): State<OpsState>) -> Response {
    if (s.ready)() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params() {
        let uri: Uri = "/x?keys=a&keys=b%20c&operation=12&mids=1&mids=x"
            .parse()
            .unwrap();
        let p = Params::from_uri(&uri);
        assert_eq!(p.all("keys"), vec!["a", "b c"]);
        assert_eq!(p.num::<i32>("operation", true), Ok(Some(12)));
        assert!(p.nums::<i64>("mids").is_err());
        assert!(p.num::<i32>("speed", true).is_err());
        assert_eq!(p.num::<i32>("speed", false), Ok(None));
        let p = Params::from_uri(&"/x?operation=0&operation=abc".parse().unwrap());
        assert!(p.num::<i32>("operation", true).is_err());
        assert_eq!(p.num::<i32>("operation", false), Ok(Some(0)));
    }

    #[test]
    fn room_ids() {
        assert_eq!(room_id("live://1000"), "1000");
        assert_eq!(room_id("plain"), "plain");
    }
}
