import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { addAccount, addDomain } from "@mailstack/db";
import { FINAL_STATES, INSERT_MESSAGES_SQL, insertMessages, stillPending } from "../src/index.ts";

// A young table (no statistics yet) full of pending deliveries: the state in which the planner
// thought deliveries_pending tiny and scanned all of it to find a handful of rows by id.
let db: TestDatabase;
let ids: number[] = [];
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "plans.test");
  const account = await addAccount(db.pool, { address: "pat@plans.test", password: "x" });
  const route = { kind: "local" as const, accountId: account.id, address: "pat@plans.test" };
  for (let i = 0; i < 20; i++) {
    const batch = Array.from({ length: 100 }, () => ({
      message: { raw: Buffer.from("Subject: plan\r\n\r\nbody\r\n"), envelopeFrom: "s@remote.test", source: "inbound" as const },
      deliveries: [{ recipient: route.address, route }],
    }));
    ids.push(...(await insertMessages(db.pool, batch, "test")).flatMap((a) => a.deliveries.map((d) => d.id)));
  }
  ids = ids.slice(-5);
});
after(async () => db.drop());

async function plan(sql: string, params: unknown[]): Promise<string> {
  return (await db.pool.query(`EXPLAIN ${sql}`, params)).rows.map((r) => r["QUERY PLAN"]).join("\n");
}

test("stillPending is the complement of the final states", () => {
  assert.equal(stillPending("d.state"), "d.state NOT IN ('delivered', 'bounced', 'cancelled')");
  assert.deepEqual([...FINAL_STATES].sort(), ["bounced", "cancelled", "delivered"]);
});

test("statements that find pending deliveries by id look them up by primary key", async () => {
  const plans = [
    await plan(`SELECT id FROM deliveries WHERE id = ANY($1) AND ${stillPending()} ORDER BY id FOR NO KEY UPDATE`, [ids]),
    await plan(`SELECT id FROM deliveries WHERE id = $1 AND ${stillPending()} FOR NO KEY UPDATE`, [ids[0]]),
    await plan(
      `UPDATE deliveries d SET state = r.state FROM unnest($1::bigint[], $2::text[]) AS r(id, state)
        WHERE d.id = r.id AND d.lease_owner = 'w' AND ${stillPending("d.state")}`,
      [ids, ids.map(() => "delivered")],
    ),
    await plan(
      `UPDATE deliveries SET lease_owner = 'w' WHERE id = ANY($1) AND message_id > 0 AND kind = 'remote'
          AND ${stillPending()} AND (state <> 'deferred' OR next_attempt_at <= now())`,
      [ids],
    ),
  ];
  for (const text of plans) {
    assert.match(text, /deliveries_pkey/, text);
    assert.doesNotMatch(text, /deliveries_pending|Seq Scan on deliveries/, text);
  }
});

test("the accept statement, prepared once per connection, keeps a generic plan that reads no big table", async () => {
  const client = await db.pool.connect();
  try {
    await client.query("SET plan_cache_mode = force_generic_plan");
    const types = ["bytea", "text[]", "int[]", "int[]", ...Array(11).fill("text[]"), "text[]", "text[]", "text[]", "text[]", "bigint[]", ...Array(4).fill("text[]"), "text"];
    await client.query(`PREPARE accept_generic(${types.join(", ")}) AS ${INSERT_MESSAGES_SQL}`);
    const args = ["'\\x00'", ...Array(types.length - 2).fill("'{}'"), "'test'"];
    const text = (await client.query(`EXPLAIN EXECUTE accept_generic(${args.join(", ")})`)).rows.map((r) => r["QUERY PLAN"]).join("\n");
    assert.match(text, /Insert on messages/, text);
    assert.doesNotMatch(text, /Scan (using \S+ )?on (deliveries|messages|mailbox_entries)\b/, text);
  } finally {
    await client.query("DEALLOCATE ALL").catch(() => undefined);
    client.release();
  }
});
