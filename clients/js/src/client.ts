// A goim-rs connection that stays up: auth, heartbeats, reconnects with full-jitter backoff,
// node choice from logic, and (with the extensions) positions, recovery and acks.

import { decode, encode, Op, type Packet } from "./packet.js";

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
  last: { seq: number; sender: number; text: string; time: number } | null;
  time: number;
}

export interface Events {
  /** Authenticated; `features` are the extensions the server does for this connection. */
  connected: { url: string; features: string[] };
  /** The socket closed; `retryInMs` is when the next attempt starts (none after `close()`). */
  disconnected: { code: number; reason: string; retryInMs?: number };
  message: Message;
  /** The answer to a recovery: whether everything missed on `stream` was sent again. */
  recovered: { stream: string; recovered: boolean; epoch: string; offset: number };
  /** The room count from a heartbeat reply. */
  online: { count: number };
  /** An admin closed this connection (`/goim/kick`); the client does not reconnect. */
  kicked: { reason: string };
  /** The server took a new token (after `TOKEN_EXPIRING`, or `refresh()`); `expires` in Unix seconds. */
  refreshed: { expires: number };
  /** A message in a conversation (with `conversations: true`). */
  conversationMessage: ConversationMessage;
  /** The user read `conversation` up to `readSeq`, here or on another device. */
  readSync: { conversation: string; readSeq: number };
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
  backoff?: { baseMs?: number; maxMs?: number };
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
export class ConversationError extends Error {
  constructor(
    message: string,
    readonly code: number,
  ) {
    super(message);
  }
}

const utf8 = new TextDecoder();

function message(p: Packet, pos?: { stream: string; epoch: string; offset: number }): Message {
  return {
    op: p.op,
    body: p.body,
    ...pos,
    text: () => utf8.decode(p.body),
    json: <T>() => JSON.parse(utf8.decode(p.body)) as T,
  };
}

export class GoimClient {
  private readonly opts: ClientOptions;
  // Keyed by event name; each set holds listeners of that event's type.
  private readonly listeners = new Map<keyof Events, Set<Listener<never>>>();
  private ws?: WebSocket;
  private heartbeat?: ReturnType<typeof setInterval>;
  private retry?: ReturnType<typeof setTimeout>;
  private attempt = 0;
  private closed = false;
  private room?: string;
  /** Last position seen per stream: recovery asks for what follows it. */
  private readonly positions = new Map<string, Position>();
  /** The stream the next `count` packets belong to (after a POSITION). */
  private pending?: { stream: string; epoch: string; next: number; count: number };
  private acked = { user: -1, key: -1 };
  /** Conversation requests waiting for their replies, by packet seq. */
  private readonly requests = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private requestSeq = 100;

  constructor(opts: ClientOptions) {
    if (!opts.url && !opts.api) {
      throw new Error("GoimClient: give `url` or `api`");
    }
    this.opts = opts;
    this.room = opts.room;
    if (opts.autoConnect !== false) {
      void this.connect();
    }
  }

  on<K extends keyof Events>(event: K, fn: Listener<Events[K]>): this {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(fn as Listener<never>);
    return this;
  }

  off<K extends keyof Events>(event: K, fn: Listener<Events[K]>): this {
    this.listeners.get(event)?.delete(fn as Listener<never>);
    return this;
  }

  private emit<K extends keyof Events>(event: K, e: Events[K]): void {
    const set = this.listeners.get(event) as Set<Listener<Events[K]>> | undefined;
    for (const fn of set ?? []) {
      try {
        fn(e);
      } catch (err) {
        if (event !== "error") this.emit("error", err as Error);
      }
    }
  }

  /** The last position seen per numbered stream (what a reconnect recovers from). */
  get streams(): ReadonlyMap<string, Position> {
    return this.positions;
  }

  /** Moves this connection to `room` (goim's change room; with recovery when numbered). */
  join(room: string): void {
    this.room = room;
    this.sendJoin();
  }

  /** Sends a raw packet (e.g. goim's `OpSub` with op numbers). */
  send(op: number, body: Uint8Array | string = ""): void {
    this.ws?.send(encode(op, body));
  }

  /** Closes the connection for good. */
  close(): void {
    this.closed = true;
    clearTimeout(this.retry);
    this.stopHeartbeat();
    this.ws?.close(1000, "client closed");
  }

  async connect(): Promise<void> {
    if (this.closed) return;
    let url: string;
    let heartbeatMs = this.opts.heartbeatMs;
    try {
      if (this.opts.url) {
        url = this.opts.url;
      } else {
        const nodes = await this.nodes();
        url = nodes.url;
        heartbeatMs ??= nodes.heartbeatMs;
      }
      this.open(url, await this.token(), heartbeatMs ?? 30_000);
    } catch (err) {
      this.emit("error", err as Error);
      this.scheduleRetry(0, String(err));
    }
  }

  /** A node from logic's `/goim/nodes/weighted`, for a web client. */
  private async nodes(): Promise<{ url: string; heartbeatMs?: number }> {
    const base = this.opts.api!.replace(/\/$/, "");
    const res = await fetch(`${base}/goim/nodes/weighted?platform=web`);
    const body = (await res.json()) as {
      code: number;
      data?: { domain?: string; nodes?: string[]; ws_port?: number; wss_port?: number; heartbeat?: number };
    };
    if (body.code !== 0 || !body.data) {
      throw new Error(`nodes: code ${body.code}`);
    }
    const d = body.data;
    const secure = typeof location !== "undefined" && location.protocol === "https:";
    const nodes = d.nodes?.length ? d.nodes : d.domain ? [d.domain] : [];
    if (!nodes.length) throw new Error("nodes: none offered");
    const host = nodes[Math.floor(Math.random() * nodes.length)];
    const port = secure ? d.wss_port : d.ws_port;
    return {
      url: `${secure ? "wss" : "ws"}://${host}${port ? `:${port}` : ""}/sub`,
      heartbeatMs: d.heartbeat ? d.heartbeat * 1000 : undefined,
    };
  }

  private async token(): Promise<string> {
    const t = typeof this.opts.token === "function" ? await this.opts.token() : this.opts.token;
    return typeof t === "string" ? t : JSON.stringify(t);
  }

  /** Joins `room` (`type://id`) beside the connection's own room, until `leaveRoom` or the
   * connection ends (rejoin after `connected`); a refusal is an `error` event. */
  joinRoom(room: string): void {
    if (this.ws && this.ws.readyState === 1) this.ws.send(encode(Op.RoomJoin, JSON.stringify({ room })));
  }

  leaveRoom(room: string): void {
    if (this.ws && this.ws.readyState === 1) this.ws.send(encode(Op.RoomLeave, JSON.stringify({ room })));
  }

  /** Sends `body` to `conversation` as this connection's user; resolves with the seq it
   * got. Give a `clientId` to make a resend after a failure safe (the first seq comes back,
   * `duplicate: true`). */
  sendMessage(
    conversation: string,
    body: string,
    opts: { op?: number; clientId?: string } = {},
  ): Promise<{ seq: number; time: number; duplicate: boolean }> {
    return this.request(Op.ConvSend, { conversation, body, op: opts.op ?? 0, client_id: opts.clientId });
  }

  /** Marks `conversation` read up to `seq`; every device of the user gets `readSync`. */
  async markRead(conversation: string, seq: number): Promise<number> {
    const r = await this.request<{ read_seq: number }>(Op.ConvRead, { conversation, seq });
    return r.read_seq;
  }

  /** Messages after `after` (the last seq held), oldest first; `more`: ask again. */
  history(conversation: string, after: number, limit?: number): Promise<{ messages: ConversationMessage[]; more: boolean }> {
    return this.request(Op.ConvHistory, { conversation, after, limit });
  }

  /** The user's conversations, most recently active first, with unread counts. */
  conversationList(limit?: number): Promise<{ conversations: ConversationSummary[]; total_unread: number; more: boolean }> {
    return this.request(Op.ConvList, { limit });
  }

  private request<T>(op: number, body: object): Promise<T> {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return Promise.reject(new Error("not connected"));
    this.requestSeq = this.requestSeq >= 2_000_000_000 ? 100 : this.requestSeq + 1;
    const seq = this.requestSeq;
    return new Promise<T>((resolve, reject) => {
      this.requests.set(seq, { resolve: resolve as (v: unknown) => void, reject });
      ws.send(encode(op, JSON.stringify(body), seq));
    });
  }

  private answer(p: Packet): void {
    const pending = this.requests.get(p.seq);
    if (!pending) return;
    this.requests.delete(p.seq);
    const b = JSON.parse(utf8.decode(p.body)) as { error?: string; code?: number };
    if (b.error !== undefined) {
      pending.reject(new ConversationError(b.error, b.code ?? 0));
    } else {
      pending.resolve(b);
    }
  }

  /** Sends a new token for this connection (asked from `token`); the server answers with
   * `refreshed`, or an `error` event if it refused it (the old expiry then stands). */
  async refresh(): Promise<void> {
    const ws = this.ws;
    const token = await this.token();
    if (ws && ws.readyState === 1 && ws === this.ws) ws.send(encode(Op.Refresh, token));
  }

  private open(url: string, token: string, heartbeatMs: number): void {
    const WS = this.opts.WebSocket ?? globalThis.WebSocket;
    if (!WS) throw new Error("no WebSocket: pass one as `WebSocket` (Node 20: --experimental-websocket or the ws package)");
    const ws = new WS(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    const extensions = this.opts.extensions !== false;
    let features: string[] = [];
    let authed = false;
    ws.onopen = () => {
      // AUTH, HELLO and RECOVER back to back: the server then holds the user's numbered
      // pushes from registration until its reply, so nothing slips between them.
      ws.send(encode(Op.Auth, token, 1));
      if (extensions) {
        ws.send(encode(Op.Hello, JSON.stringify({ v: 1, acks: !!this.opts.acks }), 2));
        ws.send(encode(Op.Recover, JSON.stringify(this.recoverBody()), 3));
      }
    };
    ws.onmessage = (ev: MessageEvent) => {
      let packets: Packet[];
      try {
        packets = decode(new Uint8Array(ev.data as ArrayBuffer));
      } catch (err) {
        this.emit("error", err as Error);
        ws.close(4000, "bad frame");
        return;
      }
      for (const p of packets) {
        if (p.op === Op.AuthReply && !authed) {
          authed = true;
          this.attempt = 0;
          this.startHeartbeat(heartbeatMs);
          if (this.opts.conversations) ws.send(encode(Op.Sub, `${Op.ConvMessage},${Op.ConvReadSync}`));
          if (!extensions) {
            this.emit("connected", { url, features });
            if (this.room) this.sendJoin();
          }
          continue;
        }
        try {
          this.handle(p, (f) => {
            features = f;
            this.emit("connected", { url, features });
            if (this.room) this.sendJoin();
          });
        } catch (err) {
          // A body that is not the JSON its op promises: reported, never thrown out of the
          // socket's handler.
          this.emit("error", err as Error);
        }
      }
      this.sendAcks();
    };
    ws.onclose = (ev: CloseEvent) => {
      this.stopHeartbeat();
      // Unanswered requests: not acknowledged (a send may be retried with its clientId).
      for (const r of this.requests.values()) r.reject(new Error("connection closed before the reply"));
      this.requests.clear();
      this.pending = undefined;
      if (this.ws === ws) this.ws = undefined;
      this.scheduleRetry(ev.code, ev.reason);
    };
    ws.onerror = () => {
      // A close follows; its handler reconnects.
    };
  }

  private handle(p: Packet, helloReply: (features: string[]) => void): void {
    switch (p.op) {
      case Op.HeartbeatReply:
        if (p.body.length === 4) {
          this.emit("online", { count: new DataView(p.body.buffer, p.body.byteOffset, 4).getInt32(0) });
        }
        return;
      case Op.HelloReply: {
        // A server without the extensions echoes op 20 empty; that is op 20, not 21.
        const f = p.body.length ? (JSON.parse(utf8.decode(p.body)).features as string[]) : [];
        helloReply(f ?? []);
        return;
      }
      case Op.Hello:
        helloReply([]);
        return;
      case Op.Position: {
        const b = JSON.parse(utf8.decode(p.body)) as { stream: string; epoch: string; offset: number; count: number };
        this.pending = { stream: b.stream, epoch: b.epoch, next: b.offset, count: b.count };
        return;
      }
      case Op.JoinReply:
      case Op.RecoverReply: {
        const b = JSON.parse(utf8.decode(p.body)) as {
          room?: string;
          stream?: string;
          recovered?: boolean;
          epoch?: string;
          offset?: number;
          error?: string;
        };
        if (b.error) {
          this.emit("error", new Error(`${p.op === Op.JoinReply ? "join" : "recover"}: ${b.error}`));
          return;
        }
        const stream = b.stream ?? b.room ?? "";
        const epoch = b.epoch ?? "";
        const offset = b.offset ?? 0;
        const known = this.positions.get(stream);
        // Not recovered: what was missed is gone; continue from the stream's current place.
        if (!b.recovered || !known || known.epoch !== epoch) {
          this.positions.set(stream, { epoch, offset });
        }
        this.emit("recovered", { stream, recovered: !!b.recovered, epoch, offset });
        return;
      }
      case Op.Kicked: {
        const b = JSON.parse(utf8.decode(p.body)) as { reason?: string };
        this.emit("kicked", { reason: b.reason ?? "" });
        this.close();
        return;
      }
      case Op.RoomJoinReply:
      case Op.RoomLeaveReply: {
        const b = JSON.parse(utf8.decode(p.body)) as { room?: string; error?: string };
        if (b.error) this.emit("error", new Error(`room ${b.room ?? ""}: ${b.error}`));
        return;
      }
      case Op.RoomJoin:
      case Op.RoomLeave:
        return;
      case Op.ConvSendReply:
      case Op.ConvReadReply:
      case Op.ConvHistoryReply:
      case Op.ConvListReply:
        this.answer(p);
        return;
      case Op.ConvMessage:
        this.emit("conversationMessage", JSON.parse(utf8.decode(p.body)) as ConversationMessage);
        return;
      case Op.ConvReadSync: {
        const b = JSON.parse(utf8.decode(p.body)) as { conversation: string; read_seq: number };
        this.emit("readSync", { conversation: b.conversation, readSeq: b.read_seq });
        return;
      }
      case Op.TokenExpiring: {
        this.refresh().catch((err) => this.emit("error", err as Error));
        return;
      }
      case Op.RefreshReply: {
        const b = JSON.parse(utf8.decode(p.body)) as { expires?: number; error?: string };
        if (b.error) {
          this.emit("error", new Error(`refresh: ${b.error}`));
        } else {
          this.emit("refreshed", { expires: b.expires ?? 0 });
        }
        return;
      }
      case Op.Reconnect: {
        const b = JSON.parse(utf8.decode(p.body)) as { after_ms?: number };
        // The comet drains: open a new connection after its advice; the old one closes later.
        const old = this.ws;
        setTimeout(() => {
          if (this.ws === old && !this.closed) {
            old?.close(1000, "draining");
          }
        }, b.after_ms ?? 0);
        return;
      }
      // A goim server without the extensions echoes what it does not know.
      case Op.Join:
      case Op.Recover:
      case Op.Ack:
      case Op.AuthReply:
      case Op.ChangeRoomReply:
      case Op.SubReply:
      case Op.UnsubReply:
      case Op.SendMsgReply:
        return;
    }
    this.deliver(p);
  }

  private deliver(p: Packet): void {
    const pend = this.pending;
    if (!pend || pend.count <= 0) {
      this.emit("message", message(p));
      return;
    }
    const offset = pend.next;
    pend.next += 1;
    pend.count -= 1;
    if (pend.count === 0) this.pending = undefined;
    const last = this.positions.get(pend.stream);
    // At least once (acks, a rejoin): a message already seen in this epoch is dropped.
    if (last && last.epoch === pend.epoch && offset <= last.offset) {
      return;
    }
    this.positions.set(pend.stream, { epoch: pend.epoch, offset });
    this.emit("message", message(p, { stream: pend.stream, epoch: pend.epoch, offset }));
  }

  private recoverBody(): object {
    const at = (s: string) => this.positions.get(s) ?? { epoch: "", offset: 0 };
    return { user: at("user"), key: at("key") };
  }

  private sendJoin(): void {
    if (!this.ws || this.ws.readyState !== 1 || !this.room) return;
    const pos = this.positions.get(this.room);
    if (this.opts.extensions === false) {
      this.ws.send(encode(Op.ChangeRoom, this.room));
      return;
    }
    this.ws.send(encode(Op.Join, JSON.stringify(pos ? { room: this.room, recover: pos } : { room: this.room })));
  }

  private sendAcks(): void {
    if (!this.opts.acks || !this.ws || this.ws.readyState !== 1) return;
    const user = this.positions.get("user");
    const key = this.positions.get("key");
    const body: Record<string, unknown> = {};
    if (user && user.offset > this.acked.user) {
      body.user = user.offset;
      body.epoch = user.epoch;
      this.acked.user = user.offset;
    }
    if (key && key.offset > this.acked.key) {
      body.key = key.offset;
      body.key_epoch = key.epoch;
      this.acked.key = key.offset;
    }
    if (Object.keys(body).length) this.ws.send(encode(Op.Ack, JSON.stringify(body)));
  }

  private startHeartbeat(ms: number): void {
    this.stopHeartbeat();
    const beat = () => this.ws?.readyState === 1 && this.ws.send(encode(Op.Heartbeat));
    beat();
    this.heartbeat = setInterval(beat, Math.max(1000, ms));
  }

  private stopHeartbeat(): void {
    clearInterval(this.heartbeat);
    this.heartbeat = undefined;
  }

  /** Full jitter: a uniform delay in [0, min(max, base * 2^attempt)). */
  private scheduleRetry(code: number, reason: string): void {
    if (this.closed) {
      this.emit("disconnected", { code, reason });
      return;
    }
    const base = this.opts.backoff?.baseMs ?? 500;
    const max = this.opts.backoff?.maxMs ?? 30_000;
    const cap = Math.min(max, base * 2 ** Math.min(this.attempt, 20));
    const delay = Math.floor(Math.random() * cap);
    this.attempt += 1;
    this.acked = { user: -1, key: -1 };
    this.emit("disconnected", { code, reason, retryInMs: delay });
    clearTimeout(this.retry);
    this.retry = setTimeout(() => void this.connect(), delay);
  }
}
