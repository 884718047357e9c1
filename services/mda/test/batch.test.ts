import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { addFilterRule, createPool } from "@mailstack/db";
import { FINAL_STATES } from "@mailstack/queue";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { DeliveryBatcher } from "../src/batch.ts";
import { mdaMetrics } from "../src/metrics.ts";
import { account, message, send } from "./helpers.ts";

let env: TestEnv;
before(async () => {
  env = await createTestEnv();
});
after(async () => {
  await env.close();
});

test("a mixed batch: plain copies share one transaction, quota is checked copy by copy, others take the general path", async () => {
  const logger = createLogger("mda-test", "silent");
  const plain = await account(env.pool, "plain@example.test");
  const small = await account(env.pool, "small@example.test", 2_000);
  const ruled = await account(env.pool, "ruled@example.test");
  await addFilterRule(env.pool, "ruled@example.test", { condition: { kind: "header", header: "Subject", op: "contains", value: "b" }, action: { kind: "fileinto", folder: "B" } });

  const ids: number[] = [];
  const add = async (address: string, accountId: number, subject: string, body = "x\r\n") =>
    ids.push((await send(env.pool, null, message(subject, body), [{ address, accountId }])).deliveries[0]!.id);
  for (let i = 0; i < 10; i++) await add("plain@example.test", plain, `p${i}`);
  // Each copy is ~300 bytes: the first few fit in 2,000 bytes, the rest bounce.
  for (let i = 0; i < 10; i++) await add("small@example.test", small, `s${i}`, "y".repeat(200) + "\r\n");
  for (let i = 0; i < 4; i++) await add("ruled@example.test", ruled, `rb${i}`);

  const batcher = new DeliveryBatcher({ pool: env.pool, logger }, { maxBatch: 64, maxParallel: 1 });
  // Every id twice, plus one that does not exist: all in flight at once.
  const outcomes = await Promise.all([...ids, ...ids, 999_999_999].map((id) => batcher.deliver(id)));
  assert.deepEqual(outcomes.at(-1), { status: "missing" });
  const sizes = (await mdaMetrics.batchSize.get()).values;
  const batches = sizes.find((v) => v.metricName === "mail_mda_batch_size_count")!.value;
  assert.ok(batches < ids.length, `${ids.length * 2 + 1} jobs went through ${batches} batches`);

  const entries = (await env.pool.query(
    "SELECT account_id, folder, uid, size, delivery_id FROM mailbox_entries ORDER BY account_id, folder, uid",
  )).rows;
  assert.equal(new Set(entries.map((e) => e.delivery_id)).size, entries.length, "one entry per delivery");
  const plainUids = entries.filter((e) => e.account_id === plain).map((e) => e.uid);
  assert.deepEqual(plainUids, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(entries.filter((e) => e.account_id === ruled).map((e) => `${e.folder}:${e.uid}`), ["B:1", "B:2", "B:3", "B:4"]);

  const smallEntries = entries.filter((e) => e.account_id === small);
  const used = (await env.pool.query("SELECT used_bytes FROM accounts WHERE id = $1", [small])).rows[0].used_bytes;
  assert.equal(used, smallEntries.reduce((sum, e) => sum + Number(e.size), 0));
  assert.ok(used <= 2_000 && used + Number(smallEntries[0].size) > 2_000, `quota filled exactly: ${used}`);
  const states = (await env.pool.query(
    "SELECT state, min(last_reply) AS reply, count(*)::int AS n FROM deliveries WHERE account_id = $1 GROUP BY 1 ORDER BY 1",
    [small],
  )).rows;
  assert.deepEqual(states.map((s) => [s.state, s.n]), [["bounced", 10 - smallEntries.length], ["delivered", smallEntries.length]]);
  assert.equal(states[0].reply, "552 5.2.2 Mailbox full");

  const delivered = (await env.pool.query("SELECT count(*)::int AS n FROM delivery_events WHERE event = 'delivered'")).rows[0].n;
  assert.equal(delivered, entries.length, "one delivered event per copy");
  const folders = (await env.pool.query("SELECT account_id, name, uid_next FROM folders WHERE account_id = ANY($1) ORDER BY 1, 2", [[plain, ruled]])).rows;
  assert.deepEqual(folders.map((f) => `${f.name}:${f.uid_next}`), ["INBOX:11", "B:5", "INBOX:1"]);
});

test("batch filing finds its rows by key on a large table, also once its plans are cached", async () => {
  const logger = createLogger("mda-test", "silent");
  const owner = await account(env.pool, "big@example.test");
  await env.pool.query(
    `INSERT INTO accounts (domain_id, local_part, address, password_hash) SELECT a.domain_id, 'filler' || n, 'filler' || n || '@example.test', a.password_hash
       FROM accounts a, generate_series(1, 3000) AS n WHERE a.id = $1`,
    [owner],
  );
  // 20,000 finished deliveries around the pending ones, and fresh statistics.
  const filler = await send(env.pool, null, message("filler"), [{ address: "big@example.test", accountId: owner }]);
  await env.pool.query(
    `INSERT INTO deliveries (message_id, recipient, final_recipient, kind, account_id, state)
     SELECT $1, 'x' || n || '@example.test', 'x' || n || '@example.test', 'local', $2, 'delivered' FROM generate_series(1, 20000) AS n`,
    [filler.messageId, owner],
  );
  const ids: number[] = [];
  for (let i = 0; i < 80; i++) ids.push((await send(env.pool, null, message(`big${i}`), [{ address: "big@example.test", accountId: owner }])).deliveries[0]!.id);
  await env.pool.query("ANALYZE deliveries; ANALYZE accounts; ANALYZE folders; ANALYZE mailbox_entries");

  // One connection, so its cached plans serve every call after the first few.
  const pool = createPool({ url: env.db.url, max: 1 });
  try {
    const scans = async () => {
      await pool.query("SELECT pg_stat_force_next_flush()");
      const client = await pool.connect();
      try {
        // A fresh snapshot of the statistics, after this connection's counts were flushed.
        await client.query("SELECT pg_stat_clear_snapshot()");
        return (await client.query("SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname IN ('deliveries', 'accounts', 'mailbox_entries')")).rows
          .map((r) => `${r.relname}:${r.seq_scan}`).sort();
      } finally {
        client.release();
      }
    };
    const before = await scans();
    const batcher = new DeliveryBatcher({ pool, logger }, { maxBatch: 4, maxParallel: 1 });
    for (let i = 0; i < ids.length; i += 4) await Promise.all(ids.slice(i, i + 4).map((id) => batcher.deliver(id)));
    assert.deepEqual(await scans(), before, "no sequential scan of deliveries, accounts or mailbox_entries in 20 batches");
  } finally {
    await pool.end();
  }
  const filed = (await env.pool.query("SELECT count(*)::int AS n FROM mailbox_entries WHERE account_id = $1 AND delivery_id = ANY($2)", [owner, ids])).rows[0].n;
  assert.equal(filed, ids.length);
});

test("mda_file_batch (SQL) treats as final exactly the states FINAL_STATES names (its twin in packages/queue)", async () => {
  const definition = (await env.pool.query("SELECT pg_get_functiondef('mda_file_batch'::regproc) AS def")).rows[0].def as string;
  const listed = /state NOT IN \(([^)]*)\)/.exec(definition)?.[1];
  assert.ok(listed, definition);
  assert.deepEqual(listed.split(",").map((s) => s.trim().replace(/'/g, "")).sort(), [...FINAL_STATES].sort());
});
