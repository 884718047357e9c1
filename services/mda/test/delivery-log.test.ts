import assert from "node:assert/strict";
import { Writable } from "node:stream";
import { after, before, test } from "node:test";
import { addFilterRule } from "@mailstack/db";
import { createLogger, currentTraceId, startTelemetry, withSpan } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { DeliveryBatcher } from "../src/batch.ts";
import { startMda, type Mda } from "../src/mda.ts";
import { LineClient, account, message, send } from "./helpers.ts";

// Trace ids exist (unrecorded spans) as in a service process.
startTelemetry("mda-delivery-log-test");

let env: TestEnv;
let mda: Mda;
const lines: Array<Record<string, unknown>> = [];

before(async () => {
  env = await createTestEnv();
  // The service's logger at the default level, writing its JSON lines here.
  mda = await startMda({ pool: env.pool, bus: env.bus, logger: createLogger("mda", "info", sinkFor(lines)), config: { LMTP_PORT: 0, LMTP_HOST: "127.0.0.1" } });
});

after(async () => {
  await mda?.stop();
  await env?.close();
});

function sinkFor(into: Array<Record<string, unknown>>): Writable {
  return new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split("\n")) if (line) into.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
}

/** The outcome lines of one delivery, once there is one. */
async function linesOf(deliveryId: number): Promise<Array<Record<string, unknown>>> {
  await waitFor(() => lines.some((l) => l.deliveryId === deliveryId));
  return lines.filter((l) => l.deliveryId === deliveryId);
}

async function queueIdOf(messageId: number): Promise<string> {
  return (await env.pool.query<{ queue_id: string }>("SELECT queue_id FROM messages WHERE id = $1", [messageId])).rows[0]!.queue_id;
}

test("a copy filed from the queue (NATS) is one info line naming the folder", async () => {
  const id = await account(env.pool, "filed@example.test");
  const accepted = await send(env.pool, env.bus, message("filed"), [{ address: "filed@example.test", accountId: id }]);
  const found = await linesOf(accepted.deliveries[0]!.id);
  assert.equal(found.length, 1);
  const line = found[0]!;
  assert.equal(line.level, "info");
  assert.equal(line.service, "mda");
  assert.equal(line.msg, "delivered");
  assert.equal(line.messageId, accepted.messageId);
  assert.equal(line.queueId, await queueIdOf(accepted.messageId));
  assert.equal(line.to, "filed@example.test");
  assert.equal(line.from, "sender@remote.example");
  assert.equal(line.status, "delivered");
  assert.equal(line.dsn, "2.0.0");
  assert.equal(line.relay, "INBOX");
  assert.equal(line.action, "filed");
  assert.equal(line.attempts, 1);
  assert.equal(typeof line.delay, "number");
  assert.match(line.reply as string, /^250 2\.0\.0 Delivered to INBOX as UID \d+$/);
  assert.match(line.trace_id as string, /^[0-9a-f]{32}$/);
  assert.ok(!JSON.stringify(line).includes("Hello."), "no body content");
});

test("bounces from the queue: full mailbox 5.2.2, disabled account 5.2.1", async () => {
  const full = await account(env.pool, "full@example.test", 10);
  const off = await account(env.pool, "off@example.test");
  await env.pool.query("UPDATE accounts SET disabled = true WHERE id = $1", [off]);
  const accepted = await send(env.pool, env.bus, message("bounces"), [{ address: "full@example.test", accountId: full }, { address: "off@example.test", accountId: off }]);
  const [quota] = await linesOf(accepted.deliveries[0]!.id);
  assert.equal(quota!.msg, "bounced");
  assert.equal(quota!.status, "bounced");
  assert.equal(quota!.dsn, "5.2.2");
  assert.equal(quota!.reply, "552 5.2.2 Mailbox full");
  assert.equal(quota!.to, "full@example.test");
  const [disabled] = await linesOf(accepted.deliveries[1]!.id);
  assert.equal(disabled!.msg, "bounced");
  assert.equal(disabled!.dsn, "5.2.1");
  assert.equal(disabled!.reply, "550 5.2.1 Mailbox disabled");
});

test("a filter that discards or forwards is logged as delivered with its action", async () => {
  const id = await account(env.pool, "rules@example.test");
  await account(env.pool, "target@example.test");
  await addFilterRule(env.pool, "rules@example.test", { condition: { kind: "header", header: "Subject", op: "is", value: "drop" }, action: { kind: "discard" } });
  await addFilterRule(env.pool, "rules@example.test", { condition: { kind: "header", header: "Subject", op: "is", value: "pass" }, action: { kind: "forward", to: "target@example.test" } });
  const dropped = await send(env.pool, env.bus, message("drop"), [{ address: "rules@example.test", accountId: id }]);
  const [discard] = await linesOf(dropped.deliveries[0]!.id);
  assert.equal(discard!.msg, "delivered");
  assert.equal(discard!.action, "discarded");
  assert.equal(typeof discard!.rule, "number");
  const passed = await send(env.pool, env.bus, message("pass"), [{ address: "rules@example.test", accountId: id }]);
  const [forward] = await linesOf(passed.deliveries[0]!.id);
  assert.equal(forward!.msg, "delivered");
  assert.equal(forward!.action, "forwarded");
  assert.equal(forward!.forwardedTo, "target@example.test");
  // The forwarded copy is a message of its own, with its own line when it is filed.
  const copy = await waitFor(() => lines.find((l) => l.messageId === forward!.forwardMessageId));
  assert.equal(copy.to, "target@example.test");
  assert.equal(copy.from, "rules@example.test");
  assert.equal(copy.relay, "INBOX");
});

test("LMTP deliveries are logged too: filed, and a full mailbox bounced", async () => {
  await account(env.pool, "lmtp-ok@example.test");
  await account(env.pool, "lmtp-full@example.test", 10);
  const client = await LineClient.open(mda.lmtpPort!);
  await client.reply();
  assert.match(await client.command("LHLO client.example"), /^250 /);
  assert.match(await client.command("MAIL FROM:<lmtp-sender@remote.example>"), /^250 /);
  assert.match(await client.command("RCPT TO:<lmtp-ok@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<lmtp-full@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("over lmtp")}.\r\n`);
  assert.match(await client.reply(), /^250 /);
  assert.match(await client.reply(), /^552 5\.2\.2 /);
  client.close();
  const ok = await waitFor(() => lines.find((l) => l.to === "lmtp-ok@example.test"));
  assert.equal(ok.msg, "delivered");
  assert.equal(ok.relay, "INBOX");
  assert.equal(ok.from, "lmtp-sender@remote.example");
  assert.match(ok.trace_id as string, /^[0-9a-f]{32}$/);
  const full = await waitFor(() => lines.find((l) => l.to === "lmtp-full@example.test"));
  assert.equal(full.msg, "bounced");
  assert.equal(full.dsn, "5.2.2");
  assert.equal(full.queueId, ok.queueId);
  assert.equal(lines.filter((l) => l.to === "lmtp-ok@example.test" || l.to === "lmtp-full@example.test").length, 2, "one line per recipient");
});

test("deliveries filed in one batch each log their own message's trace, not the trace of the job that started the batch", async () => {
  const id = await account(env.pool, "traced@example.test");
  const logger = createLogger("mda", "info", sinkFor(lines));
  const batcher = new DeliveryBatcher({ pool: env.pool, logger }, { maxBatch: 8, maxParallel: 1 });
  // Two messages accepted in two traces (not dispatched: the batcher below files them).
  const first = await withSpan("accept one", {}, async () => ({ accepted: await send(env.pool, null, message("trace one"), [{ address: "traced@example.test", accountId: id }], "one@remote.example"), trace: currentTraceId() }));
  const second = await withSpan("accept two", {}, async () => ({ accepted: await send(env.pool, null, message("trace two"), [{ address: "traced@example.test", accountId: id }], "two@remote.example"), trace: currentTraceId() }));
  await env.pool.query("UPDATE messages SET trace_id = $2 WHERE id = $1", [first.accepted.messageId, first.trace]);
  await env.pool.query("UPDATE messages SET trace_id = $2 WHERE id = $1", [second.accepted.messageId, second.trace]);
  // Both jobs join one batch, run in the context of a third trace.
  const outcomes = await withSpan("a job", {}, () =>
    Promise.all([batcher.deliver(first.accepted.deliveries[0]!.id), batcher.deliver(second.accepted.deliveries[0]!.id)]),
  );
  assert.deepEqual(outcomes.map((o) => o.status), ["delivered", "delivered"]);
  const [one] = await linesOf(first.accepted.deliveries[0]!.id);
  const [two] = await linesOf(second.accepted.deliveries[0]!.id);
  assert.equal(one!.trace_id, first.trace);
  assert.equal(two!.trace_id, second.trace);
  assert.notEqual(first.trace, second.trace);
});
