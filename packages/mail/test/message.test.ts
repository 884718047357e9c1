import { test } from "node:test";
import assert from "node:assert/strict";
import { headerBoundary } from "../src/index.ts";

function split(text: string): { header: string; body: string } | null {
  const raw = Buffer.from(text, "latin1");
  const boundary = headerBoundary(raw);
  if (!boundary) return null;
  assert.ok(boundary.headerEnd <= boundary.bodyStart);
  return { header: raw.subarray(0, boundary.headerEnd).toString("latin1"), body: raw.subarray(boundary.bodyStart).toString("latin1") };
}

test("headerBoundary: the first empty line, ended by CRLF or a bare LF, splits header fields from the body", () => {
  assert.deepEqual(split("A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n"), { header: "A: 1\r\nB: 2", body: "body\r\n\r\nmore\r\n" });
  assert.deepEqual(split("A: 1\nB: 2\n\nbody\n"), { header: "A: 1\nB: 2", body: "body\n" });
  // Mixed line ends: the first empty line of any kind counts, not the first CRLF CRLF.
  assert.deepEqual(split("A: 1\r\n\nbody\r\n\r\nmore"), { header: "A: 1", body: "body\r\n\r\nmore" });
  assert.deepEqual(split("A: 1\n\r\nbody\r\n\r\nmore"), { header: "A: 1", body: "body\r\n\r\nmore" });
  assert.deepEqual(split("A: 1\n\nbody\r\n\r\nmore"), { header: "A: 1", body: "body\r\n\r\nmore" });
  // A folded field is still header; a bare CR is not a line break.
  assert.deepEqual(split("A: 1\r\n 2\r\n\r\n"), { header: "A: 1\r\n 2", body: "" });
  assert.deepEqual(split("A: 1\r\r\nB\r\n\r\nbody"), { header: "A: 1\r\r\nB", body: "body" });
});

test("headerBoundary: a message that starts with an empty line has no header fields", () => {
  assert.deepEqual(split("\r\nbody\r\n\r\nReturn-Path: <x@y>\r\n"), { header: "", body: "body\r\n\r\nReturn-Path: <x@y>\r\n" });
  assert.deepEqual(split("\nbody\n\nmore"), { header: "", body: "body\n\nmore" });
  assert.deepEqual(split("\r\n"), { header: "", body: "" });
  assert.deepEqual(headerBoundary(Buffer.from("\r\n\r\nbody")), { headerEnd: 0, bodyStart: 2 });
});

test("headerBoundary: null without an empty line (header fields only, or nothing)", () => {
  assert.equal(split("A: 1\r\nB: 2\r\n"), null);
  assert.equal(split("A: 1"), null);
  assert.equal(split(""), null);
  assert.equal(split("\r"), null);
  assert.equal(split("A: 1\r\n\r"), null);
});

test("headerBoundary: offsets into the message", () => {
  assert.deepEqual(headerBoundary(Buffer.from("A: 1\r\n\r\nbody")), { headerEnd: 4, bodyStart: 8 });
  assert.deepEqual(headerBoundary(Buffer.from("A: 1\n\nbody")), { headerEnd: 4, bodyStart: 6 });
  assert.deepEqual(headerBoundary(Buffer.from("A: 1\r\n\n")), { headerEnd: 4, bodyStart: 7 });
});
