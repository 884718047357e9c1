import { test } from "node:test";
import assert from "node:assert/strict";
import { ConnectionSlots } from "../src/connection-slots.ts";

test("connection slots: per address and in all, exempt addresses uncounted per address, a slot given back once", () => {
  const slots = new ConnectionSlots({ max: 3, maxPerIp: 2, exempt: ["127.0.0.1"] });
  const a1 = slots.admit("192.0.2.1");
  const a2 = slots.admit("192.0.2.1");
  assert.ok(a1 && a2, "two from one address");
  assert.equal(slots.admit("192.0.2.1"), null, "third from one address");
  const local = slots.admit("127.0.0.1");
  assert.ok(local, "an exempt address has no per-address bound");
  assert.equal(slots.admit("192.0.2.2"), null, "the total is reached");
  a1();
  a1();
  assert.ok(slots.admit("192.0.2.1"), "one slot back, not two");
  assert.equal(slots.admit("192.0.2.2"), null);
  local!();
  assert.ok(slots.admit("192.0.2.2"));
  assert.ok(new ConnectionSlots({ maxPerIp: 1 }).admit("198.51.100.1"), "no total given: unbounded in all");
});
