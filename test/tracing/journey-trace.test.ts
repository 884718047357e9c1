import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import nodemailer from "nodemailer";
import { SMTPServer } from "smtp-server";
import { addAccount, addDomain } from "@mailstack/db";
import {
  createTestEnv, freePort, startOtlpReceiver, startServiceProcess, waitFor,
  type OtlpReceiver, type ReceivedSpan, type ServiceProcess, type TestEnv,
} from "@mailstack/testkit";

// One trace per message journey (DESIGN.md rule 6), checked on what the services really export
// over OTLP: the SMTP session is the root, the NATS publish its descendant, the consumer in the
// next process a child of that publish, and the consumer's work below it.

const SPAN_KIND = { INTERNAL: 1, SERVER: 2, CLIENT: 3, PRODUCER: 4, CONSUMER: 5 };

let env: TestEnv;
let receiver: OtlpReceiver;
let sink: SMTPServer;
const sinkMessages: string[] = [];
const processes: ServiceProcess[] = [];
const ports: Record<string, number> = {};

before(async () => {
  env = await createTestEnv();
  receiver = await startOtlpReceiver();
  await addDomain(env.pool, "example.test");
  await addAccount(env.pool, { address: "alice@example.test", password: "alice-pw" });
  await addAccount(env.pool, { address: "bob@example.test", password: "bob-pw" });

  sink = new SMTPServer({
    authOptional: true,
    onRcptTo(address, _session, callback) {
      if (address.address.startsWith("refused@")) return callback(Object.assign(new Error("5.1.1 no such user"), { responseCode: 550 }));
      callback();
    },
    disabledCommands: ["STARTTLS"],
    logger: false,
    onData(stream, _session, callback) {
      const chunks: Buffer[] = [];
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("end", () => {
        sinkMessages.push(Buffer.concat(chunks).toString("utf8"));
        callback();
      });
    },
  });
  ports.sink = await freePort();
  await new Promise<void>((resolve) => sink.listen(ports.sink, "127.0.0.1", resolve));

  for (const name of ["smtp", "submission", "submissions", "lmtp", "pop3", "pop3s"]) ports[name] = await freePort();
  const common = {
    ...env.env,
    LOG_LEVEL: "warn",
    OTEL_EXPORTER_OTLP_ENDPOINT: receiver.url,
    OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
    OTEL_BSP_SCHEDULE_DELAY: "100",
    TLS_DIR: ".data/tls-test",
  };
  const start = async (name: string, extra: Record<string, string>) => {
    processes.push(await startServiceProcess(name, { ...common, OTEL_SERVICE_NAME: name, ...extra }));
  };
  await Promise.all([
    start("mta-inbound", { SMTP_PORT: String(ports.smtp) }),
    start("mda", { LMTP_PORT: String(ports.lmtp) }),
    start("msa", { SUBMISSION_PORT: String(ports.submission), SUBMISSIONS_PORT: String(ports.submissions) }),
    start("mta-outbound", { RELAY_SMARTHOST: `127.0.0.1:${ports.sink}`, RELAY_SMARTHOST_TLS: "none" }),
    start("pop3", { POP3_PORT: String(ports.pop3), POP3S_PORT: String(ports.pop3s) }),
  ]);
});

after(async () => {
  await Promise.all(processes.map((p) => p.stop()));
  await new Promise<void>((resolve) => sink.close(() => resolve()));
  await receiver.close();
  await env.close();
});

async function traceIdOf(messageIdHeader: string): Promise<string> {
  return waitFor(async () => {
    const row = await env.pool.query("SELECT trace_id FROM messages WHERE message_id_header = $1", [messageIdHeader]);
    return row.rows[0]?.trace_id as string | undefined;
  }, 20_000);
}

function spansOf(traceId: string): ReceivedSpan[] {
  return receiver.spans.filter((span) => span.traceId === traceId);
}

function isDescendant(spans: ReceivedSpan[], child: ReceivedSpan, ancestor: ReceivedSpan): boolean {
  const byId = new Map(spans.map((s) => [s.spanId, s]));
  let current: ReceivedSpan | undefined = child;
  for (let hops = 0; current && hops < 50; hops++) {
    if (current.parentSpanId === ancestor.spanId) return true;
    current = byId.get(current.parentSpanId);
  }
  return false;
}

function describe(spans: ReceivedSpan[]): string {
  return spans.map((s) => `${s.service}:${s.name}(kind ${s.kind}) ${s.spanId}<-${s.parentSpanId || "root"}`).join("\n");
}

test("inbound -> MDA arrives as one trace: SMTP session root, publish, MDA consumer, filing queries", async () => {
  const transport = nodemailer.createTransport({ host: "127.0.0.1", port: ports.smtp, secure: false, ignoreTLS: true });
  const messageId = "<trace-inbound@remote.test>";
  await transport.sendMail({ from: "someone@remote.test", to: "alice@example.test", subject: "traced", text: "hello", messageId });
  transport.close();
  const traceId = await traceIdOf(messageId);
  await waitFor(async () => {
    const row = await env.pool.query("SELECT count(*)::int AS n FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE m.trace_id = $1", [traceId]);
    return row.rows[0].n === 1;
  }, 20_000);

  await waitFor(() => spansOf(traceId).some((s) => s.service === "mda" && s.kind === SPAN_KIND.CONSUMER), 20_000);
  await new Promise((resolve) => setTimeout(resolve, 500));
  const spans = spansOf(traceId);
  if (process.env.SHOW_SPANS) console.log(describe(spans));
  const roots = spans.filter((s) => !s.parentSpanId);
  assert.equal(roots.length, 1, describe(spans));
  const root = roots[0]!;
  assert.equal(root.service, "mta-inbound");
  assert.equal(root.kind, SPAN_KIND.SERVER);
  const publish = spans.find((s) => s.service === "mta-inbound" && s.kind === SPAN_KIND.PRODUCER);
  assert.ok(publish, describe(spans));
  assert.ok(isDescendant(spans, publish, root), "publish under the SMTP session");
  assert.equal(publish.attributes["messaging.system"], "nats");
  const consumer = spans.find((s) => s.service === "mda" && s.kind === SPAN_KIND.CONSUMER);
  assert.ok(consumer, describe(spans));
  assert.equal(consumer.parentSpanId, publish.spanId, "the MDA continues the publisher's span");
  const mdaWork = spans.filter((s) => s.service === "mda" && s !== consumer);
  assert.ok(mdaWork.some((s) => s.attributes["db.system"] === "postgresql" || s.attributes["db.system.name"] === "postgresql"), describe(spans));
  assert.ok(mdaWork.every((s) => isDescendant(spans, s, consumer)), describe(spans));
  assert.deepEqual([...new Set(spans.map((s) => s.service))].sort(), ["mda", "mta-inbound"]);
});

test("MSA -> relay -> sink arrives as one trace: submission root, publish, relay consumer, SMTP client spans", async () => {
  const transport = nodemailer.createTransport({
    host: "127.0.0.1", port: ports.submission, secure: false, requireTLS: true,
    tls: { rejectUnauthorized: false }, auth: { user: "bob@example.test", pass: "bob-pw" },
  });
  const messageId = "<trace-relay@example.test>";
  await transport.sendMail({ from: "bob@example.test", to: "friend@remote.test", subject: "out", text: "bye", messageId });
  transport.close();
  const traceId = await traceIdOf(messageId);
  await waitFor(() => sinkMessages.some((m) => m.includes(messageId)), 30_000);
  await waitFor(() => spansOf(traceId).some((s) => s.service === "mta-outbound" && s.name.startsWith("smtp")), 20_000);
  await new Promise((resolve) => setTimeout(resolve, 500));

  const spans = spansOf(traceId);
  if (process.env.SHOW_SPANS) console.log(describe(spans));
  const roots = spans.filter((s) => !s.parentSpanId);
  assert.equal(roots.length, 1, describe(spans));
  assert.equal(roots[0]!.service, "msa");
  assert.equal(roots[0]!.kind, SPAN_KIND.SERVER);
  const publish = spans.find((s) => s.service === "msa" && s.kind === SPAN_KIND.PRODUCER);
  assert.ok(publish && isDescendant(spans, publish, roots[0]!), describe(spans));
  const consumer = spans.find((s) => s.service === "mta-outbound" && s.kind === SPAN_KIND.CONSUMER);
  assert.ok(consumer, describe(spans));
  assert.equal(consumer.parentSpanId, publish.spanId);
  const smtpClient = spans.filter((s) => s.service === "mta-outbound" && s.kind === SPAN_KIND.CLIENT && s.name.startsWith("smtp"));
  assert.ok(smtpClient.length >= 2, describe(spans));
  assert.ok(smtpClient.every((s) => isDescendant(spans, s, consumer)), describe(spans));
  for (const span of spans) {
    for (const value of Object.values(span.attributes)) {
      assert.ok(!String(value).includes("bob-pw"), `no password in span ${span.name}`);
      assert.ok(!String(value).includes("bye\r\n"), `no body in span ${span.name}`);
    }
  }
});

test("a POP3 retrieval is a trace of its own, linked to the message's journey", async () => {
  const row = await env.pool.query("SELECT trace_id, trace_span_id FROM messages WHERE message_id_header = '<trace-inbound@remote.test>'");
  const { trace_id: journeyTrace, trace_span_id: journeySpan } = row.rows[0];
  assert.match(journeySpan, /^[0-9a-f]{16}$/);
  // A real client: curl retrieves message 1 over POP3.
  const body = execFileSync("curl", ["-s", "--user", "alice@example.test:alice-pw", `pop3://127.0.0.1:${ports.pop3}/1`], { encoding: "utf8" });
  assert.match(body, /Subject: traced/);
  const retrieval = await waitFor(
    () => receiver.spans.find((s) => s.service === "pop3" && s.name === "pop3 RETR"),
    20_000,
  );
  assert.notEqual(retrieval.traceId, journeyTrace, "its own trace");
  assert.equal(retrieval.parentSpanId, "", "a root span");
  assert.deepEqual(retrieval.links, [{ traceId: journeyTrace, spanId: journeySpan }]);
  const root = spansOf(journeyTrace).find((s) => !s.parentSpanId);
  assert.equal(root?.spanId, journeySpan, "the link points at the SMTP session span");
});

test("an LMTP delivery is a trace rooted at the MDA's LMTP DATA span, which a POP3 retrieval links to", async () => {
  const transport = nodemailer.createTransport({ host: "127.0.0.1", port: ports.lmtp, lmtp: true, secure: false, ignoreTLS: true });
  const messageId = "<trace-lmtp@remote.test>";
  await transport.sendMail({ from: "someone@remote.test", to: "bob@example.test", subject: "via lmtp", text: "hello", messageId });
  transport.close();
  const traceId = await traceIdOf(messageId);
  const lmtp = await waitFor(() => spansOf(traceId).find((s) => s.service === "mda" && s.name === "lmtp DATA"), 20_000);
  assert.equal(lmtp.kind, SPAN_KIND.SERVER);
  assert.equal(lmtp.parentSpanId, "", "the root of the journey");
  const row = await env.pool.query("SELECT trace_span_id FROM messages WHERE message_id_header = $1", [messageId]);
  assert.equal(row.rows[0].trace_span_id, lmtp.spanId, "the row keeps the LMTP span for later links");

  const before = receiver.spans.length;
  const body = execFileSync("curl", ["-s", "--user", "bob@example.test:bob-pw", `pop3://127.0.0.1:${ports.pop3}/1`], { encoding: "utf8" });
  assert.match(body, /Subject: via lmtp/);
  const retrieval = await waitFor(() => receiver.spans.slice(before).find((s) => s.service === "pop3" && s.name === "pop3 RETR"), 20_000);
  assert.deepEqual(retrieval.links, [{ traceId, spanId: lmtp.spanId }]);
});

test("a recipient the remote MX refuses: the relay's spans say ERROR, and the bounce continues the message's trace", async () => {
  const transport = nodemailer.createTransport({
    host: "127.0.0.1", port: ports.submission, secure: false, requireTLS: true,
    tls: { rejectUnauthorized: false }, auth: { user: "bob@example.test", pass: "bob-pw" },
  });
  const messageId = "<trace-refused@example.test>";
  await transport.sendMail({ from: "bob@example.test", to: "refused@remote.test", subject: "refused", text: "bye", messageId });
  transport.close();
  const traceId = await traceIdOf(messageId);
  // The bounce reaches bob's mailbox: the DSN generator, then the MDA.
  await waitFor(async () => {
    const row = await env.pool.query(
      "SELECT count(*)::int AS n FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE m.source = 'bounce' AND m.trace_id = $1", [traceId]);
    return row.rows[0].n === 1;
  }, 30_000);
  await waitFor(() => spansOf(traceId).some((s) => s.service === "mda" && s.kind === SPAN_KIND.CONSUMER), 20_000);
  await new Promise((resolve) => setTimeout(resolve, 500));
  const spans = spansOf(traceId);
  if (process.env.SHOW_SPANS) console.log(describe(spans));
  const roots = spans.filter((s) => !s.parentSpanId);
  assert.equal(roots.length, 1, describe(spans));

  // The sink offers PIPELINING: MAIL, RCPT and DATA go in the client's one `smtp transaction` span.
  const transaction = spans.find((s) => s.service === "mta-outbound" && s.name === "smtp transaction");
  assert.ok(transaction, describe(spans));
  assert.equal(transaction.attributes["mail.recipients.refused"], 1);
  assert.equal(transaction.status.code, 2, "a refused recipient is an error on the client span");
  assert.match(transaction.status.message, /550/);
  const attempt = spans.find((s) => s.name === "relay attempt");
  assert.ok(attempt, describe(spans));
  assert.equal(attempt.status.code, 2, "an attempt that delivered nothing is an error");
  assert.match(attempt.status.message, /bounced/);

  const generate = spans.find((s) => s.name === "dsn generate");
  assert.ok(generate && isDescendant(spans, generate, roots[0]!), describe(spans));
  const filing = spans.find((s) => s.service === "mda" && s.kind === SPAN_KIND.CONSUMER);
  assert.ok(filing && isDescendant(spans, filing, generate), "the MDA files the report inside the same journey");
});

test("each service's /metrics counts what the journeys above did", async () => {
  const metrics = async (service: string) => {
    const process = processes.find((p) => p.child.spawnargs.some((arg) => arg.includes(`services/${service}/`)));
    assert.ok(process, service);
    return (await fetch(`http://127.0.0.1:${process.opsPort}/metrics`)).text();
  };
  const value = (text: string, pattern: RegExp) => Number(pattern.exec(text)?.[1] ?? Number.NaN);
  const inbound = await metrics("mta-inbound");
  assert.ok(value(inbound, /^mail_smtp_transactions_total\{service="mta-inbound",class="2xx"\} (\S+)$/m) >= 1, inbound);
  assert.ok(value(inbound, /^mail_messages_accepted_total\{service="mta-inbound"\} (\S+)$/m) >= 1);
  assert.match(inbound, /^process_resident_memory_bytes \d+/m, "process defaults");
  const mda = await metrics("mda");
  assert.ok(value(mda, /^mail_deliveries_total\{kind="local",state="delivered"\} (\S+)$/m) >= 1, mda);
  assert.ok(value(mda, /^mail_mda_delivery_duration_seconds_count\S* (\S+)$/m) >= 1, "MDA filing latency");
  const relay = await waitFor(async () => {
    const text = await metrics("mta-outbound");
    return /^mail_deliveries_total\{kind="remote",state="delivered"\} [1-9]/m.test(text) ? text : null;
  });
  assert.ok(value(relay, /^mail_relay_attempt_seconds_count\S* (\S+)$/m) >= 1, "relay attempt latency");
  assert.match(relay, /^mail_queue_depth\{state="queued",kind="remote"\} \d+/m, "queue depth by state");
  assert.ok(value(relay, /^mail_relay_recipient_results_total\{outcome="bounced"\} (\S+)$/m) >= 1, "the refused recipient");
  assert.ok(value(relay, /^mail_deliveries_total\{kind="remote",state="bounced"\} (\S+)$/m) >= 1);
  // Every metric docs/msa.md and docs/mda.md name, with the documented labels.
  const msa = await metrics("msa");
  assert.ok(value(msa, /^msa_auth_total\{result="ok"\} (\S+)$/m) >= 1, msa);
  assert.ok(value(msa, /^mail_messages_accepted_total\{service="msa"\} (\S+)$/m) >= 1);
  assert.ok(value(msa, /^mail_accept_batch_size_count\{service="msa"\} (\S+)$/m) >= 1);
  assert.ok(value(msa, /^mail_smtp_transactions_total\{service="msa",class="2xx"\} (\S+)$/m) >= 1);
  assert.ok(value(mda, /^mail_mda_outcomes_total\{outcome="delivered"\} (\S+)$/m) >= 1, mda);
  const mdaNow = await metrics("mda");
  assert.ok(value(mdaNow, /^mail_smtp_transactions_total\{service="mda-lmtp",class="2xx"\} (\S+)$/m) >= 1, "LMTP transactions");
  assert.ok(value(mdaNow, /^mail_messages_accepted_total\{service="mda-lmtp"\} (\S+)$/m) >= 1);
  assert.ok(value(mdaNow, /^mail_mda_accept_to_mailbox_seconds_count (\S+)$/m) >= 1);
  const pop3 = await metrics("pop3");
  assert.ok(value(pop3, /^pop3_logins_total\{result="ok"\} (\S+)$/m) >= 1, pop3);
  assert.match(pop3, /^pop3_connections_open \d+$/m);
  assert.ok(value(pop3, /^pop3_connections_total\{listener="[^"]+"\} (\S+)$/m) >= 1, pop3);
  assert.ok(value(pop3, /^pop3_retrieved_messages_total (\S+)$/m) >= 1);
});
