import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { addAccount, addDomain, resolveRecipient, type Route } from "@mailstack/db";
import { Consumers, Streams, Subjects, consume, type Bus } from "@mailstack/bus";
import { acceptMessage, dispatchAccepted, insertMessages, sweepUndispatched, type LocalJob, type RelayJob } from "../src/index.ts";

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

test("a batch stores every message byte for byte and every field as given, awkward text included", async () => {
  const alice = await routes("alice@example.test");
  const bob = await routes("bob@example.test");
  const bodies = [Buffer.from("Subject: one\r\n\r\nfirst\r\n"), Buffer.from([0x00, 0xff, 0x0d, 0x0a, 0x5c, 0x22]), Buffer.alloc(70_000, 0x61)];
  const awkward = '"quoted\\ \"local\", {braces}"@example.test';
  const batch = [
    { message: { raw: bodies[0]!, envelopeFrom: awkward, source: "inbound" as const, clientIp: "192.0.2.1", clientHelo: "NULL", authResults: { spf: { result: "pass", note: 'a "quote" and \\' } }, dsnEnvid: "env,id{1}", dsnRet: "HDRS" as const, traceId: "t".repeat(32) }, deliveries: [{ recipient: "alice@example.test", route: alice[0]!, dsnNotify: ["SUCCESS", "FAILURE"], dsnOrcpt: "rfc822;alice@example.test" }] },
    { message: { raw: bodies[1]!, envelopeFrom: "", source: "submission" as const, authUser: "bob@example.test" }, deliveries: [{ recipient: "bob@example.test", route: bob[0]! }, { recipient: "alice@example.test", route: alice[0]! }] },
    { message: { raw: bodies[2]!, envelopeFrom: "é@example.test", source: "inbound" as const }, deliveries: [{ recipient: "bob@example.test", route: bob[0]!, folder: "Junk" }] },
  ];
  const accepted = await insertMessages(env.pool, batch, "test");
  assert.deepEqual(accepted.map((a) => a.deliveries.length), [1, 2, 1]);
  const inOrder = (await env.pool.query("SELECT final_recipient FROM deliveries WHERE message_id = $1 ORDER BY id", [accepted[1]!.messageId])).rows;
  assert.deepEqual(inOrder.map((r) => r.final_recipient), ["bob@example.test", "alice@example.test"], "delivery ids follow the RCPT order");
  for (const [i, a] of accepted.entries()) {
    const row = (await env.pool.query("SELECT * FROM messages WHERE id = $1", [a.messageId])).rows[0];
    const m = batch[i]!.message as Record<string, unknown>;
    assert.ok(Buffer.compare(row.raw, bodies[i]!) === 0, `message ${i} body`);
    assert.equal(row.size, bodies[i]!.length);
    assert.equal(row.queue_id, a.queueId);
    assert.equal(row.envelope_from, m.envelopeFrom);
    assert.equal(row.source, m.source);
    assert.equal(row.client_ip, m.clientIp ?? null);
    assert.equal(row.client_helo, m.clientHelo ?? null);
    assert.equal(row.auth_user, m.authUser ?? null);
    assert.deepEqual(row.auth_results, m.authResults ?? null);
    assert.equal(row.dsn_envid, m.dsnEnvid ?? null);
    assert.equal(row.dsn_ret, m.dsnRet ?? null);
    assert.equal(row.trace_id, m.traceId ?? null);
  }
  const first = (await env.pool.query("SELECT dsn_notify, dsn_orcpt, folder FROM deliveries WHERE message_id = $1", [accepted[0]!.messageId])).rows[0];
  assert.deepEqual(first, { dsn_notify: ["SUCCESS", "FAILURE"], dsn_orcpt: "rfc822;alice@example.test", folder: "INBOX" });
  const junk = (await env.pool.query("SELECT folder FROM deliveries WHERE message_id = $1", [accepted[2]!.messageId])).rows[0];
  assert.equal(junk.folder, "Junk");
  // Never dispatched: removed, so the sweeper test below finds only its own.
  await env.pool.query("DELETE FROM messages WHERE id = ANY($1)", [accepted.map((a) => a.messageId)]);
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
