import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { startTelemetry, withSpan, currentTraceId } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { transaction } from "@mailstack/db";
import { Consumers, Streams, Subjects, consume, publish, PermanentError } from "../src/index.ts";

startTelemetry("bus-test");

let env: TestEnv;
before(async () => {
  env = await createTestEnv({ ackWaitMs: 2_000 });
  await env.pool.query("CREATE TABLE effects (id int PRIMARY KEY, note text)");
});
after(async () => {
  await env.close();
});

async function pending(): Promise<number> {
  const info = await env.bus.jsm.consumers.info(env.bus.stream(Streams.deliver), Consumers.mda);
  return info.num_pending + info.num_ack_pending;
}

test("a second publish with the same Nats-Msg-Id is dropped", async () => {
  const first = await publish(env.bus, Subjects.deliverLocal, { n: 1 }, { msgId: "same-id" });
  const second = await publish(env.bus, Subjects.deliverLocal, { n: 2 }, { msgId: "same-id" });
  assert.equal(first.duplicate, false);
  assert.equal(second.duplicate, true);
  const info = await env.bus.jsm.streams.info(env.bus.stream(Streams.deliver));
  assert.equal(info.state.messages, 1);
  // Drain it so the next tests start from an empty consumer.
  const seen: unknown[] = [];
  const consumer = consume<{ n: number }>(env.bus, {
    stream: Streams.deliver, durable: Consumers.mda, subject: Subjects.deliverLocal,
    handler: async ({ data }) => void seen.push(data),
  });
  await waitFor(() => seen.length === 1);
  await consumer.stop();
  assert.deepEqual(seen, [{ n: 1 }]);
  await waitFor(async () => (await pending()) === 0);
});

test("a handler that throws gets the message again; a permanent error terminates it", async () => {
  const attempts = new Map<number, number>();
  const consumer = consume<{ n: number }>(env.bus, {
    stream: Streams.deliver, durable: Consumers.mda, subject: Subjects.deliverLocal,
    retryDelayMs: () => 50,
    handler: async ({ data, deliveryCount }) => {
      attempts.set(data.n, deliveryCount);
      if (data.n === 1 && deliveryCount < 3) throw new Error("transient");
      if (data.n === 2) throw new PermanentError("never");
    },
  });
  await publish(env.bus, Subjects.deliverLocal, { n: 1 });
  await publish(env.bus, Subjects.deliverLocal, { n: 2 });
  await waitFor(() => attempts.get(1) === 3);
  await waitFor(async () => (await pending()) === 0);
  await consumer.stop();
  assert.equal(attempts.get(1), 3, "redelivered until the handler succeeded");
  assert.equal(attempts.get(2), 1, "terminated after the first permanent failure");
});

test("a message is acked only after its handler's transaction committed", async () => {
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  let committed = false;
  const consumer = consume<{ id: number }>(env.bus, {
    stream: Streams.deliver, durable: Consumers.mda, subject: Subjects.deliverLocal,
    handler: async ({ data }) => {
      await transaction(env.pool, async (client) => {
        await client.query("INSERT INTO effects (id, note) VALUES ($1, 'done') ON CONFLICT DO NOTHING", [data.id]);
        await gate;
      });
      committed = true;
    },
  });
  await publish(env.bus, Subjects.deliverLocal, { id: 7 });
  await waitFor(async () => {
    const info = await env.bus.jsm.consumers.info(env.bus.stream(Streams.deliver), Consumers.mda);
    return info.num_ack_pending === 1;
  });
  // While the transaction is open, the message is still unacked and the effect invisible.
  const before = await env.pool.query("SELECT count(*)::int AS n FROM effects");
  assert.equal(before.rows[0].n, 0);
  release();
  await waitFor(async () => (await pending()) === 0);
  await consumer.stop();
  assert.equal(committed, true);
  const afterRows = await env.pool.query("SELECT count(*)::int AS n FROM effects WHERE id = 7");
  assert.equal(afterRows.rows[0].n, 1);
});

test("traceparent arrives in the consumer and continues the same trace", async () => {
  let consumerTrace: string | undefined;
  let header = "";
  const consumer = consume<{ n: number }>(env.bus, {
    stream: Streams.deliver, durable: Consumers.mda, subject: Subjects.deliverLocal,
    handler: async ({ msg }) => {
      header = msg.headers?.get("traceparent") ?? "";
      consumerTrace = currentTraceId();
    },
  });
  const producerTrace = await withSpan("smtp session", {}, async () => {
    await publish(env.bus, Subjects.deliverLocal, { n: 3 });
    return currentTraceId();
  });
  await waitFor(() => consumerTrace !== undefined);
  await consumer.stop();
  assert.ok(producerTrace && /^[0-9a-f]{32}$/.test(producerTrace));
  assert.match(header, new RegExp(`^00-${producerTrace}-[0-9a-f]{16}-0[01]$`));
  assert.equal(consumerTrace, producerTrace);
});

test("a consumer stopped at once, before its subscription exists, stops (it used to wait forever for a first message)", async () => {
  for (let i = 0; i < 3; i++) {
    const consumer = consume<{ n: number }>(env.bus, {
      stream: Streams.deliver, durable: Consumers.mda, subject: Subjects.deliverLocal,
      handler: async () => undefined,
    });
    const stopped = await Promise.race([consumer.stop().then(() => true), new Promise((resolve) => setTimeout(() => resolve(false), 5_000))]);
    assert.equal(stopped, true, `stop() resolved (attempt ${i + 1})`);
  }
});
