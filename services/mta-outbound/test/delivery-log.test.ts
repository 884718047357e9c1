import assert from "node:assert/strict";
import { Writable } from "node:stream";
import { after, before, test } from "node:test";
import { createLogger, startTelemetry } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { createRelay, type Relay } from "../src/relay.ts";
import { relayConfig } from "../src/service.ts";
import { startDns, startMx, submit, testConfig } from "./helpers.ts";

// Trace ids exist (unrecorded spans) as in a service process.
startTelemetry("delivery-log-test");

let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDns>>;
let mx: Awaited<ReturnType<typeof startMx>>;
let relay: Relay;
let relayLogger: ReturnType<typeof createLogger>;
let baseConfig: ReturnType<typeof relayConfig>;
const lines: Array<Record<string, unknown>> = [];
const longText = "x".repeat(2_000);

before(async () => {
  env = await createTestEnv();
  mx = await startMx("127.0.0.41", 0, {
    onRcpt(address) {
      if (address.startsWith("bad")) return { code: 550, message: "5.1.1 No such user here" };
      if (address.startsWith("later")) return { code: 451, message: "4.3.2 Try again later" };
      if (address.startsWith("long")) return { code: 550, message: `5.7.1 ${longText}` };
      return null;
    },
  });
  dns = await startDns({ "log.test": { mx: [{ exchange: "mx.log.test", priority: 10 }] }, "mx.log.test": { a: ["127.0.0.41"] } });
  baseConfig = relayConfig(testConfig({ DNS_SERVERS: dns.server, RELAY_DEST_PORT: String(mx.port), RELAY_BACKOFF: "1s" }));
  // The service's own logger at the default level, writing its JSON lines here.
  const sink = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split("\n")) if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  relayLogger = createLogger("mta-outbound", "info", sink);
  relay = createRelay({ pool: env.pool, logger: relayLogger, config: baseConfig });
});

after(async () => {
  await relay?.close();
  await mx?.close();
  await dns?.close();
  await env?.close();
});

test("every recipient outcome of a relay attempt is one info line: delivered, deferred (4xx), bounced (5xx)", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["good@log.test", "later@log.test", "bad@log.test", "long@log.test"], dispatch: false });
  const { rows } = await env.pool.query<{ queue_id: string }>("SELECT queue_id FROM messages WHERE id = $1", [accepted.messageId]);
  await relay.handle({ messageId: accepted.messageId, domain: "log.test", deliveryIds: accepted.deliveries.map((d) => d.id) });

  const mine = lines.filter((l) => l.messageId === accepted.messageId && ["delivered", "deferred", "bounced"].includes(l.msg as string));
  assert.equal(mine.length, 4, "one line per recipient");
  const byTo = new Map(mine.map((l) => [l.to, l]));
  const relayName = `mx.log.test[127.0.0.41]:${mx.port}`;
  const common = { level: "info", service: "mta-outbound", messageId: accepted.messageId, queueId: rows[0]!.queue_id, from: "alice@origin.test", relay: relayName, attempts: 1 };

  const good = byTo.get("good@log.test")!;
  assert.deepEqual(pick(good, Object.keys(common)), common);
  assert.equal(good.msg, "delivered");
  assert.equal(good.status, "delivered");
  assert.equal(good.dsn, "2.0.0");
  assert.match(good.reply as string, /^250 /);

  const later = byTo.get("later@log.test")!;
  assert.deepEqual(pick(later, Object.keys(common)), common);
  assert.equal(later.msg, "deferred");
  assert.equal(later.status, "deferred");
  assert.equal(later.dsn, "4.3.2");
  assert.match(later.reply as string, /451 4\.3\.2 Try again later/);

  const bad = byTo.get("bad@log.test")!;
  assert.equal(bad.msg, "bounced");
  assert.equal(bad.status, "bounced");
  assert.equal(bad.dsn, "5.1.1");
  assert.match(bad.reply as string, /550 5\.1\.1 No such user here/);

  // A long remote reply is cut: the line stays bounded.
  const long = byTo.get("long@log.test")!;
  assert.equal(long.status, "bounced");
  assert.ok((long.reply as string).length < 400, `reply of ${(long.reply as string).length} characters`);

  const ids = new Set(accepted.deliveries.map((d) => d.id));
  for (const line of mine) {
    assert.ok(ids.has(line.deliveryId as number), "names its delivery");
    assert.equal(typeof line.delay, "number");
    assert.ok((line.delay as number) >= 0 && (line.delay as number) < 60);
    assert.match(line.trace_id as string, /^[0-9a-f]{32}$/);
    assert.ok(JSON.stringify(line).length < 1_000);
    assert.ok(!JSON.stringify(line).includes("Hello."), "no body content");
  }
});

test("a delivery that cannot be tried at all (no such domain) is logged with relay=none", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "", to: ["a@nowhere-log.test"], dispatch: false });
  await relay.handle({ messageId: accepted.messageId, domain: "nowhere-log.test", deliveryIds: accepted.deliveries.map((d) => d.id) });
  const mine = lines.filter((l) => l.messageId === accepted.messageId && l.msg === "bounced");
  assert.equal(mine.length, 1);
  assert.equal(mine[0]!.relay, "none");
  assert.equal(mine[0]!.from, "");
  assert.equal(mine[0]!.dsn, "5.1.2");
});

test("a deferral past the queue lifetime is logged as bounced with status=expired (5.4.7)", async () => {
  const expiring = createRelay({ pool: env.pool, logger: relayLogger, config: { ...baseConfig, maxQueueLifetimeMs: 0 } });
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["later-expire@log.test"], dispatch: false });
  await expiring.handle({ messageId: accepted.messageId, domain: "log.test", deliveryIds: accepted.deliveries.map((d) => d.id) });
  await expiring.close();
  const mine = lines.filter((l) => l.messageId === accepted.messageId && l.msg === "bounced");
  assert.equal(mine.length, 1);
  assert.equal(mine[0]!.status, "expired");
  assert.equal(mine[0]!.dsn, "5.4.7");
  assert.match(mine[0]!.reply as string, /^delivery time expired; last error: 451 4\.3\.2/);
});

function pick(line: Record<string, unknown>, keys: string[]): Record<string, unknown> {
  return Object.fromEntries(keys.map((k) => [k, line[k]]));
}
