//! The conversation store over SQLite or PostgreSQL. One set of queries serves both (sqlx's
//! `Any` driver; `$n` parameters, which SQLite also takes). Every transaction writes first,
//! so SQLite takes its write lock at the start and concurrent writers wait (busy timeout)
//! instead of failing on a lock upgrade; in PostgreSQL the first write locks the
//! conversation's row, which is what makes sequence numbers atomic.

use std::path::Path;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use crate::{
    now_ms, preview, ChatError, Conversation, Inbox, Kind, Limits, Member, Message, Page, Preview,
    Sent, Summary,
};

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    kind: StoreKind,
    limits: Limits,
}

/// The longest conversation or client message id.
const MAX_ID: usize = 128;
/// Members per multi-row insert (3 parameters each, far below either database's limit).
const INSERT_CHUNK: usize = 300;

fn invalid(msg: impl Into<String>) -> ChatError {
    ChatError::Invalid(msg.into())
}

fn check_id(what: &str, id: &str) -> Result<(), ChatError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what}: 1 to {MAX_ID} characters of A-Z a-z 0-9 - _ . :"
        )))
    }
}

fn check_mids(mids: &[i64]) -> Result<Vec<i64>, ChatError> {
    if let Some(bad) = mids.iter().find(|&&m| m <= 0) {
        return Err(invalid(format!("member {bad}: mids are positive")));
    }
    let mut v = mids.to_vec();
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn message_from(row: &AnyRow) -> Result<Message, sqlx::Error> {
    Ok(Message {
        conversation: row.try_get("conversation")?,
        seq: row.try_get("seq")?,
        sender: row.try_get("sender")?,
        op: i32::try_from(row.try_get::<i64, _>("op")?).unwrap_or_default(),
        body: row.try_get("body")?,
        time: row.try_get("time")?,
        client_id: row.try_get("client_id")?,
    })
}

fn member_from(row: &AnyRow) -> Result<Member, sqlx::Error> {
    Ok(Member {
        mid: row.try_get("mid")?,
        muted: row.try_get::<i64, _>("muted")? != 0,
        dnd: row.try_get::<i64, _>("dnd")? != 0,
        read_seq: row.try_get("read_seq")?,
    })
}

const MESSAGE_COLUMNS: &str = "conversation, seq, sender, op, body, time, client_id";

impl Store {
    /// Opens (creating a SQLite file and its directory if needed) and migrates the store at
    /// `url`: `sqlite://path`, `sqlite::memory:` or `postgres://user@host/db`.
    pub async fn open(url: &str, limits: Limits) -> Result<Store, ChatError> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            StoreKind::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            StoreKind::Postgres
        } else {
            return Err(invalid(
                "conversation store: a sqlite:// or postgres:// URL".to_string(),
            ));
        };
        let mut url = url.to_string();
        let mut opts = AnyPoolOptions::new();
        if kind == StoreKind::Sqlite {
            if url.contains(":memory:") || url.contains("mode=memory") {
                // Each connection to an in-memory database is a database of its own.
                opts = opts.max_connections(1);
            } else {
                let path = url
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:");
                let path = path.split('?').next().unwrap_or_default();
                if let Some(dir) = Path::new(path)
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        invalid(format!("conversation store directory {dir:?}: {e}"))
                    })?;
                }
                if !url.contains('?') {
                    url.push_str("?mode=rwc");
                }
                opts = opts.max_connections(4).after_connect(|conn, _| {
                    Box::pin(async move {
                        // Readers do not wait for the writer; a write commits without a
                        // full sync of the file (WAL keeps it consistent after a crash).
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        Ok(())
                    })
                });
            }
        } else {
            opts = opts.max_connections(16);
        }
        let pool = opts.connect(&url).await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool, kind, limits })
    }

    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A new conversation. A group gets `id` (or a generated one); a direct conversation is
    /// named by its two members, and creating it again returns the existing one.
    pub async fn create(
        &self,
        id: Option<&str>,
        kind: Kind,
        members: &[i64],
    ) -> Result<Conversation, ChatError> {
        let mids = check_mids(members)?;
        if mids.len() > self.limits.max_members {
            return Err(invalid(format!(
                "members: at most {}",
                self.limits.max_members
            )));
        }
        let id = match kind {
            Kind::Direct => {
                if mids.len() != 2 {
                    return Err(invalid("a direct conversation has exactly two members"));
                }
                format!("direct:{}:{}", mids[0], mids[1])
            }
            Kind::Group => match id {
                Some(id) => {
                    check_id("id", id)?;
                    id.to_string()
                }
                None => uuid::Uuid::new_v4().to_string(),
            },
        };
        let now = now_ms();
        // A conversation deleted and created again under its id must not meet the old
        // one's cached members: versions start at a random point.
        let version = (uuid::Uuid::new_v4().as_u128() as i64 & (i64::MAX >> 2)).max(1);
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO conversations (id, kind, last_time, created, members_version, activity) \
             VALUES ($1, $2, $3, $3, $4, \
                     (SELECT COALESCE(MAX(activity), 0) + 1 FROM conversations))",
        )
        .bind(&id)
        .bind(kind.as_str())
        .bind(now)
        .bind(version)
        .execute(&mut *tx)
        .await;
        match created {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                drop(tx);
                if kind == Kind::Direct {
                    return self.get(&id).await;
                }
                return Err(ChatError::Exists(id));
            }
            Err(e) => return Err(e.into()),
        }
        insert_members(&mut tx, &id, &mids, 0, now).await?;
        tx.commit().await?;
        Ok(Conversation {
            id,
            kind,
            last_seq: 0,
            created: now,
            members: mids.len(),
        })
    }

    pub async fn get(&self, id: &str) -> Result<Conversation, ChatError> {
        let row = sqlx::query(
            "SELECT kind, last_seq, created, \
             (SELECT COUNT(*) FROM members WHERE conversation = $1) AS n \
             FROM conversations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| ChatError::NotFound(id.into()))?;
        Ok(Conversation {
            id: id.into(),
            kind: Kind::parse(&row.try_get::<String, _>("kind")?),
            last_seq: row.try_get("last_seq")?,
            created: row.try_get("created")?,
            members: usize::try_from(row.try_get::<i64, _>("n")?).unwrap_or_default(),
        })
    }

    /// Deletes the conversation with its members and messages; false if there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, ChatError> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query("DELETE FROM conversations WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM members WHERE conversation = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM messages WHERE conversation = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(gone > 0)
    }

    /// Locks the conversation's row (the transaction's first write), bumps its members'
    /// version, and returns its kind and last sequence number.
    async fn lock(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        id: &str,
    ) -> Result<(Kind, i64), ChatError> {
        let row = sqlx::query(
            "UPDATE conversations SET members_version = members_version + 1 WHERE id = $1 \
             RETURNING kind, last_seq",
        )
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| ChatError::NotFound(id.into()))?;
        Ok((
            Kind::parse(&row.try_get::<String, _>("kind")?),
            row.try_get("last_seq")?,
        ))
    }

    /// Adds members (those already in stay as they are); their unread count starts at
    /// zero. Returns how many were new.
    pub async fn add_members(&self, id: &str, members: &[i64]) -> Result<usize, ChatError> {
        let mids = check_mids(members)?;
        // Refused before any row is written when the request alone is over the limit.
        if mids.len() > self.limits.max_members {
            return Err(invalid(format!(
                "members: at most {}",
                self.limits.max_members
            )));
        }
        let mut tx = self.pool.begin().await?;
        let (kind, last_seq) = Self::lock(&mut tx, id).await?;
        if kind == Kind::Direct {
            return Err(invalid("a direct conversation's members do not change"));
        }
        let added = insert_members(&mut tx, id, &mids, last_seq, now_ms()).await?;
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM members WHERE conversation = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        if usize::try_from(n).unwrap_or(usize::MAX) > self.limits.max_members {
            return Err(invalid(format!(
                "members: at most {}",
                self.limits.max_members
            )));
        }
        tx.commit().await?;
        Ok(added)
    }

    /// Removes members; returns how many were members.
    pub async fn remove_members(&self, id: &str, members: &[i64]) -> Result<usize, ChatError> {
        let mids = check_mids(members)?;
        let mut tx = self.pool.begin().await?;
        let (kind, _) = Self::lock(&mut tx, id).await?;
        if kind == Kind::Direct {
            return Err(invalid("a direct conversation's members do not change"));
        }
        let mut removed = 0;
        for mid in mids {
            removed += sqlx::query("DELETE FROM members WHERE conversation = $1 AND mid = $2")
                .bind(id)
                .bind(mid)
                .execute(&mut *tx)
                .await?
                .rows_affected() as usize;
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// Sets a member's mute and do-not-disturb flags (`None` leaves one as it is).
    pub async fn set_member(
        &self,
        id: &str,
        mid: i64,
        muted: Option<bool>,
        dnd: Option<bool>,
    ) -> Result<Member, ChatError> {
        // The flags decide who gets pushes and notifications: a change is a new version.
        let mut tx = self.pool.begin().await?;
        Self::lock(&mut tx, id).await?;
        let row = sqlx::query(
            "UPDATE members SET muted = COALESCE($3, muted), dnd = COALESCE($4, dnd) \
             WHERE conversation = $1 AND mid = $2 RETURNING mid, muted, dnd, read_seq",
        )
        .bind(id)
        .bind(mid)
        .bind(muted.map(i64::from))
        .bind(dnd.map(i64::from))
        .fetch_optional(&mut *tx)
        .await?;
        match row {
            Some(r) => {
                let m = member_from(&r)?;
                tx.commit().await?;
                Ok(m)
            }
            None => Err(ChatError::NotMember {
                conversation: id.into(),
                mid,
            }),
        }
    }

    /// The members with the version they are at (None when they changed while being read:
    /// the list is still current as of the read, just not to be cached under a version).
    pub async fn members_versioned(
        &self,
        id: &str,
    ) -> Result<(Option<i64>, Vec<Member>), ChatError> {
        let version = || async {
            let row = sqlx::query("SELECT members_version FROM conversations WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| ChatError::NotFound(id.into()))?;
            Ok::<i64, ChatError>(row.try_get("members_version")?)
        };
        let before = version().await?;
        let members = self.members(id).await?;
        let after = version().await?;
        Ok(((before == after).then_some(after), members))
    }

    /// Why `mid` was not found in `id`.
    async fn absent(&self, id: &str, mid: i64) -> ChatError {
        match self.get(id).await {
            Ok(_) => ChatError::NotMember {
                conversation: id.into(),
                mid,
            },
            Err(e) => e,
        }
    }

    pub async fn members(&self, id: &str) -> Result<Vec<Member>, ChatError> {
        let rows = sqlx::query(
            "SELECT mid, muted, dnd, read_seq FROM members WHERE conversation = $1 ORDER BY mid",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            self.get(id).await?;
        }
        Ok(rows.iter().map(member_from).collect::<Result<_, _>>()?)
    }

    pub async fn member(&self, id: &str, mid: i64) -> Result<Member, ChatError> {
        let row = sqlx::query(
            "SELECT mid, muted, dnd, read_seq FROM members WHERE conversation = $1 AND mid = $2",
        )
        .bind(id)
        .bind(mid)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(member_from(&r)?),
            None => Err(self.absent(id, mid).await),
        }
    }

    /// Stores a message under the conversation's next sequence number. `sender` must be a
    /// member (0: a backend's message, from no member). With `client_id`, a resend returns
    /// the message stored the first time (`duplicate`). The sender has read its own message.
    pub async fn send(
        &self,
        id: &str,
        sender: i64,
        op: i32,
        body: &str,
        client_id: Option<&str>,
    ) -> Result<Sent, ChatError> {
        if body.len() > self.limits.max_body {
            return Err(invalid(format!(
                "body is {} bytes, over the limit of {}",
                body.len(),
                self.limits.max_body
            )));
        }
        if sender < 0 {
            return Err(invalid("sender: a mid, or 0 for a backend"));
        }
        if let Some(c) = client_id {
            check_id("client_id", c)?;
            if let Some(m) = self.by_client_id(id, sender, c).await? {
                return Ok(Sent {
                    message: m,
                    duplicate: true,
                    members_version: None,
                });
            }
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE conversations SET last_seq = last_seq + 1, last_sender = $2, \
             last_preview = $3, last_time = $4, \
             activity = (SELECT COALESCE(MAX(activity), 0) + 1 FROM conversations) \
             WHERE id = $1 RETURNING last_seq, members_version",
        )
        .bind(id)
        .bind(sender)
        .bind(preview(body, self.limits.preview_chars))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ChatError::NotFound(id.into()))?;
        let seq: i64 = row.try_get("last_seq")?;
        let members_version: i64 = row.try_get("members_version")?;
        if sender > 0 {
            // The sender's cursor moves to its own message: both a membership check and
            // "my own messages are read".
            let member = sqlx::query(
                "UPDATE members SET read_seq = $3 WHERE conversation = $1 AND mid = $2",
            )
            .bind(id)
            .bind(sender)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            if member.rows_affected() == 0 {
                return Err(ChatError::NotMember {
                    conversation: id.into(),
                    mid: sender,
                });
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO messages (conversation, seq, sender, op, body, time, client_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(seq)
        .bind(sender)
        .bind(i64::from(op))
        .bind(body)
        .bind(now)
        .bind(client_id)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) && client_id.is_some() => {
                // A concurrent resend won: this transaction's sequence number is undone.
                drop(tx);
                let first = self
                    .by_client_id(id, sender, client_id.unwrap_or_default())
                    .await?
                    .ok_or(ChatError::Store(e))?;
                return Ok(Sent {
                    message: first,
                    duplicate: true,
                    members_version: None,
                });
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        Ok(Sent {
            message: Message {
                conversation: id.into(),
                seq,
                sender,
                op,
                body: body.into(),
                time: now,
                client_id: client_id.map(str::to_string),
            },
            duplicate: false,
            members_version: Some(members_version),
        })
    }

    async fn by_client_id(
        &self,
        id: &str,
        sender: i64,
        client_id: &str,
    ) -> Result<Option<Message>, ChatError> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages \
             WHERE conversation = $1 AND sender = $2 AND client_id = $3"
        ))
        .bind(id)
        .bind(sender)
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(message_from).transpose()?)
    }

    pub async fn message(&self, id: &str, seq: i64) -> Result<Option<Message>, ChatError> {
        let row = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation = $1 AND seq = $2"
        ))
        .bind(id)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(message_from).transpose()?)
    }

    /// A page of history, oldest first. `reader` must be a member (0: a backend).
    pub async fn history(
        &self,
        id: &str,
        reader: i64,
        page: Page,
        limit: usize,
    ) -> Result<Vec<Message>, ChatError> {
        let limit = limit.clamp(1, self.limits.max_page) as i64;
        if reader > 0 {
            self.member(id, reader).await?;
        } else {
            self.get(id).await?;
        }
        let (sql, at) = match page {
            Page::Before(seq) if seq >= 1 => (
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation = $1 AND seq < $2 \
                     ORDER BY seq DESC LIMIT $3"
                ),
                seq,
            ),
            Page::After(seq) if seq >= 0 => (
                format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation = $1 AND seq > $2 \
                     ORDER BY seq ASC LIMIT $3"
                ),
                seq,
            ),
            _ => return Err(invalid("cursor: before >= 1 or after >= 0")),
        };
        let rows = sqlx::query(&sql)
            .bind(id)
            .bind(at)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut msgs = rows
            .iter()
            .map(message_from)
            .collect::<Result<Vec<_>, _>>()?;
        if matches!(page, Page::Before(_)) {
            msgs.reverse();
        }
        Ok(msgs)
    }

    /// Moves `mid`'s read cursor up to `seq` (never back; not past the last message).
    /// Returns the cursor.
    pub async fn mark_read(&self, id: &str, mid: i64, seq: i64) -> Result<i64, ChatError> {
        if seq < 0 {
            return Err(invalid("seq: 0 or more"));
        }
        let row = sqlx::query(
            "UPDATE members SET read_seq = CASE WHEN read_seq < $3 THEN $3 ELSE read_seq END \
             WHERE conversation = $1 AND mid = $2 \
             AND $3 <= (SELECT last_seq FROM conversations WHERE id = $1) RETURNING read_seq",
        )
        .bind(id)
        .bind(mid)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(r) = row {
            return Ok(r.try_get("read_seq")?);
        }
        let conv = self.get(id).await?;
        self.member(id, mid).await?;
        Err(invalid(format!(
            "seq {seq} is past the conversation's last message ({})",
            conv.last_seq
        )))
    }

    /// `mid`'s conversations, most recently active first (at most `limit`), with unread
    /// counts and previews, and the unread total over the ones not muted.
    pub async fn inbox(&self, mid: i64, limit: usize) -> Result<Inbox, ChatError> {
        let limit = limit.clamp(1, self.limits.max_page) as i64;
        let rows = sqlx::query(
            "SELECT c.id, c.kind, c.last_seq, c.last_sender, c.last_preview, c.last_time, \
             m.read_seq, m.muted, m.dnd FROM members m JOIN conversations c ON c.id = m.conversation \
             WHERE m.mid = $1 ORDER BY c.activity DESC, c.last_time DESC, c.id LIMIT $2",
        )
        .bind(mid)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut conversations = Vec::with_capacity(rows.len());
        for r in &rows {
            let last_seq: i64 = r.try_get("last_seq")?;
            let read_seq: i64 = r.try_get("read_seq")?;
            let time: i64 = r.try_get("last_time")?;
            conversations.push(Summary {
                conversation: r.try_get("id")?,
                kind: Kind::parse(&r.try_get::<String, _>("kind")?),
                last_seq,
                read_seq,
                unread: (last_seq - read_seq).max(0),
                muted: r.try_get::<i64, _>("muted")? != 0,
                dnd: r.try_get::<i64, _>("dnd")? != 0,
                last: (last_seq > 0)
                    .then(|| -> Result<Preview, sqlx::Error> {
                        Ok(Preview {
                            seq: last_seq,
                            sender: r.try_get("last_sender")?,
                            text: r.try_get("last_preview")?,
                            time,
                        })
                    })
                    .transpose()?,
                time,
            });
        }
        let total_unread: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(c.last_seq - m.read_seq), 0) AS BIGINT) AS n \
             FROM members m JOIN conversations c ON c.id = m.conversation \
             WHERE m.mid = $1 AND m.muted = 0",
        )
        .bind(mid)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok(Inbox {
            conversations,
            total_unread,
        })
    }

    /// Messages whose offline members were not notified yet, stored at or before `before`
    /// (Unix ms), oldest first.
    pub async fn unnotified(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, ChatError> {
        let rows = sqlx::query(
            "SELECT conversation, seq FROM messages WHERE notified = 0 AND time <= $1 \
             ORDER BY time LIMIT $2",
        )
        .bind(before)
        .bind(limit.max(1) as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Ok((r.try_get("conversation")?, r.try_get("seq")?)))
            .collect::<Result<_, sqlx::Error>>()?)
    }

    /// The message's notifications were handed to the sink (or there were none).
    pub async fn mark_notified(&self, id: &str, seq: i64) -> Result<(), ChatError> {
        sqlx::query("UPDATE messages SET notified = 1 WHERE conversation = $1 AND seq = $2")
            .bind(id)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Inserts members (existing ones untouched), their cursors at `read_seq`; returns how many
/// were new.
async fn insert_members(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    mids: &[i64],
    read_seq: i64,
    now: i64,
) -> Result<usize, ChatError> {
    let mut added = 0;
    for chunk in mids.chunks(INSERT_CHUNK) {
        let mut sql =
            String::from("INSERT INTO members (conversation, mid, read_seq, joined) VALUES ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("($1, ${}, $2, $3)", i + 4));
        }
        sql.push_str(" ON CONFLICT (conversation, mid) DO NOTHING");
        let mut q = sqlx::query(&sql).bind(id).bind(read_seq).bind(now);
        for &mid in chunk {
            q = q.bind(mid);
        }
        added += q.execute(&mut **tx).await?.rows_affected() as usize;
    }
    Ok(added)
}
