import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";
import { startMda, type Mda } from "@mailstack/mda/src/mda.ts";
import { addAccount, addAlias, addDomain, resolveRecipient } from "@mailstack/db";
import { acceptMessage } from "@mailstack/queue";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { startInbound, type Inbound } from "../src/inbound.ts";

const run = promisify(execFile);
const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");

let env: TestEnv;
let inbound: Inbound;
let mda: Mda;

before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  for (const name of ["ann", "bob", "cat"]) await addAccount(env.pool, { address: `${name}@example.test`, password: "pw" });
  await addAlias(env.pool, "staff@example.test", ["ann@example.test", "bob@example.test"]);
  await addAlias(env.pool, "all@example.test", ["staff@example.test", "cat@example.test", "ann@example.test"]);
  mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
  inbound = await startInbound({
    pool: env.pool,
    bus: env.bus,
    logger,
    // No DNS in this file: authentication checks are covered by auth.test.ts.
    config: { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", INBOUND_AUTH_CHECKS: false, INBOUND_SWEEP_INTERVAL: 300, INBOUND_SWEEP_UNDISPATCHED_AFTER: 200 },
  });
});

after(async () => {
  await inbound.stop();
  await mda.stop();
  await env.close();
});

async function mailbox(address: string) {
  const result = await env.pool.query(
    `SELECT e.folder, e.uid, e.header_prefix, m.raw, m.queue_id FROM mailbox_entries e
       JOIN accounts a ON a.id = e.account_id JOIN messages m ON m.id = e.message_id
      WHERE a.address = $1 ORDER BY e.id`,
    [address],
  );
  return result.rows as Array<{ folder: string; uid: number; header_prefix: Buffer; raw: Buffer; queue_id: string }>;
}

test("swaks to port 25: the message lands in the mailbox byte-for-byte with only the trace headers added", async () => {
  const message = [
    "From: Sender <sender@remote.example>",
    "To: ann@example.test",
    "Subject: e2e",
    "Message-ID: <e2e-1@remote.example>",
    "Date: Fri, 27 Nov 2026 09:00:00 +0000",
    "",
    "Line one",
    "second line with trailing spaces   ",
    "\ttabbed",
    "",
    "last line",
  ].join("\r\n");
  const file = join(await mkdtemp(join(tmpdir(), "e2e-")), "message.eml");
  await writeFile(file, message);
  const { stdout } = await run("swaks", [
    "--server", "127.0.0.1", "--port", String(inbound.port), "--ehlo", "client.remote.example",
    "--from", "sender@remote.example", "--to", "ann@example.test", "--data", `@${file}`,
  ]);
  const queueId = /250 2\.0\.0 Ok: queued as (\w+)/.exec(stdout)?.[1];
  assert.ok(queueId, stdout);
  const entry = await waitFor(async () => (await mailbox("ann@example.test")).find((r) => r.queue_id === queueId));
  assert.ok(entry);
  const copy = Buffer.concat([entry.header_prefix, entry.raw]).toString("latin1");
  assert.match(copy, /^Return-Path: <sender@remote\.example>\r\nDelivered-To: ann@example\.test\r\nReceived: from client\.remote\.example \(\[127\.0\.0\.1\]\)\r\n\tby mx\.example\.test \(mailstack\) with ESMTP id \w+ \(trace [0-9a-f]{32}\)\r\n\tfor <ann@example\.test>;\r\n\t[^\r]+\r\nFrom: Sender/);
  // swaks ends the data with CRLF . CRLF, so the last line's CRLF is on the wire too.
  assert.ok(copy.endsWith(`${message}\r\n`), `the message after the trace headers is exactly what was sent: ${JSON.stringify(copy.slice(-120))}`);
  assert.equal(entry.folder, "INBOX");
});

test("aliases fan out and merge: each final recipient gets exactly one copy", async () => {
  const before = { ann: (await mailbox("ann@example.test")).length, bob: (await mailbox("bob@example.test")).length, cat: (await mailbox("cat@example.test")).length };
  await run("swaks", [
    "--server", "127.0.0.1", "--port", String(inbound.port), "--from", "sender@remote.example",
    "--to", "all@example.test,staff@example.test,ann@example.test", "--header", "Subject: fan-out",
  ]);
  await waitFor(async () => (await mailbox("cat@example.test")).length === before.cat + 1);
  await waitFor(async () => (await mailbox("bob@example.test")).length === before.bob + 1);
  await waitFor(async () => (await mailbox("ann@example.test")).length === before.ann + 1);
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal((await mailbox("ann@example.test")).length, before.ann + 1, "ann is reached three ways and gets one copy");
  assert.equal((await mailbox("bob@example.test")).length, before.bob + 1);
});

test("the service's sweeper dispatches a delivery that was committed but never published", async () => {
  const resolution = await resolveRecipient(env.pool, "cat@example.test");
  assert.ok(resolution.ok);
  const raw = Buffer.from("Subject: orphan\r\n\r\ncommitted, then the process died before publishing\r\n");
  const accepted = await acceptMessage(env.pool, { raw, envelopeFrom: "x@remote.example", source: "inbound" }, [{ recipient: "cat@example.test", route: resolution.routes[0]! }], "mta-inbound");
  const delivered = await waitFor(async () => {
    const result = await env.pool.query("SELECT state FROM deliveries WHERE id = $1", [accepted.deliveries[0]!.id]);
    return result.rows[0].state === "delivered";
  }, 15_000);
  assert.ok(delivered);
});
