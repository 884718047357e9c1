import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { startMda, type Mda } from "@mailstack/mda/src/mda.ts";
import { startInbound, type Inbound } from "@mailstack/mta-inbound/src/inbound.ts";
import { addAccount, addDomain } from "@mailstack/db";
import { createApiToken } from "@mailstack/admin-ops";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { mailctl } from "./helpers.ts";
import { apiConfig } from "../src/api/config.ts";
import { startAdminApi, type RunningAdminApi } from "../src/api/server.ts";

const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
let env: TestEnv;
let mda: Mda;
let inbound: Inbound;
let api: RunningAdminApi;
let token: string;

before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "journey.test");
  await addAccount(env.pool, { address: "ann@journey.test", password: "pw" });
  mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
  inbound = await startInbound({
    pool: env.pool,
    bus: env.bus,
    logger,
    config: { MAIL_HOSTNAME: "mx.journey.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", INBOUND_AUTH_CHECKS: false },
  });
  api = await startAdminApi({ pool: env.pool, logger, config: apiConfig({ JAEGER_UI_URL: "http://jaeger.local:16686" }) });
  token = (await createApiToken(env.pool, "e2e")).token;
});
after(async () => {
  await api?.stop();
  await inbound?.stop();
  await mda?.stop();
  await env?.close();
});

/** A minimal SMTP client over a real socket: sends the commands in order, returns every reply. */
function smtp(port: number, lines: string[]): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1");
    const replies: string[] = [];
    let buffer = "";
    let step = 0;
    socket.setEncoding("latin1");
    socket.on("data", (chunk) => {
      buffer += chunk;
      let end;
      while ((end = buffer.indexOf("\r\n")) !== -1) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (line[3] === "-") continue;
        replies.push(line);
        if (step < lines.length) socket.write(`${lines[step++]}\r\n`);
        else socket.end();
      }
    });
    socket.on("error", reject);
    socket.on("close", () => resolve(replies));
  });
}

test("a mail through mta-inbound and the MDA shows its whole journey in the API, and exports byte for byte", async () => {
  const body = "From: Remote <r@remote.test>\r\nTo: ann@journey.test\r\nSubject: journey\r\nMessage-ID: <e2e-journey@remote.test>\r\n\r\nFrom the start\r\nhello\r\n";
  const replies = await smtp(inbound.port, [
    "EHLO client.remote.test", "MAIL FROM:<r@remote.test>", "RCPT TO:<ann@journey.test>", "DATA", `${body}.`, "QUIT",
  ]);
  const accepted = replies.find((r) => r.startsWith("250") && /queued as/.test(r));
  assert.ok(accepted, replies.join("\n"));

  type Journey = { messages: { queueId: string; traceId: string | null; traceUrl: string | null; recipients: { state: string; events: { event: string; service: string }[] }[] }[] };
  const headers = { authorization: `Bearer ${token}` };
  const journey = await waitFor(async () => {
    const response = await fetch(`${api.url}/journey?messageId=${encodeURIComponent("<e2e-journey@remote.test>")}`, { headers });
    if (response.status !== 200) return null;
    const data = (await response.json()) as Journey;
    // Delivered, and the dispatch stamp (written in batches right after the publish) committed.
    const recipient = data.messages[0]?.recipients[0];
    return recipient?.state === "delivered" && recipient.events.some((e) => e.event === "dispatched") ? data : null;
  });
  const message = journey!.messages[0]!;
  assert.ok(accepted.includes(message.queueId), `${accepted} names ${message.queueId}`);
  const events = message.recipients[0]!.events.map((e) => `${e.event}/${e.service}`);
  assert.equal(events[0], "accepted/mta-inbound");
  assert.ok(events.includes("delivered/mda"), events.join(", "));
  assert.equal(events[1], "dispatched/queue", "the hand-over to NATS, right after acceptance");
  const stored = await env.pool.query("SELECT trace_id FROM messages WHERE queue_id = $1", [message.queueId]);
  assert.equal(message.traceId, stored.rows[0].trace_id);
  assert.match(message.traceId ?? "", /^[0-9a-f]{32}$/);
  assert.equal(message.traceUrl, `http://jaeger.local:16686/trace/${message.traceId}`);

  // mailctl prints the same journey from the same code.
  const cli = await mailctl(env.db.url, ["journey", "<e2e-journey@remote.test>"]);
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(cli.stdout, new RegExp(`^message ${message.queueId} <e2e-journey@remote.test> from <r@remote.test> via inbound`, "m"));
  assert.match(cli.stdout, new RegExp(`^  trace: http://localhost:16686/trace/${message.traceId}$`, "m"));
  assert.match(cli.stdout, /^  <ann@journey\.test> local delivered, attempts \d+/m);
  assert.match(cli.stdout, /^    \S+  delivered  mda/m);

  const exported = await fetch(`${api.url}/accounts/ann@journey.test/export?format=mbox&folder=INBOX`, { headers });
  const mbox = Buffer.from(await exported.arrayBuffer()).toString("latin1");
  const entry = await env.pool.query(
    "SELECT e.header_prefix || m.raw AS bytes FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE m.queue_id = $1",
    [message.queueId],
  );
  const copy = (entry.rows[0].bytes as Buffer).toString("latin1");
  assert.ok(copy.endsWith(body), "the mailbox copy ends with the message as sent");
  assert.ok(copy.startsWith("Return-Path: <r@remote.test>\r\n"));
  assert.equal(mbox, `${mbox.slice(0, mbox.indexOf("\n") + 1)}${copy.replace(/^From the start/m, ">From the start")}\n`);
});
