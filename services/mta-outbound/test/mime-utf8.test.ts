import assert from "node:assert/strict";
import { test } from "node:test";
import { composeDsn } from "@mailstack/dsn";
import { simpleParser } from "mailparser";
import { hasUtf8HeaderFields, sevenBitReport } from "../src/mime-utf8.ts";

const utf8 = (text: string) => Buffer.from(text, "utf8");

const internationalOriginal = utf8("From: <alice@origin.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHallo.\r\n");
const dsnOf = (original: Buffer, ret: "FULL" | "HDRS", finalRecipient = "bad@far.test") =>
  composeDsn({
    reportingMta: "relay.test",
    to: "alice@origin.test",
    ret,
    original,
    recipients: [{ finalRecipient, action: "failed", status: "5.1.1", remoteMta: "mx.far.test", diagnostic: "550 5.1.1 unknown" }],
  }).raw;

test("UTF-8 header fields at the top, in a part's header, or in an embedded message need SMTPUTF8; 8-bit bodies do not", () => {
  assert.equal(hasUtf8HeaderFields(utf8("Subject: plain\r\n\r\nplain\r\n")), false);
  assert.equal(hasUtf8HeaderFields(internationalOriginal), true);
  assert.equal(hasUtf8HeaderFields(utf8("Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\u00fc\u00dfe\r\n")), false);
  const multipart = (partHeader: string, partBody: string) =>
    utf8(`Subject: x\r\nContent-Type: multipart/mixed; boundary="b 1"\r\n\r\npre\u00e4mble\r\n--b 1\r\nContent-Type: text/plain\r\n\r\nt\u00e9xt\r\n--b 1\r\n${partHeader}\r\n\r\n${partBody}\r\n--b 1--\r\nepil\u00f6gue\r\n`);
  assert.equal(hasUtf8HeaderFields(multipart("Content-Type: text/plain; name=\"caf\u00e9.txt\"", "x")), true, "a part's header");
  assert.equal(hasUtf8HeaderFields(multipart("Content-Type: message/rfc822", "Subject: caf\u00e9\r\n\r\nx")), true, "an embedded message's header");
  assert.equal(hasUtf8HeaderFields(multipart("Content-Type: message/global", "Subject: caf\u00e9\r\n\r\nx")), true);
  assert.equal(hasUtf8HeaderFields(multipart("Content-Type: message/rfc822", "Subject: cafe\r\n\r\ncaf\u00e9")), false, "an embedded message's 8-bit body");
  assert.equal(hasUtf8HeaderFields(multipart("Content-Type: message/global-headers", "Subject: caf\u00e9")), true);
  assert.equal(hasUtf8HeaderFields(multipart("Content-Type: message/global-delivery-status", "Final-Recipient: utf-8;caf\u00e9@x.test")), false, "8-bit report fields are body content (8BITMIME)");
  assert.equal(hasUtf8HeaderFields(multipart("Content-Type: text/plain", "caf\u00e9")), false, "8-bit text, preamble and epilogue");
  // multipart/digest: a part without Content-Type is a message (RFC 2046 5.1.5).
  const digest = utf8("Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: caf\u00e9\n\nbody\n--d--\n");
  assert.equal(hasUtf8HeaderFields(digest), true, "LF line endings and the digest default");
  assert.equal(hasUtf8HeaderFields(Buffer.from(digest.toString().replace("multipart/digest", "multipart/mixed"))), false);
});

test("a part sent base64 or quoted-printable is 7-bit whatever it holds", () => {
  const encoded = utf8(
    "Content-Type: multipart/report; report-type=global-delivery-status; boundary=r\r\n\r\n--r\r\nContent-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\nSubject: caf\u00e9\r\n\r\nx\r\n--r--\r\n",
  );
  assert.equal(hasUtf8HeaderFields(encoded), true);
  const base64 = Buffer.from(encoded.toString("utf8").replace("8bit\r\n\r\nSubject: caf\u00e9\r\n\r\nx", `base64\r\n\r\n${utf8("Subject: caf\u00e9\r\n\r\nx").toString("base64")}`), "utf8");
  assert.equal(hasUtf8HeaderFields(base64), false);
});

test("the DSN of an internationalized original needs SMTPUTF8 (message/global, message/global-headers); one about a UTF-8 recipient of an ASCII message does not", () => {
  const full = dsnOf(internationalOriginal, "FULL");
  assert.match(full.toString(), /Content-Type: message\/global\r\n/);
  assert.equal(hasUtf8HeaderFields(full), true);
  const headers = dsnOf(internationalOriginal, "HDRS");
  assert.match(headers.toString(), /Content-Type: message\/global-headers\r\n/);
  assert.equal(hasUtf8HeaderFields(headers), true);
  // Only the recipient address is UTF-8: a plain message/delivery-status (utf-8-addr-xtext), and the returned message's header is ASCII.
  const ascii = utf8("From: <alice@origin.test>\r\nSubject: hello\r\n\r\nGr\u00fc\u00dfe\r\n");
  const aboutRecipient = dsnOf(ascii, "FULL", "\u7528\u6237@far.test");
  assert.match(aboutRecipient.toString(), /Content-Type: message\/delivery-status\r\n\r\n[\s\S]*\r\nFinal-Recipient: utf-8;\\x\{7528\}\\x\{6237\}@far\.test\r\n/);
  assert.equal(hasUtf8HeaderFields(aboutRecipient), false);
  assert.equal(hasUtf8HeaderFields(dsnOf(ascii, "FULL")), false, "an 8-bit body in message/rfc822");
});

test("sevenBitReport: every 8-bit part of a DSN in base64, the report relabelled 7bit; null where no encoding can make it 7-bit", async () => {
  for (const ret of ["FULL", "HDRS"] as const) {
    // A UTF-8 recipient too: the human part is 8-bit text.
    const dsn = dsnOf(internationalOriginal, ret, "\u7528\u6237@far.test");
    const seven = sevenBitReport(dsn)!;
    assert.ok(!seven.some((byte) => byte > 0x7f), "7-bit");
    assert.equal(hasUtf8HeaderFields(seven), false);
    const text = seven.toString("latin1");
    assert.equal(text.match(/^Content-Transfer-Encoding: /gm)!.length, 4, "the report and its three parts, once each");
    assert.match(text, /\r\nContent-Transfer-Encoding: 7bit\r\n\r\nThis is a MIME-encapsulated message\./);
    const parsed = await simpleParser(seven);
    assert.match(parsed.text ?? "", /<\u7528\u6237@far\.test>: 550 5\.1\.1 unknown/);
    const returned = parsed.attachments.find((a) => a.contentType === (ret === "FULL" ? "message/global" : "message/global-headers"))!.content;
    assert.deepEqual(returned, ret === "FULL" ? internationalOriginal : utf8("From: <alice@origin.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\n"));
    assert.match(parsed.attachments.find((a) => a.contentType === "message/global-delivery-status")!.content.toString("utf8"), /\r\nFinal-Recipient: utf-8;\u7528\u6237@far\.test\r\n/);
  }
  // A returned message/rfc822 with an 8-bit body may not be encoded (RFC 2046 5.2.1).
  assert.equal(sevenBitReport(dsnOf(utf8("Subject: hello\r\n\r\nGr\u00fc\u00dfe\r\n"), "FULL")), null);
  // UTF-8 in the report's own header (a UTF-8 To:), or not a multipart at all.
  assert.equal(sevenBitReport(Buffer.from(dsnOf(internationalOriginal, "HDRS").toString("utf8").replace("To: <alice@origin.test>", "To: <\u7528\u6237@origin.test>"), "utf8")), null);
  assert.equal(sevenBitReport(internationalOriginal), null);
});
