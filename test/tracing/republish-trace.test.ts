import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { addAccount, addDomain, resolveRecipient } from "@mailstack/db";
import { acceptMessage, publishEvents, recordEvents, sweepUndispatched, type AcceptedMessage } from "@mailstack/queue";
import { startTelemetry, stopTelemetry } from "@mailstack/telemetry/sdk";
import { createTestEnv, startOtlpReceiver, waitFor, type OtlpReceiver, type ReceivedSpan, type TestEnv } from "@mailstack/testkit";
import { generateDsns } from "../../packages/dsn/src/index.ts";
import { scheduleDue } from "../../services/mta-outbound/src/scheduler.ts";
import { SmtpConnection, rfcTimeouts } from "../../services/mta-outbound/src/smtp-client.ts";
import { startScriptedMx } from "../../services/mta-outbound/test/scripted-mx.ts";

// Work done for a message after its SMTP session (a retry the scheduler republishes, a job the
// sweeper republishes, a bounce) stays in the message's one trace (DESIGN.md rule 6): its spans
// descend from the accepting session's span stored on the message row.

const SPAN_KIND_PRODUCER = 4;
let env: TestEnv;
let receiver: OtlpReceiver;

before(async () => {
  receiver = await startOtlpReceiver();
  process.env.OTEL_EXPORTER_OTLP_ENDPOINT = receiver.url;
  process.env.OTEL_EXPORTER_OTLP_PROTOCOL = "http/json";
  process.env.OTEL_BSP_SCHEDULE_DELAY = "50";
  delete process.env.OTEL_TRACES_SAMPLER;
  startTelemetry("republish-test");
  env = await createTestEnv();
  await addDomain(env.pool, "home.test");
  await addAccount(env.pool, { address: "sender@home.test", password: "pw-123456", quotaBytes: null });
});

after(async () => {
  await stopTelemetry();
  await env?.close();
  await receiver?.close();
});

let counter = 0;
/** A message as the SMTP intake stores it: with the session's trace id and span id. */
async function storedMessage(to: string): Promise<AcceptedMessage & { traceSpanId: string }> {
  counter++;
  const traceId = `${"ab".repeat(12)}${String(counter).padStart(8, "0")}`;
  const traceSpanId = `${"cd".repeat(4)}${String(counter).padStart(8, "0")}`;
  const resolution = await resolveRecipient(env.pool, to, { allowRemote: true });
  assert.ok(resolution.ok);
  const raw = Buffer.from(`From: <sender@home.test>\r\nTo: <${to}>\r\nSubject: t${counter}\r\n\r\nbody\r\n`);
  const accepted = await acceptMessage(
    env.pool,
    { raw, envelopeFrom: "sender@home.test", source: "submission", traceId, traceSpanId },
    [{ recipient: to, route: resolution.routes[0]!, dsnNotify: null }],
    "test",
  );
  return { ...accepted, traceSpanId };
}

function spansOf(traceId: string): ReceivedSpan[] {
  return receiver.spans.filter((s) => s.traceId === traceId);
}

test("a deferred delivery the scheduler republishes continues the message's trace", async () => {
  const message = await storedMessage("r@far.test");
  await env.pool.query(
    "UPDATE deliveries SET state = 'deferred', attempts = 1, next_attempt_at = now() - interval '1 second', dispatched_at = now() WHERE message_id = $1",
    [message.messageId],
  );
  assert.ok((await scheduleDue(env.bus, env.pool)) >= 1);
  const publish = await waitFor(() => spansOf(message.traceId!).find((s) => s.name === "mail.relay.outbound publish"), 10_000);
  assert.equal(publish.kind, SPAN_KIND_PRODUCER);
  assert.equal(publish.parentSpanId, message.traceSpanId, "a child of the accepting session's span");
});

test("a job the sweeper republishes continues the message's trace", async () => {
  const message = await storedMessage("s@far.test");
  await env.pool.query("UPDATE deliveries SET created_at = now() - interval '1 hour', dispatched_at = NULL WHERE message_id = $1", [message.messageId]);
  assert.ok((await sweepUndispatched(env.bus, env.pool, { undispatchedAfterMs: 1_000 })) >= 1);
  const publish = await waitFor(() => spansOf(message.traceId!).find((s) => s.name === "mail.relay.outbound publish"), 10_000);
  assert.equal(publish.parentSpanId, message.traceSpanId);
});

test("a bounce is generated, stored and dispatched inside the original message's trace", async () => {
  const message = await storedMessage("gone@far.test");
  await env.pool.query(
    "UPDATE deliveries SET state = 'bounced', last_reply = '550 5.1.1 unknown user', last_status = '5.1.1', remote_mta = 'mx.far.test', dsn_state = 'pending', dispatched_at = now() WHERE message_id = $1",
    [message.messageId],
  );
  assert.equal(await generateDsns(env.bus, env.pool, { reportingMta: "mx.home.test", service: "test" }), 1);
  const bounce = await env.pool.query<{ trace_id: string; trace_span_id: string }>(
    "SELECT trace_id, trace_span_id FROM messages WHERE source = 'bounce' AND position(convert_to('gone@far.test', 'UTF8') in raw) > 0",
  );
  assert.equal(bounce.rows.length, 1);
  assert.equal(bounce.rows[0]!.trace_id, message.traceId, "the report's row keeps the original journey's trace id");

  const generate = await waitFor(() => spansOf(message.traceId!).find((s) => s.name === "dsn generate"), 10_000);
  assert.equal(generate.parentSpanId, message.traceSpanId);
  assert.equal(bounce.rows[0]!.trace_span_id, generate.spanId, "later traces (POP3) link to the span that made the report");
  const publish = await waitFor(() => spansOf(message.traceId!).find((s) => s.name === "mail.deliver.local publish"), 10_000);
  assert.equal(publish.parentSpanId, generate.spanId, "the report's delivery job is published under it");
});

test("without PIPELINING, a refused RCPT is an error on its own `smtp RCPT` client span", async () => {
  const server = await startScriptedMx("127.0.0.1", 0, {
    extensions: ["8BITMIME"],
    reply: (command) => (command.startsWith("RCPT TO:<bad") ? "550 5.1.1 no such user" : undefined),
  });
  try {
    const connection = await SmtpConnection.open({
      hostname: "mx.span.test", address: server.host, port: server.port, heloName: "relay.test", tls: "none", timeouts: rfcTimeouts,
    });
    const result = await connection.send(
      { from: "a@origin.test", recipients: [{ address: "good@x.test" }, { address: "bad@x.test" }] },
      Buffer.from("Subject: hi\r\n\r\nHello.\r\n"),
      { eightBit: false, utf8Header: false },
    );
    assert.deepEqual(result.recipients.map((r) => r.accepted), [true, false]);
    await connection.quit();
  } finally {
    await server.close();
  }
  const mine = await waitFor(() => {
    const spans = receiver.spans.filter((s) => s.attributes["server.address"] === "mx.span.test");
    return spans.some((s) => s.name === "smtp transaction") ? spans : null;
  }, 10_000);
  const rcpts = mine.filter((s) => s.name === "smtp RCPT");
  assert.deepEqual(rcpts.map((s) => [s.attributes["smtp.reply.code"], s.status.code]).sort(), [[250, 0], [550, 2]]);
  assert.match(rcpts.find((s) => s.status.code === 2)!.status.message, /550 5\.1\.1/);
  const transaction = mine.find((s) => s.name === "smtp transaction")!;
  assert.equal(transaction.status.code, 2);
  assert.equal(transaction.attributes["mail.recipients.refused"], 1);
  assert.equal(mine.find((s) => s.name === "smtp message")!.status.code, 0, "the accepted recipient's data went through");
});

test("a journey event published from the outbox is in its message's trace, not a trace of its own", async () => {
  const message = await storedMessage("evented@far.test");
  await recordEvents(env.pool, [{ messageId: message.messageId, deliveryId: message.deliveries[0]!.id, event: "delayed", service: "test", detail: null }]);
  await env.pool.query("UPDATE delivery_events SET created_at = now() - interval '1 minute' WHERE message_id = $1", [message.messageId]);
  assert.ok((await publishEvents(env.bus, env.pool, { lagMs: 0 })) >= 1);
  const published = await waitFor(() => {
    const spans = spansOf(message.traceId!).filter((s) => s.name.startsWith("mail.event."));
    return spans.length >= 2 ? spans : null;
  }, 10_000);
  assert.deepEqual(published.map((s) => s.name).sort(), ["mail.event.accepted publish", "mail.event.delayed publish"]);
  for (const span of published) assert.equal(span.parentSpanId, message.traceSpanId, span.name);
});
