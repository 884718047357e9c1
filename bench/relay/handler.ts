/**
 * The relay handler alone, in this process: no NATS, no worker processes. Accepts COUNT
 * messages (held), then runs createRelay().handle() for all of them with CONCURRENCY jobs at
 * once against a local smtp-sink, and reports jobs/s. Shows where the end-to-end figure
 * loses time (compare with `run.ts --mode relay`).
 *
 *   node bench/relay/handler.ts [--count 3000] [--concurrency 64] [--size 4096]
 */
import { spawn } from "node:child_process";
import { parseArgs } from "node:util";
import { acceptMessage, type AcceptedMessage } from "../../packages/queue/src/index.ts";
import { createLogger } from "../../packages/telemetry/src/index.ts";
import { createTestEnv, freePort } from "../../packages/testkit/src/index.ts";
import { createRelay } from "../../services/mta-outbound/src/relay.ts";
import { relayConfig, shape } from "../../services/mta-outbound/src/service.ts";
import { loadConfig } from "../../packages/config/src/index.ts";

const { values } = parseArgs({
  options: { count: { type: "string", default: "3000" }, concurrency: { type: "string", default: "64" }, size: { type: "string", default: "4096" } },
});
const count = Number(values.count);
const concurrency = Number(values.concurrency);
const size = Number(values.size);

const env = await createTestEnv();
const sinkPort = await freePort();
const sink = spawn("smtp-sink", ["-u", "postfix", "-c", `127.0.0.1:${sinkPort}`, "500"], { stdio: ["ignore", "ignore", "inherit"] });
try {
  const raw = Buffer.from(`Subject: handler bench\r\n\r\n${"The quick brown fox jumps over the lazy dog, again and again and again.\r\n".repeat(Math.floor(size / 74))}`);
  const route = { kind: "remote" as const, address: "user@far.example", domain: "far.example" };
  const held: AcceptedMessage[] = [];
  for (let i = 0; i < count; i++) held.push(await acceptMessage(env.pool, { raw, envelopeFrom: "s@bench.test", source: "submission" }, [{ recipient: route.address, route }], "bench"));
  const config = relayConfig({ ...loadConfig(shape, { RELAY_SMARTHOST: `127.0.0.1:${sinkPort}`, RELAY_MAX_CONNECTIONS_PER_HOST: process.env.PER_HOST ?? "20" }), MAIL_HOSTNAME: "relay.bench.test" });
  const relay = createRelay({ pool: env.pool, logger: createLogger("bench", "warn"), config });
  const t0 = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < held.length) {
        const m = held[next++]!;
        await relay.handle({ messageId: m.messageId, domain: "far.example", deliveryIds: m.deliveries.map((d) => d.id) });
      }
    }),
  );
  const seconds = (performance.now() - t0) / 1000;
  await relay.close();
  const delivered = (await env.pool.query("SELECT count(*)::int AS n FROM deliveries WHERE state = 'delivered'")).rows[0].n;
  console.log(`handler only: ${count} jobs, concurrency ${concurrency}: ${seconds.toFixed(2)} s, ${(count / seconds).toFixed(1)} jobs/s; delivered ${delivered}`);
} finally {
  sink.kill("SIGTERM");
  await env.close();
}
