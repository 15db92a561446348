// The demo page standalone serves, in headless Chromium (Debian's, driven by playwright-core;
// nothing is downloaded): connect, push through the HTTP API, see the message in the page.
// The screenshot lands in test-output/demo.png.

import assert from "node:assert/strict";
import { existsSync, mkdirSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

import { push, startStandalone } from "./server.mjs";

const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const out = join(dirname(fileURLToPath(import.meta.url)), "..", "test-output");

let server;
let browser;
before(async () => {
  assert.ok(existsSync(executablePath), `no Chromium at ${executablePath} (Debian: apt-get install chromium)`);
  server = await startStandalone();
  browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

test("the demo page shows a message pushed through the API", async () => {
  const page = await browser.newPage({ viewport: { width: 1200, height: 700 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(server.http + "/");
  await page.fill("#mid", "4242");
  await page.fill("#room", "live://77");
  await page.click("#connect");
  await page.locator("#state", { hasText: "connected" }).waitFor({ timeout: 10_000 });
  // The room is joined once the page logs the JOIN's answer.
  await page.locator("#messages li.sys", { hasText: "live://77" }).waitFor({ timeout: 10_000 });

  const body = `hello from the test ${Date.now()}`;
  const reply = await push(server.http, "/goim/push/room?operation=1000&type=live&room=77", body);
  assert.equal(reply.code, 0);
  await page.locator("#messages li.msg", { hasText: body }).waitFor({ timeout: 10_000 });

  // And from the page's own form, to the user.
  await page.selectOption("#target", "mid");
  await page.fill("#body", "from the page");
  await page.click("#push");
  await page.locator("#messages li.msg", { hasText: "from the page" }).waitFor({ timeout: 10_000 });

  // The metrics panel reads /metrics: this page's connection is counted.
  await page.waitForFunction(() => Number(document.getElementById("connections")?.textContent) >= 1, null, {
    timeout: 10_000,
  });

  mkdirSync(out, { recursive: true });
  const shot = join(out, "demo.png");
  await page.screenshot({ path: shot, fullPage: true });
  assert.ok(statSync(shot).size > 1000);
  assert.deepEqual(errors, []);
  console.log(`screenshot: ${shot}`);
});
