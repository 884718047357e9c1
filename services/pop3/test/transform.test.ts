import { test } from "node:test";
import assert from "node:assert/strict";
import { canonicalLength, MessageEncoder } from "../src/transform.ts";

function encode(input: string[], options: { stuff?: boolean; bodyLines?: number | null } = {}): string {
  const encoder = new MessageEncoder(options);
  const parts = input.map((chunk) => encoder.push(Buffer.from(chunk, "latin1")));
  parts.push(encoder.end());
  return Buffer.concat(parts).toString("latin1");
}

test("CRLF stays, bare LF becomes CRLF, a final CRLF is added, bare CR passes through", () => {
  assert.equal(encode(["a\r\nb\nc"]), "a\r\nb\r\nc\r\n");
  assert.equal(encode(["x\ry\r\n"]), "x\ry\r\n");
  assert.equal(encode([""]), "");
  assert.equal(encode(["abc\r"]), "abc\r\n");
});

test("line endings split across chunks are handled once", () => {
  assert.equal(encode(["a\r", "\nb\r", "", "\n"]), "a\r\nb\r\n");
  assert.equal(encode(["a", "\n", "\n"]), "a\r\n\r\n");
});

test("lines starting with a dot are byte-stuffed, also across chunk boundaries", () => {
  assert.equal(encode([".hidden\r\n..two\r\nmid.dle\r\n.\r\n"]), "..hidden\r\n...two\r\nmid.dle\r\n..\r\n");
  assert.equal(encode(["a\r\n", ".b\n", "."]), "a\r\n..b\r\n..\r\n");
  assert.equal(encode([".x"], { stuff: false }), ".x\r\n");
});

test("canonical length equals the unstuffed output length", () => {
  const samples = ["a\nb\n", "a\r\n.b\r\n", "no newline", "\n\n\n", "x\r\ry\n"];
  for (const sample of samples) {
    const unstuffed = encode([sample], { stuff: false });
    assert.equal(canonicalLength([Buffer.from(sample, "latin1")]), Buffer.byteLength(unstuffed, "latin1"), JSON.stringify(sample));
  }
});

test("TOP: header, blank line, then n body lines", () => {
  const message = "Subject: s\r\nFrom: a\r\n\r\nl1\r\n.l2\r\nl3\r\n";
  assert.equal(encode([message], { bodyLines: 0 }), "Subject: s\r\nFrom: a\r\n\r\n");
  assert.equal(encode([message], { bodyLines: 2 }), "Subject: s\r\nFrom: a\r\n\r\nl1\r\n..l2\r\n");
  assert.equal(encode([message], { bodyLines: 99 }), "Subject: s\r\nFrom: a\r\n\r\nl1\r\n..l2\r\nl3\r\n");
  // Bare-LF separators count as lines too.
  assert.equal(encode(["H: v\n\nbody1\nbody2\n"], { bodyLines: 1 }), "H: v\r\n\r\nbody1\r\n");
  // A message with no body: everything.
  assert.equal(encode(["H: v\r\n"], { bodyLines: 0 }), "H: v\r\n");
});
