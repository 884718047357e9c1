import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createApiToken } from "@mailstack/admin-ops";
import { addDomain } from "@mailstack/db";
import { acceptMessage } from "@mailstack/queue";
import { mailctl, startHarness, type ApiHarness } from "./helpers.ts";

let h: ApiHarness;
const ids: Record<string, number> = {};
let queueId: string;

async function accept(recipients: string[]) {
  return acceptMessage(
    h.db.pool,
    { raw: Buffer.from("Subject: q\r\n\r\nq\r\n"), envelopeFrom: "sender@local.test", source: "submission" },
    recipients.map((r) => ({ recipient: r, route: { kind: "remote" as const, address: r, domain: r.split("@")[1]! } })),
    "msa",
  );
}

before(async () => {
  h = await startHarness();
  await addDomain(h.db.pool, "local.test");
  const first = await accept(["a@slow.test", "b@slow.test", "c@fast.test"]);
  queueId = first.queueId;
  for (const d of first.deliveries) ids[d.finalRecipient] = d.id;
  // a@ and b@slow.test were tried and deferred; c@fast.test waits for its first attempt.
  await h.db.pool.query(
    "UPDATE deliveries SET state = 'deferred', attempts = 1, next_attempt_at = now() + interval '1 hour', last_reply = '421 4.4.2 try later' WHERE id = ANY($1)",
    [[ids["a@slow.test"], ids["b@slow.test"]]],
  );
  const done = await accept(["d@fast.test"]);
  await h.db.pool.query("UPDATE deliveries SET state = 'delivered' WHERE id = $1", [done.deliveries[0]!.id]);
  ids["d@fast.test"] = done.deliveries[0]!.id;
});
after(async () => h?.close());

type Entries = { entries: { id: number; recipient: string; state: string; lastReply: string | null; nextAttemptAt: string | null }[] };

test("queue list by state and by domain", async () => {
  const waiting = (await (await h.call("GET", "/queue")).json()) as Entries;
  assert.deepEqual(waiting.entries.map((e) => e.recipient), ["a@slow.test", "b@slow.test", "c@fast.test"]);
  const deferred = (await (await h.call("GET", "/queue?state=deferred")).json()) as Entries;
  assert.deepEqual(deferred.entries.map((e) => e.recipient), ["a@slow.test", "b@slow.test"]);
  assert.equal(deferred.entries[0]!.lastReply, "421 4.4.2 try later");
  const fast = (await (await h.call("GET", "/queue?state=delivered&domain=fast.test")).json()) as Entries;
  assert.deepEqual(fast.entries.map((e) => e.recipient), ["d@fast.test"]);
  const bad = await h.call("GET", "/queue?state=lost");
  assert.equal(bad.status, 400);
  assert.equal(((await bad.json()) as { field: string }).field, "state");
});

test("retry makes deferred deliveries due now and records it; non-deferred ones are a conflict", async () => {
  const one = await h.call("POST", `/queue/deliveries/${ids["a@slow.test"]}/retry`);
  assert.equal(one.status, 200);
  assert.deepEqual(await one.json(), { deliveryIds: [ids["a@slow.test"]] });
  const row = await h.db.pool.query("SELECT next_attempt_at <= now() AS due FROM deliveries WHERE id = $1", [ids["a@slow.test"]]);
  assert.equal(row.rows[0].due, true);
  const detail = (await (await h.call("GET", `/queue/deliveries/${ids["a@slow.test"]}`)).json()) as { events: { event: string; service: string }[] };
  assert.deepEqual(detail.events.map((e) => `${e.event}/${e.service}`), ["accepted/msa", "retry/admin-api"]);

  assert.equal((await h.call("POST", `/queue/deliveries/${ids["c@fast.test"]}/retry`)).status, 409);
  assert.equal((await h.call("POST", "/queue/deliveries/999999/retry")).status, 404);
  const byDomain = await h.call("POST", "/queue/domains/slow.test/retry");
  assert.deepEqual(((await byDomain.json()) as { deliveryIds: number[] }).deliveryIds.sort(), [ids["a@slow.test"], ids["b@slow.test"]].sort());
  const byMessage = await h.call("POST", `/queue/messages/${queueId}/retry`);
  assert.equal(byMessage.status, 200);
  assert.equal(((await byMessage.json()) as { deliveryIds: number[] }).deliveryIds.length, 2);
});

test("delete cancels waiting deliveries without a bounce; the journey and mailctl show it", async () => {
  assert.equal((await h.call("DELETE", `/queue/deliveries/${ids["c@fast.test"]}`)).status, 204);
  assert.equal((await h.call("DELETE", `/queue/deliveries/${ids["c@fast.test"]}`)).status, 409);
  assert.equal((await h.call("DELETE", `/queue/deliveries/${ids["d@fast.test"]}`)).status, 409);
  const rest = await h.call("DELETE", `/queue/messages/${queueId}`);
  assert.equal(rest.status, 200);
  assert.deepEqual(((await rest.json()) as { deliveryIds: number[] }).deliveryIds, [ids["a@slow.test"], ids["b@slow.test"]]);
  assert.equal((await h.call("DELETE", `/queue/messages/${queueId}`)).status, 409);
  const rows = await h.db.pool.query("SELECT state, dsn_state FROM deliveries WHERE message_id = (SELECT id FROM messages WHERE queue_id = $1)", [queueId]);
  assert.ok(rows.rows.every((r) => r.state === "cancelled" && r.dsn_state === null));

  const journey = (await (await h.call("GET", `/journey?queueId=${queueId}`)).json()) as { messages: { recipients: { state: string; events: { event: string }[] }[] }[] };
  for (const r of journey.messages[0]!.recipients) {
    assert.equal(r.state, "cancelled");
    assert.equal(r.events.at(-1)!.event, "cancelled");
  }
  const cli = await mailctl(h.db.url, ["queue", "list", "--state", "cancelled"]);
  assert.equal(cli.code, 0, cli.stderr);
  assert.equal(cli.stdout.trim().split("\n").length, 3);
});

test("a destination domain is found however it is written: Unicode or A-labels, any case, a final dot", async () => {
  // Routing stores the domain as the address parser gives it: A-labels.
  const idn = await accept(["x@xn--bcher-kva.test"]);
  const id = idn.deliveries[0]!.id;
  await h.db.pool.query("UPDATE deliveries SET state = 'deferred', next_attempt_at = now() + interval '1 hour' WHERE id = $1", [id]);
  for (const written of ["bücher.test", "BÜCHER.test.", "xn--bcher-kva.test"]) {
    const listed = (await (await h.call("GET", `/queue?state=deferred&domain=${encodeURIComponent(written)}`)).json()) as Entries;
    assert.deepEqual(listed.entries.map((e) => e.id), [id], written);
  }
  const retried = await h.call("POST", `/queue/domains/${encodeURIComponent("Bücher.test")}/retry`);
  assert.deepEqual(await retried.json(), { deliveryIds: [id] });
  const cli = await mailctl(h.db.url, ["queue", "list", "--state", "deferred", "--domain", "bücher.test"]);
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(cli.stdout, /x@xn--bcher-kva\.test/);
});

test("the queue is operator-only", async () => {
  const { token } = await createApiToken(h.db.pool, "tenant", { domain: "local.test" });
  assert.equal((await h.call("GET", "/queue", { token })).status, 403);
  assert.equal((await h.call("DELETE", `/queue/messages/${queueId}`, { token })).status, 403);
  assert.equal((await h.call("GET", "/queue", { token: null })).status, 401);
});
