import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { deliverLocal } from "../src/deliver.ts";
import { parseMessage, structureOf, walkStructure, type MimePart } from "../src/parse.ts";
import { account, send } from "./helpers.ts";

const crlf = (lines: string[]) => Buffer.from(lines.join("\r\n"), "utf8");

function find(part: MimePart | null, type: string): MimePart[] {
  if (!part) return [];
  return [...(part.type === type ? [part] : []), ...(part.parts ?? []).flatMap((child) => find(child, type))];
}

test("headers: subject, addresses, date, Message-ID, In-Reply-To, References, encoded words", async () => {
  const parsed = await parseMessage(crlf([
    "From: =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <jorg@example.org>",
    "To: Ann <ann@example.com>, team: bob@example.com, carl@example.com;",
    "Cc: dora@example.com",
    "Date: Tue, 3 Mar 2026 10:00:00 +0100",
    "Subject: =?UTF-8?B?SGVsbG8gd8O2cmxk?=",
    "Message-ID: <m1@example.org>",
    "In-Reply-To: <m0@example.org>",
    "References: <a@example.org> <m0@example.org>",
    "X-Spam-Flag: yes",
    "",
    "body",
  ]));
  assert.equal(parsed.subject, "Hello wörld");
  assert.deepEqual(parsed.from, [{ name: "Jörg Müller", address: "jorg@example.org" }]);
  assert.deepEqual(parsed.to.map((m) => m.address), ["ann@example.com", "bob@example.com", "carl@example.com"]);
  assert.deepEqual(parsed.cc.map((m) => m.address), ["dora@example.com"]);
  assert.equal(parsed.date, "2026-03-03T09:00:00.000Z");
  assert.equal(parsed.messageId, "<m1@example.org>");
  assert.equal(parsed.inReplyTo, "<m0@example.org>");
  assert.deepEqual(parsed.references, ["<a@example.org>", "<m0@example.org>"]);
  assert.equal(parsed.spam, true);
  assert.equal(parsed.structure?.type, "text/plain");
  assert.equal(parsed.errors, undefined);
});

test("MIME structure: mixed, alternative, related, base64, quoted-printable, filenames and sizes", async () => {
  const pdf = Buffer.alloc(3000, 7);
  const parsed = await parseMessage(crlf([
    "Subject: structure",
    "MIME-Version: 1.0",
    "Content-Type: multipart/mixed; boundary=\"outer\"",
    "",
    "preamble",
    "--outer",
    "Content-Type: multipart/alternative; boundary=\"alt\"",
    "",
    "--alt",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: quoted-printable",
    "",
    "Gr=C3=BC=C3=9Fe",
    "--alt",
    "Content-Type: multipart/related; boundary=\"rel\"",
    "",
    "--rel",
    "Content-Type: text/html; charset=utf-8",
    "",
    "<img src=\"cid:logo\">",
    "--rel",
    "Content-Type: image/png",
    "Content-ID: <logo>",
    "Content-Transfer-Encoding: base64",
    "",
    "iVBORw0KGgo=",
    "--rel--",
    "--alt--",
    "--outer",
    "Content-Type: application/pdf; name=\"report.pdf\"",
    "Content-Disposition: attachment; filename=\"=?UTF-8?Q?r=C3=A9port.pdf?=\"",
    "Content-Transfer-Encoding: base64",
    "",
    ...(pdf.toString("base64").match(/.{1,76}/g) ?? []),
    "--outer--",
    "",
  ]));
  const root = parsed.structure!;
  assert.equal(root.type, "multipart/mixed");
  assert.deepEqual(root.parts!.map((p) => p.type), ["multipart/alternative", "application/pdf"]);
  const alternative = root.parts![0]!;
  assert.deepEqual(alternative.parts!.map((p) => p.type), ["text/plain", "multipart/related"]);
  assert.equal(alternative.parts![0]!.encoding, "quoted-printable");
  assert.deepEqual(alternative.parts![1]!.parts!.map((p) => p.type), ["text/html", "image/png"]);
  const attachment = root.parts![1]!;
  assert.equal(attachment.filename, "réport.pdf");
  assert.equal(attachment.partId, "2");
  assert.ok(attachment.size >= 4000, `encoded size ${attachment.size}`);
  assert.equal(root.size, root.parts!.reduce((sum, p) => sum + p.size, 0));
  const decoded = parsed.attachments.find((a) => a.type === "application/pdf");
  assert.equal(decoded?.size, 3000);
});

test("attachment sizes are the decoded sizes (base64 with padding, quoted-printable with escapes and soft breaks)", async () => {
  const bin = Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x00]);
  const qpText = "caf=C3=A9 and a very long line that is softly =\r\nbroken=3D";
  const parsed = await parseMessage(crlf([
    "Subject: sizes",
    "Content-Type: multipart/mixed; boundary=s",
    "",
    "--s",
    "Content-Type: text/plain",
    "",
    "inline text is not an attachment",
    "--s",
    "Content-Type: application/octet-stream; name=a.bin",
    "Content-Transfer-Encoding: base64",
    "",
    bin.toString("base64"),
    "--s",
    "Content-Type: text/plain; name=notes.txt",
    "Content-Disposition: attachment; filename=notes.txt",
    "Content-Transfer-Encoding: quoted-printable",
    "",
    qpText,
    "--s--",
    "",
  ]));
  assert.deepEqual(parsed.attachments, [
    { partId: "2", type: "application/octet-stream", filename: "a.bin", size: 5 },
    // The CRLF before a boundary belongs to the boundary, not to the part.
    { partId: "3", type: "text/plain", filename: "notes.txt", size: Buffer.byteLength("café and a very long line that is softly broken=") },
  ]);
});

test("a single-part message's structure, read from its header alone, is what the full walk gives", async () => {
  const messages = [
    crlf(["Subject: no content type", "", "line one", ".leading dot", "", "last line", ""]),
    crlf(["Subject: qp", "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable", "", "caf=C3=A9 =", "soft break", ""]),
    crlf(["Subject: html", "Content-Type: TEXT/HTML; charset=\"iso-8859-1\"", "Content-Transfer-Encoding: 8bit", "", "<p>hi</p>"]),
    crlf(["Subject: a pdf as the whole body", "Content-Type: application/pdf; name=\"=?utf-8?q?r=C3=A9sum=C3=A9?=.pdf\"", "Content-Disposition: attachment;", " filename*=utf-8''r%C3%A9sum%C3%A9.pdf", "Content-Transfer-Encoding: base64", "", "JVBERi0xLjQK", "JSVFT0YK", ""]),
    crlf(["Subject: empty body", "", ""]),
    crlf(["Subject: nested", "Content-Type: message/rfc822", "", "Subject: inner", "", "inner body", ""]),
    crlf(["Subject: multi", "Content-Type: multipart/mixed; boundary=b", "", "--b", "Content-Type: text/plain", "", "one", "--b--", ""]),
    Buffer.from("Subject: bare LF header\n\nbody\r\n\r\nmore\r\n"),
    // The header ends at the first empty line, whatever ends it: what follows is body.
    Buffer.from("Subject: bare LF, then CRLF\n\r\nContent-Type: application/pdf\r\n\r\nbody\r\n"),
    crlf(["", "Content-Type: application/pdf; name=a.pdf", "", "JVBERi0xLjQK", ""]),
  ];
  for (const raw of messages) {
    const fast: Array<{ partId: string | null; type: string; filename: string | null; size: number }> = [];
    const walked: typeof fast = [];
    assert.deepEqual(await structureOf(raw, fast), await walkStructure(raw, walked), raw.toString("latin1").split("\r\n")[0]);
    assert.deepEqual(fast, walked);
  }
  const pdf = await structureOf(messages[3]!, []);
  assert.equal(pdf?.filename, "résumé.pdf");
  assert.equal(pdf?.size, "JVBERi0xLjQK\r\nJSVFT0YK\r\n".length);
});

test("MIME structure: digest and nested message/rfc822 (plain and base64)", async () => {
  const inner = ["Subject: inner", "Content-Type: multipart/mixed; boundary=in", "", "--in", "Content-Type: text/plain", "", "deep", "--in", "Content-Type: image/gif; name=x.gif", "Content-Transfer-Encoding: base64", "", "R0lGODlh", "--in--", ""].join("\r\n");
  const parsed = await parseMessage(crlf([
    "Subject: digest",
    "Content-Type: multipart/mixed; boundary=top",
    "",
    "--top",
    "Content-Type: multipart/digest; boundary=dig",
    "",
    "--dig",
    "",
    "Subject: digest one",
    "",
    "one",
    "--dig",
    "",
    "Subject: digest two",
    "",
    "two",
    "--dig--",
    "--top",
    "Content-Type: message/rfc822",
    "Content-Disposition: attachment",
    "",
    inner,
    "--top",
    "Content-Type: message/rfc822",
    "Content-Transfer-Encoding: base64",
    "",
    Buffer.from(inner).toString("base64"),
    "--top--",
    "",
  ]));
  const digest = find(parsed.structure, "multipart/digest")[0]!;
  assert.equal(digest.parts?.length, 2);
  // RFC 2046 §5.1.5: parts of a digest default to message/rfc822.
  assert.ok(digest.parts!.every((p) => p.type === "message/rfc822"), JSON.stringify(digest.parts));
  const embedded = find(parsed.structure, "message/rfc822").filter((p) => p.parts?.[0]?.type === "multipart/mixed");
  assert.equal(embedded.length, 2, "both attached messages are walked");
  for (const message of embedded) {
    assert.deepEqual(message.parts![0]!.parts!.map((p) => p.type), ["text/plain", "image/gif"]);
    assert.equal(message.parts![0]!.parts![1]!.filename, "x.gif");
  }
});

test("X-Spam-Flag counts wherever it is in the header section, also after more fields than are listed", async () => {
  const padding = Array.from({ length: 400 }, (_, i) => `X-Pad-${i}: v`);
  const flagged = await parseMessage(crlf(["Subject: padded", ...padding, "X-Spam-Flag:", " YES", "", "body"]));
  assert.equal(flagged.headers.length, 300, "the list is bounded");
  assert.equal(flagged.spam, true);
  assert.equal((await parseMessage(crlf(["Subject: padded", ...padding, "X-Spam-Flag: NO", "", "body"]))).spam, false);
});

test("malformed MIME never throws and keeps what can be read", async () => {
  const samples = [
    crlf(["Subject: no end boundary", "Content-Type: multipart/mixed; boundary=zz", "", "--zz", "Content-Type: text/plain", "", "dangling"]),
    crlf(["Subject: empty boundary", "Content-Type: multipart/mixed; boundary=", "", "--", "x"]),
    crlf(["Subject: bad base64", "Content-Type: application/octet-stream", "Content-Transfer-Encoding: base64", "", "!!!not base64***"]),
    crlf(["Subject: =?UTF-8?B?broken", "Content-Type: text/plain; charset=no-such-charset", "", "\xff\xfe"]),
    Buffer.from([0x00, 0xff, 0x0a, 0x0d, 0x3a, 0x0a, 0x0a, 0x2d, 0x2d]),
    Buffer.alloc(0),
    crlf(["Header-without-body: x"]),
  ];
  for (const sample of samples) {
    const parsed = await parseMessage(sample);
    assert.equal(parsed.size, sample.length);
    assert.ok(Array.isArray(parsed.headers));
  }
  const first = await parseMessage(samples[0]!);
  assert.equal(first.subject, "no end boundary");
  assert.equal(first.structure?.parts?.[0]?.type, "text/plain");
});

let env: TestEnv;
before(async () => {
  env = await createTestEnv();
});
after(async () => {
  await env.close();
});

test("a delivery stores the parse once, and a malformed message is still delivered", async () => {
  const id = await account(env.pool, "ivy@example.test");
  const logger = createLogger("mda-test", "silent");
  const broken = crlf(["Subject: broken", "Content-Type: multipart/mixed; boundary=", "", "--", "\x00\x01 junk"]);
  const accepted = await send(env.pool, null, broken, [{ address: "ivy@example.test", accountId: id }]);
  const outcome = await deliverLocal({ pool: env.pool, logger }, accepted.deliveries[0]!.id);
  assert.equal(outcome.status, "delivered");
  const parsed = (await env.pool.query("SELECT parsed FROM message_parsed WHERE message_id = $1", [accepted.messageId])).rows[0].parsed;
  assert.equal(parsed.subject, "broken");

  // Parsed only when nothing is stored: a second delivery of the same message leaves it alone.
  const again = await send(env.pool, null, broken, [{ address: "ivy@example.test", accountId: id }]);
  await env.pool.query(`INSERT INTO message_parsed (message_id, parsed) VALUES ($1, '{"marker": true}')`, [again.messageId]);
  await deliverLocal({ pool: env.pool, logger }, again.deliveries[0]!.id);
  const kept = (await env.pool.query("SELECT parsed FROM message_parsed WHERE message_id = $1", [again.messageId])).rows[0].parsed;
  assert.deepEqual(kept, { marker: true });
});

test("real-world tricky messages through LMTP: every one is delivered and its stored summary is right", async () => {
  const { startMda } = await import("../src/mda.ts");
  const { addFilterRule } = await import("@mailstack/db");
  const { LineClient } = await import("./helpers.ts");
  await account(env.pool, "tricky@example.test");
  // A rule on a UTF-8 subject: it must see the subject as the sender wrote it.
  await addFilterRule(env.pool, "tricky@example.test", { condition: { kind: "header", header: "Subject", op: "contains", value: "Grüße" }, action: { kind: "fileinto", folder: "Grüße" } });
  const mda = await startMda({ pool: env.pool, bus: env.bus, logger: createLogger("mda-test", "silent"), config: { LMTP_PORT: 0, LMTP_HOST: "127.0.0.1" } });
  const many = ["Subject: many parts", "Content-Type: multipart/mixed; boundary=P", ""];
  for (let i = 0; i < 600; i++) many.push("--P", `Content-Type: text/plain; name="f${i}.txt"`, "Content-Disposition: attachment", "", `part ${i}`);
  many.push("--P--", "");
  const samples: Record<string, Buffer> = {
    latin1: Buffer.concat([Buffer.from("Subject: Gr\xfc\xdfe in Latin-1\r\nFrom: J\xfcrgen <j@x.example>\r\nDate: 21 Nov 97 09:55:06 GMT\r\n\r\nbody\r\n", "latin1")]),
    utf8: crlf(["Subject: Grüße in UTF-8", "From: Jürgen <j@x.example>", "Date: Fri, 21 Nov 1997 09:55:06 PDT", "", "body", ""]),
    badDate: crlf(["Subject: bad date", "Date: yesterday-ish", "", "body", ""]),
    encodedFrom: crlf(["From: =?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>", "Subject: =?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=", "    =?ISO-8859-2?B?dSB1bmRlcnN0YW5kIHRoZSBleGFtcGxlLg==?=", "Date: Thu, 13 Feb 1969 23:32:54 -0330 (Newfoundland Time)", "", "x", ""]),
    noBoundary: crlf(["Subject: no boundary", "Content-Type: multipart/mixed", "", "--X", "Content-Type: text/plain", "", "t", "--X--", ""]),
    neverCloses: crlf(["Subject: unclosed", "Content-Type: multipart/mixed; boundary=U", "", "--U", "Content-Type: text/plain", "", "one", "--U", "Content-Type: application/pdf; name=a.pdf", "Content-Transfer-Encoding: base64", "", "JVBERi0xLjQK", ""]),
    rfc2231: crlf(["Subject: 2231", "Content-Type: multipart/mixed; boundary=R", "", "--R", "Content-Type: application/octet-stream", "Content-Disposition: attachment;", " filename*0*=UTF-8''%E6%97%A5%E6%9C%AC;", " filename*1*=%E8%AA%9E.txt", "", "x", "--R", "Content-Type: application/octet-stream", "Content-Disposition: attachment; filename*=iso-8859-1'de'M%FCller.txt", "", "y", "--R--", ""]),
    digest: crlf(["Subject: digest", "Content-Type: multipart/digest; boundary=D", "", "--D", "", "Subject: first", "", "one", "--D", "", "Subject: second", "Content-Type: message/rfc822", "", "Subject: nested", "", "deep", "--D--", ""]),
    many: crlf(many),
  };
  const queueIds: Record<string, string> = {};
  try {
    const client = await LineClient.open(mda.lmtpPort!);
    await client.reply();
    await client.command("LHLO client.example");
    for (const [name, raw] of Object.entries(samples)) {
      assert.match(await client.command(`MAIL FROM:<sender@remote.example>${name === "utf8" ? " SMTPUTF8" : ""}`), /^250 /);
      assert.match(await client.command("RCPT TO:<tricky@example.test>"), /^250 /);
      assert.match(await client.command("DATA"), /^354 /);
      client.socket.write(Buffer.concat([raw, Buffer.from(".\r\n")]));
      const reply = await client.reply();
      assert.match(reply, /^250 2\.0\.0 Delivered/, name);
      queueIds[name] = /\(([0-9A-Z]+)\)/.exec(reply)![1]!;
    }
    client.close();
  } finally {
    await mda.stop();
  }
  const stored = async (name: string) => (await env.pool.query(
    `SELECT p.parsed, d.folder FROM messages m JOIN message_parsed p ON p.message_id = m.id JOIN deliveries d ON d.message_id = m.id WHERE m.queue_id = $1`,
    [queueIds[name]],
  )).rows[0] as { parsed: import("../src/parse.ts").ParsedMessage; folder: string };

  const latin1 = await stored("latin1");
  assert.equal(latin1.parsed.subject, "Grüße in Latin-1");
  assert.deepEqual(latin1.parsed.from, [{ name: "Jürgen", address: "j@x.example" }]);
  assert.equal(latin1.parsed.date, "1997-11-21T09:55:06.000Z");
  assert.equal(latin1.folder, "Grüße");
  const utf8 = await stored("utf8");
  assert.deepEqual(utf8.parsed.headers.find(([name]) => name === "subject"), ["subject", "Grüße in UTF-8"]);
  assert.deepEqual(utf8.parsed.from, [{ name: "Jürgen", address: "j@x.example" }]);
  assert.equal(utf8.parsed.date, "1997-11-21T16:55:06.000Z");
  assert.equal(utf8.folder, "Grüße", "the filter rule saw the UTF-8 subject");
  assert.equal((await stored("badDate")).parsed.date, null, "an unreadable Date is no date, not the time of parsing");
  const encoded = await stored("encodedFrom");
  assert.deepEqual(encoded.parsed.from, [{ name: "André Pirard", address: "PIRARD@vm1.ulg.ac.be" }]);
  assert.equal(encoded.parsed.subject, "If you can read this you understand the example.");
  assert.equal(encoded.parsed.date, "1969-02-14T03:02:54.000Z");
  const noBoundary = (await stored("noBoundary")).parsed;
  assert.deepEqual(noBoundary.structure, { partId: "", type: "text/plain", size: Buffer.byteLength("--X\r\nContent-Type: text/plain\r\n\r\nt\r\n--X--\r\n") });
  assert.match(noBoundary.errors?.join() ?? "", /multipart\/mixed has no parts/);
  const unclosed = (await stored("neverCloses")).parsed;
  assert.deepEqual(unclosed.structure?.parts?.map((p) => [p.type, p.filename ?? null]), [["text/plain", null], ["application/pdf", "a.pdf"]]);
  assert.deepEqual((await stored("rfc2231")).parsed.attachments.map((a) => a.filename), ["日本語.txt", "Müller.txt"]);
  const digest = (await stored("digest")).parsed.structure!;
  assert.deepEqual(digest.parts?.map((p) => p.type), ["message/rfc822", "message/rfc822"]);
  assert.equal(digest.parts?.[1]?.parts?.[0]?.type, "message/rfc822", "a message inside a digest message");
  const manyParts = (await stored("many")).parsed;
  assert.equal(manyParts.structure?.parts?.length, 499);
  assert.match(manyParts.errors?.join() ?? "", /more than 500 parts/);
});
