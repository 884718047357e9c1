import assert from "node:assert/strict";
import { test } from "node:test";
import { composeDsn } from "@mailstack/dsn";
import { hasUtf8HeaderFields } from "../src/mime-utf8.ts";

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
  // Only the recipient address is UTF-8: message/global-delivery-status, and the returned message's header is ASCII.
  const ascii = utf8("From: <alice@origin.test>\r\nSubject: hello\r\n\r\nGr\u00fc\u00dfe\r\n");
  const aboutRecipient = dsnOf(ascii, "FULL", "\u7528\u6237@far.test");
  assert.match(aboutRecipient.toString(), /Content-Type: message\/global-delivery-status\r\n/);
  assert.equal(hasUtf8HeaderFields(aboutRecipient), false);
  assert.equal(hasUtf8HeaderFields(dsnOf(ascii, "FULL")), false, "an 8-bit body in message/rfc822");
});
