/**
 * Mailbox export and import throughput through the admin API running as its own process, and
 * the process's peak RSS, to show that export streams rows instead of holding the mailbox.
 *
 *   node bench/admin-api/mailbox-io.ts [--count 2000] [--size 51200]
 *
 * Uses a fresh database and bus prefix of its own (testkit) and removes them afterwards.
 */
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import { createApiToken } from "../../packages/admin-ops/src/index.ts";
import { addAccount, addDomain } from "../../packages/db/src/index.ts";
import { createTestEnv, freePort, startServiceProcess } from "../../packages/testkit/src/index.ts";

const { values } = parseArgs({ options: { count: { type: "string", default: "2000" }, size: { type: "string", default: "51200" } } });
const count = Number(values.count);
const size = Number(values.size);

async function peakRssMiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) / 1024;
}

const env = await createTestEnv();
const port = await freePort();
const service = await startServiceProcess("admin-api", { ...env.env, API_PORT: String(port), API_HOST: "127.0.0.1", LOG_LEVEL: "warn" });
try {
  await addDomain(env.pool, "bench.test");
  const source = await addAccount(env.pool, { address: "source@bench.test", password: "x" });
  await addAccount(env.pool, { address: "target@bench.test", password: "x" });
  // Fill the mailbox in SQL: count messages of about `size` bytes, 78-byte CRLF lines, some "From " lines.
  const lines = Math.max(1, Math.floor(size / 78));
  await env.pool.query(
    `WITH m AS (
       INSERT INTO messages (queue_id, raw, size, envelope_from, source)
       SELECT 'BENCH' || n, r.raw, length(r.raw), 'sender@bench.test', 'inbound'
       FROM generate_series(1, $1::int) n,
            LATERAL (SELECT convert_to('Subject: bench ' || n || E'\\r\\n\\r\\nFrom the bench\\r\\n' || repeat(repeat('x', 76) || E'\\r\\n', $2::int), 'UTF8') AS raw) r
       RETURNING id, size)
     INSERT INTO mailbox_entries (account_id, folder, uid, message_id, size)
     SELECT $3, 'INBOX', row_number() OVER (ORDER BY id), id, size FROM m`,
    [count, lines, source.id],
  );
  await env.pool.query("UPDATE folders SET uid_next = $2 + 1 WHERE account_id = $1 AND name = 'INBOX'", [source.id, count]);
  const total = Number((await env.pool.query("SELECT sum(size)::bigint AS s FROM mailbox_entries WHERE account_id = $1", [source.id])).rows[0].s);
  const { token } = await createApiToken(env.pool, "bench");
  const headers = { authorization: `Bearer ${token}` };
  const pid = service.child.pid!;
  const before = await peakRssMiB(pid);
  console.log(`mailbox: ${count} messages, ${(total / 1048576).toFixed(1)} MiB; admin-api peak RSS before: ${before.toFixed(0)} MiB`);

  let started = performance.now();
  const response = await fetch(`http://127.0.0.1:${port}/accounts/source@bench.test/export?format=mbox&folder=INBOX`, { headers });
  const chunks: Buffer[] = [];
  for await (const chunk of response.body!) chunks.push(Buffer.from(chunk));
  const mbox = Buffer.concat(chunks);
  let seconds = (performance.now() - started) / 1000;
  console.log(`export mbox (API):  ${(mbox.length / 1048576).toFixed(1)} MiB in ${seconds.toFixed(2)} s = ${(mbox.length / 1048576 / seconds).toFixed(1)} MiB/s, ${(count / seconds).toFixed(0)} msgs/s; peak RSS ${(await peakRssMiB(pid)).toFixed(0)} MiB`);

  started = performance.now();
  const tar = await fetch(`http://127.0.0.1:${port}/accounts/source@bench.test/export?format=eml`, { headers });
  let tarBytes = 0;
  for await (const chunk of tar.body!) tarBytes += chunk.length;
  seconds = (performance.now() - started) / 1000;
  console.log(`export eml tar (API): ${(tarBytes / 1048576).toFixed(1)} MiB in ${seconds.toFixed(2)} s = ${(tarBytes / 1048576 / seconds).toFixed(1)} MiB/s; peak RSS ${(await peakRssMiB(pid)).toFixed(0)} MiB`);

  started = performance.now();
  const imported = await fetch(`http://127.0.0.1:${port}/accounts/target@bench.test/import?format=mbox&folder=INBOX`, {
    method: "POST", headers: { ...headers, "content-type": "application/mbox" }, body: mbox,
  });
  const result = (await imported.json()) as { imported: number };
  seconds = (performance.now() - started) / 1000;
  console.log(`import mbox (API):  ${result.imported} messages in ${seconds.toFixed(2)} s = ${(result.imported / seconds).toFixed(0)} msgs/s, ${(mbox.length / 1048576 / seconds).toFixed(1)} MiB/s; peak RSS ${(await peakRssMiB(pid)).toFixed(0)} MiB`);
  if (result.imported !== count) throw new Error(`imported ${result.imported} of ${count}`);
} finally {
  await service.stop();
  await env.close();
}
