//! Conversations in logic: the store (goim-chat), delivery by the policy (push to members
//! online, notify the offline, nothing for the muted beyond their unread count), read-cursor
//! sync across a user's devices, and the conversation ops clients send over their connection.

pub mod grpc;
pub mod http;
pub mod notify;
mod ops;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use goim_chat::policy::{self, Action};
use goim_chat::{ChatError, Limits, Member, Message, Store};
use goim_config::ConversationsConfig;
use goim_proto::op;
use prometheus_client::encoding::EncodeLabelSet;
use tokio_util::sync::CancellationToken;

use crate::logic::{Logic, LogicMetrics};
use notify::{Job, Notification, Notifier};

/// Why a conversation message did not reach a member it should have reached at once (they
/// still have it in history and their unread count).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// What the policy gave a member for a message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Given {
    pub action: &'static str,
}

pub struct Chat {
    store: Store,
    notifier: Option<Notifier>,
    renotify_after: Duration,
    members: Mutex<MemberCache>,
}

/// Member lists by conversation, each under the members' version it was read at: used only
/// for a message stored at that same version, so a change on any logic replica (which bumps
/// the version in the store) is never missed. Bounded in members held.
#[derive(Default)]
struct MemberCache {
    lists: HashMap<String, (i64, Arc<Vec<Member>>)>,
    held: usize,
}

/// Members cached at most (about 32 bytes each).
const CACHED_MEMBERS: usize = 1_000_000;

impl MemberCache {
    fn get(&self, id: &str, version: i64) -> Option<Arc<Vec<Member>>> {
        self.lists
            .get(id)
            .filter(|(v, _)| *v == version)
            .map(|(_, l)| l.clone())
    }

    fn put(&mut self, id: &str, version: i64, list: Arc<Vec<Member>>) {
        if list.len() > CACHED_MEMBERS / 4 {
            return;
        }
        if let Some((_, old)) = self.lists.remove(id) {
            self.held -= old.len();
        }
        // Full: start over (cheap, and the lists in use come back on their next message).
        if self.held + list.len() > CACHED_MEMBERS {
            self.lists.clear();
            self.held = 0;
        }
        self.held += list.len();
        self.lists.insert(id.to_string(), (version, list));
    }
}

/// The store URL: `store`, or the content of `store_file` (a mounted Secret).
fn store_url(cfg: &ConversationsConfig) -> Result<Option<String>, ChatError> {
    if !cfg.store.is_empty() {
        return Ok(Some(cfg.store.clone()));
    }
    if cfg.store_file.is_empty() {
        return Ok(None);
    }
    let url = std::fs::read_to_string(&cfg.store_file).map_err(|e| {
        ChatError::Invalid(format!(
            "reading the conversation store URL from {}: {e}",
            cfg.store_file
        ))
    })?;
    Ok(Some(url.trim().to_string()))
}

impl Chat {
    /// Opens the configured store and starts the notification sink; `None` when no store
    /// is configured.
    pub async fn open(
        cfg: &ConversationsConfig,
        metrics: &LogicMetrics,
    ) -> Result<Option<Chat>, ChatError> {
        let Some(url) = store_url(cfg)? else {
            return Ok(None);
        };
        let limits = Limits {
            max_body: cfg.max_body,
            max_members: cfg.max_members,
            preview_chars: cfg.preview_chars,
            max_page: cfg.max_page.max(1),
        };
        let store = Store::open(&url, limits).await?;
        let notifier =
            Notifier::start(&cfg.notify, store.clone(), metrics.notifications.clone())
                .map_err(|e| ChatError::Invalid(format!("[logic.conversations.notify]: {e}")))?;
        tracing::info!(store = ?store.kind(), notify = notifier.is_some(), "conversations on");
        Ok(Some(Chat {
            store,
            notifier,
            renotify_after: cfg.renotify_after,
            members: Mutex::default(),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The members a message stored at `version` goes to: cached when the version matches,
    /// else read (and cached under the version read).
    async fn members_at(
        &self,
        id: &str,
        version: Option<i64>,
    ) -> Result<Arc<Vec<Member>>, ChatError> {
        let cache = || self.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = version.and_then(|v| cache().get(id, v)) {
            return Ok(l);
        }
        let (read_at, list) = self.store.members_versioned(id).await?;
        let list = Arc::new(list);
        if let Some(v) = read_at {
            cache().put(id, v, list.clone());
        }
        Ok(list)
    }
}

/// How a renotify page ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Fewer than a page were due: nothing left.
    Done,
    /// A full page went: there may be more now.
    More,
    /// The sink's queue was full: the rest waits.
    QueueFull,
}

/// What happened to a message's members.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Members pushed to (online, not muted; the sender's devices included).
    pub pushed: usize,
    /// Offline members queued for a notification.
    pub notified: usize,
    /// Offline members whose notification waits for a later round (the queue was full).
    pub deferred: usize,
}

impl Logic {
    /// The conversations, when configured.
    pub fn chat(&self) -> Option<&Arc<Chat>> {
        self.chat.as_ref()
    }

    fn given(&self, action: &'static str, n: usize) {
        self.metrics
            .conversation_deliveries
            .get_or_create(&Given { action })
            .inc_by(n as u64);
    }

    fn undelivered(&self, reason: &'static str, n: usize) {
        self.metrics
            .conversation_undelivered
            .get_or_create(&Reason { reason })
            .inc_by(n as u64);
    }

    /// Stores a message and delivers it by the policy; a resend (same sender and client id)
    /// returns the first one, delivered then.
    pub async fn conversation_send(
        &self,
        chat: &Chat,
        conversation: &str,
        sender: i64,
        msg_op: i32,
        body: &str,
        client_id: Option<&str>,
    ) -> Result<(goim_chat::Sent, Delivered), ChatError> {
        let sent = chat
            .store
            .send(conversation, sender, msg_op, body, client_id)
            .await?;
        if sent.duplicate {
            return Ok((sent, Delivered::default()));
        }
        self.metrics.conversation_messages.inc();
        // Stored is acknowledged: a delivery that fails now is counted, and its
        // notifications wait in the store for the next round.
        let delivered = match self
            .deliver(chat, &sent.message, sent.members_version, true)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, conversation = %conversation, seq = sent.message.seq,
                    "stored, but not delivered");
                // The members are unknown here: counted once for the message.
                self.undelivered("members_unavailable", 1);
                Delivered::default()
            }
        };
        Ok((sent, delivered))
    }

    /// Pushes `m` to its members online (when `push`) and queues notifications for the
    /// offline. The message stays "to notify" in the store until the sink took them.
    async fn deliver(
        &self,
        chat: &Chat,
        m: &Message,
        members_version: Option<i64>,
        push: bool,
    ) -> Result<Delivered, ChatError> {
        let members = chat.members_at(&m.conversation, members_version).await?;
        // Presence only for those who could get a push or a notification.
        let candidates: Vec<i64> = members
            .iter()
            .filter(|x| !x.muted || x.mid == m.sender)
            .map(|x| x.mid)
            .collect();
        let mut presence = if candidates.is_empty() {
            crate::online::Found::complete(Default::default())
        } else {
            match self.online.servers_by_mids(&candidates).await {
                Ok(found) => found,
                Err(e) => {
                    // Nobody can be told apart: no push now, and the notifications wait
                    // for the next round (the message stays to notify).
                    tracing::warn!(error = %e, "conversation delivery: presence unavailable");
                    if push {
                        self.undelivered("presence_unavailable", candidates.len());
                    }
                    return Ok(Delivered::default());
                }
            }
        };
        let online: HashSet<i64> = presence
            .servers
            .values()
            .flat_map(|keys| keys.iter().map(|(_, mid)| *mid))
            .collect();
        let (mut to_push, mut to_notify, mut nothing) = (Vec::new(), Vec::new(), 0);
        for member in members.iter() {
            match policy::action(member, m.sender, online.contains(&member.mid)) {
                Action::Push => to_push.push(member.mid),
                Action::Notify => to_notify.push(member.mid),
                Action::Nothing => nothing += 1,
            }
        }
        let mut delivered = Delivered::default();
        if push && !to_push.is_empty() {
            let body = serde_json::to_vec(m).unwrap_or_default();
            // The connections presence just found for them: one lookup per message.
            let pushed: HashSet<i64> = to_push.iter().copied().collect();
            for keys in presence.servers.values_mut() {
                keys.retain(|(_, mid)| pushed.contains(mid));
            }
            presence.servers.retain(|_, keys| !keys.is_empty());
            match self
                .push_found_mids(
                    op::CONV_MESSAGE,
                    to_push.clone(),
                    presence,
                    Bytes::from(body),
                )
                .await
            {
                Ok(_) => {
                    delivered.pushed = to_push.len();
                    self.given("push", to_push.len());
                }
                Err(e) => {
                    tracing::warn!(error = %e, conversation = %m.conversation, seq = m.seq,
                        "conversation push failed");
                    let reason = if matches!(e, crate::logic::PushError::BadRequest(_)) {
                        "too_large"
                    } else {
                        "push_failed"
                    };
                    self.undelivered(reason, to_push.len());
                }
            }
        }
        if push {
            self.given("nothing", nothing);
        }
        match &chat.notifier {
            Some(n) if !to_notify.is_empty() => {
                let preview = goim_chat::preview(&m.body, chat.store.limits().preview_chars);
                let items = to_notify
                    .iter()
                    .map(|&mid| Notification {
                        id: format!("{}/{}/{mid}", m.conversation, m.seq),
                        mid,
                        conversation: m.conversation.clone(),
                        seq: m.seq,
                        sender: m.sender,
                        preview: preview.clone(),
                        time: m.time,
                    })
                    .collect();
                let job = Job {
                    conversation: m.conversation.clone(),
                    seq: m.seq,
                    items,
                };
                if n.offer(job) {
                    delivered.notified = to_notify.len();
                    if push {
                        self.given("notify", to_notify.len());
                    }
                } else {
                    delivered.deferred = to_notify.len();
                }
            }
            // No sink, or nobody to notify: done with this message.
            _ => chat.store.mark_notified(&m.conversation, m.seq).await?,
        }
        Ok(delivered)
    }

    /// Moves a member's read cursor and tells the user's devices (op `CONV_READ_SYNC`).
    pub async fn conversation_read(
        &self,
        chat: &Chat,
        conversation: &str,
        mid: i64,
        seq: i64,
    ) -> Result<i64, ChatError> {
        let read = chat.store.mark_read(conversation, mid, seq).await?;
        let body = serde_json::json!({ "conversation": conversation, "read_seq": read });
        if let Err(e) = self
            .push_mids(op::CONV_READ_SYNC, vec![mid], Bytes::from(body.to_string()))
            .await
        {
            tracing::warn!(error = %e, "read cursor sync not pushed");
            self.undelivered("push_failed", 1);
        }
        Ok(read)
    }

    /// Notifies again what a restart or a sink outage left unnotified (no pushes: those
    /// members catch up from history). Runs until `stop`.
    pub async fn renotify_loop(self: Arc<Self>, stop: CancellationToken) {
        let Some(chat) = self.chat.clone() else {
            return;
        };
        let every = (chat.renotify_after / 2).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            // Pages until the backlog is handed over or the queue is full again.
            loop {
                match self.renotify(&chat).await {
                    Ok(Round::More) if !stop.is_cancelled() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "renotify round failed");
                        break;
                    }
                }
            }
        }
    }

    /// One page of messages still to notify after `renotify_after`.
    pub async fn renotify(&self, chat: &Chat) -> Result<Round, ChatError> {
        const PAGE: usize = 100;
        let cutoff = goim_chat::now_ms() - chat.renotify_after.as_millis() as i64;
        let due = chat.store.unnotified(cutoff, PAGE).await?;
        for (conversation, seq) in &due {
            match chat.store.message(conversation, *seq).await? {
                Some(m) => match self.deliver(chat, &m, None, false).await {
                    // The queue is full: the rest waits for the next tick.
                    Ok(d) if d.deferred > 0 => return Ok(Round::QueueFull),
                    // Deleted meanwhile: nothing left to notify.
                    Ok(_) | Err(ChatError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                },
                None => chat.store.mark_notified(conversation, *seq).await?,
            }
        }
        Ok(if due.len() == PAGE {
            Round::More
        } else {
            Round::Done
        })
    }
}
