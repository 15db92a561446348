/** A stream's place: an epoch (new when history was lost) and the last offset seen in it. */
export interface Position {
    epoch: string;
    offset: number;
}
export interface Message {
    op: number;
    body: Uint8Array;
    /** The numbered stream it belongs to (`user`, `key` or a room id), when numbered. */
    stream?: string;
    epoch?: string;
    offset?: number;
    text(): string;
    json<T = unknown>(): T;
}
/** A message in one of the user's conversations (docs/CONVERSATIONS.md). Keep them by
 * `(conversation, seq)`: the sender's own devices get its messages too. */
export interface ConversationMessage {
    conversation: string;
    seq: number;
    /** 0: a backend's message. */
    sender: number;
    op: number;
    body: string;
    /** Unix milliseconds. */
    time: number;
}
/** One line of the user's conversation list. */
export interface ConversationSummary {
    conversation: string;
    kind: "group" | "direct";
    last_seq: number;
    read_seq: number;
    unread: number;
    muted: boolean;
    dnd: boolean;
    last: {
        seq: number;
        sender: number;
        text: string;
        time: number;
    } | null;
    time: number;
}
export interface Events {
    /** Authenticated; `features` are the extensions the server does for this connection. */
    connected: {
        url: string;
        features: string[];
    };
    /** The socket closed; `retryInMs` is when the next attempt starts (none after `close()`). */
    disconnected: {
        code: number;
        reason: string;
        retryInMs?: number;
    };
    message: Message;
    /** The answer to a recovery: whether everything missed on `stream` was sent again. */
    recovered: {
        stream: string;
        recovered: boolean;
        epoch: string;
        offset: number;
    };
    /** The room count from a heartbeat reply. */
    online: {
        count: number;
    };
    /** An admin closed this connection (`/goim/kick`); the client does not reconnect. */
    kicked: {
        reason: string;
    };
    /** The server took a new token (after `TOKEN_EXPIRING`, or `refresh()`); `expires` in Unix seconds. */
    refreshed: {
        expires: number;
    };
    /** A message in a conversation (with `conversations: true`). */
    conversationMessage: ConversationMessage;
    /** The user read `conversation` up to `readSeq`, here or on another device. */
    readSync: {
        conversation: string;
        readSeq: number;
    };
    error: Error;
}
type Listener<T> = (e: T) => void;
export interface ClientOptions {
    /** `ws://host:3102/sub`. Either this or `api`. */
    url?: string;
    /** logic's HTTP API (`http://host:3111`): nodes, ports and heartbeat come from it. */
    api?: string;
    /** goim's JSON token, or a JWT: a string, or a function asked before every connect and
     * whenever the server says the token expired (the new one is sent with `REFRESH`). */
    token: string | object | (() => string | object | Promise<string | object>);
    /** Room to join after auth (with recovery when the server numbers it). */
    room?: string;
    /** Heartbeat interval; default: what logic advertises, else 30 s. */
    heartbeatMs?: number;
    /** Reconnect backoff: full jitter between 0 and min(max, base * 2^attempt). */
    backoff?: {
        baseMs?: number;
        maxMs?: number;
    };
    /** Speak the extensions (default true); `acks` asks for at-least-once delivery. */
    extensions?: boolean;
    acks?: boolean;
    /** A WebSocket constructor (Node 20 without `--experimental-websocket`: the `ws` package). */
    WebSocket?: typeof WebSocket;
    /** Connect as soon as constructed (default true). */
    autoConnect?: boolean;
    /** Take part in the user's conversations: watch their pushes (ops 41, 42) on every
     * connection. Requests (`sendMessage`, `markRead`, ...) work either way. */
    conversations?: boolean;
}
/** A conversation request the server refused (`code` as HTTP's: 400, 403, 404, 501, 503). */
export declare class ConversationError extends Error {
    readonly code: number;
    constructor(message: string, code: number);
}
export declare class GoimClient {
    private readonly opts;
    private readonly listeners;
    private ws?;
    private heartbeat?;
    private retry?;
    private attempt;
    private closed;
    private room?;
    /** Last position seen per stream: recovery asks for what follows it. */
    private readonly positions;
    /** The stream the next `count` packets belong to (after a POSITION). */
    private pending?;
    private acked;
    /** Conversation requests waiting for their replies, by packet seq. */
    private readonly requests;
    private requestSeq;
    constructor(opts: ClientOptions);
    on<K extends keyof Events>(event: K, fn: Listener<Events[K]>): this;
    off<K extends keyof Events>(event: K, fn: Listener<Events[K]>): this;
    private emit;
    /** The last position seen per numbered stream (what a reconnect recovers from). */
    get streams(): ReadonlyMap<string, Position>;
    /** Moves this connection to `room` (goim's change room; with recovery when numbered). */
    join(room: string): void;
    /** Sends a raw packet (e.g. goim's `OpSub` with op numbers). */
    send(op: number, body?: Uint8Array | string): void;
    /** Closes the connection for good. */
    close(): void;
    connect(): Promise<void>;
    /** A node from logic's `/goim/nodes/weighted`, for a web client. */
    private nodes;
    private token;
    /** Joins `room` (`type://id`) beside the connection's own room, until `leaveRoom` or the
     * connection ends (rejoin after `connected`); a refusal is an `error` event. */
    joinRoom(room: string): void;
    leaveRoom(room: string): void;
    /** Sends `body` to `conversation` as this connection's user; resolves with the seq it
     * got. Give a `clientId` to make a resend after a failure safe (the first seq comes back,
     * `duplicate: true`). */
    sendMessage(conversation: string, body: string, opts?: {
        op?: number;
        clientId?: string;
    }): Promise<{
        seq: number;
        time: number;
        duplicate: boolean;
    }>;
    /** Marks `conversation` read up to `seq`; every device of the user gets `readSync`. */
    markRead(conversation: string, seq: number): Promise<number>;
    /** Messages after `after` (the last seq held), oldest first; `more`: ask again. */
    history(conversation: string, after: number, limit?: number): Promise<{
        messages: ConversationMessage[];
        more: boolean;
    }>;
    /** The user's conversations, most recently active first, with unread counts. */
    conversationList(limit?: number): Promise<{
        conversations: ConversationSummary[];
        total_unread: number;
        more: boolean;
    }>;
    private request;
    private answer;
    /** Sends a new token for this connection (asked from `token`); the server answers with
     * `refreshed`, or an `error` event if it refused it (the old expiry then stands). */
    refresh(): Promise<void>;
    private open;
    private handle;
    private deliver;
    private recoverBody;
    private sendJoin;
    private sendAcks;
    private startHeartbeat;
    private stopHeartbeat;
    /** Full jitter: a uniform delay in [0, min(max, base * 2^attempt)). */
    private scheduleRetry;
}
export {};
