import assert from "node:assert/strict";
import { Writable } from "node:stream";
import { after, before, test } from "node:test";
import { simpleParser } from "mailparser";
import { addAccount, addDomain, resolveRecipient } from "@mailstack/db";
import { acceptMessage, type NewDelivery } from "@mailstack/queue";
import { createLogger, registry } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { composeDsn, diagnosticCode, generateDsns, headerSection, wantsNotice, type DsnFailures } from "../src/index.ts";
import { decodeUtf8Addr } from "@mailstack/mail";
import { parseWithPython } from "./python-email.ts";

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
  assert.match(body, /Arrival-Date: Fri, 02 Jan 2026 03:04:05 \+0000/);
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

test("Python's email package reads the report: per-message fields, one block per recipient, no defects", async () => {
  const dsn = composeDsn({
    reportingMta: "mx.home.test",
    to: "sender@home.test",
    arrivalDate: new Date("2026-01-02T03:04:05Z"),
    ret: "HDRS",
    original,
    recipients: [
      { finalRecipient: "r@far.test", originalRecipient: "rfc822;R@far.test", action: "failed", status: "5.1.1", remoteMta: "mx.far.test", diagnostic: "550 5.1.1 unknown" },
      { finalRecipient: "s@far.test", expandedFrom: "list@home.test", action: "failed", status: "5.4.7", diagnostic: "delivery time expired" },
    ],
  });
  const view = await parseWithPython(dsn.raw);
  assert.deepEqual(view.defects, []);
  assert.deepEqual(view.parts.map((p) => p.type), ["multipart/report", "text/plain", "message/delivery-status", "text/plain", "text/plain", "text/plain", "text/rfc822-headers"]);
  assert.equal(view.autoSubmitted, "auto-replied");
  assert.deepEqual(view.status, [
    { "Reporting-MTA": "dns; mx.home.test", "Arrival-Date": "Fri, 02 Jan 2026 03:04:05 +0000" },
    { "Original-Recipient": "rfc822;R@far.test", "Final-Recipient": "rfc822;r@far.test", Action: "failed", Status: "5.1.1", "Remote-MTA": "dns; mx.far.test", "Diagnostic-Code": "smtp; 550 5.1.1 unknown" },
    // No ORCPT: no Original-Recipient (RFC 3461 6.3 d); our own failure: an X- diagnostic type.
    { "Final-Recipient": "rfc822;s@far.test", Action: "failed", Status: "5.4.7", "Diagnostic-Code": "X-mailstack; delivery time expired" },
  ]);
  assert.match(dsn.raw.toString(), /<s@far\.test> \(expanded from <list@home\.test>\): delivery time expired/);
});

test("an 8-bit original is labelled 8bit on its part and on the report; a UTF-8 reply is escaped in the 7-bit status part", async () => {
  const eightBit = Buffer.from("From: <sender@home.test>\r\nSubject: hello\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u00fc\u00dfe\r\n", "utf8");
  const dsn = composeDsn({
    reportingMta: "mx.home.test",
    to: "sender@home.test",
    ret: "FULL",
    original: eightBit,
    recipients: [{ finalRecipient: "r@far.test", action: "failed", status: "5.1.1", remoteMta: "mx.far.test", diagnostic: "550 5.1.1 Benutzer unbekannt: J\u00fcrgen" }],
  });
  const text = dsn.raw.toString("utf8");
  assert.match(text, /boundary="[^"]+"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n/, "the multipart itself says 8bit (RFC 2045 6.4)");
  assert.match(text, /Content-Type: message\/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\nFrom: <sender@home\.test>/);
  assert.match(text, /Content-Type: message\/delivery-status\r\n\r\n/, "the status part stays 7-bit");
  assert.match(text, /Diagnostic-Code: smtp; 550 5\.1\.1 Benutzer unbekannt: J\\x\{FC\}rgen\r\n/);
  assert.match(text, /Content-Type: text\/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n[\s\S]*J\u00fcrgen/, "the human part shows the reply as it was");
  const view = await parseWithPython(dsn.raw);
  assert.deepEqual(view.defects, []);
  assert.equal(view.parts.find((p) => p.type === "message/rfc822")!.cte, "8bit");
  const parsed = await simpleParser(dsn.raw);
  assert.match(parsed.attachments.find((a) => a.contentType === "message/rfc822")!.content.toString("utf8"), /Gr\u00fc\u00dfe/);
});

test("an internationalized original (UTF-8 header fields and addresses) gets the RFC 6533 global types", async () => {
  const utf8 = Buffer.from("From: <j\u00fcrgen@home.test>\r\nTo: <m\u00fcller@far.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHallo.\r\n", "utf8");
  for (const ret of ["HDRS", "FULL"] as const) {
    const dsn = composeDsn({
      reportingMta: "mx.home.test",
      to: "j\u00fcrgen@home.test",
      ret,
      original: utf8,
      recipients: [{ finalRecipient: "m\u00fcller@far.test", action: "failed", status: "5.1.1", remoteMta: "mx.far.test", diagnostic: "550 5.1.1 unknown" }],
    });
    const text = dsn.raw.toString("utf8");
    assert.match(text, /Content-Type: multipart\/report; report-type=global-delivery-status;/);
    assert.match(text, /Content-Type: message\/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n\r\n/);
    assert.match(text, /Final-Recipient: utf-8;m\u00fcller@far\.test\r\n/);
    assert.match(text, new RegExp(`Content-Type: ${ret === "FULL" ? "message/global" : "message/global-headers"}\r\nContent-Transfer-Encoding: 8bit\r\n\r\nFrom: <j\u00fcrgen@home\\.test>`));
    assert.doesNotMatch(text, /message\/rfc822|text\/rfc822-headers/, "no raw UTF-8 header fields inside a type that forbids them");
    const view = await parseWithPython(dsn.raw);
    assert.deepEqual(view.defects, []);
    const parsed = await simpleParser(dsn.raw);
    assert.equal(parsed.subject, "Undelivered Mail Returned to Sender");
    assert.ok(parsed.attachments.some((a) => a.contentType === "message/global-delivery-status" && /Final-Recipient: utf-8;m\u00fcller@far\.test/.test(a.content.toString("utf8"))));
  }
});

test("a UTF-8 recipient of an ASCII message: a plain delivery-status with Final-Recipient in utf-8-addr-xtext, the human part in UTF-8 (RFC 6533 3)", async () => {
  for (const ret of ["HDRS", "FULL"] as const) {
    const dsn = composeDsn({
      reportingMta: "mx.home.test",
      to: "sender@home.test",
      ret,
      original,
      recipients: [{ finalRecipient: "m\u00fcller@dest.test", action: "failed", status: "5.1.1", remoteMta: "mx.dest.test", diagnostic: "550 5.1.1 unknown" }],
    });
    const text = dsn.raw.toString("utf8");
    assert.match(text, /Content-Type: multipart\/report; report-type=delivery-status;/);
    assert.match(text, /Content-Type: message\/delivery-status\r\n\r\n/, "a 7-bit status part, no transfer encoding");
    assert.match(text, /\r\nFinal-Recipient: utf-8;m\\x\{FC\}ller@dest\.test\r\n/);
    assert.match(text, new RegExp(`Content-Type: ${ret === "FULL" ? "message/rfc822" : "text/rfc822-headers"}\r\n\r\nFrom: <sender@home\\.test>`));
    assert.doesNotMatch(text, /global/);
    assert.match(text, /Content-Type: text\/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n[\s\S]*<m\u00fcller@dest\.test>: 550 5\.1\.1 unknown/, "the human part names the address as it is");

    const view = await parseWithPython(dsn.raw);
    assert.deepEqual(view.defects, []);
    assert.deepEqual(view.parts.map((p) => p.type).slice(0, 3), ["multipart/report", "text/plain", "message/delivery-status"]);
    assert.equal(view.status[1]!["Final-Recipient"], "utf-8;m\\x{FC}ller@dest.test");
    assert.equal(decodeUtf8Addr(view.status[1]!["Final-Recipient"]!.slice("utf-8;".length), { unitext: false }), "m\u00fcller@dest.test");

    const parsed = await simpleParser(dsn.raw);
    assert.equal((parsed.headers.get("content-type") as { params: Record<string, string> }).params["report-type"], "delivery-status");
    // mailparser shows a message/delivery-status inline, after the human part.
    assert.match(parsed.text ?? "", /<m\u00fcller@dest\.test>: 550 5\.1\.1 unknown/);
    assert.match(parsed.text ?? "", /\nFinal-Recipient: utf-8;m\\x\{FC\}ller@dest\.test\r?\n/);
  }
});

test("a report is global when it must be: a UTF-8 returned header, or a UTF-8 address it goes to", async () => {
  const recipient = { finalRecipient: "m\u00fcller@dest.test", action: "failed" as const, status: "5.1.1" };
  const utf8Header = Buffer.from("From: <sender@home.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHallo.\r\n", "utf8");
  for (const [to, raw] of [["sender@home.test", utf8Header], ["j\u00fcrgen@home.test", original]] as const) {
    const dsn = composeDsn({ reportingMta: "mx.home.test", to, ret: "HDRS", original: raw, recipients: [recipient] });
    const text = dsn.raw.toString("utf8");
    assert.match(text, /report-type=global-delivery-status;/, to);
    assert.match(text, /Content-Type: message\/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n\r\n/);
    assert.match(text, /\r\nFinal-Recipient: utf-8;m\u00fcller@dest\.test\r\n/, "the utf-8-address form, as it is");
    assert.deepEqual((await parseWithPython(dsn.raw)).defects, []);
  }
});

test("a Final-Recipient is always typed, even with a \";\" in a quoted local part", () => {
  const dsn = composeDsn({ reportingMta: "mx.home.test", to: "sender@home.test", ret: "HDRS", original, recipients: [{ finalRecipient: '"a;b"@dest.test', action: "failed", status: "5.1.1" }] });
  assert.match(dsn.raw.toString(), /\r\nFinal-Recipient: rfc822;"a;b"@dest\.test\r\n/);
});

test("a utf-8 ORCPT: Original-Recipient in UTF-8 in a global status part, in the \\x{HEX} utf-8-addr-xtext form in a plain one (RFC 6533 3)", async () => {
  const recipient = { finalRecipient: "r@far.test", originalRecipient: "utf-8;m\u00fcller+x@far.test", action: "failed" as const, status: "5.1.1", diagnostic: "550 5.1.1 unknown" };
  // An ASCII original: the UTF-8 ORCPT alone keeps the report plain and 7-bit.
  const plain = composeDsn({ reportingMta: "mx.home.test", to: "sender@home.test", ret: "HDRS", original, recipients: [recipient] });
  assert.ok(!plain.raw.some((byte) => byte > 0x7f), "7-bit");
  const view = await parseWithPython(plain.raw);
  assert.deepEqual(view.defects, []);
  assert.ok(view.parts.some((p) => p.type === "message/delivery-status"));
  assert.equal(view.status[1]!["Original-Recipient"], "utf-8;m\\x{FC}ller\\x{2B}x@far.test");
  // A UTF-8 original: the global status part carries the address as it is.
  const utf8 = Buffer.from("From: <sender@home.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHallo.\r\n", "utf8");
  const global = composeDsn({ reportingMta: "mx.home.test", to: "sender@home.test", ret: "HDRS", original: utf8, recipients: [recipient] });
  const parsed = await simpleParser(global.raw);
  const status = parsed.attachments.find((a) => a.contentType === "message/global-delivery-status")!.content.toString("utf8");
  assert.match(status, /\r\nOriginal-Recipient: utf-8;m\u00fcller\+x@far\.test\r\nFinal-Recipient: rfc822;r@far\.test\r\n/);
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
  assert.doesNotMatch(text, /Original-Recipient/, "no ORCPT was given (RFC 3461 6.3 d)");
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

test("a delay notice says until when delivery will be retried (Will-Retry-Until: arrival plus the queue lifetime)", async () => {
  const lifetimeMs = 5 * 24 * 3600 * 1000;
  const delayed = await failedMessage("retry-until@elsewhere.test", [{ to: "late@far.test", notify: ["DELAY"], state: "deferred" }]);
  const failed = await failedMessage("retry-until@elsewhere.test", [{ to: "gone@far.test" }]);
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, maxQueueLifetimeMs: lifetimeMs }), 2);
  const { rows } = await env.pool.query<{ received_at: Date }>("SELECT received_at FROM messages WHERE id = $1", [delayed.messageId]);
  const [notice, bounce] = await bouncesTo("retry-until@elsewhere.test");
  const view = await parseWithPython(notice!.raw);
  assert.equal(view.status[1]!["Action"], "delayed");
  const until = view.status[1]!["Will-Retry-Until"];
  assert.ok(until, "the delayed recipient's block has Will-Retry-Until");
  assert.equal(new Date(until).getTime(), Math.floor((rows[0]!.received_at.getTime() + lifetimeMs) / 1000) * 1000);
  // A failure is final: no retry date (RFC 3464 2.3.9: delayed only).
  assert.equal((await parseWithPython(bounce!.raw)).status[1]!["Will-Retry-Until"], undefined);
  assert.ok(failed.messageId > delayed.messageId);
});

test("the returned part is described by what happened to the message: undelivered, delayed or delivered", () => {
  const report = (action: "failed" | "delayed" | "delivered", ret: "FULL" | "HDRS") =>
    composeDsn({ reportingMta: "mx.home.test", to: "sender@home.test", ret, original, recipients: [{ finalRecipient: "r@far.test", action, status: "2.0.0" }] }).raw.toString();
  const description = (text: string) => [...text.matchAll(/^Content-Description: (.*)\r$/gm)].map((m) => m[1]).at(-1);
  assert.equal(description(report("failed", "FULL")), "Undelivered Message");
  assert.equal(description(report("failed", "HDRS")), "Undelivered Message Headers");
  assert.equal(description(report("delayed", "HDRS")), "Delayed Message Headers");
  assert.equal(description(report("delivered", "HDRS")), "Delivered Message Headers");
  assert.equal(description(report("delivered", "FULL")), "Delivered Message");
});

test("a long remote reply (many lines joined, or one long token) never makes a line over 998 octets", async () => {
  // About a megabyte: what a server may answer in up to a thousand lines, joined.
  const multiLine = Array.from({ length: 8000 }, (_, i) => `550-5.7.1 policy line ${i} ${"explanation ".repeat(9)}`).join(" ");
  const token = `https://block.example/${"x".repeat(3000)}`;
  const dsn = composeDsn({
    reportingMta: "mx.home.test",
    to: "sender@home.test",
    ret: "HDRS",
    original,
    recipients: [
      { finalRecipient: "a@far.test", action: "failed", status: "5.7.1", remoteMta: "mx.far.test", diagnostic: `550 5.7.1 ${multiLine}` },
      { finalRecipient: "b@far.test", action: "failed", status: "5.7.1", remoteMta: "mx.far.test", diagnostic: `550 5.7.1 see ${token} now` },
      { finalRecipient: "c@far.test", action: "failed", status: "5.7.1", remoteMta: "mx.far.test", diagnostic: `550 5.7.1 ${"\u00fc".repeat(1500)}` },
    ],
  });
  const octets = dsn.raw.toString("utf8").split("\r\n").map((line) => Buffer.byteLength(line));
  assert.deepEqual(octets.filter((n) => n > 998), [], "RFC 5322 2.1.1");
  assert.ok(multiLine.length > 1_000_000 && dsn.raw.length < 60_000, "a megabyte of reply is not copied whole, twice");
  const view = await parseWithPython(dsn.raw);
  assert.deepEqual(view.defects, []);
  assert.equal(view.status.length, 4);
  assert.match(view.status[1]!["Diagnostic-Code"]!, /^smtp; 550 5\.7\.1 550-5\.7\.1 policy line 0 explanation/);
  assert.match(view.status[2]!["Diagnostic-Code"]!, /^smtp; 550 5\.7\.1 see https:\/\/block\.example\/x+/);
  const parsed = await simpleParser(dsn.raw);
  assert.match(parsed.text ?? "", /<a@far\.test>: 550 5\.7\.1 550-5\.7\.1 policy line 0/);
});

test("RET=FULL returns the message in a bounce only: a delay or success notice returns the header (RFC 3461 4.3)", async () => {
  const partTypes = async (state: string, notify: string[]) => {
    const resolution = await resolveRecipient(env.pool, "ret-full@far.test", { allowRemote: true });
    assert.ok(resolution.ok);
    const accepted = await acceptMessage(
      env.pool,
      { raw: original, envelopeFrom: "ret-full@elsewhere.test", source: "submission", dsnRet: "FULL" },
      [{ recipient: "ret-full@far.test", route: resolution.routes[0]!, dsnNotify: notify }],
      "test",
    );
    await env.pool.query("UPDATE deliveries SET state = $2, last_status = NULL, dsn_state = 'pending', dispatched_at = now() WHERE id = $1", [
      accepted.deliveries[0]!.id,
      state,
    ]);
    assert.equal(await generateDsns(env.bus, env.pool, options), 1);
    const report = (await bouncesTo("ret-full@elsewhere.test")).at(-1)!;
    const view = await parseWithPython(report.raw);
    const returned = view.parts.map((p) => p.type).filter((t) => t === "message/rfc822" || t === "text/rfc822-headers");
    return { returned, body: report.raw.toString().includes("The body.") };
  };
  assert.deepEqual(await partTypes("bounced", ["FAILURE"]), { returned: ["message/rfc822"], body: true });
  for (const [state, notify] of [["deferred", ["DELAY"]], ["delivered", ["SUCCESS"]]] as const) {
    assert.deepEqual(await partTypes(state, [...notify]), { returned: ["text/rfc822-headers"], body: false }, state);
  }
});

test("the returned header section ends at the first empty line, whatever its line ending", () => {
  // An LF-ended header followed by a CRLF empty line: the body's later "\n\n" is not the end.
  assert.equal(headerSection(Buffer.from("Subject: a\n\r\nX-In-Body: 1\n\nmore")).toString("latin1"), "Subject: a\r\n\r\n");
  // An empty first line: no header fields; the body's field-like lines are not returned.
  assert.equal(headerSection(Buffer.from("\r\nX-In-Body: 1\r\n\r\nmore")).toString("latin1"), "\r\n");
  assert.equal(headerSection(Buffer.from("Subject: b\r\nTo: c@d\r\n\r\nbody\r\n")).toString("latin1"), "Subject: b\r\nTo: c@d\r\n\r\n");
});

test("a generated DSN is one info line naming the original message, its sender and the recipients it reports", async () => {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split("\n")) if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  const logger = createLogger("mta-outbound", "info", sink);
  const message = await failedMessage("sender@home.test", [{ to: "log-a@far.test" }, { to: "log-b@far.test" }, { to: "log-c@far.test", notify: ["NEVER"] }]);
  const silent = await failedMessage("", [{ to: "log-d@far.test" }]);
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, logger }), 1);
  const mine = lines.filter((l) => l.msg === "DSN generated");
  assert.equal(mine.length, 1, "one line per DSN; none for a suppressed one");
  const line = mine[0]!;
  const { rows } = await env.pool.query<{ id: number; queue_id: string }>(
    "SELECT m.id, m.queue_id FROM messages m WHERE m.id = $1 OR (m.source = 'bounce' AND m.id > $1) ORDER BY m.id",
    [message.messageId],
  );
  assert.equal(line.level, "info");
  assert.equal(line.messageId, message.messageId);
  assert.equal(line.queueId, rows[0]!.queue_id);
  assert.equal(line.to, "sender@home.test");
  assert.equal(line.dsnMessageId, rows.at(-1)!.id);
  assert.equal(line.dsnQueueId, rows.at(-1)!.queue_id);
  assert.deepEqual(line.actions, ["failed"]);
  assert.deepEqual(line.recipients, [
    { to: "log-a@far.test", action: "failed", dsn: "5.1.1" },
    { to: "log-b@far.test", action: "failed", dsn: "5.1.1" },
  ]);
  assert.equal(line.recipientCount, 2);
  assert.ok(!lines.some((l) => l.messageId === silent.messageId && l.msg === "DSN generated"));
});

function logLines() {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split("\n")) if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { lines, logger: createLogger("mta-outbound", "info", sink) };
}

async function dsnFailureCount(): Promise<number> {
  const match = /^mail_dsn_failures_total (\d+)$/m.exec(await registry.metrics());
  return Number(match?.[1] ?? 0);
}

test("a message whose DSN always fails is logged, counted and retried after a backoff; the others still get theirs", async () => {
  const { lines, logger } = logLines();
  // A corrupt row: an arrival date of 'infinity' makes the report's Arrival-Date throw.
  const corrupt = await failedMessage("corrupt@elsewhere.test", [{ to: "a@far.test" }]);
  await env.pool.query("UPDATE messages SET received_at = 'infinity' WHERE id = $1", [corrupt.messageId]);
  const later = await failedMessage("later@elsewhere.test", [{ to: "b@far.test" }]);
  const failuresBefore = await dsnFailureCount();
  const failures: DsnFailures = new Map();

  // The corrupt message comes first; the pass goes on past it.
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, logger }, failures), 1);
  assert.equal((await bouncesTo("later@elsewhere.test")).length, 1);
  assert.deepEqual((await dsnStates(later.messageId)).map((r) => r.dsn_state), ["sent"]);
  assert.deepEqual((await dsnStates(corrupt.messageId)).map((r) => r.dsn_state), ["pending"], "left pending, not lost");
  assert.equal((await bouncesTo("corrupt@elsewhere.test")).length, 0, "the failed transaction stored nothing");
  const errors = lines.filter((l) => l.msg === "DSN generation failed; the message stays pending");
  assert.equal(errors.length, 1);
  assert.equal(errors[0]!.level, "error");
  assert.equal(errors[0]!.messageId, corrupt.messageId);
  assert.match(String(errors[0]!.reason), /toUTCString/);
  assert.equal(errors[0]!.retryInS, 30);
  assert.equal(await dsnFailureCount(), failuresBefore + 1);

  // Within its backoff it is left out, so a batch is never filled by failing messages.
  const third = await failedMessage("third@elsewhere.test", [{ to: "c@far.test" }]);
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, logger, batchSize: 1 }, failures), 1);
  assert.equal((await bouncesTo("third@elsewhere.test")).length, 1);
  assert.equal(lines.filter((l) => l.msg === "DSN generation failed; the message stays pending").length, 1, "not retried before its time");

  // Its time come, it is retried (and fails again: a longer backoff).
  failures.get(corrupt.messageId)!.retryAt = Date.now() - 1;
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, logger }, failures), 0);
  assert.equal(failures.get(corrupt.messageId)!.failures, 2);
  assert.equal(lines.filter((l) => l.msg === "DSN generation failed; the message stays pending").at(-1)!.retryInS, 60);
  assert.equal(await dsnFailureCount(), failuresBefore + 2);

  // Once the row is repaired, the next retry sends exactly one DSN.
  await env.pool.query("UPDATE messages SET received_at = now() WHERE id = $1", [corrupt.messageId]);
  failures.get(corrupt.messageId)!.retryAt = Date.now() - 1;
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, logger }, failures), 1);
  assert.equal(await generateDsns(env.bus, env.pool, { ...options, logger }, failures), 0);
  assert.equal((await bouncesTo("corrupt@elsewhere.test")).length, 1);
  assert.deepEqual((await dsnStates(corrupt.messageId)).map((r) => r.dsn_state), ["sent"]);
  assert.equal(failures.size, 0);
});

test("RET=FULL returns the whole message only up to the size limit, as without RET; above it the header, and the report says so", async () => {
  const big = Buffer.concat([original, Buffer.from("A long body line.\r\n".repeat(300))]);
  const returned = async (sender: string, dsnRet: "FULL" | "HDRS" | null, fullReturnLimit: number) => {
    const resolution = await resolveRecipient(env.pool, "big@far.test", { allowRemote: true });
    assert.ok(resolution.ok);
    const accepted = await acceptMessage(
      env.pool,
      { raw: big, envelopeFrom: sender, source: "submission", dsnRet },
      [{ recipient: "big@far.test", route: resolution.routes[0]!, dsnNotify: null }],
      "test",
    );
    await env.pool.query("UPDATE deliveries SET state = 'bounced', last_status = '5.1.1', dsn_state = 'pending', dispatched_at = now() WHERE id = $1", [
      accepted.deliveries[0]!.id,
    ]);
    assert.equal(await generateDsns(env.bus, env.pool, { ...options, fullReturnLimit }), 1);
    const report = (await bouncesTo(sender)).at(-1)!;
    const view = await parseWithPython(report.raw);
    assert.deepEqual(view.defects, []);
    const parsed = await simpleParser(report.raw);
    return {
      type: view.parts.map((p) => p.type).filter((t) => t === "message/rfc822" || t === "text/rfc822-headers")[0],
      body: report.raw.toString().includes("A long body line."),
      note: /larger than \d+ bytes, so only its header is attached/.test(parsed.text ?? ""),
    };
  };
  assert.ok(big.length > 5000);
  assert.deepEqual(await returned("big-full@elsewhere.test", "FULL", 1000), { type: "text/rfc822-headers", body: false, note: true });
  assert.deepEqual(await returned("big-none@elsewhere.test", null, 1000), { type: "text/rfc822-headers", body: false, note: true });
  assert.deepEqual(await returned("big-hdrs@elsewhere.test", "HDRS", 1000), { type: "text/rfc822-headers", body: false, note: false }, "asked for: nothing to explain");
  assert.deepEqual(await returned("big-fits@elsewhere.test", "FULL", 100_000), { type: "message/rfc822", body: true, note: false });
});
