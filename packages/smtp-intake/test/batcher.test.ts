import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { addAccount, addDomain, type AccountRow } from "@mailstack/db";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { AcceptBatcher } from "../src/batcher.ts";

let db: TestDatabase;
let account: AccountRow;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "example.test");
  account = await addAccount(db.pool, { address: "user@example.test", password: "x" });
});
after(async () => db.drop());

const delivery = () => [{ recipient: "user@example.test", route: { kind: "local" as const, accountId: account.id, address: "user@example.test" } }];
const message = (bytes: number, subject: string) => ({
  raw: Buffer.from(`Subject: ${subject}\r\n\r\n${"x".repeat(bytes)}\r\n`),
  envelopeFrom: "sender@remote.example",
  source: "inbound" as const,
});

/** The transaction that wrote each message (rows written by one transaction share xmin). */
async function writers(queueIds: string[]): Promise<Map<string, string>> {
  const rows = await db.pool.query<{ queue_id: string; xmin: string }>("SELECT queue_id, xmin::text FROM messages WHERE queue_id = ANY($1)", [queueIds]);
  return new Map(rows.rows.map((r) => [r.queue_id, r.xmin]));
}

test("small messages arriving together share a commit; a large one commits alone beside them", async () => {
  const batcher = new AcceptBatcher(db.pool, "test", { concurrency: 1, soloAboveBytes: 64 * 1024 });
  const first = batcher.accept(message(100, "first"), delivery());
  const large = batcher.accept(message(2 * 1024 * 1024, "large"), delivery());
  // These queue behind the first small message's transaction and go together in the next one.
  const small = Array.from({ length: 5 }, (_, i) => batcher.accept(message(100, `small ${i}`), delivery()));
  const accepted = await Promise.all([first, large, ...small]);
  await batcher.idle();

  const xmin = await writers(accepted.map((a) => a.queueId));
  assert.equal(xmin.size, 7, "every message was committed");
  const smallWriters = new Set(accepted.slice(2).map((a) => xmin.get(a.queueId)));
  assert.equal(smallWriters.size, 1, "the five small messages were one transaction");
  const largeWriter = xmin.get(accepted[1]!.queueId);
  assert.ok(![...smallWriters, xmin.get(accepted[0]!.queueId)].includes(largeWriter), "the large message was a transaction of its own");
  assert.equal(batcher.stats.transactions, 3);
});
