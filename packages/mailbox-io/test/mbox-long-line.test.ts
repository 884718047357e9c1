// A long line in an mbox import (up to the message size limit) is read in time linear in its
// length: it used to be joined with each new chunk and searched again from its start, so one
// 50 MB line sent in 16 KiB pieces kept the admin API's CPU busy for minutes.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readMboxrd } from "../src/index.ts";

async function* oneLongLine(lineBytes: number, pieceBytes: number): AsyncGenerator<Buffer> {
  yield Buffer.from("From sender@example.test Thu Jan  1 00:00:00 2024\n");
  const piece = Buffer.alloc(pieceBytes, 0x61);
  for (let sent = 0; sent < lineBytes; sent += pieceBytes) yield piece;
  yield Buffer.from("\nlast line\n");
}

test("a 24 MiB line arriving in 16 KiB pieces is read in linear time", async () => {
  const lineBytes = 24 * 1024 * 1024;
  const started = Date.now();
  const messages = [];
  for await (const message of readMboxrd(oneLongLine(lineBytes, 16 * 1024), 50 * 1024 * 1024)) messages.push(message);
  const elapsed = Date.now() - started;
  assert.equal(messages.length, 1);
  assert.equal(messages[0]!.raw.length, lineBytes + "\nlast line".length);
  assert.ok(messages[0]!.raw.subarray(0, lineBytes).every((b) => b === 0x61));
  assert.equal(messages[0]!.envelopeFrom, "sender@example.test");
  // Linear: well under a second here; the quadratic join took about 20 s.
  assert.ok(elapsed < 4_000, `took ${elapsed} ms`);
});

test("a line over the limit is still refused while it arrives", async () => {
  let pulled = 0;
  async function* counted(): AsyncGenerator<Buffer> {
    for await (const chunk of oneLongLine(8 * 1024 * 1024, 16 * 1024)) {
      pulled += chunk.length;
      yield chunk;
    }
  }
  await assert.rejects(async () => {
    for await (const _ of readMboxrd(counted(), 1024 * 1024));
  }, /a line is longer than the limit of 1048576 bytes/);
  assert.ok(pulled < 2 * 1024 * 1024, `read ${pulled} bytes before refusing`);
});
