// Postfix as the sending MTA in front of port 25: a private Postfix instance (testkit's
// startPostfix) relays to mta-inbound (relayhost = [127.0.0.1]:port), with STARTTLS,
// PIPELINING, DSN, 8BITMIME and SMTPUTF8 as Postfix's smtp client uses them; the MDA files
// what we accept. Postfix's bounces come back to the sender's mailbox here.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { addAccount, addDomain, createPool, type Pool } from "@mailstack/db";
import { startMda, type Mda } from "@mailstack/mda/src/mda.ts";
import { loadTlsCredentials } from "@mailstack/runtime";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, postfixAvailable, startPostfix, tcpProxy, waitFor, type Postfix, type TcpProxy, type TestEnv } from "@mailstack/testkit";
import { startDsnGenerator } from "../../../packages/dsn/src/index.ts";
import { parseWithPython } from "../../../packages/dsn/test/python-email.ts";
import { startInbound, type Inbound } from "../src/inbound.ts";

const skip = !postfixAvailable && "needs Postfix and root";
const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
const ROOT = "/tmp/mailstack-inbound-postfix";
const MAX_SIZE = 20_000;

let env: TestEnv;
let mda: Mda;
let inbound: Inbound;
/** A second inbound MTA whose PostgreSQL goes through a proxy the test cuts: its RCPTs get 451 4.3.0. */
let flaky: Inbound;
let flakyPool: Pool;
let dbProxy: TcpProxy;
let postfix: Postfix;
/** The DSN generator, as every relay worker runs it. */
let dsnGenerator: { stop(): Promise<void> };

before(async () => {
  if (skip) return;
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  await addDomain(env.pool, "later.test");
  for (const address of ["ann@example.test", "sender@example.test", "big@example.test", "jürgen@example.test", "eve@later.test"]) {
    await addAccount(env.pool, { address, password: "pw" });
  }
  const tls = await loadTlsCredentials({ dir: `${ROOT}-tls`, hostname: "mx.example.test" });
  const config = { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", INBOUND_AUTH_CHECKS: false, tls, limits: { maxMessageSize: MAX_SIZE } };
  mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
  dsnGenerator = startDsnGenerator(env.bus, env.pool, { reportingMta: "mx.example.test", service: "mta-outbound", intervalMs: 200, logger });
  inbound = await startInbound({ pool: env.pool, bus: env.bus, logger, config });
  dbProxy = await tcpProxy(Number(new URL(env.db.url).port || 5432));
  const proxied = new URL(env.db.url);
  proxied.port = String(dbProxy.port);
  flakyPool = createPool({ url: proxied.toString(), max: 2 });
  flaky = await startInbound({ pool: flakyPool, bus: env.bus, logger, config });
  postfix = await startPostfix({
    root: ROOT,
    myhostname: "postfix.remote.example",
    main: {
      relayhost: `[127.0.0.1]:${inbound.port}`,
      // later.test goes to the flaky inbound; big@ through a client that ignores our SIZE, so the 552 is ours.
      transport_maps: `inline:{ later.test=smtp:[127.0.0.1]:${flaky.port}, big@example.test=nosize:[127.0.0.1]:${inbound.port} }`,
      smtp_tls_security_level: "may",
      smtp_tls_loglevel: "1",
      smtputf8_enable: "yes",
      // The SMTP conversation in the log: which commands went out before which replies came in.
      debug_peer_list: "127.0.0.1",
      debug_peer_level: "1",
      // Bounces stay under our SIZE (they return at most this much of the original).
      bounce_size_limit: "4000",
    },
    master: ["nosize unix - - n - - smtp -o smtp_discard_ehlo_keywords=size"],
  });
});

after(async () => {
  if (skip) return;
  await postfix.stop();
  await dsnGenerator.stop();
  await flaky.stop();
  await inbound.stop();
  await mda.stop();
  await flakyPool.end().catch(() => undefined);
  await dbProxy.cut();
  await env.close();
});

interface Filed {
  header_prefix: Buffer;
  raw: Buffer;
  queue_id: string;
  message_id: number;
}

async function mailbox(address: string): Promise<Filed[]> {
  const result = await env.pool.query(
    `SELECT e.header_prefix, m.raw, m.queue_id, m.id AS message_id FROM mailbox_entries e
       JOIN accounts a ON a.id = e.account_id JOIN messages m ON m.id = e.message_id
      WHERE a.address = $1 ORDER BY e.id`,
    [address],
  );
  return result.rows;
}

/** The copy in address's mailbox whose bytes include marker. */
function filed(address: string, marker: string, timeoutMs = 20_000): Promise<Filed> {
  return waitFor(async () => (await mailbox(address)).find((r) => r.raw.includes(marker)), timeoutMs, 100);
}

/** Postfix's queue id of the message posted with this Message-ID. */
function queueIdOf(messageId: string): Promise<string> {
  return waitFor(() => new RegExp(`postfix/cleanup\\[\\d+\\]: (\\w+): message-id=<${messageId.replace(/[.$]/g, "\\$&")}>`).exec(postfix.log())?.[1], 10_000, 50);
}

/** Postfix's log lines that include text (a queue id, a command). */
function linesOf(text: string): string {
  return postfix.log().split("\n").filter((l) => l.includes(text)).join("\n");
}

/** The commands Postfix's smtp client sent (debug_peer_list), one a line. */
const sentCommands = () => linesOf("]: > 127.0.0.1[127.0.0.1]:");

/** The copy's bytes as the mailbox owner gets them: our per-recipient lines, then the stored message. */
const copyOf = (entry: Filed) => Buffer.concat([entry.header_prefix, entry.raw]);

/** The report Postfix sent back to sender@example.test about `about` (an address or text in it). */
async function postfixBounce(about: string) {
  const entry = await filed("sender@example.test", about);
  assert.ok(copyOf(entry).toString("latin1").startsWith("Return-Path: <>\r\n"), "a bounce comes from the null sender");
  return { entry, report: await parseWithPython(entry.raw) };
}

test("a plain message: Postfix uses STARTTLS and PIPELINING; it is filed byte for byte behind the trace headers", { skip }, async () => {
  const message = [
    "From: Sender <sender@remote.example>",
    "To: ann@example.test",
    "Subject: plain via postfix",
    "Message-ID: <plain-1@remote.example>",
    "Date: Fri, 27 Nov 2026 09:00:00 +0000",
    "",
    "Line one",
    "second line with trailing spaces   ",
    "\ttabbed",
    ".a line starting with a dot",
    "",
    "last line",
    "",
  ].join("\r\n");
  await postfix.sendmail(["-i", "-f", "sender@remote.example", "ann@example.test"], message);
  const queueId = await queueIdOf("plain-1@remote.example");
  const entry = await filed("ann@example.test", "plain-1@remote.example");
  const copy = copyOf(entry).toString("latin1");
  // Our lines, our Received (TLS: ESMTPS), Postfix's own Received, then the message as posted.
  const trace = new RegExp(
    "^Return-Path: <sender@remote\\.example>\\r\\nDelivered-To: ann@example\\.test\\r\\n" +
      "Received: from postfix\\.remote\\.example \\(\\[127\\.0\\.0\\.1\\]\\)\\r\\n\\tby mx\\.example\\.test \\(mailstack\\) with ESMTPS id (\\w+) \\(trace [0-9a-f]{32}\\)\\r\\n\\tfor <ann@example\\.test>;\\r\\n\\t[^\\r]+\\r\\n" +
      `Received: by postfix\\.remote\\.example \\(Postfix, from userid 0\\)\\r\\n\\tid ${queueId}; [^\\r]+\\r\\n`,
  );
  const match = trace.exec(copy);
  assert.ok(match, copy.slice(0, 600));
  assert.equal(copy.slice(match[0].length), message, "the message after the trace headers is what was posted");
  assert.equal(match[1], entry.queue_id);
  const log = linesOf(queueId);
  assert.match(log, new RegExp(`to=<ann@example\\.test>, relay=127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\]:${inbound.port},.* dsn=2\\.0\\.0, status=sent \\(250 2\\.0\\.0 Ok: queued as ${entry.queue_id}\\)`));
  // Postfix's client: TLS with our self-signed certificate, then MAIL, RCPT and DATA in one go before any reply.
  const session = postfix.log().split("\n").filter((l) => l.includes(`:${inbound.port}`) || l.includes("Using ESMTP PIPELINING")).slice(0, 60).join("\n");
  assert.match(session, new RegExp(`Untrusted TLS connection established to 127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\]:${inbound.port}: TLSv1\\.[23]`));
  assert.match(session, /Using ESMTP PIPELINING/);
  assert.match(session, /> \S+: MAIL FROM:<sender@remote\.example> SIZE=\d+\n.*> \S+: RCPT TO:<ann@example\.test> ORCPT=rfc822;ann@example\.test\n.*> \S+: DATA\n(.*\n)?.*< \S+: 250 2\.1\.0 /);
});

test("DSN parameters from sendmail -N/-V/-R reach the delivery: NOTIFY, ORCPT, ENVID, RET", { skip }, async () => {
  await postfix.sendmail(
    ["-i", "-f", "sender@example.test", "-N", "success,delay,failure", "-V", "ENV-77.postfix", "-R", "hdrs", "ann@example.test"],
    "Subject: dsn parameters\r\nMessage-ID: <dsn-1@example.test>\r\n\r\nWith DSN parameters.\r\n",
  );
  const queueId = await queueIdOf("dsn-1@example.test");
  const entry = await filed("ann@example.test", "dsn-1@example.test");
  const sent = sentCommands();
  assert.match(sent, /> \S+: MAIL FROM:<sender@example\.test> SIZE=\d+ ENVID=ENV-77\.postfix RET=HDRS\n/);
  assert.match(sent, /> \S+: RCPT TO:<ann@example\.test> ORCPT=rfc822;ann@example\.test NOTIFY=SUCCESS,FAILURE,DELAY\n/);
  const message = (await env.pool.query("SELECT dsn_envid, dsn_ret FROM messages WHERE id = $1", [entry.message_id])).rows[0];
  assert.deepEqual(message, { dsn_envid: "ENV-77.postfix", dsn_ret: "HDRS" });
  const delivery = (await env.pool.query("SELECT final_recipient, dsn_notify, dsn_orcpt, state FROM deliveries WHERE message_id = $1", [entry.message_id])).rows;
  assert.deepEqual(delivery, [{ final_recipient: "ann@example.test", dsn_notify: ["SUCCESS", "FAILURE", "DELAY"], dsn_orcpt: "rfc822;ann@example.test", state: "delivered" }]);
  // We took over DSN duty (we offer DSN): Postfix says sent, without a notice of its own...
  assert.match(linesOf(queueId), /to=<ann@example\.test>.* status=sent /);
  assert.doesNotMatch(linesOf(queueId), /sender delivery status notification/);
  // ...so the "delivered" notice NOTIFY=SUCCESS asks for is ours (RFC 3461 5.2.2): to the sender, about ann@.
  const notice = await filed("sender@example.test", "Original-Envelope-Id: ENV-77.postfix");
  assert.ok(copyOf(notice).toString("latin1").startsWith("Return-Path: <>\r\n"));
  const report = await parseWithPython(notice.raw);
  assert.equal(report.subject, "Successful Mail Delivery Report");
  // (Python walks the status part's blocks as text/plain parts of their own.)
  assert.deepEqual(report.parts.map((p) => p.type).filter((t, i, all) => all.indexOf(t) === i), ["multipart/report", "text/plain", "message/delivery-status", "text/rfc822-headers"], "RET=HDRS: the header only");
  assert.equal(report.status[0]?.["Original-Envelope-Id"], "ENV-77.postfix");
  assert.equal(report.status[1]?.["Final-Recipient"], "rfc822;ann@example.test");
  assert.equal(report.status[1]?.["Original-Recipient"], "rfc822;ann@example.test");
  assert.equal(report.status[1]?.Action, "delivered");
  assert.equal(report.status[1]?.Status, "2.0.0");
  assert.equal((await env.pool.query("SELECT dsn_state FROM deliveries WHERE message_id = $1", [entry.message_id])).rows[0].dsn_state, "sent");
});

test("an 8-bit body goes as BODY=8BITMIME and is filed with its bytes unchanged", { skip }, async () => {
  const body = Buffer.from("Grüße aus Köln, 100 € — naïve café\r\n", "utf8");
  const message = Buffer.concat([
    Buffer.from("From: sender@remote.example\r\nSubject: eight bit\r\nMessage-ID: <8bit-1@remote.example>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"),
    body,
  ]);
  await postfix.sendmail(["-i", "-B", "8BITMIME", "-f", "sender@remote.example", "ann@example.test"], message);
  const entry = await filed("ann@example.test", "8bit-1@remote.example");
  assert.ok(entry.raw.subarray(entry.raw.length - body.length).equals(body), "the 8-bit bytes as they were posted");
  assert.match(sentCommands(), /> \S+: MAIL FROM:<sender@remote\.example> SIZE=\d+ BODY=8BITMIME\n/);
});

test("SMTPUTF8: a UTF-8 sender and recipient and a UTF-8 Subject are accepted and filed", { skip }, async () => {
  const message = Buffer.from("From: Pérez <pérez@remote.example>\r\nTo: jürgen@example.test\r\nSubject: Grüße\r\nMessage-ID: <utf8-1@remote.example>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\nHallo Jürgen.\r\n", "utf8");
  await postfix.sendmail(["-i", "-f", "pérez@remote.example", "jürgen@example.test"], message);
  const queueId = await queueIdOf("utf8-1@remote.example");
  const entry = await filed("jürgen@example.test", "utf8-1@remote.example");
  const copy = copyOf(entry).toString("utf8");
  assert.ok(copy.startsWith("Return-Path: <pérez@remote.example>\r\nDelivered-To: jürgen@example.test\r\n"), copy.slice(0, 200));
  assert.ok(entry.raw.subarray(entry.raw.length - message.length).equals(message));
  // Postfix sends the recipient's ORCPT as RFC 6533's utf-8-addr-xtext; we keep it decoded.
  assert.match(sentCommands(), /> \S+: MAIL FROM:<pérez@remote\.example> SIZE=\d+ SMTPUTF8\n.*> \S+: RCPT TO:<jürgen@example\.test> ORCPT=utf-8;j\\x\{FC\}rgen@example\.test\n/);
  const delivery = (await env.pool.query("SELECT dsn_orcpt FROM deliveries WHERE message_id = $1", [entry.message_id])).rows[0];
  assert.equal(delivery.dsn_orcpt, "utf-8;jürgen@example.test");
  assert.match(linesOf(queueId), /to=<jürgen@example\.test>.* status=sent /);
});

test("an unknown user gets our 550 5.1.1 and Postfix bounces to its sender", { skip }, async () => {
  await postfix.sendmail(["-i", "-f", "sender@example.test", "nobody@example.test", "ann@example.test"], "Subject: to nobody\r\nMessage-ID: <unknown-1@example.test>\r\n\r\nHello?\r\n");
  const queueId = await queueIdOf("unknown-1@example.test");
  const { entry, report } = await postfixBounce("nobody@example.test");
  assert.match(linesOf(queueId), /to=<nobody@example\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+,.* dsn=5\.1\.1, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 550 5\.1\.1 [^\n]*\(in reply to RCPT TO command\)\)/);
  assert.match(linesOf(queueId), /to=<ann@example\.test>.* status=sent /);
  assert.equal(report.subject, "Undelivered Mail Returned to Sender");
  const [, recipient] = report.status;
  assert.equal(recipient?.["Final-Recipient"], "rfc822; nobody@example.test");
  assert.equal(recipient?.Action, "failed");
  assert.equal(recipient?.Status, "5.1.1");
  assert.match(recipient?.["Diagnostic-Code"] ?? "", /^smtp; 550 5\.1\.1 /);
  assert.equal(report.status.length, 2, "one recipient block: ann got it");
  assert.match(entry.raw.toString("latin1"), /unknown-1@example\.test/, "the original is returned");
});

test("an oversize message: Postfix honours our SIZE itself, and without it gets our 552 5.3.4; the sender is told both times", { skip }, async () => {
  const big = `Subject: too big\r\nMessage-ID: <big-%@example.test>\r\n\r\n${"0123456789".repeat(7).concat("\r\n").repeat(400)}`;
  await postfix.sendmail(["-i", "-f", "sender@example.test", "ann@example.test"], big.replace("%", "1"));
  await postfix.sendmail(["-i", "-f", "sender@example.test", "big@example.test"], big.replace("%", "2"));
  const [first, second] = [await queueIdOf("big-1@example.test"), await queueIdOf("big-2@example.test")];
  await waitFor(() => /status=bounced/.test(linesOf(first)) && /status=bounced/.test(linesOf(second)), 20_000, 100);
  assert.match(linesOf(first), /to=<ann@example\.test>.* dsn=5\.3\.4, status=bounced \(message size \d+ exceeds size limit 20000 of server 127\.0\.0\.1\[127\.0\.0\.1\]\)/);
  assert.match(linesOf(second), /to=<big@example\.test>.* dsn=5\.3\.4, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 552 5\.3\.4 [^\n]*maximum message size[^\n]* \(in reply to end of DATA command\)\)/);
  for (const [address, status] of [["ann@example.test", "5.3.4"], ["big@example.test", "5.3.4"]] as const) {
    const { report } = await postfixBounce(`Final-Recipient: rfc822; ${address}`);
    assert.equal(report.status[1]?.Status, status);
  }
  assert.equal((await mailbox("big@example.test")).length, 0);
});

test("our 451 4.3.0 (PostgreSQL unreachable at RCPT): Postfix defers, retries and delivers exactly once", { skip }, async () => {
  await dbProxy.cut();
  try {
    await postfix.sendmail(["-i", "-f", "sender@example.test", "eve@later.test"], "Subject: later\r\nMessage-ID: <later-1@example.test>\r\n\r\nTry again.\r\n");
    const queueId = await queueIdOf("later-1@example.test");
    await waitFor(() => /status=deferred/.test(linesOf(queueId)), 20_000, 100);
    assert.match(linesOf(queueId), new RegExp(`to=<eve@later\\.test>, relay=127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\]:${flaky.port},.* dsn=4\\.3\\.0, status=deferred \\(host 127\\.0\\.0\\.1\\[127\\.0\\.0\\.1\\] said: 451 4\\.3\\.0 [^\\n]*\\(in reply to RCPT TO command\\)\\)`));
    await dbProxy.restore();
    await waitFor(() => /status=sent/.test(linesOf(queueId)), 30_000, 100);
    await filed("eve@later.test", "later-1@example.test");
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    assert.equal((await mailbox("eve@later.test")).length, 1, "one copy");
    assert.equal(linesOf(queueId).match(/status=sent/g)?.length, 1);
    const deliveries = (await env.pool.query("SELECT count(*)::int AS n FROM deliveries WHERE final_recipient = 'eve@later.test'")).rows[0].n;
    assert.equal(deliveries, 1, "nothing was kept of the refused attempt");
  } finally {
    await dbProxy.restore().catch(() => undefined);
  }
});

test("after all of the above, Postfix's smtp client logged no complaint about our server (protocol errors, unexpected replies, lost connections)", { skip }, async () => {
  const complaints = postfix.log().split("\n").filter((l) => /postfix\/\w+\[\d+\]: (warning|fatal|panic)|lost connection|unexpected|protocol error/.test(l));
  assert.deepEqual(complaints, []);
});
