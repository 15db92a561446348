// A goim-rs connection that stays up: auth, heartbeats, reconnects with full-jitter backoff,
// node choice from logic, and (with the extensions) positions, recovery and acks.
import { decode, encode, Op } from "./packet.js";
/** A conversation request the server refused (`code` as HTTP's: 400, 403, 404, 501, 503). */
export class ConversationError extends Error {
    code;
    constructor(message, code) {
        super(message);
        this.code = code;
    }
}
const utf8 = new TextDecoder();
function message(p, pos) {
    return {
        op: p.op,
        body: p.body,
        ...pos,
        text: () => utf8.decode(p.body),
        json: () => JSON.parse(utf8.decode(p.body)),
    };
}
export class GoimClient {
    opts;
    // Keyed by event name; each set holds listeners of that event's type.
    listeners = new Map();
    ws;
    heartbeat;
    retry;
    attempt = 0;
    closed = false;
    room;
    /** Last position seen per stream: recovery asks for what follows it. */
    positions = new Map();
    /** The stream the next `count` packets belong to (after a POSITION). */
    pending;
    acked = { user: -1, key: -1 };
    /** Conversation requests waiting for their replies, by packet seq. */
    requests = new Map();
    requestSeq = 100;
    constructor(opts) {
        if (!opts.url && !opts.api) {
            throw new Error("GoimClient: give `url` or `api`");
        }
        this.opts = opts;
        this.room = opts.room;
        if (opts.autoConnect !== false) {
            void this.connect();
        }
    }
    on(event, fn) {
        let set = this.listeners.get(event);
        if (!set) {
            set = new Set();
            this.listeners.set(event, set);
        }
        set.add(fn);
        return this;
    }
    off(event, fn) {
        this.listeners.get(event)?.delete(fn);
        return this;
    }
    emit(event, e) {
        const set = this.listeners.get(event);
        for (const fn of set ?? []) {
            try {
                fn(e);
            }
            catch (err) {
                if (event !== "error")
                    this.emit("error", err);
            }
        }
    }
    /** The last position seen per numbered stream (what a reconnect recovers from). */
    get streams() {
        return this.positions;
    }
    /** Moves this connection to `room` (goim's change room; with recovery when numbered). */
    join(room) {
        this.room = room;
        this.sendJoin();
    }
    /** Sends a raw packet (e.g. goim's `OpSub` with op numbers). */
    send(op, body = "") {
        this.ws?.send(encode(op, body));
    }
    /** Closes the connection for good. */
    close() {
        this.closed = true;
        clearTimeout(this.retry);
        this.stopHeartbeat();
        this.ws?.close(1000, "client closed");
    }
    async connect() {
        if (this.closed)
            return;
        let url;
        let heartbeatMs = this.opts.heartbeatMs;
        try {
            if (this.opts.url) {
                url = this.opts.url;
            }
            else {
                const nodes = await this.nodes();
                url = nodes.url;
                heartbeatMs ??= nodes.heartbeatMs;
            }
            this.open(url, await this.token(), heartbeatMs ?? 30_000);
        }
        catch (err) {
            this.emit("error", err);
            this.scheduleRetry(0, String(err));
        }
    }
    /** A node from logic's `/goim/nodes/weighted`, for a web client. */
    async nodes() {
        const base = this.opts.api.replace(/\/$/, "");
        const res = await fetch(`${base}/goim/nodes/weighted?platform=web`);
        const body = (await res.json());
        if (body.code !== 0 || !body.data) {
            throw new Error(`nodes: code ${body.code}`);
        }
        const d = body.data;
        const secure = typeof location !== "undefined" && location.protocol === "https:";
        const nodes = d.nodes?.length ? d.nodes : d.domain ? [d.domain] : [];
        if (!nodes.length)
            throw new Error("nodes: none offered");
        const host = nodes[Math.floor(Math.random() * nodes.length)];
        const port = secure ? d.wss_port : d.ws_port;
        return {
            url: `${secure ? "wss" : "ws"}://${host}${port ? `:${port}` : ""}/sub`,
            heartbeatMs: d.heartbeat ? d.heartbeat * 1000 : undefined,
        };
    }
    async token() {
        const t = typeof this.opts.token === "function" ? await this.opts.token() : this.opts.token;
        return typeof t === "string" ? t : JSON.stringify(t);
    }
    /** Joins `room` (`type://id`) beside the connection's own room, until `leaveRoom` or the
     * connection ends (rejoin after `connected`); a refusal is an `error` event. */
    joinRoom(room) {
        if (this.ws && this.ws.readyState === 1)
            this.ws.send(encode(Op.RoomJoin, JSON.stringify({ room })));
    }
    leaveRoom(room) {
        if (this.ws && this.ws.readyState === 1)
            this.ws.send(encode(Op.RoomLeave, JSON.stringify({ room })));
    }
    /** Sends `body` to `conversation` as this connection's user; resolves with the seq it
     * got. Give a `clientId` to make a resend after a failure safe (the first seq comes back,
     * `duplicate: true`). */
    sendMessage(conversation, body, opts = {}) {
        return this.request(Op.ConvSend, { conversation, body, op: opts.op ?? 0, client_id: opts.clientId });
    }
    /** Marks `conversation` read up to `seq`; every device of the user gets `readSync`. */
    async markRead(conversation, seq) {
        const r = await this.request(Op.ConvRead, { conversation, seq });
        return r.read_seq;
    }
    /** Messages after `after` (the last seq held), oldest first; `more`: ask again. */
    history(conversation, after, limit) {
        return this.request(Op.ConvHistory, { conversation, after, limit });
    }
    /** The user's conversations, most recently active first, with unread counts. */
    conversationList(limit) {
        return this.request(Op.ConvList, { limit });
    }
    request(op, body) {
        const ws = this.ws;
        if (!ws || ws.readyState !== 1)
            return Promise.reject(new Error("not connected"));
        this.requestSeq = this.requestSeq >= 2_000_000_000 ? 100 : this.requestSeq + 1;
        const seq = this.requestSeq;
        return new Promise((resolve, reject) => {
            this.requests.set(seq, { resolve: resolve, reject });
            ws.send(encode(op, JSON.stringify(body), seq));
        });
    }
    answer(p) {
        const pending = this.requests.get(p.seq);
        if (!pending)
            return;
        this.requests.delete(p.seq);
        const b = JSON.parse(utf8.decode(p.body));
        if (b.error !== undefined) {
            pending.reject(new ConversationError(b.error, b.code ?? 0));
        }
        else {
            pending.resolve(b);
        }
    }
    /** Sends a new token for this connection (asked from `token`); the server answers with
     * `refreshed`, or an `error` event if it refused it (the old expiry then stands). */
    async refresh() {
        const ws = this.ws;
        const token = await this.token();
        if (ws && ws.readyState === 1 && ws === this.ws)
            ws.send(encode(Op.Refresh, token));
    }
    open(url, token, heartbeatMs) {
        const WS = this.opts.WebSocket ?? globalThis.WebSocket;
        if (!WS)
            throw new Error("no WebSocket: pass one as `WebSocket` (Node 20: --experimental-websocket or the ws package)");
        const ws = new WS(url);
        ws.binaryType = "arraybuffer";
        this.ws = ws;
        const extensions = this.opts.extensions !== false;
        let features = [];
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
        ws.onmessage = (ev) => {
            let packets;
            try {
                packets = decode(new Uint8Array(ev.data));
            }
            catch (err) {
                this.emit("error", err);
                ws.close(4000, "bad frame");
                return;
            }
            for (const p of packets) {
                if (p.op === Op.AuthReply && !authed) {
                    authed = true;
                    this.attempt = 0;
                    this.startHeartbeat(heartbeatMs);
                    if (this.opts.conversations)
                        ws.send(encode(Op.Sub, `${Op.ConvMessage},${Op.ConvReadSync}`));
                    if (!extensions) {
                        this.emit("connected", { url, features });
                        if (this.room)
                            this.sendJoin();
                    }
                    continue;
                }
                try {
                    this.handle(p, (f) => {
                        features = f;
                        this.emit("connected", { url, features });
                        if (this.room)
                            this.sendJoin();
                    });
                }
                catch (err) {
                    // A body that is not the JSON its op promises: reported, never thrown out of the
                    // socket's handler.
                    this.emit("error", err);
                }
            }
            this.sendAcks();
        };
        ws.onclose = (ev) => {
            this.stopHeartbeat();
            // Unanswered requests: not acknowledged (a send may be retried with its clientId).
            for (const r of this.requests.values())
                r.reject(new Error("connection closed before the reply"));
            this.requests.clear();
            this.pending = undefined;
            if (this.ws === ws)
                this.ws = undefined;
            this.scheduleRetry(ev.code, ev.reason);
        };
        ws.onerror = () => {
            // A close follows; its handler reconnects.
        };
    }
    handle(p, helloReply) {
        switch (p.op) {
            case Op.HeartbeatReply:
                if (p.body.length === 4) {
                    this.emit("online", { count: new DataView(p.body.buffer, p.body.byteOffset, 4).getInt32(0) });
                }
                return;
            case Op.HelloReply: {
                // A server without the extensions echoes op 20 empty; that is op 20, not 21.
                const f = p.body.length ? JSON.parse(utf8.decode(p.body)).features : [];
                helloReply(f ?? []);
                return;
            }
            case Op.Hello:
                helloReply([]);
                return;
            case Op.Position: {
                const b = JSON.parse(utf8.decode(p.body));
                this.pending = { stream: b.stream, epoch: b.epoch, next: b.offset, count: b.count };
                return;
            }
            case Op.JoinReply:
            case Op.RecoverReply: {
                const b = JSON.parse(utf8.decode(p.body));
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
                const b = JSON.parse(utf8.decode(p.body));
                this.emit("kicked", { reason: b.reason ?? "" });
                this.close();
                return;
            }
            case Op.RoomJoinReply:
            case Op.RoomLeaveReply: {
                const b = JSON.parse(utf8.decode(p.body));
                if (b.error)
                    this.emit("error", new Error(`room ${b.room ?? ""}: ${b.error}`));
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
                this.emit("conversationMessage", JSON.parse(utf8.decode(p.body)));
                return;
            case Op.ConvReadSync: {
                const b = JSON.parse(utf8.decode(p.body));
                this.emit("readSync", { conversation: b.conversation, readSeq: b.read_seq });
                return;
            }
            case Op.TokenExpiring: {
                this.refresh().catch((err) => this.emit("error", err));
                return;
            }
            case Op.RefreshReply: {
                const b = JSON.parse(utf8.decode(p.body));
                if (b.error) {
                    this.emit("error", new Error(`refresh: ${b.error}`));
                }
                else {
                    this.emit("refreshed", { expires: b.expires ?? 0 });
                }
                return;
            }
            case Op.Reconnect: {
                const b = JSON.parse(utf8.decode(p.body));
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
    deliver(p) {
        const pend = this.pending;
        if (!pend || pend.count <= 0) {
            this.emit("message", message(p));
            return;
        }
        const offset = pend.next;
        pend.next += 1;
        pend.count -= 1;
        if (pend.count === 0)
            this.pending = undefined;
        const last = this.positions.get(pend.stream);
        // At least once (acks, a rejoin): a message already seen in this epoch is dropped.
        if (last && last.epoch === pend.epoch && offset <= last.offset) {
            return;
        }
        this.positions.set(pend.stream, { epoch: pend.epoch, offset });
        this.emit("message", message(p, { stream: pend.stream, epoch: pend.epoch, offset }));
    }
    recoverBody() {
        const at = (s) => this.positions.get(s) ?? { epoch: "", offset: 0 };
        return { user: at("user"), key: at("key") };
    }
    sendJoin() {
        if (!this.ws || this.ws.readyState !== 1 || !this.room)
            return;
        const pos = this.positions.get(this.room);
        if (this.opts.extensions === false) {
            this.ws.send(encode(Op.ChangeRoom, this.room));
            return;
        }
        this.ws.send(encode(Op.Join, JSON.stringify(pos ? { room: this.room, recover: pos } : { room: this.room })));
    }
    sendAcks() {
        if (!this.opts.acks || !this.ws || this.ws.readyState !== 1)
            return;
        const user = this.positions.get("user");
        const key = this.positions.get("key");
        const body = {};
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
        if (Object.keys(body).length)
            this.ws.send(encode(Op.Ack, JSON.stringify(body)));
    }
    startHeartbeat(ms) {
        this.stopHeartbeat();
        const beat = () => this.ws?.readyState === 1 && this.ws.send(encode(Op.Heartbeat));
        beat();
        this.heartbeat = setInterval(beat, Math.max(1000, ms));
    }
    stopHeartbeat() {
        clearInterval(this.heartbeat);
        this.heartbeat = undefined;
    }
    /** Full jitter: a uniform delay in [0, min(max, base * 2^attempt)). */
    scheduleRetry(code, reason) {
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
