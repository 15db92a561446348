//! What the store keeps and answers, serialized as the HTTP API shows it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Any number of members, added and removed over time.
    #[default]
    Group,
    /// Two users; its id is derived from them, so creating it again finds the same one.
    Direct,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Group => "group",
            Kind::Direct => "direct",
        }
    }

    pub(crate) fn parse(s: &str) -> Kind {
        if s == "direct" {
            Kind::Direct
        } else {
            Kind::Group
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conversation {
    pub id: String,
    pub kind: Kind,
    pub last_seq: i64,
    /// Unix milliseconds.
    pub created: i64,
    pub members: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub mid: i64,
    /// No push and no notification; unread count and preview still kept.
    pub muted: bool,
    /// Do not disturb: no notification while offline.
    pub dnd: bool,
    /// Everything up to here has been read.
    pub read_seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub conversation: String,
    pub seq: i64,
    /// 0: sent by a backend, as no member.
    pub sender: i64,
    /// The goim op the message is pushed with inside its envelope (the app's own kinds).
    pub op: i32,
    pub body: String,
    /// Unix milliseconds.
    pub time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// A stored send: the message, and whether it was a resend of one stored before (same
/// sender and client id), which is not delivered again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub message: Message,
    pub duplicate: bool,
    /// The version of the conversation's members when it was stored (None for a resend).
    pub members_version: Option<i64>,
}

/// The start of a conversation's last message, for conversation lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preview {
    pub seq: i64,
    pub sender: i64,
    pub text: String,
    pub time: i64,
}

/// One line of a user's conversation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub conversation: String,
    pub kind: Kind,
    pub last_seq: i64,
    pub read_seq: i64,
    pub unread: i64,
    pub muted: bool,
    pub dnd: bool,
    /// None until the first message.
    pub last: Option<Preview>,
    /// Last activity (the last message, or creation), Unix milliseconds.
    pub time: i64,
}

/// A user's conversations, most recently active first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inbox {
    pub conversations: Vec<Summary>,
    /// Unread messages over all of the user's conversations except muted ones.
    pub total_unread: i64,
}

/// Which part of a conversation's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The newest messages before this sequence number (`i64::MAX`: the newest).
    Before(i64),
    /// The oldest messages after this sequence number (0: from the start).
    After(i64),
}

/// Bounds on what callers may store and ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest message body, in bytes.
    pub max_body: usize,
    pub max_members: usize,
    /// Characters of a body kept as the conversation's preview.
    pub preview_chars: usize,
    /// Most messages or conversations one page returns.
    pub max_page: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 4096,
            max_members: 100_000,
            preview_chars: 100,
            max_page: 1000,
        }
    }
}

/// The preview of `body`: its first `chars` characters.
pub fn preview(body: &str, chars: usize) -> String {
    match body.char_indices().nth(chars) {
        Some((i, _)) => body[..i].to_string(),
        None => body.to_string(),
    }
}
