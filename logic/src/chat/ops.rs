//! Conversation requests from clients' connections (ops `CONV_*`, docs/PROTOCOL.md), as the
//! connection's user. Replies must fit one packet (`max_message`): history and lists are cut
//! short with `"more":true`.

use bytes::Bytes;
use goim_chat::{ChatError, Page};
use goim_proto::logic::{ReceiveReply, ReceiveReq};
use goim_proto::op;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Chat;
use crate::logic::Logic;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendReq {
    conversation: String,
    body: String,
    #[serde(default)]
    op: i32,
    #[serde(default)]
    client_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadReq {
    conversation: String,
    seq: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryReq {
    conversation: String,
    #[serde(default)]
    after: i64,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListReq {
    #[serde(default)]
    limit: Option<usize>,
}

/// The error code a client sees (HTTP's meaning).
pub fn code(e: &ChatError) -> i32 {
    match e {
        ChatError::Invalid(_) => 400,
        ChatError::NotMember { .. } => 403,
        ChatError::NotFound(_) => 404,
        ChatError::Exists(_) => 409,
        ChatError::Store(_) | ChatError::Migrate(_) => 503,
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ChatError> {
    serde_json::from_slice(body).map_err(|e| ChatError::Invalid(format!("request body: {e}")))
}

/// `items` as a JSON array cut to fit `budget` bytes with the rest of the reply; whether
/// any were left out.
fn fit(items: Vec<Value>, budget: usize) -> (Vec<Value>, bool) {
    let mut used = 0;
    let mut kept = Vec::new();
    let total = items.len();
    for v in items {
        let n = v.to_string().len() + 1;
        if used + n > budget {
            break;
        }
        used += n;
        kept.push(v);
    }
    let more = kept.len() < total;
    (kept, more)
}

impl Logic {
    /// Answers a conversation request on its reply op.
    pub(crate) async fn conversation_op(
        &self,
        chat: &Chat,
        req: &ReceiveReq,
        reply_op: i32,
    ) -> ReceiveReply {
        let body = req.proto.as_ref().map(|p| &p.body[..]).unwrap_or_default();
        let op = req.proto.as_ref().map_or(0, |p| p.op);
        let answer = if req.mid <= 0 {
            Err(ChatError::Invalid(
                "conversations need a connection authenticated as a user (mid > 0)".into(),
            ))
        } else {
            self.answer_conversation(chat, req.mid, op, body).await
        };
        match answer {
            Ok(v) => ReceiveReply {
                reply: Bytes::from(v.to_string()),
                op: reply_op,
                ..Default::default()
            },
            Err(e) => ReceiveReply {
                error: e.to_string(),
                code: code(&e),
                op: reply_op,
                ..Default::default()
            },
        }
    }

    async fn answer_conversation(
        &self,
        chat: &Chat,
        mid: i64,
        op: i32,
        body: &[u8],
    ) -> Result<Value, ChatError> {
        // Room for the envelope around a page.
        let budget = self.config().max_message.saturating_sub(128);
        match op {
            op::CONV_SEND => {
                let r: SendReq = parse(body)?;
                let (sent, _) = self
                    .conversation_send(
                        chat,
                        &r.conversation,
                        mid,
                        r.op,
                        &r.body,
                        r.client_id.as_deref(),
                    )
                    .await?;
                Ok(json!({
                    "conversation": r.conversation,
                    "seq": sent.message.seq,
                    "time": sent.message.time,
                    "duplicate": sent.duplicate,
                }))
            }
            op::CONV_READ => {
                let r: ReadReq = parse(body)?;
                let read = self
                    .conversation_read(chat, &r.conversation, mid, r.seq)
                    .await?;
                Ok(json!({ "conversation": r.conversation, "read_seq": read }))
            }
            op::CONV_HISTORY => {
                let r: HistoryReq = parse(body)?;
                let limit = r.limit.unwrap_or(50);
                let msgs = chat
                    .store()
                    .history(&r.conversation, mid, Page::After(r.after), limit)
                    .await?;
                let full = msgs.len() >= limit.clamp(1, chat.store().limits().max_page);
                let items = msgs
                    .iter()
                    .map(|m| serde_json::to_value(m).unwrap_or_default())
                    .collect();
                let (messages, cut) = fit(items, budget);
                Ok(json!({
                    "conversation": r.conversation,
                    "messages": messages,
                    "more": cut || full,
                }))
            }
            op::CONV_LIST => {
                let r: ListReq = if body.is_empty() {
                    ListReq::default()
                } else {
                    parse(body)?
                };
                let limit = r.limit.unwrap_or(50);
                let inbox = chat.store().inbox(mid, limit).await?;
                let full =
                    inbox.conversations.len() >= limit.clamp(1, chat.store().limits().max_page);
                let items = inbox
                    .conversations
                    .iter()
                    .map(|s| serde_json::to_value(s).unwrap_or_default())
                    .collect();
                let (conversations, cut) = fit(items, budget);
                Ok(json!({
                    "conversations": conversations,
                    "total_unread": inbox.total_unread,
                    "more": cut || full,
                }))
            }
            other => Err(ChatError::Invalid(format!(
                "op {other} is not a conversation request"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_cut_to_fit_a_packet() {
        let items: Vec<Value> = (0..10).map(|i| json!({ "seq": i })).collect();
        let (kept, more) = fit(items.clone(), 40);
        assert!(more);
        assert_eq!(kept, items[..4]);
        let (kept, more) = fit(items.clone(), 10_000);
        assert!(!more);
        assert_eq!(kept.len(), 10);
    }
}
