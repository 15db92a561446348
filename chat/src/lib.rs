//! Conversations: group and direct chats whose messages are stored once (read diffusion), with
//! a sequence number per conversation, and per-member read cursors, mute and do-not-disturb.
//! Unread counts are `last_seq - read_seq`, so a message to a group of any size writes one
//! message row and updates one conversation row, never a row per member.
//!
//! [`Store`] keeps them in SQLite (standalone) or PostgreSQL (clusters) through the same
//! queries; [`policy`] says what each member gets for a new message.

mod model;
pub mod policy;
mod store;

pub use model::*;
pub use store::{Store, StoreKind};

/// What a conversation call failed on; each maps to one HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("conversation {0:?} not found")]
    NotFound(String),
    #[error("user {mid} is not a member of conversation {conversation:?}")]
    NotMember { conversation: String, mid: i64 },
    #[error("conversation {0:?} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("conversation store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("conversation store migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests;
