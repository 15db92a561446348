//! Operation codes (goim `api/protocol/operation.go`).

pub const HANDSHAKE: i32 = 0;
pub const HANDSHAKE_REPLY: i32 = 1;
pub const HEARTBEAT: i32 = 2;
pub const HEARTBEAT_REPLY: i32 = 3;
pub const SEND_MSG: i32 = 4;
pub const SEND_MSG_REPLY: i32 = 5;
pub const DISCONNECT_REPLY: i32 = 6;
pub const AUTH: i32 = 7;
pub const AUTH_REPLY: i32 = 8;
pub const RAW: i32 = 9;
pub const PROTO_READY: i32 = 10;
pub const PROTO_FINISH: i32 = 11;
pub const CHANGE_ROOM: i32 = 12;
pub const CHANGE_ROOM_REPLY: i32 = 13;
pub const SUB: i32 = 14;
pub const SUB_REPLY: i32 = 15;
pub const UNSUB: i32 = 16;
pub const UNSUB_REPLY: i32 = 17;

// goim-rs extensions (docs/PROTOCOL.md): ops goim leaves unused, sent by the server only to
// clients that said `HELLO`; goim's clients never see them.

/// c→s: the client speaks the extensions; JSON body `{"v":1}`.
pub const HELLO: i32 = 20;
/// s→c: JSON body `{"v":1,"features":[...]}`.
pub const HELLO_REPLY: i32 = 21;
/// s→c: the server is draining; reconnect (to another node) after `after_ms`. JSON body
/// `{"reason":"drain","after_ms":N}`. The server closes the connection soon after.
pub const RECONNECT: i32 = 22;
/// s→c: the next `count` packets are messages of `stream` (a room id, or `user`) numbered
/// `offset`.. in its `epoch`. JSON body `{"stream":S,"epoch":E,"offset":N,"count":C}`.
pub const POSITION: i32 = 23;
/// c→s: join a room, optionally recovering what was missed since a position. JSON body
/// `{"room":R,"recover":{"epoch":E,"offset":N}}` (`recover` optional).
pub const JOIN: i32 = 24;
/// s→c: JSON body `{"room":R,"recovered":B,"epoch":E,"offset":N}` (or `{"error":...}`).
pub const JOIN_REPLY: i32 = 25;
/// c→s: recover the user's stream (pushes to this user) since a position. JSON body
/// `{"user":{"epoch":E,"offset":N}}`.
pub const RECOVER: i32 = 26;
/// s→c: JSON body `{"stream":"user","recovered":B,"epoch":E,"offset":N}` (or `{"error":...}`).
pub const RECOVER_REPLY: i32 = 27;
/// c→s: the client has every push to its user up to `offset` (cumulative; only after `HELLO`
/// with `"acks":true`). JSON body `{"user":N}`. No reply.
pub const ACK: i32 = 28;
/// s→c: an admin closed this connection (`/goim/kick`); JSON body `{"reason":R}`. The server
/// closes the connection after it. Only to clients that said `HELLO`.
pub const KICKED: i32 = 29;
/// c→s: a new token for this connection before its current one expires; the body is the
/// token. Only after `HELLO`.
pub const REFRESH: i32 = 30;
/// s→c: JSON body `{"expires":N}` (Unix seconds, 0: never), or `{"error":...}` when the
/// token was refused (the connection keeps its old expiry).
pub const REFRESH_REPLY: i32 = 31;
/// s→c: the connection's token has expired; send `REFRESH` within `grace_ms` or be closed.
/// JSON body `{"expires":N,"grace_ms":G}`. Only to clients that said `HELLO` (others are
/// closed when the grace period ends).
pub const TOKEN_EXPIRING: i32 = 32;
/// c→s: join another room beside goim's one (goim's `CHANGE_ROOM` still moves that one).
/// JSON body `{"room":R}`, `R` as `type://id`. Only after `HELLO`.
pub const ROOM_JOIN: i32 = 33;
/// s→c: JSON body `{"room":R,"joined":B}` (`false`: it was in it already), or
/// `{"error":...}`.
pub const ROOM_JOIN_REPLY: i32 = 34;
/// c→s: leave a room joined with `ROOM_JOIN`. JSON body `{"room":R}`.
pub const ROOM_LEAVE: i32 = 35;
/// s→c: JSON body `{"room":R,"left":B}` (`false`: it was not one of its extra rooms).
pub const ROOM_LEAVE_REPLY: i32 = 36;

// Conversations (docs/CONVERSATIONS.md): answered by logic, for any client (HELLO not
// needed); errors as `{"error":E,"code":C}` on the reply op.

/// c→s: send to a conversation the user is a member of. JSON body
/// `{"conversation":C,"body":B,"op":N,"client_id":X}` (`op`, `client_id` optional; a resend
/// with the same `client_id` gets the first seq back).
pub const CONV_SEND: i32 = 37;
/// s→c: `{"conversation":C,"seq":N,"time":T,"duplicate":B}`.
pub const CONV_SEND_REPLY: i32 = 38;
/// c→s: everything up to `seq` is read. JSON body `{"conversation":C,"seq":N}`.
pub const CONV_READ: i32 = 39;
/// s→c: `{"conversation":C,"read_seq":N}` (the cursor, which never moves back).
pub const CONV_READ_REPLY: i32 = 40;
/// s→c: a message in one of the user's conversations. JSON body
/// `{"conversation":C,"seq":N,"sender":M,"op":O,"body":B,"time":T}`.
pub const CONV_MESSAGE: i32 = 41;
/// s→c: the user read a conversation up to `read_seq` (on this or another device). JSON body
/// `{"conversation":C,"read_seq":N}`.
pub const CONV_READ_SYNC: i32 = 42;
/// c→s: history after a seq (catching up after a reconnect). JSON body
/// `{"conversation":C,"after":N,"limit":L}` (`limit` optional).
pub const CONV_HISTORY: i32 = 43;
/// s→c: `{"conversation":C,"messages":[...],"more":B}`; `more`: ask again after the last.
pub const CONV_HISTORY_REPLY: i32 = 44;
/// c→s: the user's conversations, most recently active first. JSON body `{"limit":L}`
/// (optional).
pub const CONV_LIST: i32 = 45;
/// s→c: `{"conversations":[{"conversation","kind","last_seq","read_seq","unread","muted",
/// "dnd","last":{"seq","sender","text","time"},"time"}...],"total_unread":N,"more":B}`.
pub const CONV_LIST_REPLY: i32 = 46;

/// The reply op of a conversation request, which logic answers (None for other ops).
pub fn conversation_reply(op: i32) -> Option<i32> {
    matches!(op, CONV_SEND | CONV_READ | CONV_HISTORY | CONV_LIST).then_some(op + 1)
}
