// A page of the queue list reads about a page of deliveries whatever its filter: each state is a
// range of an index in id order (deliveries_pending for the waiting states,
// deliveries_bounced_cancelled, deliveries_domain with a destination domain), or, for delivered
// rows where they are most of the table, a walk of the primary key that finds one nearly at
// every step. Never a walk past thousands of other rows, nor a domain checked row by row.
// Checked with EXPLAIN ANALYZE on a table where most rows are of other states and other domains.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { analyzeTableScans, createTestDatabase, type TableScans, type TestDatabase } from "@mailstack/testkit";
import { addAccount, addDomain, type Queryable } from "@mailstack/db";
import { listQueue, type QueueFilter } from "../src/index.ts";

const ROWS = 100_000;
let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "local.test");
  const account = await addAccount(db.pool, { address: "pat@local.test", password: "x" });
  await db.pool.query(
    `INSERT INTO messages (queue_id, raw, size, envelope_from, source)
     SELECT 'Q' || g, convert_to('Subject: plan ' || g || E'\\r\\n\\r\\nbody\\r\\n', 'UTF8'), 30, 's@remote.test', 'inbound' FROM generate_series(1, 1000) g`,
  );
  // Per 200 deliveries, local and remote alike: 2 queued, 2 deferred, 2 bounced, 1 cancelled, the
  // rest delivered. Every other one is remote: mostly to big.test, one in 53 to rare.test.
  await db.pool.query(
    `INSERT INTO deliveries (message_id, recipient, final_recipient, kind, account_id, remote_domain, state)
     SELECT m.id, r, r, k, CASE WHEN k = 'local' THEN $1::bigint END, d,
            CASE WHEN g / 2 % 200 < 2 THEN 'queued' WHEN g / 2 % 200 < 4 THEN 'deferred' WHEN g / 2 % 200 < 6 THEN 'bounced'
                 WHEN g / 2 % 200 < 7 THEN 'cancelled' ELSE 'delivered' END
       FROM generate_series(1, $2::int) g
       CROSS JOIN LATERAL (SELECT CASE WHEN g % 2 = 0 THEN 'remote' ELSE 'local' END AS k,
                                  CASE WHEN g % 2 = 1 THEN NULL WHEN g / 2 % 53 = 7 THEN 'rare.test' WHEN g / 2 % 10 = 3 THEN 'other.test' ELSE 'big.test' END AS d) kd
       CROSS JOIN LATERAL (SELECT 'r' || g || '@' || coalesce(kd.d, 'local.test') AS r) rr
       JOIN messages m ON m.id = (SELECT min(id) FROM messages) + g % 1000`,
    [account.id, ROWS],
  );
  await db.pool.query("ANALYZE deliveries; ANALYZE messages");
});
after(async () => db.drop());

/** Runs listQueue, then EXPLAIN ANALYZEs the statement it sent. */
async function pageScan(filter: QueueFilter): Promise<TableScans & { entries: number }> {
  let sent: { text: string; values: unknown[] } | undefined;
  const recorder = {
    query: (text: string, values: unknown[] = []) => {
      sent = { text, values };
      return db.pool.query(text, values);
    },
  } as unknown as Queryable;
  const page = await listQueue(recorder, filter);
  assert.ok(sent, "listQueue sent a query");
  return { ...(await analyzeTableScans(db.pool, sent, "deliveries")), entries: page.entries.length };
}

test("a page of the queue list, by any state and destination domain, reads about a page of deliveries", async () => {
  const middle = (await db.pool.query("SELECT min(id) + $1::int AS id FROM deliveries", [ROWS / 2])).rows[0].id as number;
  const limit = 25;
  for (const state of [undefined, "queued", "deferred", "delivered", "bounced", "cancelled"]) {
    for (const domain of [undefined, "big.test", "rare.test"]) {
      for (const afterId of [0, Number(middle)]) {
        const filter: QueueFilter = { limit, after: afterId, ...(state ? { state } : {}), ...(domain ? { domain } : {}) };
        const scanned = await pageScan(filter);
        const label = `${JSON.stringify(filter)}: ${scanned.scans.join(", ")}`;
        assert.ok(scanned.entries > 0, `${label}: the page is not empty`);
        assert.ok(!scanned.scans.some((scan) => scan.startsWith("Seq Scan") || scan.startsWith("Bitmap")), `no scan of the whole table: ${label}`);
        // About a page per state. Where most rows match (delivered, to big.test) the planner may
        // walk the primary key instead of an index range, which reads about as few; where one row
        // in a hundred matches, such a walk (the only way without the index) reads thousands.
        const states = state ? 1 : 2;
        assert.ok(scanned.rows <= 4 * states * (limit + 1), `${label} scanned ${scanned.rows} delivery rows (${ROWS} in all)`);
      }
    }
  }
});
