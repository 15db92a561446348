//! The logic role: auth and presence for comets, push requests for the HTTP API, room counts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use goim_proto::logic::push_msg::Type as PushType;
use goim_proto::logic::{
    Backoff, ConnectReply, ConnectReq, DisconnectReply, DisconnectReq, DisconnectResult,
    DisconnectsReply, DisconnectsReq, HeartbeatReply, HeartbeatReq, HistoryReply, HistoryReq,
    NodesReply, NodesReq, OnlineReply, OnlineReq, PushMsg, ReceiveReply, ReceiveReq, RefreshReply,
    RefreshReq, RoomEventReply, RoomEventReq,
};
use goim_proto::service::{JobService, LogicService};
use goim_proto::MAX_ID;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::Status;

use crate::auth::{AuthError, Authenticator};
use crate::nodes::{Balancer, CometInstance, NodeSource};
use crate::online::{OnlineError, OnlineStore, Origin, UserKeysByServer};
use goim_config::LogicConfig;

/// Why a push request failed; the HTTP layer maps these to goim's codes.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    BadRequest(String),
    #[error("online store: {0}")]
    Online(#[from] OnlineError),
    #[error("job: {0}")]
    Job(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

/// A forwarded client message's end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// Seconds, 100 µs to about 3 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

#[derive(Debug)]
pub struct LogicMetrics {
    /// How long push requests took in logic (presence lookups and the call to job), by kind.
    pub push_seconds: Family<Kind, Histogram, fn() -> Histogram>,
    pub connects: Counter,
    pub auth_failures: Counter,
    /// Tokens a connection replaced before its old one expired.
    pub refreshes: Counter,
    pub disconnects: Counter,
    /// `Disconnects` calls: several connections' Disconnects in one.
    pub disconnect_batches: Counter,
    /// Client messages forwarded to the business, by outcome.
    pub forwarded: Family<Outcome, Counter>,
    /// Lifecycle events, by outcome (sent, queue_full, failed).
    pub events: Family<crate::events::Outcome, Counter>,
    /// Push requests accepted, by kind (keys, mids, room, all).
    pub pushes: Family<Kind, Counter>,
    /// Keys or mids a push named that are not online anywhere.
    pub unknown_targets: Counter,
    /// Key and user pushes made while presence could miss connections (a comet was putting
    /// its presence back after its etcd lease lapsed, or had just vanished).
    pub presence_incomplete: Counter,
    /// Conversation messages stored (resends not counted).
    pub conversation_messages: Counter,
    /// Members of conversation messages, by what the policy gave them (push, notify, nothing).
    pub conversation_deliveries: Family<crate::chat::Given, Counter>,
    /// Members a conversation message should have reached at once but did not, by reason
    /// (they still have it in history and unread).
    pub conversation_undelivered: Family<crate::chat::Reason, Counter>,
    /// Offline members' notifications, by outcome (sent, queue_full, failed, stale).
    pub notifications: Family<crate::events::Outcome, Counter>,
}

/// What logic knows of a key or user push it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targeted {
    /// Connections presence named for it.
    pub keys_found: usize,
    /// False when presence could have missed some (the push is counted
    /// `goim_logic_presence_incomplete_total`).
    pub presence_complete: bool,
    /// A key push's keys that were not online, in the order named: nothing was sent to them,
    /// so a caller can tell which of its pushes did not go out (a user push is numbered for
    /// offline users instead).
    pub keys_offline: Vec<String>,
}

impl Default for LogicMetrics {
    fn default() -> Self {
        LogicMetrics {
            push_seconds: Family::new_with_constructor(latency),
            connects: Counter::default(),
            auth_failures: Counter::default(),
            refreshes: Counter::default(),
            disconnects: Counter::default(),
            disconnect_batches: Counter::default(),
            forwarded: Family::default(),
            events: Family::default(),
            pushes: Family::default(),
            unknown_targets: Counter::default(),
            presence_incomplete: Counter::default(),
            conversation_messages: Counter::default(),
            conversation_deliveries: Family::default(),
            conversation_undelivered: Family::default(),
            notifications: Family::default(),
        }
    }
}

impl LogicMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("goim_logic");
        r.register(
            "push_seconds",
            "How long push requests took in logic, by kind",
            self.push_seconds.clone(),
        );
        r.register(
            "connects",
            "Successful Connect calls",
            self.connects.clone(),
        );
        r.register(
            "auth_failures",
            "Refused Connect and Refresh calls",
            self.auth_failures.clone(),
        );
        r.register(
            "refreshes",
            "Connections that replaced their token",
            self.refreshes.clone(),
        );
        r.register(
            "disconnects",
            "Disconnects (alone or in a Disconnects call)",
            self.disconnects.clone(),
        );
        r.register(
            "disconnect_batches",
            "Disconnects calls, each carrying several connections' Disconnects",
            self.disconnect_batches.clone(),
        );
        r.register(
            "forwarded",
            "Client messages forwarded to the business, by outcome",
            self.forwarded.clone(),
        );
        r.register(
            "events",
            "Lifecycle events for the business, by outcome (sent, queue_full, failed)",
            self.events.clone(),
        );
        r.register("pushes", "Push requests handed to job", self.pushes.clone());
        r.register(
            "unknown_targets",
            "Pushed keys or mids with no connection",
            self.unknown_targets.clone(),
        );
        r.register(
            "presence_incomplete",
            "Key and user pushes made while presence could miss connections (a comet was re-putting it)",
            self.presence_incomplete.clone(),
        );
        r.register(
            "conversation_messages",
            "Conversation messages stored",
            self.conversation_messages.clone(),
        );
        r.register(
            "conversation_deliveries",
            "Members of conversation messages, by what they were given (push, notify, nothing)",
            self.conversation_deliveries.clone(),
        );
        r.register(
            "conversation_undelivered",
            "Members a conversation message did not reach at once, by reason",
            self.conversation_undelivered.clone(),
        );
        r.register(
            "notifications",
            "Offline members' notifications, by outcome (sent, queue_full, failed, stale)",
            self.notifications.clone(),
        );
    }
}

pub struct Logic {
    cfg: LogicConfig,
    auth: Arc<dyn Authenticator>,
    pub(crate) online: Arc<dyn OnlineStore>,
    job: Arc<dyn JobService>,
    nodes: Arc<dyn NodeSource>,
    balancer: Mutex<Balancer>,
    pub(crate) metrics: Arc<LogicMetrics>,
    /// Where client messages go (`[logic.forward]`).
    forward: Option<crate::forward::Forwarder>,
    /// Where lifecycle events go (`[logic.events]`).
    events: Option<crate::events::EventSink>,
    /// Conversations (`[logic.conversations]`).
    pub(crate) chat: Option<Arc<crate::chat::Chat>>,
}

impl Logic {
    pub fn new(
        cfg: LogicConfig,
        auth: Arc<dyn Authenticator>,
        online: Arc<dyn OnlineStore>,
        job: Arc<dyn JobService>,
        nodes: Arc<dyn NodeSource>,
        metrics: Arc<LogicMetrics>,
    ) -> Self {
        Logic {
            cfg,
            auth,
            online,
            job,
            nodes,
            balancer: Mutex::new(Balancer::default()),
            metrics,
            forward: None,
            events: None,
            chat: None,
        }
    }

    /// Opens the conversation store `[logic.conversations]` names, if any (and starts its
    /// notification sink).
    pub async fn with_conversations(mut self) -> Result<Self, goim_chat::ChatError> {
        self.chat = crate::chat::Chat::open(&self.cfg.conversations, &self.metrics)
            .await?
            .map(Arc::new);
        Ok(self)
    }

    /// Connects the business hooks the config names: message forwarding and lifecycle
    /// events (starts the events' sender task).
    pub fn with_business_hooks(mut self) -> Result<Self, crate::webhook::WebhookError> {
        self.forward =
            crate::forward::Forwarder::from_config(&self.cfg.forward, self.cfg.max_message)?;
        self.events =
            crate::events::EventSink::from_config(&self.cfg.events, self.metrics.events.clone())?;
        Ok(self)
    }

    fn event(&self, e: impl FnOnce() -> crate::events::Event) {
        if let Some(sink) = &self.events {
            sink.emit(e());
        }
    }

    pub fn config(&self) -> &LogicConfig {
        &self.cfg
    }

    fn check_body(&self, msg: &Bytes) -> Result<(), PushError> {
        if msg.len() > self.cfg.max_message {
            return Err(PushError::BadRequest(format!(
                "message body is {} bytes, over the limit of {}",
                msg.len(),
                self.cfg.max_message
            )));
        }
        Ok(())
    }

    /// One message per comet, as goim sends one Kafka message per server. `mids`, when given,
    /// is parallel to each server's keys: the user each key must still belong to.
    async fn push_by_server(
        &self,
        op: i32,
        by: impl IntoIterator<Item = (String, Vec<String>, Vec<i64>)>,
        msg: Bytes,
    ) -> Result<(), PushError> {
        for (server, keys, mids) in by {
            let m = PushMsg {
                r#type: PushType::Push as i32,
                operation: op,
                server,
                keys,
                mids,
                msg: msg.clone(),
                ..Default::default()
            };
            self.to_job(m).await?;
        }
        Ok(())
    }

    /// Closes connections by key and every connection of the users named, telling clients
    /// that speak the extensions `reason` first. Returns the connections presence named.
    /// Where a user is connected: each of its connections' key and comet, and whether the
    /// answer can have missed some (a comet putting its presence back).
    pub async fn devices(&self, mid: i64) -> Result<(Vec<(String, String)>, bool), OnlineError> {
        let found = self.online.servers_by_mids(&[mid]).await?;
        let mut devices: Vec<(String, String)> = found
            .servers
            .into_iter()
            .flat_map(|(server, keys)| {
                keys.into_iter()
                    .filter(move |(_, m)| *m == mid)
                    .map(move |(key, _)| (key, server.clone()))
            })
            .collect();
        devices.sort();
        Ok((devices, found.complete))
    }

    pub async fn kick(
        &self,
        keys: Vec<String>,
        mut mids: Vec<i64>,
        reason: String,
    ) -> Result<Targeted, PushError> {
        mids.sort_unstable();
        mids.dedup();
        if keys.is_empty() && mids.is_empty() {
            return Err(PushError::BadRequest(
                "keys or mids: at least one is required".into(),
            ));
        }
        if reason.len() > 256 {
            return Err(PushError::BadRequest("reason: at most 256 bytes".into()));
        }
        // Keys by comet, each with the user presence found it for.
        let mut by: std::collections::BTreeMap<String, (Vec<String>, Vec<i64>)> =
            Default::default();
        let (mut found, mut complete) = (0, true);
        let mut add = |f: crate::online::Found<UserKeysByServer>| {
            complete &= f.complete;
            for (server, pairs) in f.servers {
                found += pairs.len();
                let e = by.entry(server).or_default();
                for (k, m) in pairs {
                    e.0.push(k);
                    e.1.push(m);
                }
            }
        };
        if !keys.is_empty() {
            add(self.online.servers_by_keys(&keys).await?);
        }
        if !mids.is_empty() {
            add(self.online.servers_by_mids(&mids).await?);
        }
        self.count("kick");
        for (server, (keys, mids)) in by {
            let m = PushMsg {
                r#type: PushType::Push as i32,
                server,
                keys,
                mids,
                kick: if reason.is_empty() {
                    "kicked".into()
                } else {
                    reason.clone()
                },
                ..Default::default()
            };
            self.to_job(m).await?;
        }
        Ok(self.targeted(found, complete))
    }

    async fn to_job(&self, m: PushMsg) -> Result<(), PushError> {
        self.job
            .push(m)
            .await
            .map(|_| ())
            .map_err(|e| PushError::Job(e.message().to_string()))
    }

    fn count(&self, kind: &'static str) {
        self.metrics.pushes.get_or_create(&Kind { kind }).inc();
    }

    /// Records how long a push request of `kind` took, answered or refused.
    pub fn push_took(&self, kind: &'static str, started: std::time::Instant) {
        self.metrics
            .push_seconds
            .get_or_create(&Kind { kind })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Pushes to connections by key; returns how many of the keys are online, and whether
    /// presence can have missed some (counted `presence_incomplete`).
    pub async fn push_keys(
        &self,
        op: i32,
        keys: Vec<String>,
        msg: Bytes,
    ) -> Result<Targeted, PushError> {
        if keys.is_empty() {
            return Err(PushError::BadRequest(
                "keys: at least one key is required".into(),
            ));
        }
        self.check_body(&msg)?;
        let by = self.online.servers_by_keys(&keys).await?;
        let found: usize = by.servers.values().map(Vec::len).sum();
        self.metrics
            .unknown_targets
            .inc_by((keys.len().saturating_sub(found)) as u64);
        let keys_offline = offline_keys(&keys, &by.servers);
        // Only a key that was not found can be on a comet whose presence is incomplete.
        let complete = by.complete || found >= keys.len();
        self.count("keys");
        let targeted = Targeted {
            keys_offline,
            ..self.targeted(found, complete)
        };
        if self.cfg.user_streams {
            self.push_key_streams(op, by.servers, msg).await?;
            return Ok(targeted);
        }
        // With the user each key was found for: the comet delivers only to that user, should
        // the key have been reused by another since.
        let servers = by.servers.into_iter().map(|(server, pairs)| {
            let (keys, mids) = pairs.into_iter().unzip();
            (server, keys, mids)
        });
        self.push_by_server(op, servers, msg).await?;
        Ok(targeted)
    }

    /// Pushes to every connection of the users; returns how many keys they hold online, and
    /// whether presence can have missed some (counted `presence_incomplete`).
    pub async fn push_mids(
        &self,
        op: i32,
        mut mids: Vec<i64>,
        msg: Bytes,
    ) -> Result<Targeted, PushError> {
        // A user named twice gets the message once.
        mids.sort_unstable();
        mids.dedup();
        if mids.is_empty() {
            return Err(PushError::BadRequest(
                "mids: at least one mid is required".into(),
            ));
        }
        self.check_body(&msg)?;
        let by = self.online.servers_by_mids(&mids).await?;
        self.push_found_mids(op, mids, by, msg).await
    }

    /// [`Logic::push_mids`] once presence was looked up (`by`: where `mids` are connected).
    pub(crate) async fn push_found_mids(
        &self,
        op: i32,
        mids: Vec<i64>,
        by: crate::online::Found<UserKeysByServer>,
        msg: Bytes,
    ) -> Result<Targeted, PushError> {
        self.check_body(&msg)?;
        let found: usize = by.servers.values().map(Vec::len).sum();
        if by.servers.is_empty() {
            self.metrics.unknown_targets.inc_by(mids.len() as u64);
        }
        self.count("mids");
        let complete = by.complete;
        if self.cfg.user_streams {
            self.push_user_streams(op, &mids, by.servers, msg).await?;
            return Ok(self.targeted(found, complete));
        }
        let servers = by.servers.into_iter().map(|(server, pairs)| {
            let (keys, mids) = pairs.into_iter().unzip();
            (server, keys, mids)
        });
        self.push_by_server(op, servers, msg).await?;
        Ok(self.targeted(found, complete))
    }

    /// One call per user, to the job numbering that user's stream: every key of the user
    /// (on any comet), or none when the user is offline (the message is still numbered and
    /// kept for the user's next recovery).
    async fn push_user_streams(
        &self,
        op: i32,
        mids: &[i64],
        servers: UserKeysByServer,
        msg: Bytes,
    ) -> Result<(), PushError> {
        let mut per_user: BTreeMap<i64, PushMsg> = mids
            .iter()
            .map(|&mid| {
                let m = PushMsg {
                    r#type: PushType::Push as i32,
                    operation: op,
                    stream: format!("user://{mid}"),
                    msg: msg.clone(),
                    ..Default::default()
                };
                (mid, m)
            })
            .collect();
        for (server, pairs) in servers {
            for (key, mid) in pairs {
                if let Some(m) = per_user.get_mut(&mid) {
                    m.keys.push(key);
                    m.mids.push(mid);
                    m.servers.push(server.clone());
                }
            }
        }
        // All at once: calls for one job then share a PushBatch.
        futures_util::future::try_join_all(per_user.into_values().map(|m| self.to_job(m))).await?;
        Ok(())
    }

    /// One call per key found, to the job numbering that connection's stream
    /// (`key://{mid}/{key}`: bound to the user, so a key reused by another user never reads
    /// the first one's pushes). A key not online has no known user and is not numbered.
    async fn push_key_streams(
        &self,
        op: i32,
        servers: UserKeysByServer,
        msg: Bytes,
    ) -> Result<(), PushError> {
        let mut calls = Vec::new();
        for (server, pairs) in servers {
            for (key, mid) in pairs {
                let m = PushMsg {
                    r#type: PushType::Push as i32,
                    operation: op,
                    stream: format!("key://{mid}/{key}"),
                    keys: vec![key],
                    mids: vec![mid],
                    servers: vec![server.clone()],
                    msg: msg.clone(),
                    ..Default::default()
                };
                calls.push(self.to_job(m));
            }
        }
        // All at once: calls for one job then share a PushBatch.
        futures_util::future::try_join_all(calls).await?;
        Ok(())
    }

    fn targeted(&self, keys_found: usize, presence_complete: bool) -> Targeted {
        if !presence_complete {
            self.metrics.presence_incomplete.inc();
        }
        Targeted {
            keys_found,
            presence_complete,
            keys_offline: Vec::new(),
        }
    }

    pub async fn push_room(
        &self,
        op: i32,
        typ: &str,
        room: &str,
        msg: Bytes,
    ) -> Result<(), PushError> {
        self.check_body(&msg)?;
        // `user://` and `key://` name users' and connections' numbered streams in job; a
        // room push there would write into one.
        if typ == "user" || typ == "key" {
            return Err(PushError::BadRequest(format!(
                "type: {typ} is reserved for numbered user and key streams"
            )));
        }
        let room = room_key(typ, room);
        // The same bound clients and tokens get: a room id becomes etcd records and job state.
        if room.len() > MAX_ID {
            return Err(PushError::BadRequest(format!(
                "room: type://room is {} bytes, over the limit of {MAX_ID}",
                room.len()
            )));
        }
        let m = PushMsg {
            r#type: PushType::Room as i32,
            operation: op,
            room,
            msg,
            ..Default::default()
        };
        self.count("room");
        self.to_job(m).await
    }

    pub async fn push_all(&self, op: i32, speed: i32, msg: Bytes) -> Result<(), PushError> {
        self.check_body(&msg)?;
        let m = PushMsg {
            r#type: PushType::Broadcast as i32,
            operation: op,
            speed,
            msg,
            ..Default::default()
        };
        self.count("all");
        self.to_job(m).await
    }

    pub async fn room_counts(&self) -> Result<HashMap<String, i32>, OnlineError> {
        self.online.room_counts().await
    }

    /// `(ip_count, conn_count)` summed over the comets, as goim does.
    pub fn totals(&self) -> (i64, i64) {
        self.nodes
            .instances()
            .iter()
            .fold((0, 0), |(i, c), n| (i + n.ip_count, c + n.conn_count))
    }

    pub fn instances(&self) -> Vec<CometInstance> {
        self.nodes.instances()
    }

    /// goim's `NodesReply` for a client (`web` gets domains, others public addresses).
    pub fn nodes_weighted(&self, platform: &str) -> NodesReply {
        let node = &self.cfg.node;
        let instances = self.nodes.instances();
        // goim has no IP geolocation (its `location()` is a stub), so the client region is "".
        let ranked = self
            .balancer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rank(&instances, "", node.region_weight)
            .into_iter()
            .cloned()
            .collect::<Vec<_>>();
        let mut nodes: Vec<String> = if platform == "web" {
            ranked
                .iter()
                .map(|n| format!("{}{}", n.name, node.host_domain))
                .collect()
        } else {
            ranked
                .iter()
                .flat_map(|n| n.addrs.iter().cloned())
                .collect()
        };
        nodes.retain(|n| !n.is_empty());
        if nodes.is_empty() {
            nodes.push(node.default_domain.clone());
        }
        NodesReply {
            domain: node.default_domain.clone(),
            tcp_port: node.tcp_port,
            ws_port: node.ws_port,
            wss_port: node.wss_port,
            heartbeat: self.cfg.heartbeat.as_secs() as i32,
            nodes,
            backoff: Some(Backoff {
                max_delay: self.cfg.backoff.max_delay,
                base_delay: self.cfg.backoff.base_delay,
                factor: self.cfg.backoff.factor,
                jitter: self.cfg.backoff.jitter,
            }),
            heartbeat_max: self.cfg.heartbeat_max as i32,
        }
    }
}

/// goim's room key: `type://room`.
pub fn room_key(typ: &str, room: &str) -> String {
    format!("{typ}://{room}")
}

/// The keys of `keys` presence did not find in `found`, each once, in the order named.
fn offline_keys(keys: &[String], found: &UserKeysByServer) -> Vec<String> {
    let online: std::collections::HashSet<&str> =
        found.values().flatten().map(|(k, _)| k.as_str()).collect();
    let mut seen = std::collections::HashSet::new();
    keys.iter()
        .filter(|k| !online.contains(k.as_str()) && seen.insert(k.as_str()))
        .cloned()
        .collect()
}

fn online_status(e: OnlineError) -> Status {
    Status::unavailable(e.to_string())
}

fn unix_secs(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

impl Logic {
    /// A token checked by the configured authenticator; failures counted.
    async fn verify(&self, token: &[u8], cookie: &str) -> Result<crate::auth::Identity, Status> {
        self.auth.verify(token, cookie).await.map_err(|e| {
            self.metrics.auth_failures.inc();
            match e {
                AuthError::Malformed(_) => Status::invalid_argument(e.to_string()),
                AuthError::Refused(_) => Status::unauthenticated(e.to_string()),
            }
        })
    }
}

#[async_trait]
impl LogicService for Logic {
    async fn connect(&self, req: ConnectReq) -> Result<ConnectReply, Status> {
        let id = self.verify(&req.token, &req.cookie).await?;
        let key = if id.key.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            id.key
        };
        // Unlike goim, a connection whose presence could not be stored is refused: it could
        // not be reached by key or mid anyway. Tokens are never logged.
        let presence_revision = self
            .online
            .add(
                Origin::new(&req.server, req.lease),
                id.mid,
                &key,
                &id.room_id,
            )
            .await
            .map_err(online_status)?;
        self.metrics.connects.inc();
        tracing::debug!(%key, mid = id.mid, server = %req.server, "connected");
        self.event(|| {
            let mut e = crate::events::Event::new("connect", id.mid, &key, &req.server);
            e.room = id.room_id.clone();
            e
        });
        Ok(ConnectReply {
            mid: id.mid,
            key,
            room_id: id.room_id,
            accepts: id.accepts,
            heartbeat: self.cfg.idle_timeout().as_nanos().min(i64::MAX as u128) as i64,
            presence_revision,
            expires: unix_secs(id.expires),
            rooms: id.extra_rooms,
        })
    }

    /// A comet says a connection joined or left a room: a lifecycle event for the business.
    async fn room_event(&self, req: RoomEventReq) -> Result<RoomEventReply, Status> {
        self.event(|| {
            let kind = if req.joined {
                "room_join"
            } else {
                "room_leave"
            };
            let mut e = crate::events::Event::new(kind, req.mid, &req.key, &req.server);
            e.room = req.room.clone();
            e
        });
        Ok(RoomEventReply {})
    }

    /// A connection's new token: it must be valid and name the same user (and the same key,
    /// if it names one); a token cannot move a connection to another identity.
    async fn refresh(&self, req: RefreshReq) -> Result<RefreshReply, Status> {
        let id = self.verify(&req.token, "").await?;
        if id.mid != req.mid || (!id.key.is_empty() && id.key != req.key) {
            self.metrics.auth_failures.inc();
            return Err(Status::permission_denied(
                "the new token names another user or key",
            ));
        }
        self.metrics.refreshes.inc();
        Ok(RefreshReply {
            expires: unix_secs(id.expires),
        })
    }

    async fn disconnect(&self, req: DisconnectReq) -> Result<DisconnectReply, Status> {
        self.metrics.disconnects.inc();
        let has = self
            .online
            .del(
                Origin::new(&req.server, req.lease),
                req.mid,
                &req.key,
                req.presence_revision,
            )
            .await
            .map_err(online_status)?;
        self.event(|| {
            let mut e = crate::events::Event::new("disconnect", req.mid, &req.key, &req.server);
            e.reason = req.reason.clone();
            e
        });
        Ok(DisconnectReply { has })
    }

    /// All at once, so their presence deletes share the batched etcd writes.
    async fn disconnects(&self, req: DisconnectsReq) -> Result<DisconnectsReply, Status> {
        self.metrics.disconnect_batches.inc();
        let each = req.disconnects.into_iter().map(|d| self.disconnect(d));
        let results = futures_util::future::join_all(each).await;
        Ok(DisconnectsReply {
            results: results.into_iter().map(DisconnectResult::from).collect(),
        })
    }

    /// A room's history for a client that reconnects, from the job numbering the room.
    async fn history(&self, req: HistoryReq) -> Result<HistoryReply, Status> {
        self.job.history(req).await
    }

    async fn heartbeat(&self, req: HeartbeatReq) -> Result<HeartbeatReply, Status> {
        // Presence hangs on the comet's lifetime (its etcd lease in distributed mode), so a
        // heartbeat from our comets costs no write; only a lapsed mapping is put back.
        self.online
            .touch(Origin::new(&req.server, 0), req.mid, &req.key)
            .await
            .map_err(online_status)?;
        Ok(HeartbeatReply {})
    }

    async fn renew_online(&self, req: OnlineReq) -> Result<OnlineReply, Status> {
        self.online
            .renew_rooms(Origin::new(&req.server, req.lease), req.room_count)
            .await
            .map_err(online_status)?;
        let all_room_count = self.online.room_counts().await.map_err(online_status)?;
        Ok(OnlineReply { all_room_count })
    }

    async fn nodes(&self, req: NodesReq) -> Result<NodesReply, Status> {
        Ok(self.nodes_weighted(&req.platform))
    }

    async fn receive(&self, req: ReceiveReq) -> Result<ReceiveReply, Status> {
        let op = req.proto.as_ref().map_or(0, |p| p.op);
        // Conversation requests are logic's own (ops 37-46 are goim-rs's, not the app's).
        if let Some(reply_op) = goim_proto::op::conversation_reply(op) {
            return Ok(match &self.chat {
                Some(chat) => self.conversation_op(chat, &req, reply_op).await,
                None => ReceiveReply {
                    error: "conversations are off".into(),
                    code: 501,
                    op: reply_op,
                    ..Default::default()
                },
            });
        }
        let Some(f) = &self.forward else {
            tracing::debug!(
                mid = req.mid,
                op,
                "receive: no forwarding configured, dropped"
            );
            return Ok(ReceiveReply::default());
        };
        let (reply, outcome) = f.forward(&req).await;
        self.metrics
            .forwarded
            .get_or_create(&Outcome {
                outcome: outcome.label(),
            })
            .inc();
        Ok(reply)
    }
}
