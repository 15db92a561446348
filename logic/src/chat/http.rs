//! The conversations' HTTP API for backends, beside goim's (same `{"code","message","data"}`
//! envelope, same API keys), with JSON bodies and the HTTP status matching `code`
//! (docs/CONVERSATIONS.md has each route):
//!
//! - `POST   /goim/conversations` `{"id"?,"kind"?,"members":[..]}`
//! - `GET    /goim/conversations/{id}` (with its members), `DELETE` the same
//! - `POST   /goim/conversations/{id}/members` `{"mids":[..]}`,
//!   `DELETE /goim/conversations/{id}/members/{mid}`,
//!   `PATCH  /goim/conversations/{id}/members/{mid}` `{"muted"?,"dnd"?}`
//! - `POST   /goim/conversations/{id}/messages` `{"sender","body","op"?,"client_id"?}`,
//!   `GET    /goim/conversations/{id}/messages?before=N|after=N&limit=L&mid=M`
//! - `POST   /goim/conversations/{id}/read` `{"mid","seq"}`
//! - `GET    /goim/users/{mid}/conversations?limit=L`

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, patch, post};
use axum::Router;
use goim_chat::{ChatError, Kind, Page};
use serde::Deserialize;
use serde_json::{json, Value};

use super::ops::code;
use crate::http::reply;
use crate::logic::Logic;

#[derive(Clone)]
struct ChatState {
    logic: Arc<Logic>,
}

pub fn router(logic: Arc<Logic>) -> Router {
    Router::new()
        .route("/goim/conversations", post(create))
        .route("/goim/conversations/{id}", get(show).delete(remove))
        .route("/goim/conversations/{id}/members", post(add_members))
        .route(
            "/goim/conversations/{id}/members/{mid}",
            patch(set_member).delete(remove_member),
        )
        .route("/goim/conversations/{id}/messages", post(send).get(history))
        .route("/goim/conversations/{id}/read", post(read))
        .route("/goim/users/{mid}/conversations", get(inbox))
        .with_state(ChatState { logic })
}

fn failed(e: ChatError) -> Response {
    let c = code(&e);
    if c == 503 {
        tracing::warn!(error = %e, "conversation store call failed");
    }
    let mut r = reply(-c, e.to_string(), None);
    *r.status_mut() = StatusCode::from_u16(c as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

fn done(data: Value) -> Response {
    reply(0, "", Some(data))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ChatError> {
    serde_json::from_slice(body).map_err(|e| ChatError::Invalid(format!("request body: {e}")))
}

/// 501: no store configured.
fn off() -> Response {
    let mut r = reply(
        -501,
        "conversations are off: set [logic.conversations] store",
        None,
    );
    *r.status_mut() = StatusCode::NOT_IMPLEMENTED;
    r
}

macro_rules! attempt {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return failed(e),
        }
    };
}

macro_rules! chat_or_off {
    ($s:expr) => {
        match $s.logic.chat() {
            Some(c) => c,
            None => return off(),
        }
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateReq {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    kind: Kind,
    #[serde(default)]
    members: Vec<i64>,
}

async fn create(State(s): State<ChatState>, body: Bytes) -> Response {
    let chat = chat_or_off!(s);
    let r: CreateReq = attempt!(parse(&body));
    let c = attempt!(
        chat.store()
            .create(r.id.as_deref(), r.kind, &r.members)
            .await
    );
    done(json!(c))
}

async fn show(State(s): State<ChatState>, Path(id): Path<String>) -> Response {
    let chat = chat_or_off!(s);
    let c = attempt!(chat.store().get(&id).await);
    let members = attempt!(chat.store().members(&id).await);
    done(json!({ "conversation": c, "members": members }))
}

async fn remove(State(s): State<ChatState>, Path(id): Path<String>) -> Response {
    let chat = chat_or_off!(s);
    if !attempt!(chat.store().delete(&id).await) {
        return failed(ChatError::NotFound(id));
    }
    done(json!({ "deleted": id }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MidsReq {
    mids: Vec<i64>,
}

async fn add_members(State(s): State<ChatState>, Path(id): Path<String>, body: Bytes) -> Response {
    let chat = chat_or_off!(s);
    let r: MidsReq = attempt!(parse(&body));
    let added = attempt!(chat.store().add_members(&id, &r.mids).await);
    done(json!({ "added": added }))
}

async fn remove_member(
    State(s): State<ChatState>,
    Path((id, mid)): Path<(String, i64)>,
) -> Response {
    let chat = chat_or_off!(s);
    if attempt!(chat.store().remove_members(&id, &[mid]).await) == 0 {
        return failed(ChatError::NotMember {
            conversation: id,
            mid,
        });
    }
    done(json!({ "removed": mid }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberReq {
    #[serde(default)]
    muted: Option<bool>,
    #[serde(default)]
    dnd: Option<bool>,
}

async fn set_member(
    State(s): State<ChatState>,
    Path((id, mid)): Path<(String, i64)>,
    body: Bytes,
) -> Response {
    let chat = chat_or_off!(s);
    let r: MemberReq = attempt!(parse(&body));
    let m = attempt!(chat.store().set_member(&id, mid, r.muted, r.dnd).await);
    done(json!(m))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendReq {
    /// 0 (or absent): the backend's own message, from no member.
    #[serde(default)]
    sender: i64,
    body: String,
    #[serde(default)]
    op: i32,
    #[serde(default)]
    client_id: Option<String>,
}

async fn send(State(s): State<ChatState>, Path(id): Path<String>, body: Bytes) -> Response {
    let chat = chat_or_off!(s);
    let r: SendReq = attempt!(parse(&body));
    let (sent, delivered) = attempt!(
        s.logic
            .conversation_send(chat, &id, r.sender, r.op, &r.body, r.client_id.as_deref())
            .await
    );
    done(json!({
        "conversation": id,
        "seq": sent.message.seq,
        "time": sent.message.time,
        "duplicate": sent.duplicate,
        "pushed": delivered.pushed,
        "notified": delivered.notified,
    }))
}

/// `before` or `after` (default: the newest page), `limit`, and `mid` to read as a member.
async fn history(State(s): State<ChatState>, Path(id): Path<String>, uri: Uri) -> Response {
    let chat = chat_or_off!(s);
    let q = Query::from(&uri);
    let page = match (q.num("before"), q.num("after")) {
        (Ok(Some(_)), Ok(Some(_))) => {
            return failed(ChatError::Invalid("before or after, not both".into()))
        }
        (Ok(Some(b)), _) => Page::Before(b),
        (_, Ok(Some(a))) => Page::After(a),
        (Err(e), _) | (_, Err(e)) => return failed(e),
        _ => Page::Before(i64::MAX),
    };
    let limit = attempt!(q.num("limit")).unwrap_or(50);
    let mid = attempt!(q.num("mid")).unwrap_or(0);
    let msgs = attempt!(
        chat.store()
            .history(&id, mid, page, usize::try_from(limit).unwrap_or(1))
            .await
    );
    done(json!({ "conversation": id, "messages": msgs }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadReq {
    mid: i64,
    seq: i64,
}

async fn read(State(s): State<ChatState>, Path(id): Path<String>, body: Bytes) -> Response {
    let chat = chat_or_off!(s);
    let r: ReadReq = attempt!(parse(&body));
    let read = attempt!(s.logic.conversation_read(chat, &id, r.mid, r.seq).await);
    done(json!({ "conversation": id, "mid": r.mid, "read_seq": read }))
}

async fn inbox(State(s): State<ChatState>, Path(mid): Path<i64>, uri: Uri) -> Response {
    let chat = chat_or_off!(s);
    let q = Query::from(&uri);
    let limit = attempt!(q.num("limit")).unwrap_or(100);
    let inbox = attempt!(
        chat.store()
            .inbox(mid, usize::try_from(limit).unwrap_or(1))
            .await
    );
    done(
        json!({ "mid": mid, "conversations": inbox.conversations, "total_unread": inbox.total_unread }),
    )
}

/// Query parameters, each at most once.
struct Query(Vec<(String, String)>);

impl Query {
    fn from(uri: &Uri) -> Query {
        Query(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn num(&self, name: &str) -> Result<Option<i64>, ChatError> {
        match self.0.iter().find(|(k, _)| k == name) {
            None => Ok(None),
            Some((_, v)) => v
                .parse()
                .map(Some)
                .map_err(|_| ChatError::Invalid(format!("{name}: {v:?} is not a valid number"))),
        }
    }
}
