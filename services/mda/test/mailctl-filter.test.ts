import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { listFilterRules } from "@mailstack/db";
import { createTestDatabase, runMailctl, type TestDatabase } from "@mailstack/testkit";
import { account } from "./helpers.ts";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await account(db.pool, "rules@example.test");
});
after(async () => db.drop());

function mailctl(args: string[]) {
  return runMailctl(db.url, args);
}

test("mailctl filter add, list and remove manage an account's rules in order", async () => {
  const a = await mailctl(["filter", "add", "rules@example.test", "--header", "Subject", "--contains", "invoice", "--fileinto", "Bills"]);
  assert.equal(a.code, 0, a.stderr);
  const b = await mailctl(["filter", "add", "rules@example.test", "--size-over", "10M", "--discard"]);
  assert.equal(b.code, 0, b.stderr);
  const c = await mailctl(["filter", "add", "rules@example.test", "--header", "List-Id", "--exists", "--forward", "Other@Remote.Example", "--keep"]);
  assert.equal(c.code, 0, c.stderr);

  const rules = await listFilterRules(db.pool, "rules@example.test");
  assert.deepEqual(rules.map((r) => [r.position, r.condition, r.header_name, r.op, r.action]), [
    [0, "header", "subject", "contains", "fileinto"],
    [1, "size", null, "over", "discard"],
    [2, "header", "list-id", "exists", "forward"],
  ]);
  assert.equal(rules[1]!.size_bytes, 10 * 1024 * 1024);
  // A forward target leaves the system: its local part's case is kept (RFC 5321 2.4).
  assert.equal(rules[2]!.forward_to, "Other@remote.example");
  assert.equal(rules[2]!.keep_copy, true);

  const list = await mailctl(["filter", "list", "rules@example.test"]);
  assert.equal(list.code, 0, list.stderr);
  const lines = list.stdout.trim().split("\n");
  assert.equal(lines.length, 3);
  assert.match(lines[0]!, /if header subject contains "invoice" then fileinto "Bills"/);

  const removed = await mailctl(["filter", "remove", "rules@example.test", String(rules[1]!.id)]);
  assert.equal(removed.code, 0, removed.stderr);
  assert.equal((await listFilterRules(db.pool, "rules@example.test")).length, 2);
});

test("mailctl filter refuses incomplete or contradictory rules and unknown accounts", async () => {
  const before = (await listFilterRules(db.pool, "rules@example.test")).length;
  const cases = [
    ["filter", "add", "rules@example.test", "--discard"],
    ["filter", "add", "rules@example.test", "--header", "Subject", "--discard"],
    ["filter", "add", "rules@example.test", "--size-over", "1M", "--discard", "--fileinto", "X"],
    ["filter", "add", "rules@example.test", "--size-over", "1M", "--fileinto", "X", "--keep"],
    ["filter", "add", "rules@example.test", "--header", "Bad Name", "--exists", "--discard"],
    ["filter", "add", "rules@example.test", "--size-over", "1M", "--forward", "not an address"],
    ["filter", "add", "nobody@example.test", "--size-over", "1M", "--discard"],
    ["filter", "remove", "rules@example.test", "999999"],
  ];
  for (const args of cases) {
    const result = await mailctl(args);
    assert.notEqual(result.code, 0, `${args.join(" ")} should fail`);
    assert.ok(result.stderr.length > 0);
  }
  assert.equal((await listFilterRules(db.pool, "rules@example.test")).length, before);
});
