import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { addAccount, addDomain } from "@mailstack/db";
import { INSERT_MESSAGES_SQL, insertMessages } from "@mailstack/queue";
import { BATCH_ROWS_SQL, FILE_BATCH_SQL, LOCK_PENDING_SQL } from "../src/batch.ts";

// The MDA's batch statements and the accept statement are prepared once per connection, and
// PostgreSQL then runs them with a generic plan, made without the parameters' values. Such a plan
// must still find rows by key: a scan of deliveries per batch grows with the table (an earlier
// attempt at prepared statements slowed down round after round for that reason).
let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "generic.test");
  const account = await addAccount(db.pool, { address: "gil@generic.test", password: "x" });
  const route = { kind: "local" as const, accountId: account.id, address: "gil@generic.test" };
  for (let i = 0; i < 20; i++) {
    const batch = Array.from({ length: 100 }, () => ({
      message: { raw: Buffer.alloc(2000, 0x61), envelopeFrom: "s@remote.test", source: "inbound" as const },
      deliveries: [{ recipient: route.address, route }],
    }));
    await insertMessages(db.pool, batch, "test");
  }
});
after(async () => db.drop());

async function genericPlan(name: string, sql: string, types: string[], args: string[]): Promise<string> {
  const client = await db.pool.connect();
  try {
    await client.query("SET plan_cache_mode = force_generic_plan");
    await client.query(`PREPARE ${name}(${types.join(", ")}) AS ${sql}`);
    const rows = (await client.query(`EXPLAIN EXECUTE ${name}(${args.join(", ")})`)).rows;
    return rows.map((r) => r["QUERY PLAN"]).join("\n");
  } finally {
    client.release();
  }
}

test("generic plans of the prepared statements look rows up by key, never scan the big tables", async () => {
  const plans = [
    await genericPlan("rows", BATCH_ROWS_SQL, ["bigint[]", "bigint"], ["'{1,2,3}'", "1000"]),
    await genericPlan("lock", LOCK_PENDING_SQL, ["bigint[]"], ["'{1,2,3}'"]),
    await genericPlan(
      "file",
      FILE_BATCH_SQL,
      ["bigint[]", "jsonb[]", "bigint[]", "bigint[]", "bigint[]", "text[]", "bigint[]", "bigint[]", "bigint[]", "bytea[]", "bigint[]", "text[]", "text", "jsonb[]"],
      ["'{}'", "'{}'", "'{1}'", "'{10}'", "'{1}'", "'{INBOX}'", "'{99}'", "'{1}'", "'{1}'", "'{\"\\\\x00\"}'", "'{10}'", "'{r}'", "'mda'", "'{\"{}\"}'"],
    ),
  ];
  for (const plan of plans) {
    assert.doesNotMatch(plan, /Seq Scan on (deliveries|messages|mailbox_entries)\b/, plan);
    assert.doesNotMatch(plan, /deliveries_pending/, plan);
  }
  assert.match(plans[2]!, /Index Cond: \(id = ANY/, plans[2]);
});

test("the accept statement's generic plan writes without reading the big tables", async () => {
  const plan = await genericPlan(
    "accept",
    INSERT_MESSAGES_SQL,
    ["bytea", ...Array(14).fill("text[]").map((t, i) => (i === 1 || i === 2 ? "int[]" : t)), ...Array(9).fill("text[]").map((t, i) => (i === 4 ? "bigint[]" : t)), "text"],
    ["'\\x00'", ...Array(14).fill("'{}'"), ...Array(9).fill("'{}'"), "'x'"],
  );
  assert.doesNotMatch(plan, /Seq Scan on (deliveries|messages|mailbox_entries)\b/, plan);
});
