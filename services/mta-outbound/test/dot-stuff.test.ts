import assert from "node:assert/strict";
import { test } from "node:test";
import { DotStuffer, dotStuff, hasEightBit } from "../src/dot-stuff.ts";

test("line endings become CRLF, leading dots are doubled, the end is CRLF.CRLF", () => {
  const cases: Array<[string, string]> = [
    ["", ".\r\n"],
    ["a", "a\r\n.\r\n"],
    ["a\r\n", "a\r\n.\r\n"],
    ["a\nb\rc\r\nd", "a\r\nb\r\nc\r\nd\r\n.\r\n"],
    [".\r\n", "..\r\n.\r\n"],
    ["x\n.\nMAIL FROM:<e@x>\r\n", "x\r\n..\r\nMAIL FROM:<e@x>\r\n.\r\n"],
    ["x\r\n.\r\n", "x\r\n..\r\n.\r\n"],
    ["a\r\r\nb", "a\r\n\r\nb\r\n.\r\n"],
    ["end\r", "end\r\n.\r\n"],
    ["..x", "...x\r\n.\r\n"],
  ];
  for (const [input, expected] of cases) assert.equal(dotStuff(Buffer.from(input)).toString(), expected, JSON.stringify(input));
});

test("state carries across chunk boundaries: any split gives the same bytes", () => {
  const input = Buffer.from("head\r\n\r\n.dot\r\nline\r.\n..\r\n\rtail\r");
  const whole = dotStuff(input).toString();
  for (let a = 0; a <= input.length; a++) {
    for (let b = a; b <= input.length; b++) {
      const s = new DotStuffer();
      const out = Buffer.concat([s.push(input.subarray(0, a)), s.push(input.subarray(a, b)), s.push(input.subarray(b)), s.end()]).toString();
      assert.equal(out, whole, `split at ${a},${b}`);
    }
  }
  assert.doesNotMatch(whole, /\r(?!\n)|(?<!\r)\n/, "no bare CR or LF left");
});

test("8-bit detection", () => {
  assert.equal(hasEightBit(Buffer.from("plain ascii\r\n")), false);
  assert.equal(hasEightBit(Buffer.from("caf\u00e9")), true);
});
