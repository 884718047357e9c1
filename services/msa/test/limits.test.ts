import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";
import { addAccount, addDomain, type Pool } from "@mailstack/db";
import { createSubmissionLimiter } from "../src/limits.ts";

let db: TestDatabase;
let ids: number[];
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "limits.test");
  ids = [];
  for (const name of ["ann", "ben", "cat"]) ids.push((await addAccount(db.pool, { address: `${name}@limits.test`, password: "x" })).id);
});
after(async () => db.drop());

/** The real pool, counting the statements sent through it. */
function counting(pool: Pool): { pool: Pool; statements: () => number } {
  let n = 0;
  const proxy = new Proxy(pool, {
    get(target, key, receiver) {
      if (key === "query") return (...args: unknown[]) => ((n++, (target.query as (...a: unknown[]) => unknown).apply(target, args)));
      return Reflect.get(target, key, receiver);
    },
  });
  return { pool: proxy, statements: () => n };
}

async function stored(accountId: number): Promise<{ messages: number; recipients: number } | undefined> {
  return (await db.pool.query("SELECT messages, recipients FROM submission_counters WHERE account_id = $1", [accountId])).rows[0];
}

test("counts are exact at once in the process and written together, not one statement per message", async () => {
  const { pool, statements } = counting(db.pool);
  const limiter = createSubmissionLimiter(pool, { maxMessages: 5, maxRecipients: 100, windowMs: 3_600_000 }, { flushMs: 50, refreshMs: 60_000 });
  const [ann, ben] = [ids[0]!, ids[1]!];
  assert.deepEqual(await limiter.usage(ann), { messages: 0, recipients: 0 });
  assert.deepEqual(await limiter.usage(ben), { messages: 0, recipients: 0 });
  const afterReads = statements();
  for (let i = 0; i < 4; i++) {
    assert.ok(limiter.messageAllowed(await limiter.usage(ann)));
    limiter.record(ann, 2);
  }
  limiter.record(ben, 1);
  assert.deepEqual(await limiter.usage(ann), { messages: 4, recipients: 8 });
  limiter.record(ann, 1);
  assert.equal(limiter.messageAllowed(await limiter.usage(ann)), false, "the fifth message used up the limit");
  assert.equal(statements(), afterReads, "no statement for the checks and counts themselves");
  await limiter.flush();
  assert.equal(statements(), afterReads + 1, "one statement wrote both accounts");
  assert.deepEqual(await stored(ann), { messages: 5, recipients: 9 });
  assert.deepEqual(await stored(ben), { messages: 1, recipients: 1 });
  // Written counts are not counted twice afterwards.
  assert.deepEqual(await limiter.usage(ann), { messages: 5, recipients: 9 });
});

test("another replica's counts arrive with the next read; a timed write happens by itself", async () => {
  const cat = ids[2]!;
  const limits = { maxMessages: 3, maxRecipients: 0, windowMs: 3_600_000 };
  const first = createSubmissionLimiter(db.pool, limits, { flushMs: 20, refreshMs: 0 });
  const second = createSubmissionLimiter(db.pool, limits, { flushMs: 20, refreshMs: 0 });
  first.record(cat, 1);
  first.record(cat, 1);
  const deadline = Date.now() + 5_000;
  while ((await stored(cat))?.messages !== 2) {
    assert.ok(Date.now() < deadline, "the timed write did not happen");
    await new Promise((r) => setTimeout(r, 10));
  }
  second.record(cat, 1);
  assert.equal((await second.usage(cat)).messages, 3);
  assert.equal(second.messageAllowed(await second.usage(cat)), false);
  await second.flush();
  assert.equal((await first.usage(cat)).messages, 3);
});

test("a write that fails keeps its counts for the next one", async () => {
  const dan = (await addAccount(db.pool, { address: "dan@limits.test", password: "x" })).id;
  let failNext = true;
  const flaky = new Proxy(db.pool, {
    get(target, key, receiver) {
      if (key !== "query") return Reflect.get(target, key, receiver);
      return (...args: unknown[]) => {
        if (failNext && String(args[0]).startsWith("INSERT INTO submission_counters")) {
          failNext = false;
          return Promise.reject(new Error("the database went away"));
        }
        return (target.query as (...a: unknown[]) => unknown).apply(target, args);
      };
    },
  });
  const limiter = createSubmissionLimiter(flaky, { maxMessages: 10, maxRecipients: 0, windowMs: 3_600_000 }, { flushMs: 60_000, refreshMs: 60_000 });
  await limiter.usage(dan);
  limiter.record(dan, 3);
  limiter.record(dan, 1);
  await assert.rejects(limiter.flush(), /went away/);
  assert.deepEqual(await limiter.usage(dan), { messages: 2, recipients: 4 }, "still counted in the process");
  assert.equal(await stored(dan), undefined);
  await limiter.flush();
  assert.deepEqual(await stored(dan), { messages: 2, recipients: 4 });
});
