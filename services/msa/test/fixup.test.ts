import { test } from "node:test";
import assert from "node:assert/strict";
import { fixMessage, type FixContext } from "../src/fixup.ts";
import { loginProblem, plainActsAsOther, plainProblem } from "../src/sasl.ts";

const context: FixContext = {
  user: "alice@example.test",
  owned: new Set(["alice@example.test", "sales@example.test"]),
  envelopeFrom: "alice@example.test",
  defaultDomain: "example.test",
  hostname: "mx.example.test",
  now: new Date("2026-11-27T09:00:00Z"),
};

function fix(text: string) {
  return fixMessage(Buffer.from(text), context);
}

function headerOf(result: ReturnType<typeof fix>): string {
  assert.ok(result.ok);
  const text = result.message.toString();
  return text.slice(0, text.indexOf("\r\n\r\n") + 2);
}

test("adds Date: and Message-ID: when missing, keeps the body byte for byte", () => {
  const result = fix("From: Alice <alice@example.test>\r\nTo: bob@else.test\r\nSubject: hi\r\n\r\nbody\r\n.dots\r\n");
  assert.ok(result.ok);
  const header = headerOf(result);
  assert.match(header, /\r\nDate: Fri, 27 Nov 2026 09:00:00 \+0000\r\n/);
  assert.match(header, /\r\nMessage-ID: <[0-9a-f]{24}@mx\.example\.test>\r\n/);
  assert.equal(result.messageId, /Message-ID: (<[^>]+>)/.exec(header)![1]);
  assert.ok(result.message.toString().endsWith("\r\n\r\nbody\r\n.dots\r\n"));
  assert.deepEqual(result.fromAddresses, ["alice@example.test"]);
});

test("a complete message is passed through unchanged", () => {
  const text = "From: alice@example.test\r\nDate: Thu, 26 Nov 2026 10:00:00 +0100\r\nMessage-ID: <x@y>\r\n\r\nhello\r\n";
  const result = fix(text);
  assert.ok(result.ok);
  assert.equal(result.message.toString(), text);
  assert.deepEqual(result.changes, []);
});

test("completes addresses without a domain and removes Bcc:", () => {
  const result = fix("From: Alice <alice>\r\nTo: bob, \"Carol, C.\" <carol@else.test>\r\nBcc: secret@else.test\r\nDate: x\r\nMessage-ID: <a@b>\r\n\r\nhi\r\n");
  const header = headerOf(result);
  assert.match(header, /^From: Alice <alice@example\.test>\r\n/);
  assert.match(header, /\r\nTo: <bob@example\.test>, "Carol, C\." <carol@else\.test>\r\n/);
  assert.doesNotMatch(header, /Bcc:|secret/);
});

test("removes Resent-Bcc: of a resent message (RFC 5322 3.6.6), folded or not, and keeps the other Resent- fields", () => {
  const result = fix(
    "From: alice@example.test\r\nDate: x\r\nMessage-ID: <a@b>\r\nResent-From: alice@example.test\r\nResent-To: bob@else.test\r\n" +
      "Resent-Bcc: hidden@else.test,\r\n other-hidden@else.test\r\nresent-bcc:\r\n\r\nhi\r\n",
  );
  const header = headerOf(result);
  assert.doesNotMatch(header, /Resent-Bcc|hidden/i);
  assert.match(header, /\r\nResent-From: alice@example\.test\r\nResent-To: bob@else\.test\r\n/);
  assert.ok(result.ok && result.changes.includes("resent-bcc-removed"));
});

test("From: must be owned; several owned From: addresses get a Sender:", () => {
  const forged = fix("From: Mallory <boss@example.test>\r\n\r\nhi\r\n");
  assert.ok(!forged.ok);
  assert.equal(forged.reply.code, 553);
  assert.equal(forged.reply.enhanced, "5.7.1");

  const header = headerOf(fix("From: alice@example.test, Sales <sales@example.test>\r\n\r\nhi\r\n"));
  assert.match(header, /\r\nSender: <alice@example\.test>\r\n/);

  const otherSender = fix("From: alice@example.test\r\nSender: boss@example.test\r\n\r\nhi\r\n");
  assert.ok(!otherSender.ok);
  assert.equal(otherSender.reply.code, 553);

  const twoFrom = fix("From: alice@example.test\r\nFrom: sales@example.test\r\n\r\nhi\r\n");
  assert.ok(!twoFrom.ok);
  assert.equal(twoFrom.reply.code, 554);
});

test("a missing From: is the envelope sender", () => {
  const header = headerOf(fix("Subject: no from\r\n\r\nhi\r\n"));
  assert.match(header, /\r\nFrom: <alice@example\.test>\r\n/);
});

test("a message without a valid header block is refused with a clear reply", () => {
  for (const text of ["just a body line\r\nand another\r\n", "\r\nbody after an empty header\r\n", "\r\nFrom: <alice@example.test>\r\n\r\nbody after an empty header\r\n", " folded: first\r\n\r\nx\r\n"]) {
    const result = fix(text);
    assert.ok(!result.ok, text);
    assert.equal(result.reply.code, 554);
    assert.equal(result.reply.enhanced, "5.6.0");
    assert.match(result.reply.text, /no valid header block/);
  }
});

test("SASL data checks: bad base64 and missing parts", () => {
  const b64 = (s: string) => Buffer.from(s).toString("base64");
  assert.equal(plainProblem(b64("\x00alice@example.test\x00secret")), null);
  assert.match(plainProblem("not base64!!")!, /not base64/);
  assert.match(plainProblem("YWJj=")!, /not base64/);
  assert.match(plainProblem(b64("alice\x00secret"))!, /expected authzid/);
  assert.match(plainProblem(b64("\x00alice\x00"))!, /missing password/);
  assert.match(plainProblem(b64("\x00\x00secret"))!, /missing user name/);
  assert.equal(plainActsAsOther(b64("Alice@example.test\x00alice@example.test\x00pw")), false);
  assert.equal(plainActsAsOther(b64("bob@example.test\x00alice@example.test\x00pw")), true);
  assert.equal(loginProblem(b64("alice"), "user name"), null);
  assert.match(loginProblem("", "password")!, /missing password/);
  assert.match(loginProblem("%%%", "password")!, /not base64/);
});

test("UTF-8 (SMTPUTF8) From: addresses are compared in their UTF-8 form", () => {
  const owned = new Set(["josé@example.test"]);
  const raw = Buffer.from("From: José <JOSÉ@example.test>\r\nDate: x\r\nMessage-ID: <a@b>\r\n\r\nhola\r\n", "utf8");
  const result = fixMessage(raw, { ...context, owned, user: "josé@example.test" });
  assert.ok(result.ok);
  assert.deepEqual(result.fromAddresses, ["josé@example.test"]);
  assert.ok(result.message.equals(raw), "nothing to change, bytes untouched");
  const other = fixMessage(Buffer.from("From: <jose@example.test>\r\n\r\nx\r\n", "utf8"), { ...context, owned });
  assert.ok(!other.ok);
});

test("a From: or Sender: added for a UTF-8 sender or login is written in UTF-8, like the rest of the header", () => {
  const owned = new Set(["josé@example.test", "pepe@example.test"]);
  const utf8 = { ...context, owned, user: "josé@example.test", envelopeFrom: "josé@example.test" };
  const noFrom = fixMessage(Buffer.from("Subject: sin from\r\n\r\nhola\r\n", "utf8"), utf8);
  assert.ok(noFrom.ok);
  assert.match(noFrom.message.toString("utf8"), /\r\nFrom: <josé@example\.test>\r\n/);
  const twoAuthors = fixMessage(Buffer.from("From: josé@example.test, pepe@example.test\r\n\r\nhola\r\n", "utf8"), utf8);
  assert.ok(twoAuthors.ok);
  assert.match(twoAuthors.message.toString("utf8"), /\r\nSender: <josé@example\.test>\r\n/);
});

test("a long address list that gets a domain completed is folded again, its lines within 78 characters", () => {
  const others = Array.from({ length: 40 }, (_, i) => `person${i}@a-rather-long-domain-name.example`);
  const result = fix(`From: alice@example.test\r\nTo: bob,\r\n ${others.join(",\r\n ")}\r\nSubject: many\r\n\r\nbody\r\n`);
  const header = headerOf(result);
  for (const line of header.split("\r\n")) assert.ok(line.length <= 78, `${line.length}: ${line}`);
  const to = /\r\nTo:((?:.|\r\n )*)\r\n/.exec(header)![1]!.replace(/\r\n /g, " ").trim();
  assert.equal(to, ["<bob@example.test>", ...others.map((a) => `<${a}>`)].join(", "));
});

test("the 553 for a From: that is not owned names it in printable US-ASCII only (RFC 5321 4.2)", () => {
  const result = fixMessage(Buffer.from("From: <jörg@example.test>\r\n\r\nhallo\r\n", "utf8"), context);
  assert.ok(!result.ok);
  assert.equal(result.reply.code, 553);
  assert.match(result.reply.text, /^From: address <j\?\?rg@example\.test> is not owned/);
  assert.doesNotMatch(result.reply.text, /[^\x20-\x7e]/);
});

test("From: and Sender: are read strictly: an address without a domain is completed in place, the rest of the field kept as written", () => {
  const header = headerOf(fix('From: "Example, Alice" (work)\r\n <alice>, =?UTF-8?Q?Sal=C3=A9s?= <sales>\r\nSender: alice\r\n\r\nhi\r\n'));
  assert.match(header, /^From: "Example, Alice" \(work\)\r\n <alice@example\.test>, =\?UTF-8\?Q\?Sal=C3=A9s\?= <sales@example\.test>\r\nSender: alice@example\.test\r\n/);

  for (const text of ["From: <alice@example.test>boss@example.test", "From: alice@example.test\r\nSender: alice@example.test (boss@example.test)"]) {
    const result = fix(`${text}\r\n\r\nhi\r\n`);
    assert.ok(!result.ok, text);
    assert.equal(result.reply.code, 554);
    assert.equal(result.reply.enhanced, "5.6.0");
    assert.match(result.reply.text, /^Message refused: (From|Sender): field is not /);
  }
});
