-- The order of activity across conversations: each create and send takes the highest so far
-- plus one, so a user's list is newest first even when two sends fall in one millisecond
-- (last_time alone ties). Concurrent sends may share a value; either order is then right.
ALTER TABLE conversations ADD COLUMN activity BIGINT NOT NULL DEFAULT 0;
CREATE INDEX conversations_activity ON conversations (activity);
