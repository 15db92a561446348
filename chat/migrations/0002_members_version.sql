-- Bumped in the same transaction as every change to a conversation's members or their
-- mute/dnd flags, and returned by each send: logic caches a member list under it, so a
-- cached list is used only for a message sent while it was exactly the list.
ALTER TABLE conversations ADD COLUMN members_version BIGINT NOT NULL DEFAULT 0;
