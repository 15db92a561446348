-- One statement set that PostgreSQL and SQLite both take: integers are BIGINT (flags 0/1),
-- times are Unix milliseconds, and deletes are explicit (no cascading foreign keys, which
-- SQLite enforces only per connection).

-- A conversation carries its last sequence number and its last message's preview, so a
-- send writes this row and one message row whatever the member count.
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0,
    last_sender BIGINT NOT NULL DEFAULT 0,
    last_preview TEXT NOT NULL DEFAULT '',
    last_time BIGINT NOT NULL,
    created BIGINT NOT NULL
);

CREATE TABLE members (
    conversation TEXT NOT NULL,
    mid BIGINT NOT NULL,
    muted BIGINT NOT NULL DEFAULT 0,
    dnd BIGINT NOT NULL DEFAULT 0,
    -- Everything up to this sequence number has been read; unread = last_seq - read_seq.
    read_seq BIGINT NOT NULL DEFAULT 0,
    joined BIGINT NOT NULL,
    PRIMARY KEY (conversation, mid)
);
CREATE INDEX members_by_mid ON members (mid);

CREATE TABLE messages (
    conversation TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sender BIGINT NOT NULL,
    op BIGINT NOT NULL,
    body TEXT NOT NULL,
    time BIGINT NOT NULL,
    -- The sender's own id for the message: a resend with it returns the first seq.
    client_id TEXT,
    -- 0 until the offline members' notifications were handed to the sink: the row is the
    -- outbox, so a restart finishes what was acknowledged but not yet notified.
    notified BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation, seq)
);
CREATE UNIQUE INDEX messages_by_client_id ON messages (conversation, sender, client_id);
CREATE INDEX messages_to_notify ON messages (time) WHERE notified = 0;
