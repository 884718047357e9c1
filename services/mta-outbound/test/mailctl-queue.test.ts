import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { mailctl } from "../../admin-api/src/cli/mailctl.ts";
import { createRelay } from "../src/relay.ts";
import { relayConfig } from "../src/service.ts";
import { deliveryStates, submit, testConfig } from "./helpers.ts";

let env: TestEnv;

before(async () => {
  env = await createTestEnv();
});

after(async () => {
  await env?.close();
});

async function run(...argv: string[]) {
  const out: string[] = [];
  const err: string[] = [];
  const code = await mailctl(argv, { out: (l) => out.push(l), err: (l) => err.push(l) }, { DATABASE_URL: env.db.url });
  return { code, out: out.join("\n"), err: err.join("\n") };
}

test("mailctl queue list/show/retry/delete on deliveries a relay attempt deferred", async () => {
  // A smart host nobody listens on: every attempt is a connection failure, so the deliveries are deferred.
  const config = relayConfig(testConfig({ RELAY_SMARTHOST: "127.0.0.9:2", RELAY_CONNECT_TIMEOUT: "2s" }));
  const relay = createRelay({ pool: env.pool, logger: createLogger("test", "silent"), config });
  const first = await submit(env.pool, env.bus, { from: "a@origin.test", to: ["one@down.test", "two@down.test"] });
  const other = await submit(env.pool, env.bus, { from: "a@origin.test", to: ["x@other.test"] });
  await relay.handle({ messageId: first.messageId, domain: "down.test", deliveryIds: first.deliveries.map((d) => d.id) });
  await relay.handle({ messageId: other.messageId, domain: "other.test", deliveryIds: other.deliveries.map((d) => d.id) });
  await relay.close();
  const [one, two] = first.deliveries;

  const list = await run("queue", "list", "--state", "deferred", "--domain", "down.test");
  assert.equal(list.code, 0, list.err);
  const lines = list.out.split("\n");
  assert.equal(lines.length, 2);
  assert.match(lines[0]!, new RegExp(`^${one!.id}\\t${first.queueId}\\tdeferred\\tattempts=1\\tnext=\\S+\\t<a@origin.test> -> <one@down.test>\\tconnect to 127\\.0\\.0\\.9:2`));

  const show = await run("queue", "show", String(one!.id));
  assert.equal(show.code, 0, show.err);
  assert.match(show.out, /state: +deferred 4\.4\.1/);
  assert.match(show.out, /attempt +mta-outbound +connect to 127\.0\.0\.9:2/, "the attempt with its reply");
  assert.match(show.out, /deferred +mta-outbound/);

  const retry = await run("queue", "retry", String(one!.id));
  assert.equal(retry.code, 0, retry.err);
  assert.match(retry.out, /^1 delivery due now/);
  const due = await env.pool.query("SELECT next_attempt_at <= now() AS due FROM deliveries WHERE id = $1", [one!.id]);
  assert.equal(due.rows[0].due, true);

  const byDomain = await run("queue", "retry", "--domain", "other.test");
  assert.match(byDomain.out, /^1 delivery due now/);

  const del = await run("queue", "delete", String(two!.id));
  assert.equal(del.code, 0, del.err);
  const rows = await deliveryStates(env.pool, first.messageId);
  assert.deepEqual(rows.map((r) => r.state), ["deferred", "cancelled"]);
  assert.equal(rows[1]!.dsn_state, null, "an operator's delete sends no bounce");

  const again = await run("queue", "delete", String(two!.id));
  assert.equal(again.code, 1);
  assert.match(again.err, /already cancelled/);
  const missing = await run("queue", "show", "999999");
  assert.equal(missing.code, 1);
  const usage = await run("queue", "retry");
  assert.equal(usage.code, 2);

  const byQueueId = await run("queue", "show", first.queueId);
  assert.equal((byQueueId.out.match(/^delivery /gm) ?? []).length, 2);
});
