// The demo page standalone serves at `/`: connect as a user, join a room, push through the
// HTTP API, watch messages, online counts and the server's metrics. Not part of the package's
// API; it uses only what the package exports.
import { GoimClient } from "./client.js";
const $ = (id) => document.getElementById(id);
const input = (id) => $(id).value.trim();
let client;
function log(kind, text) {
    const li = document.createElement("li");
    li.className = kind;
    li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    const list = $("messages");
    list.prepend(li);
    while (list.children.length > 200)
        list.lastElementChild?.remove();
}
function headers() {
    const key = input("apikey");
    return key ? { Authorization: `Bearer ${key}` } : {};
}
async function connect() {
    client?.close();
    const cfg = (await (await fetch("/demo/config.json")).json());
    const mid = Number(input("mid")) || 1;
    const room = input("room");
    client = new GoimClient({
        url: `ws://${location.hostname}:${cfg.ws_port}/sub`,
        token: { mid, key: `demo-${mid}-${Math.random().toString(36).slice(2, 8)}`, room_id: "", platform: "web", accepts: [1000, 1001, 1002] },
        room: room || undefined,
    });
    client
        .on("connected", (e) => {
        $("state").textContent = "connected";
        log("sys", `connected to ${e.url} (${e.features.join(", ") || "goim protocol"})`);
    })
        .on("disconnected", (e) => {
        $("state").textContent = "disconnected";
        log("sys", `disconnected (${e.code}${e.retryInMs !== undefined ? `, retry in ${e.retryInMs} ms` : ""})`);
    })
        .on("recovered", (e) => {
        if (e.epoch) {
            log("sys", `${e.stream}: ${e.recovered ? "recovered up to" : "starts after"} #${e.offset} (epoch ${e.epoch})`);
        }
        else if (e.stream !== "user" && e.stream !== "key") {
            log("sys", `joined ${e.stream}`);
        }
    })
        .on("kicked", (e) => log("err", `kicked: ${e.reason}`))
        .on("online", (e) => ($("room-online").textContent = String(e.count)))
        .on("message", (m) => log("msg", `${m.stream ? `[${m.stream} #${m.offset}] ` : ""}${m.text()}`))
        .on("error", (e) => log("err", e.message));
}
async function push() {
    const target = $("target").value;
    const body = input("body");
    let url;
    if (target === "room") {
        const [type, id] = input("room").split("://");
        url = `/goim/push/room?operation=1000&type=${encodeURIComponent(type)}&room=${encodeURIComponent(id ?? "")}`;
    }
    else if (target === "mid") {
        url = `/goim/push/mids?operation=1000&mids=${encodeURIComponent(input("mid"))}`;
    }
    else {
        url = "/goim/push/all?operation=1000";
    }
    const res = await fetch(url, { method: "POST", body, headers: headers() });
    const reply = (await res.json());
    if (reply.code !== 0)
        log("err", `push refused: ${reply.code} ${reply.message}`);
}
/** The few numbers that matter, read from Prometheus' text format. */
function sum(metrics, name) {
    let total = 0;
    for (const line of metrics.split("\n")) {
        if (line.startsWith(name) && (line[name.length] === " " || line[name.length] === "{")) {
            total += Number(line.slice(line.lastIndexOf(" ") + 1)) || 0;
        }
    }
    return total;
}
let lastPushes;
async function poll() {
    try {
        const metrics = await (await fetch("/metrics")).text();
        $("connections").textContent = String(sum(metrics, "goim_comet_connections"));
        const pushes = sum(metrics, "goim_comet_pushes_queued_total");
        $("rate").textContent = lastPushes === undefined ? "0" : String(Math.max(0, (pushes - lastPushes) / 2));
        lastPushes = pushes;
        $("drops").textContent = String(sum(metrics, "goim_comet_pushes_dropped_total"));
        const total = (await (await fetch("/goim/online/total", { headers: headers() })).json());
        $("online").textContent = String(total.data?.conn_count ?? "?");
    }
    catch {
        // The server is restarting; the next poll tries again.
    }
}
$("connect").addEventListener("click", () => void connect());
$("push").addEventListener("click", () => void push());
$("join").addEventListener("click", () => client?.join(input("room")));
setInterval(() => void poll(), 2000);
void poll();
