// The client against the real standalone server: pushes to a user and a room, heartbeats,
// nodes from logic, recovery after a lost connection; the codec and the backoff on their own.

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { ConversationError, decode, encode, GoimClient, Op, PacketError } from "../dist/index.js";
import { next, push, startStandalone } from "./server.mjs";

const token = (mid, extra = {}) => ({ mid, key: `k-${mid}-${Math.random()}`, room_id: "", platform: "web", accepts: [1000], ...extra });

describe("codec", () => {
  test("a packet round-trips and a raw batch unpacks in order", () => {
    const one = encode(Op.SendMsgReply, "hi", 7);
    assert.deepEqual([...one.subarray(0, 16)], [0, 0, 0, 18, 0, 16, 0, 1, 0, 0, 0, 5, 0, 0, 0, 7]);
    const [p] = decode(one);
    assert.equal(p.op, Op.SendMsgReply);
    assert.equal(p.seq, 7);
    assert.equal(new TextDecoder().decode(p.body), "hi");
    const inner = new Uint8Array([...encode(1000, "a"), ...encode(1000, "b")]);
    const batch = decode(encode(Op.Raw, inner));
    assert.deepEqual(
      batch.map((p) => new TextDecoder().decode(p.body)),
      ["a", "b"],
    );
  });

  test("lengths that do not fit are refused, never read past the frame", () => {
    const good = encode(1000, "abc");
    assert.throws(() => decode(good.subarray(0, 10)), PacketError);
    const long = good.slice();
    new DataView(long.buffer).setUint32(0, 1000);
    assert.throws(() => decode(long), PacketError);
    const shortHeader = good.slice();
    new DataView(shortHeader.buffer).setUint16(4, 8);
    assert.throws(() => decode(shortHeader), PacketError);
    const nested = encode(Op.Raw, encode(Op.Raw, encode(1000, "x")));
    // A batch inside a batch is delivered as a packet, not unpacked again.
    assert.equal(decode(nested)[0].op, Op.Raw);
  });
});

describe("backoff", () => {
  test("reconnects with full jitter under a growing cap", async () => {
    const delays = [];
    // A socket that never opens: every attempt fails at once.
    class Refused {
      constructor() {
        queueMicrotask(() => this.onclose?.({ code: 1006, reason: "refused" }));
      }
      send() {}
      close() {}
    }
    const c = new GoimClient({
      url: "ws://127.0.0.1:1/sub",
      token: "{}",
      WebSocket: Refused,
      backoff: { baseMs: 1, maxMs: 8 },
    });
    await new Promise((resolve) =>
      c.on("disconnected", (e) => {
        delays.push(e.retryInMs);
        if (delays.length === 6) resolve();
      }),
    );
    c.close();
    const caps = [1, 2, 4, 8, 8, 8];
    delays.forEach((d, i) => assert.ok(d >= 0 && d < caps[i], `attempt ${i}: ${d} not in [0, ${caps[i]})`));
  });
});

describe("against standalone", () => {
  let server;
  before(async () => {
    server = await startStandalone();
  });
  after(async () => {
    await server?.stop();
  });

  test("a user push and a room push arrive; heartbeats report the room count", async () => {
    const c = new GoimClient({ url: server.ws, token: token(501), room: "live://9" });
    const online = next(c, "online");
    await next(c, "connected");
    // JOIN is answered before pushes to the room reach this connection.
    await next(c, "recovered", (e) => e.stream === "live://9");
    const toUser = next(c, "message");
    assert.equal((await push(server.http, "/goim/push/mids?operation=1000&mids=501", "to the user")).code, 0);
    assert.equal((await toUser).text(), "to the user");
    const toRoom = next(c, "message");
    assert.equal((await push(server.http, "/goim/push/room?operation=1000&type=live&room=9", "to the room")).code, 0);
    const m = await toRoom;
    assert.equal(m.text(), "to the room");
    assert.equal(m.op, 1000);
    assert.ok((await online).count >= 0);
    c.close();
  });

  test("a kick is reported with its reason and not reconnected", async () => {
    const c = new GoimClient({ url: server.ws, token: token(503) });
    await next(c, "connected");
    const kicked = next(c, "kicked");
    const gone = next(c, "disconnected");
    const reply = await push(server.http, "/goim/kick?mids=503&reason=maintenance", "");
    assert.equal(reply.code, 0);
    assert.equal((await kicked).reason, "maintenance");
    assert.equal((await gone).retryInMs, undefined);
  });

  test("rooms beside the connection's own", async () => {
    const c = new GoimClient({ url: server.ws, token: token(504, { room_id: "live://11" }) });
    const e = await next(c, "connected");
    assert.ok(e.features.includes("rooms"), `${e.features}`);
    c.joinRoom("chat://12");
    const refused = next(c, "error");
    c.joinRoom("user://504");
    assert.match((await refused).message, /room user:\/\/504/);
    const got = next(c, "message", (m) => m.text() === "to chat 12");
    assert.equal((await push(server.http, "/goim/push/room?operation=1000&type=chat&room=12", "to chat 12")).code, 0);
    await got;
    c.close();
  });

  test("goim's protocol alone, without the extensions", async () => {
    const c = new GoimClient({ url: server.ws, token: token(502, { room_id: "live://10" }), extensions: false });
    const e = await next(c, "connected");
    assert.deepEqual(e.features, []);
    const got = next(c, "message");
    await push(server.http, "/goim/push/room?operation=1000&type=live&room=10", "plain");
    assert.equal((await got).text(), "plain");
    c.close();
  });
});

async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

describe("with history and nodes from logic", () => {
  let server;
  let wsPort;
  before(async () => {
    wsPort = await freePort();
    const dir = mkdtempSync(join(tmpdir(), "goim-js-"));
    const config = join(dir, "goim.toml");
    // The comet's name is what logic offers web clients; make it reachable here.
    writeFileSync(
      config,
      [
        "[comet]",
        'name = "127.0.0.1"',
        "[logic]",
        "user_streams = true",
        "[logic.node]",
        'host_domain = ""',
        `ws_port = ${wsPort}`,
        "[job.history.chat]",
        "size = 100",
        'ttl = "60s"',
        "[job.history.user]",
        "size = 100",
        'ttl = "60s"',
        "",
      ].join("\n"),
    );
    server = await startStandalone({ ws: `127.0.0.1:${wsPort}`, config });
  });
  after(async () => {
    await server?.stop();
  });

  test("nodes and heartbeat come from logic's API", async () => {
    const c = new GoimClient({ api: server.http, token: token(601) });
    const e = await next(c, "connected");
    assert.equal(e.url, `ws://127.0.0.1:${wsPort}/sub`);
    assert.ok(e.features.includes("recover"), e.features.join());
    c.close();
  });

  test("what was pushed while the connection was lost is recovered, once, in order", async () => {
    // The token is asked for before every connect: holding it back keeps the client away
    // while the test pushes what it must recover.
    let gate = Promise.resolve();
    const t = token(701);
    const c = new GoimClient({
      url: server.ws,
      token: async () => {
        await gate;
        return t;
      },
      room: "chat://1",
      acks: true,
      backoff: { baseMs: 1, maxMs: 1 },
    });
    await next(c, "connected");
    await next(c, "recovered", (e) => e.stream === "chat://1");
    const seen = [];
    c.on("message", (m) => seen.push(`${m.stream}#${m.offset}:${m.text()}`));
    // Resolves once a message with body `text` has arrived (before or after the call).
    const arrived = (text) =>
      seen.some((s) => s.endsWith(`:${text}`)) ? Promise.resolve() : next(c, "message", (m) => m.text() === text);
    for (const b of ["r1", "r2", "r3"]) {
      await push(server.http, "/goim/push/room?operation=1000&type=chat&room=1", b);
    }
    await push(server.http, "/goim/push/mids?operation=1000&mids=701", "u1");
    await arrived("r3");
    await arrived("u1");
    // Lose the connection (not close()): the client reconnects by itself.
    let open;
    gate = new Promise((resolve) => (open = resolve));
    const lost = next(c, "disconnected");
    c.ws.close();
    await lost;
    const room = next(c, "recovered", (e) => e.stream === "chat://1");
    const user = next(c, "recovered", (e) => e.stream === "user");
    for (const b of ["r4", "r5"]) {
      await push(server.http, "/goim/push/room?operation=1000&type=chat&room=1", b);
    }
    await push(server.http, "/goim/push/mids?operation=1000&mids=701", "u2");
    open();
    assert.equal((await room).recovered, true);
    assert.equal((await user).recovered, true);
    await arrived("r5");
    await arrived("u2");
    const roomSeen = seen.filter((s) => s.startsWith("chat://1#"));
    assert.deepEqual(roomSeen, ["chat://1#1:r1", "chat://1#2:r2", "chat://1#3:r3", "chat://1#4:r4", "chat://1#5:r5"]);
    const userSeen = seen.filter((s) => s.startsWith("user#")).map((s) => s.split(":")[1]);
    assert.deepEqual(userSeen, ["u1", "u2"]);
    assert.equal(c.streams.get("chat://1").offset, 5);
    c.close();
  });
});

describe("with signed tokens that expire", () => {
  let server;
  const secret = "a test secret of thirty-two bytes or more";
  const b64url = (b) => Buffer.from(b).toString("base64url");
  const jwt = (claims) => {
    const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
    const body = b64url(JSON.stringify(claims));
    const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
    return `${head}.${body}.${sig}`;
  };
  before(async () => {
    const dir = mkdtempSync(join(tmpdir(), "goim-js-jwt-"));
    writeFileSync(join(dir, "hs256"), secret);
    const config = join(dir, "goim.toml");
    writeFileSync(
      config,
      `[comet]\ntoken_grace = "5s"\n[logic]\nauth = "jwt"\n[logic.jwt]\nhs256_secret_files = ["${join(dir, "hs256")}"]\nleeway = "0s"\n`,
    );
    server = await startStandalone({ config });
  });
  after(() => server?.stop());

  test("the token function is asked again when the server says the token expired", async () => {
    const now = Math.floor(Date.now() / 1000);
    let asked = 0;
    const c = new GoimClient({
      url: server.ws,
      // First a token that expires in a second, then one good for an hour.
      token: () => jwt({ sub: "601", key: "js-refresh", accepts: [1000], exp: asked++ === 0 ? now + 1 : now + 3600 }),
    });
    const e = await next(c, "connected");
    assert.ok(e.features.includes("refresh"), `${e.features}`);
    const refreshed = await next(c, "refreshed");
    assert.ok(refreshed.expires >= now + 3600, `${refreshed.expires}`);
    assert.equal(asked, 2);
    const got = next(c, "message");
    assert.equal((await push(server.http, "/goim/push/mids?operation=1000&mids=601", "after refresh")).code, 0);
    assert.equal((await got).text(), "after refresh");
    c.close();
  });
});

describe("conversations", () => {
  let server;
  before(async () => {
    const dir = mkdtempSync(join(tmpdir(), "goim-js-chat-"));
    const config = join(dir, "goim.toml");
    writeFileSync(config, `[logic.conversations]\nstore = "sqlite://${join(dir, "chat.db")}"\n`);
    server = await startStandalone({ config });
  });
  after(() => server?.stop());

  const api = async (method, path, body) => {
    const res = await fetch(`${server.http}${path}`, { method, body: JSON.stringify(body) });
    const reply = await res.json();
    assert.equal(reply.code, 0, JSON.stringify(reply));
    return reply.data;
  };

  test("send, receive on every device, read sync, history and the list", async () => {
    await api("POST", "/goim/conversations", { id: "js-team", members: [701, 702] });
    // The token watches only 1000: `conversations: true` adds the conversation ops.
    const alice = new GoimClient({ url: server.ws, token: token(701), conversations: true });
    const phone = new GoimClient({ url: server.ws, token: token(702), conversations: true });
    const laptop = new GoimClient({ url: server.ws, token: token(702), conversations: true });
    await Promise.all([next(alice, "connected"), next(phone, "connected"), next(laptop, "connected")]);

    const onPhone = next(phone, "conversationMessage");
    const onLaptop = next(laptop, "conversationMessage");
    const sent = await alice.sendMessage("js-team", "hello from js", { op: 3, clientId: "js-1" });
    assert.deepEqual([sent.seq, sent.duplicate], [1, false]);
    for (const m of [await onPhone, await onLaptop]) {
      assert.deepEqual([m.conversation, m.seq, m.sender, m.op, m.body], ["js-team", 1, 701, 3, "hello from js"]);
    }
    const again = await alice.sendMessage("js-team", "hello from js", { clientId: "js-1" });
    assert.deepEqual([again.seq, again.duplicate], [1, true]);

    let list = await phone.conversationList();
    assert.deepEqual([list.total_unread, list.conversations[0].last.text], [1, "hello from js"]);
    const synced = next(laptop, "readSync");
    assert.equal(await phone.markRead("js-team", 1), 1);
    assert.deepEqual(await synced, { conversation: "js-team", readSeq: 1 });
    list = await laptop.conversationList();
    assert.equal(list.total_unread, 0);
    const h = await laptop.history("js-team", 0);
    assert.deepEqual(h.messages.map((m) => m.body), ["hello from js"]);

    await assert.rejects(alice.sendMessage("nope", "x"), (e) => e instanceof ConversationError && e.code === 404);
    for (const c of [alice, phone, laptop]) c.close();
  });
});
