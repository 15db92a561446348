//! The conversations' gRPC API for backends (`goim.chat.Conversations`), the HTTP API's twin:
//! the same store calls and delivery, errors as gRPC codes, API keys as call metadata.

use std::sync::Arc;

use goim_chat::{ChatError, Kind, Page};
use goim_proto::chat as pb;
use goim_proto::chat::conversations_server::{Conversations, ConversationsServer};
use tonic::{Request, Response, Status};

use super::Chat;
use crate::api_keys::ApiKeys;
use crate::logic::Logic;

pub struct ConversationsApi {
    logic: Arc<Logic>,
    keys: ApiKeys,
}

/// The service, checking `keys` (when any are configured) on every call.
pub fn server(logic: Arc<Logic>, keys: ApiKeys) -> ConversationsServer<ConversationsApi> {
    ConversationsServer::new(ConversationsApi { logic, keys })
}

fn status(e: ChatError) -> Status {
    match e {
        ChatError::Invalid(m) => Status::invalid_argument(m),
        e @ ChatError::NotMember { .. } => Status::permission_denied(e.to_string()),
        e @ ChatError::NotFound(_) => Status::not_found(e.to_string()),
        e @ ChatError::Exists(_) => Status::already_exists(e.to_string()),
        e @ (ChatError::Store(_) | ChatError::Migrate(_)) => Status::unavailable(e.to_string()),
    }
}

fn conversation(c: goim_chat::Conversation) -> pb::Conversation {
    pb::Conversation {
        id: c.id,
        kind: c.kind.as_str().into(),
        last_seq: c.last_seq,
        created: c.created,
        members: c.members as i64,
    }
}

fn member(m: goim_chat::Member) -> pb::Member {
    pb::Member {
        mid: m.mid,
        muted: m.muted,
        dnd: m.dnd,
        read_seq: m.read_seq,
    }
}

fn message(m: goim_chat::Message) -> pb::Message {
    pb::Message {
        conversation: m.conversation,
        seq: m.seq,
        sender: m.sender,
        op: m.op,
        body: m.body,
        time: m.time,
        client_id: m.client_id.unwrap_or_default(),
    }
}

fn summary(s: goim_chat::Summary) -> pb::Summary {
    pb::Summary {
        conversation: s.conversation,
        kind: s.kind.as_str().into(),
        last_seq: s.last_seq,
        read_seq: s.read_seq,
        unread: s.unread,
        muted: s.muted,
        dnd: s.dnd,
        last: s.last.map(|p| pb::Preview {
            seq: p.seq,
            sender: p.sender,
            text: p.text,
            time: p.time,
        }),
        time: s.time,
    }
}

fn limit(n: i64, default: usize) -> usize {
    if n <= 0 {
        default
    } else {
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

impl ConversationsApi {
    /// The conversations, after the caller's key was checked.
    fn chat<T>(&self, req: &Request<T>) -> Result<&Arc<Chat>, Status> {
        if !self.keys.allows(&req.metadata().clone().into_headers()) {
            return Err(Status::unauthenticated("missing or wrong API key"));
        }
        self.logic.chat().ok_or_else(|| {
            Status::unimplemented("conversations are off: set [logic.conversations] store")
        })
    }
}

#[tonic::async_trait]
impl Conversations for ConversationsApi {
    async fn create(
        &self,
        req: Request<pb::CreateReq>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let kind = match r.kind.as_str() {
            "" | "group" => Kind::Group,
            "direct" => Kind::Direct,
            other => {
                return Err(Status::invalid_argument(format!(
                    "kind {other:?}: group or direct"
                )))
            }
        };
        let id = (!r.id.is_empty()).then_some(r.id.as_str());
        let c = chat
            .store()
            .create(id, kind, &r.members)
            .await
            .map_err(status)?;
        Ok(Response::new(conversation(c)))
    }

    async fn get(&self, req: Request<pb::GetReq>) -> Result<Response<pb::GetReply>, Status> {
        let chat = self.chat(&req)?;
        let id = req.into_inner().id;
        let c = chat.store().get(&id).await.map_err(status)?;
        let members = chat.store().members(&id).await.map_err(status)?;
        Ok(Response::new(pb::GetReply {
            conversation: Some(conversation(c)),
            members: members.into_iter().map(member).collect(),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteReq>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let chat = self.chat(&req)?;
        let id = req.into_inner().id;
        if !chat.store().delete(&id).await.map_err(status)? {
            return Err(status(ChatError::NotFound(id)));
        }
        Ok(Response::new(pb::DeleteReply {}))
    }

    async fn add_members(
        &self,
        req: Request<pb::MembersReq>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let n = chat
            .store()
            .add_members(&r.id, &r.mids)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::MembersReply { changed: n as i64 }))
    }

    async fn remove_members(
        &self,
        req: Request<pb::MembersReq>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let n = chat
            .store()
            .remove_members(&r.id, &r.mids)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::MembersReply { changed: n as i64 }))
    }

    async fn set_member(
        &self,
        req: Request<pb::SetMemberReq>,
    ) -> Result<Response<pb::Member>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let m = chat
            .store()
            .set_member(&r.id, r.mid, r.muted, r.dnd)
            .await
            .map_err(status)?;
        Ok(Response::new(member(m)))
    }

    async fn send(&self, req: Request<pb::SendReq>) -> Result<Response<pb::SendReply>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let client_id = (!r.client_id.is_empty()).then_some(r.client_id.as_str());
        let (sent, delivered) = self
            .logic
            .conversation_send(chat, &r.conversation, r.sender, r.op, &r.body, client_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SendReply {
            seq: sent.message.seq,
            time: sent.message.time,
            duplicate: sent.duplicate,
            pushed: delivered.pushed as i64,
            notified: delivered.notified as i64,
        }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryReq>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let page = match r.cursor {
            Some(pb::history_req::Cursor::Before(b)) => Page::Before(b),
            Some(pb::history_req::Cursor::After(a)) => Page::After(a),
            None => Page::Before(i64::MAX),
        };
        let msgs = chat
            .store()
            .history(&r.conversation, r.mid, page, limit(r.limit, 50))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::HistoryReply {
            messages: msgs.into_iter().map(message).collect(),
        }))
    }

    async fn mark_read(
        &self,
        req: Request<pb::ReadReq>,
    ) -> Result<Response<pb::ReadReply>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let read_seq = self
            .logic
            .conversation_read(chat, &r.conversation, r.mid, r.seq)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReadReply { read_seq }))
    }

    async fn inbox(&self, req: Request<pb::InboxReq>) -> Result<Response<pb::InboxReply>, Status> {
        let chat = self.chat(&req)?;
        let r = req.into_inner();
        let inbox = chat
            .store()
            .inbox(r.mid, limit(r.limit, 100))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::InboxReply {
            conversations: inbox.conversations.into_iter().map(summary).collect(),
            total_unread: inbox.total_unread,
        }))
    }
}
