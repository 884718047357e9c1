import { test } from "node:test";
import assert from "node:assert/strict";
import { Readable } from "node:stream";
import { asctime, mboxrdEntry, parseAsctime, readMboxrd, readTar, returnPath, tarStream, MailboxIoError } from "../src/index.ts";

const tricky: Buffer[] = [
  Buffer.from("From: a@example.test\r\nSubject: one\r\n\r\nFrom the start\r\n>From quoted once\r\n>>From twice\r\nFromage\r\n"),
  Buffer.from("Subject: bare LF\n\nFrom here\nno final newline"),
  Buffer.from("Subject: ends with blank lines\r\n\r\nbody\r\n\r\n\r\n"),
  Buffer.from("Subject: binary\r\n\r\n\x00\xff\xfe\r\nFrom \r\n", "latin1"),
  Buffer.alloc(0),
  Buffer.from("From x"),
];

async function* chunks(data: Buffer, size: number) {
  for (let i = 0; i < data.length; i += size) yield data.subarray(i, i + size);
}

test("mboxrd quotes From lines and reads every message back byte for byte, whatever the chunking", async () => {
  const when = new Date(Date.UTC(2026, 10, 7, 9, 5, 3));
  const file = Buffer.concat(tricky.flatMap((raw, i) => mboxrdEntry(i % 2 ? "" : `s${i}@example.test`, when, raw)));
  const text = file.toString("latin1");
  assert.ok(text.startsWith("From s0@example.test Sat Nov  7 09:05:03 2026\n"));
  assert.ok(text.includes("\r\n>From the start\r\n>>From quoted once\r\n>>>From twice\r\nFromage"));
  assert.ok(text.includes("\nFrom MAILER-DAEMON Sat Nov  7 09:05:03 2026\n"));
  for (const size of [1, 7, 64, 1 << 20]) {
    const back = [];
    for await (const message of readMboxrd(chunks(file, size), 1 << 20)) back.push(message);
    assert.equal(back.length, tricky.length, `chunk size ${size}`);
    back.forEach((message, i) => {
      assert.ok(message.raw.equals(tricky[i]!), `message ${i} with chunk size ${size}`);
      assert.equal(message.envelopeFrom, i % 2 ? "" : `s${i}@example.test`);
      assert.equal(message.receivedAt?.getTime(), when.getTime());
    });
  }
});

test("mbox reading refuses a file without a From line and a message over the limit", async () => {
  await assert.rejects(async () => {
    for await (const _ of readMboxrd(Readable.from([Buffer.from("Subject: x\n\nbody\n")]), 1000));
  }, /does not start with a "From " line/);
  const big = Buffer.concat(mboxrdEntry("a@b.test", new Date(), Buffer.from("line\n".repeat(1000))));
  await assert.rejects(async () => {
    for await (const _ of readMboxrd(chunks(big, 100), 1000));
  }, /a message is larger than the limit of 1000 bytes/);
  const longLine = Buffer.concat(mboxrdEntry("a@b.test", new Date(), Buffer.alloc(5000, "a")));
  await assert.rejects(async () => {
    for await (const _ of readMboxrd(chunks(longLine, 100), 1000));
  }, /longer than the limit of 1000 bytes/);
});

test("asctime round-trips", () => {
  const date = new Date(Date.UTC(2026, 0, 31, 23, 59, 59));
  assert.equal(asctime(date), "Sat Jan 31 23:59:59 2026");
  assert.equal(parseAsctime(asctime(date))?.getTime(), date.getTime());
  assert.equal(parseAsctime("not a date"), null);
});

test("tar of .eml files reads back byte for byte, including long folder paths", async () => {
  const files = [
    { path: "INBOX/1.eml", bytes: Buffer.from("Subject: a\r\n\r\nA\r\n"), mtime: new Date(1_700_000_000_000) },
    { path: `${"deep/".repeat(30)}7.eml`, bytes: Buffer.alloc(1025, 0x61), mtime: new Date(1_700_000_001_000) },
    { path: "Sent/2.eml", bytes: Buffer.alloc(0), mtime: new Date(1_700_000_002_000) },
  ];
  async function* source() {
    yield* files;
  }
  const parts: Buffer[] = [];
  for await (const part of tarStream(source())) parts.push(part);
  const tar = Buffer.concat(parts);
  assert.equal(tar.length % 512, 0);
  const back = [];
  for await (const file of readTar(chunks(tar, 333), 1 << 20)) back.push(file);
  assert.deepEqual(back.map((f) => f.path), files.map((f) => f.path));
  back.forEach((f, i) => {
    assert.ok(f.bytes.equals(files[i]!.bytes));
    assert.equal(f.mtime.getTime(), files[i]!.mtime.getTime());
  });
  await assert.rejects(async () => {
    for await (const _ of readTar(chunks(tar.subarray(0, 700), 100), 1 << 20));
  }, MailboxIoError);
});

test("an .eml file's envelope sender is its Return-Path, looked for in the header section only", () => {
  const eml = (text: string) => returnPath(Buffer.from(text));
  assert.equal(eml("Return-Path: <a@x.test>\r\nSubject: s\r\n\r\nbody\r\n"), "a@x.test");
  assert.equal(eml("Subject: s\nReturn-Path:\n <b@x.test>\n\nbody\n"), "b@x.test");
  assert.equal(eml("Return-Path: <>\r\n\r\n"), "");
  // The header ends at the first empty line, LF or CRLF: a Return-Path in the body is not the sender.
  assert.equal(eml("Subject: s\n\nReturn-Path: <body@x.test>\r\n\r\nmore\r\n"), "");
  assert.equal(eml("Subject: s\r\n\nReturn-Path: <body@x.test>\r\n\r\nmore\r\n"), "");
  // An empty first line: no header fields at all.
  assert.equal(eml("\r\nReturn-Path: <body@x.test>\r\n\r\nmore\r\n"), "");
  // No empty line: all header.
  assert.equal(eml("Subject: s\r\nReturn-Path: <c@x.test>\r\n"), "c@x.test");
});
