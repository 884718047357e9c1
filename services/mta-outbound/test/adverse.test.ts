import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, freePort, waitFor, type TestEnv } from "@mailstack/testkit";
import { startOutbound, type OutboundService } from "../src/service.ts";
import { deliveryStates, startDns, submit, testConfig } from "./helpers.ts";
import { startScriptedMx } from "./scripted-mx.ts";

// The relay worker against adverse remote servers and DNS answers, end to end (PostgreSQL, NATS,
// a DNS server and scripted MX hosts on loopback). testConfig names this relay "relay.test".

let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDns>>;
let outbound: OutboundService;
/** Stands in for this host's own port 25: like mta-inbound, it refuses to relay (554 5.7.1 at RCPT). */
let ourselves: Awaited<ReturnType<typeof startScriptedMx>>;
let good: Awaited<ReturnType<typeof startScriptedMx>>;

before(async () => {
  env = await createTestEnv();
  const port = await freePort();
  ourselves = await startScriptedMx("127.0.0.40", port, {
    reply: (command) => (command.startsWith("RCPT") ? "554 5.7.1 Relay access denied" : undefined),
  });
  good = await startScriptedMx("127.0.0.41", port);
  dns = await startDns({
    "relay.test": { a: ["127.0.0.40"] },
    "mx.good.test": { a: ["127.0.0.41"] },
    // Nothing listens on 127.0.0.42: the connection is refused.
    "down.primary.test": { a: ["127.0.0.42"] },
    // We are a backup MX of a domain we do not serve, and its primary is down.
    "backup.test": { mx: [{ exchange: "down.primary.test", priority: 10 }, { exchange: "relay.test", priority: 20 }] },
    // We are its best MX (named in another case, with the final dot): a host after us must not be tried.
    "loop.test": { mx: [{ exchange: "RELAY.TEST.", priority: 10 }, { exchange: "mx.good.test", priority: 20 }] },
    // A host equal in preference to us is discarded with us; a better one is used.
    "equal-us.test": { mx: [{ exchange: "mx.good.test", priority: 5 }, { exchange: "relay.test", priority: 10 }, { exchange: "down.primary.test", priority: 10 }] },
    // MX hosts that do not exist (NXDOMAIN) or have no A/AAAA (NODATA): final answers.
    "ghost.test": { mx: [{ exchange: "nothing.ghost.test", priority: 10 }, { exchange: "empty.ghost.test", priority: 20 }] },
    "empty.ghost.test": {},
    // The same with one MX host whose lookup fails (SERVFAIL): it may exist.
    "ghostly.test": { mx: [{ exchange: "nothing.ghost.test", priority: 10 }, { exchange: "broken.ghostly.test", priority: 20 }] },
    "broken.ghostly.test": { servfail: true },
    // A failing MX host lookup is skipped for a usable one.
    "servfail-mx.test": { mx: [{ exchange: "broken.ghostly.test", priority: 10 }, { exchange: "mx.good.test", priority: 20 }] },
  });
  const config = testConfig({
    DNS_SERVERS: dns.server,
    RELAY_DEST_PORT: String(port),
    RELAY_BACKOFF: "1h",
    RELAY_SCHEDULER_INTERVAL: "200ms",
    RELAY_DSN_INTERVAL: "200ms",
    RELAY_CONNECT_TIMEOUT: "2s",
    RELAY_GREETING_TIMEOUT: "2s",
  });
  outbound = startOutbound({ pool: env.pool, bus: env.bus, logger: createLogger("mta-outbound", "silent"), config });
});

after(async () => {
  await outbound?.stop();
  await Promise.all([ourselves, good].map((s) => s?.close()));
  await dns?.close();
  await env?.close();
});

/** The delivery rows of a message once each has had its first attempt. */
async function attempted(messageId: number) {
  return waitFor(async () => {
    const rows = await deliveryStates(env.pool, messageId);
    return rows.every((r) => r.attempts >= 1) ? rows : null;
  }, 15_000);
}

const rcptsTo = (server: typeof good, domain: string) => server.commands().filter((c) => c.startsWith("RCPT") && c.includes(`@${domain}>`));

test("an MX naming this host: records at its preference and above are discarded (RFC 5321 5.1), never sent to ourselves", async () => {
  const backup = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["b@backup.test"] });
  const loop = await submit(env.pool, env.bus, { from: "", to: ["l@loop.test"] });
  const equal = await submit(env.pool, env.bus, { from: "", to: ["e@equal-us.test"] });
  // The primary is down and we are only the backup: a temporary failure, not our own "relay denied" bounce.
  const [deferred] = await attempted(backup.messageId);
  assert.deepEqual([deferred!.state, deferred!.last_status], ["deferred", "4.4.1"]);
  // We are the best MX: the mail would loop back to us; it is returned as undeliverable.
  const [looped] = await attempted(loop.messageId);
  assert.deepEqual([looped!.state, looped!.last_status], ["bounced", "5.4.6"]);
  assert.match(looped!.last_reply ?? "", /loops back to myself/);
  const [delivered] = await attempted(equal.messageId);
  assert.deepEqual([delivered!.state, delivered!.remote_mta], ["delivered", "mx.good.test"]);
  assert.equal(ourselves.connections.length, 0, "no connection to our own address");
  assert.equal(rcptsTo(good, "loop.test").length, 0, "an MX less preferred than us is not tried");
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [backup.messageId]);
});

test("MX hosts that do not exist or have no address bounce (5.4.4, RFC 5321 5.1); a failed lookup among them defers (4.4.3)", async () => {
  const ghost = await submit(env.pool, env.bus, { from: "", to: ["g@ghost.test"] });
  const ghostly = await submit(env.pool, env.bus, { from: "", to: ["g@ghostly.test"] });
  const skipped = await submit(env.pool, env.bus, { from: "", to: ["s@servfail-mx.test"] });
  const [bounced] = await attempted(ghost.messageId);
  assert.deepEqual([bounced!.state, bounced!.last_status], ["bounced", "5.4.4"]);
  assert.match(bounced!.last_reply ?? "", /nothing\.ghost\.test, empty\.ghost\.test/);
  const [deferred] = await attempted(ghostly.messageId);
  assert.deepEqual([deferred!.state, deferred!.last_status], ["deferred", "4.4.3"]);
  const [delivered] = await attempted(skipped.messageId);
  assert.deepEqual([delivered!.state, delivered!.remote_mta], ["delivered", "mx.good.test"]);
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [ghostly.messageId]);
});
