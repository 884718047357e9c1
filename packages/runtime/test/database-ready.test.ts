import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createPool, type Pool } from "@mailstack/db";
import { createTestDatabase, freePort, type TestDatabase } from "../../testkit/src/index.ts";
import { databaseReadiness } from "../src/database-ready.ts";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
});
after(async () => db?.drop());

test("a saturated pool that keeps returning healthy clients is ready at once, without queueing SELECT 1 behind the work", async () => {
  const pool: Pool = createPool({ url: db.url, max: 2 });
  const ready = databaseReadiness(pool, { recentMs: 5_000, timeoutMs: 1_000 });
  let busy = true;
  // Two workers keep both connections in slow queries, as a service under load does.
  const workers = [0, 1].map(async () => {
    while (busy) await pool.query("SELECT pg_sleep(0.4)");
  });
  try {
    await new Promise((resolve) => setTimeout(resolve, 600));
    const started = Date.now();
    assert.equal(await ready(), true);
    assert.ok(Date.now() - started < 100, `answered in ${Date.now() - started} ms`);
  } finally {
    busy = false;
    await Promise.all(workers);
    await pool.end();
  }
});

test("an idle pool is asked SELECT 1; an unreachable database is not ready within the timeout", async () => {
  const idle: Pool = createPool({ url: db.url, max: 1 });
  assert.equal(await databaseReadiness(idle)(), true);
  await idle.end();

  const url = new URL(db.url);
  url.port = String(await freePort());
  const unreachable: Pool = createPool({ url: url.toString(), max: 1 });
  const started = Date.now();
  assert.equal(await databaseReadiness(unreachable, { timeoutMs: 1_000 })(), false);
  assert.ok(Date.now() - started < 1_500, `gave up after ${Date.now() - started} ms`);
  await unreachable.end();
});
