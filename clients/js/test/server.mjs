// Starts the real standalone server on free ports for a test and stops it afterwards.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

/** The `goim` binary: $GOIM_BIN, else the debug build in $CARGO_TARGET_DIR or the cache. */
export function goimBin() {
  if (process.env.GOIM_BIN) return process.env.GOIM_BIN;
  const target =
    process.env.CARGO_TARGET_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "goim-rs", "target");
  const bin = join(target, "debug", "goim");
  if (!existsSync(bin)) {
    throw new Error(`no goim binary at ${bin}: run \`cargo build -p goim\` or set GOIM_BIN`);
  }
  return bin;
}

/**
 * Runs `goim standalone` on loopback port 0 and resolves with its addresses once it logs
 * them (its logs are JSON lines when not on a terminal). `ws` and `config` as the flags.
 */
export function startStandalone({ ws = "127.0.0.1:0", config } = {}) {
  const args = ["standalone", "--tcp", "127.0.0.1:0", "--ws", ws, "--http", "127.0.0.1:0"];
  if (config) args.push("--config", config);
  const child = spawn(goimBin(), args, {
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lines = createInterface({ input: child.stderr });
  const started = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("standalone did not start in 30 s")), 30_000);
    child.once("exit", (code) => reject(new Error(`standalone exited with ${code}`)));
    lines.on("line", (line) => {
      let entry;
      try {
        entry = JSON.parse(line);
      } catch {
        return;
      }
      if (entry.fields?.message === "goim standalone started") {
        clearTimeout(timer);
        const f = entry.fields;
        resolve({
          ws: `ws://${f.ws}/sub`,
          http: `http://${f.http}`,
          stop: () =>
            new Promise((done) => {
              child.once("exit", done);
              child.kill("SIGTERM");
            }),
        });
      }
    });
  });
  return started;
}

/** POSTs `body` to a push route of the HTTP API; resolves with goim's reply. */
export async function push(http, path, body, headers = {}) {
  const res = await fetch(`${http}${path}`, { method: "POST", body, headers });
  return res.json();
}

/** Resolves with the first event `event` of `client` that `pred` accepts (10 s at most). */
export function next(client, event, pred = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off(event, on);
      reject(new Error(`no ${event} within 10 s`));
    }, 10_000);
    const on = (e) => {
      if (!pred(e)) return;
      clearTimeout(timer);
      client.off(event, on);
      resolve(e);
    };
    client.on(event, on);
  });
}
