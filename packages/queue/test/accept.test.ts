import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { addAccount, addDomain, resolveRecipient, type Route } from "@mailstack/db";
import { Consumers, Streams, Subjects, consume, type Bus } from "@mailstack/bus";
import { acceptMessage, dispatchAccepted, sweepUndispatched, type LocalJob, type RelayJob } from "../src/index.ts";

let env: TestEnv;
before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  await addAccount(env.pool, { address: "alice@example.test", password: "x" });
  await addAccount(env.pool, { address: "bob@example.test", password: "x" });
});
after(async () => env.close());

async function routes(address: string): Promise<Route[]> {
  const resolution = await resolveRecipient(env.pool, address, { allowRemote: true });
  assert.ok(resolution.ok);
  return resolution.routes;
}

async function collect<T>(bus: Bus, stream: string, durable: string, subject: string, count: number): Promise<T[]> {
  const seen: T[] = [];
  const consumer = consume<T>(bus, { stream, durable, subject, handler: async ({ data }) => void seen.push(data) });
  await waitFor(() => seen.length >= count);
  await new Promise((resolve) => setTimeout(resolve, 200));
  await consumer.stop();
  return seen;
}

test("a message and its deliveries commit together; jobs are one per local delivery and one per remote domain", async () => {
  const recipients = ["alice@example.test", "bob@example.test", "alice@example.test", "x@remote.test", "y@remote.test", "z@far.test"];
  const deliveries = [];
  for (const recipient of recipients) for (const route of await routes(recipient)) deliveries.push({ recipient, route });
  const accepted = await acceptMessage(env.pool, { raw: Buffer.from("Subject: hi\r\n\r\nbody\r\n"), envelopeFrom: "s@remote.test", source: "inbound" }, deliveries, "test");
  assert.equal(accepted.deliveries.length, 5, "the duplicate recipient got one delivery");
  await dispatchAccepted(env.bus, env.pool, accepted);

  const local = await collect<LocalJob>(env.bus, Streams.deliver, Consumers.mda, Subjects.deliverLocal, 2);
  assert.equal(local.length, 2);
  const relay = await collect<RelayJob>(env.bus, Streams.relay, Consumers.relay, Subjects.relayOutbound, 2);
  assert.deepEqual(relay.map((job) => [job.domain, job.deliveryIds.length]).sort(), [["far.test", 1], ["remote.test", 2]]);

  const rows = await env.pool.query("SELECT state, dispatched_at FROM deliveries WHERE message_id = $1", [accepted.messageId]);
  assert.ok(rows.rows.every((row) => row.state === "queued" && row.dispatched_at !== null));
  const events = await env.pool.query("SELECT count(*)::int AS n FROM delivery_events WHERE message_id = $1 AND event = 'accepted'", [accepted.messageId]);
  assert.equal(events.rows[0].n, 5);
});

test("a failure inside the accept transaction leaves nothing behind", async () => {
  const before = await env.pool.query("SELECT count(*)::int AS n FROM messages");
  const bogus: Route = { kind: "local", accountId: 999_999, address: "ghost@example.test" };
  await assert.rejects(acceptMessage(env.pool, { raw: Buffer.from("x"), envelopeFrom: "", source: "inbound" }, [{ recipient: "ghost@example.test", route: bogus }], "test"));
  const afterCount = await env.pool.query("SELECT count(*)::int AS n FROM messages");
  assert.equal(afterCount.rows[0].n, before.rows[0].n);
});

test("the sweeper republishes deliveries committed but never dispatched (crash between commit and publish)", async () => {
  const accepted = await acceptMessage(
    env.pool,
    { raw: Buffer.from("Subject: lost\r\n\r\n"), envelopeFrom: "", source: "inbound" },
    [{ recipient: "bob@example.test", route: (await routes("bob@example.test"))[0]! }],
    "test",
  );
  // No dispatch: as if the process died right after COMMIT.
  assert.equal(await sweepUndispatched(env.bus, env.pool, { undispatchedAfterMs: 60_000 }), 0, "too recent to sweep");
  assert.equal(await sweepUndispatched(env.bus, env.pool, { undispatchedAfterMs: 0 }), 1);
  const jobs = await collect<LocalJob>(env.bus, Streams.deliver, Consumers.mda, Subjects.deliverLocal, 1);
  assert.deepEqual(jobs, [{ deliveryId: accepted.deliveries[0]!.id, messageId: accepted.messageId }]);
  assert.equal(await sweepUndispatched(env.bus, env.pool, { undispatchedAfterMs: 0 }), 0, "dispatched rows are left alone");
});
