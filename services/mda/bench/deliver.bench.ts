// MDA throughput: N accepted 4 KiB messages are dispatched at once; measures how fast the
// consumer files them (deliveries per second) and the accept-to-mailbox latency.
// Run from /work/main: node services/mda/bench/deliver.bench.ts [messages] [concurrency] [accounts]
import { dispatchDeliveries, insertMessage } from "@mailstack/queue";
import { transaction } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv } from "@mailstack/testkit";
import { startMda } from "../src/mda.ts";
import { account, message } from "../test/helpers.ts";

const count = Number(process.argv[2] ?? 5_000);
const concurrency = Number(process.argv[3] ?? 32);
const accountCount = Number(process.argv[4] ?? 20);
const env = await createTestEnv({ maxAckPending: 10_000 });
try {
  const accounts: Array<{ id: number; address: string }> = [];
  for (let i = 0; i < accountCount; i++) accounts.push({ id: await account(env.pool, `bench${i}@bench.test`), address: `bench${i}@bench.test` });
  const body = message("bench", `${"x".repeat(76)}\r\n`.repeat(50));
  const items: Array<{ id: number; messageId: number; kind: "local"; remoteDomain: null; attempts: number }> = [];
  for (let start = 0; start < count; start += 500) {
    await transaction(env.pool, async (client) => {
      for (let i = start; i < Math.min(count, start + 500); i++) {
        const target = accounts[i % accounts.length]!;
        const accepted = await insertMessage(client, { raw: Buffer.from(body), envelopeFrom: "load@remote.example", source: "inbound" }, [{ recipient: target.address, route: { kind: "local", accountId: target.id, address: target.address } }], "bench");
        items.push({ id: accepted.deliveries[0]!.id, messageId: accepted.messageId, kind: "local", remoteDomain: null, attempts: 0 });
      }
    });
  }
  const mda = await startMda({ pool: env.pool, bus: env.bus, logger: createLogger("mda-bench", "warn"), config: { LMTP_ENABLED: false, MDA_CONCURRENCY: concurrency } });
  const started = Date.now();
  await env.pool.query("UPDATE messages SET received_at = now()");
  for (let i = 0; i < items.length; i += 1_000) await dispatchDeliveries(env.bus, env.pool, items.slice(i, i + 1_000));
  for (;;) {
    const left = (await env.pool.query("SELECT count(*)::int AS n FROM deliveries WHERE state = 'queued'")).rows[0].n;
    if (left === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const seconds = (Date.now() - started) / 1000;
  const latency = (await env.pool.query(
    `SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50, percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
       FROM (SELECT extract(epoch FROM e.created_at - m.received_at) * 1000 AS ms
               FROM mailbox_entries e JOIN messages m ON m.id = e.message_id) t`,
  )).rows[0];
  console.log(`${count} deliveries to ${accountCount} accounts, concurrency ${concurrency}: ${(count / seconds).toFixed(0)} deliveries/s (${seconds.toFixed(1)} s); ` +
    `dispatch-to-mailbox p50 ${Number(latency.p50).toFixed(0)} ms, p99 ${Number(latency.p99).toFixed(0)} ms (backlog drained at once, so latency grows with N); ` +
    `rss ${(process.memoryUsage().rss / 1048576).toFixed(0)} MB`);
  await mda.stop();
} finally {
  await env.close();
}
