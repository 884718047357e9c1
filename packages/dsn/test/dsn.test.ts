import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { simpleParser } from "mailparser";
import { addAccount, addDomain, resolveRecipient } from "@mailstack/db";
import { acceptMessage, type NewDelivery } from "@mailstack/queue";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { composeDsn, diagnosticCode, generateDsns, wantsNotice } from "../src/index.ts";

let env: TestEnv;

before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "home.test");
  await addAccount(env.pool, { address: "sender@home.test", password: "pw-123456", quotaBytes: null });
});

after(async () => {
  await env?.close();
});

const original = Buffer.from("From: <sender@home.test>\r\nTo: <r@far.test>\r\nSubject: hello\r\nMessage-ID: <m1@home.test>\r\n\r\nThe body.\r\n");

test("composeDsn builds a multipart/report that a parser reads back", async () => {
  const dsn = composeDsn({
    reportingMta: "mx.home.test",
    to: "sender@home.test",
    originalEnvelopeId: "ENV1",
    arrivalDate: new Date("2026-01-02T03:04:05Z"),
    ret: "HDRS",
    original,
    recipients: [
      { finalRecipient: "r@far.test", originalRecipient: "rfc822;R@far.test", action: "failed", status: "5.1.1", remoteMta: "mx.far.test", diagnostic: "550 5.1.1 unknown\r\nInjected: header" },
    ],
  });
  const text = dsn.raw.toString();
  assert.doesNotMatch(text, /(^|[^\r])\n/, "every line ends in CRLF");
  assert.doesNotMatch(text, /\r\nInjected: header/, "a reply's line break cannot inject a field");
  const parsed = await simpleParser(dsn.raw);
  assert.equal(parsed.subject, "Undelivered Mail Returned to Sender");
  assert.equal(parsed.messageId, dsn.messageId);
  assert.match(String((parsed.headers.get("content-type") as { value: string; params: Record<string, string> }).value), /multipart\/report/);
  assert.equal((parsed.headers.get("content-type") as { params: Record<string, string> }).params["report-type"], "delivery-status");
  assert.equal(parsed.headers.get("auto-submitted"), "auto-replied");
  const body = parsed.text ?? "";
  assert.match(body, /Reporting-MTA: dns; mx\.home\.test/);
  assert.match(body, /Original-Envelope-Id: ENV1/);
  assert.match(body, /Arrival-Date: Fri, 02 Jan 2026 03:04:05 GMT/);
  assert.match(body, /Original-Recipient: rfc822;R@far\.test/);
  assert.match(body, /Final-Recipient: rfc822;r@far\.test/);
  assert.match(body, /Action: failed/);
  assert.match(body, /Status: 5\.1\.1/);
  assert.match(body, /Remote-MTA: dns; mx\.far\.test/);
  assert.match(body, /Diagnostic-Code: smtp; 550 5\.1\.1 unknown Injected: header/);
  // RET=HDRS: the header only, as text/rfc822-headers.
  assert.match(text, /Content-Type: text\/rfc822-headers\r\n\r\nFrom: <sender@home\.test>[\s\S]*Subject: hello\r\n/);
  assert.doesNotMatch(text, /The body\./);
});

test("Diagnostic-Code: smtp for a remote reply, an X- type for a failure of our own", () => {
  assert.equal(diagnosticCode("550 5.1.1 No such user"), "smtp; 550 5.1.1 No such user");
  assert.equal(diagnosticCode("421"), "smtp; 421");
  assert.equal(diagnosticCode("smtp; 552 too big"), "smtp; 552 too big");
  assert.equal(diagnosticCode("gmail.example has no MX and no address records"), "X-mailstack; gmail.example has no MX and no address records");
  assert.equal(diagnosticCode("5000 bytes is over the quota"), "X-mailstack; 5000 bytes is over the quota");
});

test("wantsNotice follows NOTIFY and the default policy", () => {
  assert.equal(wantsNotice(null, "failed", false), true);
  assert.equal(wantsNotice(null, "delayed", false), false);
  assert.equal(wantsNotice(null, "delayed", true), true);
  assert.equal(wantsNotice(null, "relayed", true), false);
  assert.equal(wantsNotice(["NEVER"], "failed", true), false);
  assert.equal(wantsNotice(["SUCCESS"], "failed", true), false);
  assert.equal(wantsNotice(["SUCCESS"], "relayed", true), true);
  assert.equal(wantsNotice(["DELAY"], "delayed", false), true);
  assert.equal(wantsNotice(["FAILURE", "DELAY"], "failed", false), true);
});

async function failedMessage(from: string, recipients: Array<{ to: string; notify?: string[]; state?: string }>) {
  const deliveries: NewDelivery[] = [];
  for (const r of recipients) {
    const resolution = await resolveRecipient(env.pool, r.to, { allowRemote: true });
    assert.ok(resolution.ok);
    deliveries.push({ recipient: r.to, route: resolution.routes[0]!, dsnNotify: r.notify ?? null });
  }
  const accepted = await acceptMessage(env.pool, { raw: original, envelopeFrom: from, source: "submission" }, deliveries, "test");
  for (const [i, r] of recipients.entries()) {
    await env.pool.query(
      "UPDATE deliveries SET state = $2, last_reply = '550 5.1.1 unknown user', last_status = '5.1.1', remote_mta = 'mx.far.test', dsn_state = 'pending', dispatched_at = now() WHERE id = $1",
      [accepted.deliveries[i]!.id, r.state ?? "bounced"],
    );
  }
  return accepted;
}

const options = { reportingMta: "mx.home.test", service: "test" };

async function bouncesTo(address: string) {
  const result = await env.pool.query<{ id: number; raw: Buffer; envelope_from: string; source: string; kind: string; account_id: number | null }>(
    `SELECT m.id, m.raw, m.envelope_from, m.source, d.kind, d.account_id FROM messages m JOIN deliveries d ON d.message_id = m.id
      WHERE m.source = 'bounce' AND d.final_recipient = $1 ORDER BY m.id`,
    [address],
  );
  return result.rows;
}

async function dsnStates(messageId: number) {
  const result = await env.pool.query<{ dsn_state: string; delay_notified_at: Date | null }>("SELECT dsn_state, delay_notified_at FROM deliveries WHERE message_id = $1 ORDER BY id", [messageId]);
  return result.rows;
}

test("the generator sends ONE bounce per message from <> to a local sender, and marks the rows sent", async () => {
  const before = (await bouncesTo("sender@home.test")).length;
  const message = await failedMessage("sender@home.test", [{ to: "a@far.test" }, { to: "b@far.test" }, { to: "c@far.test", notify: ["NEVER"] }]);
  const count = await generateDsns(env.bus, env.pool, options);
  assert.equal(count, 1);
  const bounces = await bouncesTo("sender@home.test");
  assert.equal(bounces.length, before + 1);
  const bounce = bounces.at(-1)!;
  assert.equal(bounce.envelope_from, "");
  assert.equal(bounce.source, "bounce");
  assert.equal(bounce.kind, "local");
  assert.ok(bounce.account_id);
  const text = bounce.raw.toString();
  assert.match(text, /Final-Recipient: rfc822;a@far\.test/);
  assert.match(text, /Final-Recipient: rfc822;b@far\.test/);
  assert.doesNotMatch(text, /c@far\.test\r\nAction/, "NOTIFY=NEVER is left out");
  assert.deepEqual((await dsnStates(message.messageId)).map((r) => r.dsn_state), ["sent", "sent", "suppressed"]);
  // A second pass finds nothing: the rows were marked in the same transaction.
  assert.equal(await generateDsns(env.bus, env.pool, options), 0);
});

test("no bounce for a message from <>, for NOTIFY=SUCCESS-only failures, or to an unroutable sender", async () => {
  const nullSender = await failedMessage("", [{ to: "a@far.test" }]);
  const successOnly = await failedMessage("sender@home.test", [{ to: "a@far.test", notify: ["SUCCESS"] }]);
  const unknownLocal = await failedMessage("ghost@home.test", [{ to: "a@far.test" }]);
  const before = (await bouncesTo("sender@home.test")).length;
  assert.equal(await generateDsns(env.bus, env.pool, options), 0);
  for (const m of [nullSender, successOnly, unknownLocal]) {
    assert.deepEqual((await dsnStates(m.messageId)).map((r) => r.dsn_state), ["suppressed"]);
  }
  assert.equal((await bouncesTo("sender@home.test")).length, before);
  assert.equal((await bouncesTo("ghost@home.test")).length, 0);
});

test("a delay notice for NOTIFY=DELAY records delay_notified_at; a remote sender gets a remote DSN delivery", async () => {
  const delayed = await failedMessage("someone@elsewhere.test", [{ to: "a@far.test", notify: ["DELAY", "FAILURE"], state: "deferred" }]);
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, delayByDefault: false }), 1);
  const [row] = await dsnStates(delayed.messageId);
  assert.equal(row!.dsn_state, "sent");
  assert.ok(row!.delay_notified_at);
  const [bounce] = await bouncesTo("someone@elsewhere.test");
  assert.equal(bounce!.kind, "remote");
  assert.match(bounce!.raw.toString(), /Action: delayed/);
  assert.match(bounce!.raw.toString(), /Subject: Delayed Mail/);
});
