import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { addAccount, addDomain, resolveRecipient } from "@mailstack/db";
import { Streams, Subjects } from "@mailstack/bus";
import { acceptMessage, publishEvents, recordEvents, type PublishedEvent } from "../src/index.ts";

let env: TestEnv;
before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  await addAccount(env.pool, { address: "alice@example.test", password: "x" });
});
after(async () => env.close());

async function streamEvents(): Promise<PublishedEvent[]> {
  const info = await env.bus.jsm.streams.info(env.bus.stream(Streams.events));
  const events: PublishedEvent[] = [];
  for (let seq = info.state.first_seq; seq <= info.state.last_seq && info.state.messages > 0; seq++) {
    const message = await env.bus.jsm.streams.getMessage(env.bus.stream(Streams.events), { seq });
    if (message) events.push({ ...(message.json<PublishedEvent>()), subject: message.subject } as PublishedEvent & { subject: string });
  }
  return events;
}

test("committed journey events are published to mail.event.<kind> once, in order, from the outbox position", async () => {
  const resolution = await resolveRecipient(env.pool, "alice@example.test");
  assert.ok(resolution.ok);
  const accepted = await acceptMessage(env.pool, { raw: Buffer.from("Subject: x\r\n\r\n"), envelopeFrom: "a@remote.test", source: "inbound" }, [{ recipient: "alice@example.test", route: resolution.routes[0]! }], "test");
  await recordEvents(env.pool, [{ messageId: accepted.messageId, deliveryId: accepted.deliveries[0]!.id, event: "delivered", service: "mda", reply: "250 2.0.0 filed" }]);

  assert.equal(await publishEvents(env.bus, env.pool, { lagMs: 60_000 }), 0, "events younger than the lag wait");
  assert.equal(await publishEvents(env.bus, env.pool, { lagMs: 0 }), 2);
  assert.equal(await publishEvents(env.bus, env.pool, { lagMs: 0 }), 0, "the position moved past them");

  const events = await streamEvents();
  assert.deepEqual(events.map((e) => [e.event, e.messageId, (e as PublishedEvent & { subject: string }).subject]), [
    ["accepted", accepted.messageId, env.bus.subject(Subjects.event("accepted"))],
    ["delivered", accepted.messageId, env.bus.subject(Subjects.event("delivered"))],
  ]);
  assert.equal(events[1]!.reply, "250 2.0.0 filed");

  // A crash after publishing but before the position was saved: the republish is dropped by Nats-Msg-Id.
  await env.pool.query("UPDATE event_outbox SET position = 0");
  assert.equal(await publishEvents(env.bus, env.pool, { lagMs: 0 }), 2);
  assert.equal((await streamEvents()).length, 2);
});
