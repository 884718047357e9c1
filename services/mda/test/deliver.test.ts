import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { Consumers, Streams, Subjects, consume, publish } from "@mailstack/bus";
import { addFilterRule, removeAccount } from "@mailstack/db";
import { acceptMessage, dispatchAccepted } from "@mailstack/queue";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { deliverLocal, headerPrefix } from "../src/deliver.ts";
import { startMda, type Mda } from "../src/mda.ts";
import { account, message, send } from "./helpers.ts";

const logger = createLogger("mda-test", "silent");
let env: TestEnv;
let mda: Mda | null = null;

before(async () => {
  env = await createTestEnv();
});

after(async () => {
  await mda?.stop();
  await env.close();
});

async function deliveryRow(id: number) {
  return (await env.pool.query("SELECT * FROM deliveries WHERE id = $1", [id])).rows[0];
}

async function entriesFor(deliveryId: number) {
  return (await env.pool.query("SELECT * FROM mailbox_entries WHERE delivery_id = $1", [deliveryId])).rows;
}

test("a message lands in the mailbox byte-for-byte, with only Return-Path and Delivered-To added", async () => {
  const alice = await account(env.pool, "alice@example.test");
  mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
  // Odd but legal bytes: 8-bit text, a leading dot line, long-ish lines, no final CRLF issues.
  const raw = Buffer.concat([
    Buffer.from(message("byte for byte", "Caf\xc3\xa9 au lait\r\n..leading dot kept as stored\r\n\tindented\r\n")),
    Buffer.from([0xe2, 0x82, 0xac, 0x0d, 0x0a]),
  ]);
  const accepted = await send(env.pool, env.bus, raw, [{ address: "alice@example.test", accountId: alice }]);
  const deliveryId = accepted.deliveries[0]!.id;
  await waitFor(async () => (await deliveryRow(deliveryId)).state === "delivered");

  const entries = await entriesFor(deliveryId);
  assert.equal(entries.length, 1);
  const entry = entries[0];
  assert.equal(entry.folder, "INBOX");
  assert.equal(entry.uid, 1);
  const stored = (await env.pool.query("SELECT raw FROM messages WHERE id = $1", [accepted.messageId])).rows[0].raw as Buffer;
  const copy = Buffer.concat([entry.header_prefix, stored]);
  const expected = Buffer.concat([Buffer.from("Return-Path: <sender@remote.example>\r\nDelivered-To: alice@example.test\r\n"), raw]);
  assert.deepEqual(copy, expected);
  assert.equal(entry.size, expected.length);

  const acct = (await env.pool.query("SELECT used_bytes FROM accounts WHERE id = $1", [alice])).rows[0];
  assert.equal(acct.used_bytes, expected.length);
  const row = await deliveryRow(deliveryId);
  assert.equal(row.last_status, "2.0.0");
  const events = (await env.pool.query("SELECT event, service FROM delivery_events WHERE delivery_id = $1 ORDER BY id", [deliveryId])).rows;
  assert.deepEqual(events.map((e) => e.event), ["accepted", "delivered"]);

  // A second message gets the next UID.
  const second = await send(env.pool, env.bus, message("second"), [{ address: "alice@example.test", accountId: alice }]);
  await waitFor(async () => (await deliveryRow(second.deliveries[0]!.id)).state === "delivered");
  assert.equal((await entriesFor(second.deliveries[0]!.id))[0].uid, 2);

  // The message was parsed once and kept.
  const parsed = (await env.pool.query("SELECT parsed FROM message_parsed WHERE message_id = $1", [accepted.messageId])).rows[0].parsed;
  assert.equal(parsed.subject, "byte for byte");
  assert.equal(parsed.messageId, "<byteforbyte@remote.example>");
});

test("a redelivered job never makes a second copy: the same job published twice, and direct concurrent calls", async () => {
  const bob = await account(env.pool, "bob@example.test");
  const accepted = await send(env.pool, null, message("twice"), [{ address: "bob@example.test", accountId: bob }]);
  const deliveryId = accepted.deliveries[0]!.id;
  const job = { deliveryId, messageId: accepted.messageId };
  // Different msg ids so JetStream does not drop the repeat: the MDA itself must.
  await publish(env.bus, Subjects.deliverLocal, job, { msgId: `dup-a-${deliveryId}` });
  await publish(env.bus, Subjects.deliverLocal, job, { msgId: `dup-b-${deliveryId}` });
  const direct = await Promise.all([1, 2, 3, 4].map(() => deliverLocal({ pool: env.pool, logger }, deliveryId)));
  await waitFor(async () => (await deliveryRow(deliveryId)).state === "delivered");
  await new Promise((resolve) => setTimeout(resolve, 500));

  assert.equal((await entriesFor(deliveryId)).length, 1);
  assert.equal(direct.filter((o) => o.status === "delivered").length <= 1, true);
  const delivered = (await env.pool.query("SELECT count(*)::int AS n FROM delivery_events WHERE delivery_id = $1 AND event = 'delivered'", [deliveryId])).rows[0].n;
  assert.equal(delivered, 1);
  const used = (await env.pool.query("SELECT used_bytes FROM accounts WHERE id = $1", [bob])).rows[0].used_bytes;
  assert.equal(used, (await entriesFor(deliveryId))[0].size);
});

test("a handler that crashes after commit but before ack is redelivered and makes no second copy", async () => {
  await mda?.stop();
  mda = null;
  const carol = await account(env.pool, "carol@example.test");
  const seen: number[] = [];
  const crashing = consume<{ deliveryId: number }>(env.bus, {
    stream: Streams.deliver,
    durable: Consumers.mda,
    subject: Subjects.deliverLocal,
    retryDelayMs: () => 100,
    async handler({ data, deliveryCount }) {
      seen.push(deliveryCount);
      await deliverLocal({ pool: env.pool, logger }, data.deliveryId);
      if (deliveryCount === 1) throw new Error("simulated crash before ack");
    },
  });
  const accepted = await send(env.pool, env.bus, message("crash"), [{ address: "carol@example.test", accountId: carol }]);
  await waitFor(() => seen.some((count) => count >= 2));
  await crashing.stop();
  assert.equal((await entriesFor(accepted.deliveries[0]!.id)).length, 1);
  assert.equal((await deliveryRow(accepted.deliveries[0]!.id)).state, "delivered");
  mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
});

test("over quota: the delivery bounces with 5.2.2 and a pending DSN, never for the null sender or NOTIFY=NEVER", async () => {
  const dave = await account(env.pool, "dave@example.test", 600);
  const big = message("too big", "x".repeat(700) + "\r\n");
  const bounced = await send(env.pool, env.bus, big, [{ address: "dave@example.test", accountId: dave }]);
  const fromNull = await send(env.pool, env.bus, big, [{ address: "dave@example.test", accountId: dave }], "");
  const never = await send(env.pool, env.bus, big, [{ address: "dave@example.test", accountId: dave, notify: ["NEVER"] }]);
  const small = await send(env.pool, env.bus, message("fits"), [{ address: "dave@example.test", accountId: dave }]);
  for (const a of [bounced, fromNull, never, small]) {
    await waitFor(async () => ["bounced", "delivered"].includes((await deliveryRow(a.deliveries[0]!.id)).state));
  }
  const row = await deliveryRow(bounced.deliveries[0]!.id);
  assert.equal(row.state, "bounced");
  assert.equal(row.last_status, "5.2.2");
  assert.equal(row.last_reply, "552 5.2.2 Mailbox full");
  assert.equal(row.dsn_state, "pending");
  assert.equal((await deliveryRow(fromNull.deliveries[0]!.id)).dsn_state, "suppressed");
  assert.equal((await deliveryRow(never.deliveries[0]!.id)).dsn_state, "suppressed");
  assert.equal((await entriesFor(bounced.deliveries[0]!.id)).length, 0);
  assert.equal((await deliveryRow(small.deliveries[0]!.id)).state, "delivered");
  const used = (await env.pool.query("SELECT used_bytes FROM accounts WHERE id = $1", [dave])).rows[0].used_bytes;
  assert.equal(used, (await entriesFor(small.deliveries[0]!.id))[0].size);
  const events = (await env.pool.query("SELECT reply FROM delivery_events WHERE delivery_id = $1 AND event = 'bounced'", [row.id])).rows;
  assert.equal(events.length, 1);
});

test("a disabled or vanished account fails permanently", async () => {
  const erin = await account(env.pool, "erin@example.test");
  await env.pool.query("UPDATE accounts SET disabled = true WHERE id = $1", [erin]);
  const accepted = await send(env.pool, env.bus, message("disabled"), [{ address: "erin@example.test", accountId: erin }]);
  await waitFor(async () => (await deliveryRow(accepted.deliveries[0]!.id)).state === "bounced");
  assert.match((await deliveryRow(accepted.deliveries[0]!.id)).last_reply, /^550 5\.2\.1/);
  assert.deepEqual(await deliverLocal({ pool: env.pool, logger }, 987654321), { status: "missing" });
});

test("X-Spam-Flag: YES is filed into Junk; filter rules file, discard and forward in order", async () => {
  const frank = await account(env.pool, "frank@example.test");
  const grace = await account(env.pool, "grace@example.test");
  await addFilterRule(env.pool, "frank@example.test", { condition: { kind: "header", header: "Subject", op: "contains", value: "invoice" }, action: { kind: "fileinto", folder: "Bills" } });
  await addFilterRule(env.pool, "frank@example.test", { condition: { kind: "header", header: "Subject", op: "contains", value: "invoice" }, action: { kind: "discard" } });
  await addFilterRule(env.pool, "frank@example.test", { condition: { kind: "size", op: "over", bytes: 5_000 }, action: { kind: "discard" } });
  await addFilterRule(env.pool, "frank@example.test", { condition: { kind: "header", header: "List-Id", op: "exists" }, action: { kind: "forward", to: "grace@example.test" } });
  await addFilterRule(env.pool, "frank@example.test", { condition: { kind: "header", header: "X-Forward-Out", op: "is", value: "yes" }, action: { kind: "forward", to: "someone@remote.example", keepCopy: true } });

  const r = (address: string, accountId: number) => [{ address, accountId }];
  const spam = await send(env.pool, env.bus, message("cheap pills", "buy\r\n", "X-Spam-Flag: YES\r\n"), r("grace@example.test", grace));
  const bill = await send(env.pool, env.bus, message("Your Invoice 42"), r("frank@example.test", frank));
  const huge = await send(env.pool, env.bus, message("huge", "y".repeat(6_000) + "\r\n"), r("frank@example.test", frank));
  // Accepted as the SMTP intake does, with the session's trace and span ids.
  const list = await acceptMessage(
    env.pool,
    { raw: Buffer.from(message("list post", "hi\r\n", "List-Id: <dev.lists.example>\r\n")), envelopeFrom: "sender@remote.example", source: "inbound", traceId: "4bf92f3577b34da6a3ce929d0e0e4736", traceSpanId: "00f067aa0ba902b7" },
    [{ recipient: "frank@example.test", route: { kind: "local", accountId: frank, address: "frank@example.test" } }],
    "test",
  );
  await dispatchAccepted(env.bus, env.pool, list);
  const out = await send(env.pool, env.bus, message("forward out", "hi\r\n", "X-Forward-Out: yes\r\n"), r("frank@example.test", frank));
  const plain = await send(env.pool, env.bus, message("plain"), r("frank@example.test", frank));
  for (const a of [spam, bill, huge, list, out, plain]) {
    await waitFor(async () => (await deliveryRow(a.deliveries[0]!.id)).state === "delivered");
  }
  assert.equal((await entriesFor(spam.deliveries[0]!.id))[0].folder, "Junk");
  assert.equal((await entriesFor(bill.deliveries[0]!.id))[0].folder, "Bills", "the first matching rule wins");
  assert.equal((await entriesFor(huge.deliveries[0]!.id)).length, 0, "discarded");
  assert.equal((await entriesFor(list.deliveries[0]!.id)).length, 0, "forwarded without a copy");
  assert.equal((await entriesFor(plain.deliveries[0]!.id))[0].folder, "INBOX");
  assert.equal((await entriesFor(out.deliveries[0]!.id))[0].folder, "INBOX", "forward with keep files a copy");
  const folders = (await env.pool.query("SELECT name, uid_next FROM folders WHERE account_id = $1 ORDER BY name", [frank])).rows;
  assert.deepEqual(folders, [{ name: "Bills", uid_next: 2 }, { name: "INBOX", uid_next: 3 }]);

  // The local forward became a new message, delivered to grace, sent by frank.
  // The two forwarding deliveries are filed concurrently: order the forwards local first, not by id.
  const forwards = (await env.pool.query(
    `SELECT m.id, m.envelope_from, m.raw, m.trace_id, m.trace_span_id, d.final_recipient, d.kind, d.state FROM messages m JOIN deliveries d ON d.message_id = m.id
      WHERE m.source = 'forward' ORDER BY d.kind, m.id`,
  )).rows;
  assert.equal(forwards.length, 2);
  // Each copy stays in the original's journey: its retries continue that trace, a POP3 RETR links to it.
  assert.deepEqual([forwards[0].trace_id, forwards[0].trace_span_id], ["4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"]);
  assert.equal(forwards[0].envelope_from, "frank@example.test");
  assert.equal(forwards[0].final_recipient, "grace@example.test");
  assert.ok((forwards[0].raw as Buffer).toString().startsWith("Delivered-To: frank@example.test\r\n"));
  await waitFor(async () => (await env.pool.query("SELECT state FROM deliveries WHERE id = (SELECT id FROM deliveries WHERE message_id = $1)", [forwards[0].id])).rows[0].state === "delivered");
  const graceEntries = (await env.pool.query("SELECT folder FROM mailbox_entries WHERE account_id = $1 AND message_id = $2", [grace, forwards[0].id])).rows;
  assert.equal(graceEntries.length, 1);
  // The remote forward is a queued remote delivery for the relay.
  assert.equal(forwards[1].kind, "remote");
  assert.equal(forwards[1].final_recipient, "someone@remote.example");
  assert.equal(forwards[1].envelope_from, "frank@example.test");
  const kinds = (await env.pool.query("SELECT event FROM delivery_events WHERE delivery_id = $1 ORDER BY id", [list.deliveries[0]!.id])).rows.map((e) => e.event);
  assert.deepEqual(kinds, ["accepted", "forwarded"]);
});

test("a delivery routed to Junk at accept time (DMARC quarantine) is filed there; a user rule still wins", async () => {
  const ivan = await account(env.pool, "ivan@example.test");
  const quarantined = await send(env.pool, env.bus, message("quarantined"), [{ address: "ivan@example.test", accountId: ivan, folder: "Junk" }]);
  await addFilterRule(env.pool, "ivan@example.test", { condition: { kind: "header", header: "Subject", op: "is", value: "keep me" }, action: { kind: "fileinto", folder: "Keep" } });
  const ruled = await send(env.pool, env.bus, message("keep me"), [{ address: "ivan@example.test", accountId: ivan, folder: "Junk" }]);
  for (const a of [quarantined, ruled]) await waitFor(async () => (await deliveryRow(a.deliveries[0]!.id)).state === "delivered");
  assert.equal((await entriesFor(quarantined.deliveries[0]!.id))[0].folder, "Junk");
  assert.equal((await entriesFor(ruled.deliveries[0]!.id))[0].folder, "Keep");
});

test("a forwarding loop is broken: the copy stays in the INBOX", async () => {
  const hank = await account(env.pool, "hank@example.test");
  await addFilterRule(env.pool, "hank@example.test", { condition: { kind: "header", header: "Subject", op: "contains", value: "loop" }, action: { kind: "forward", to: "elsewhere@remote.example" } });
  const looped = await send(env.pool, env.bus, message("loop", "x\r\n", "Delivered-To: hank@example.test\r\n"), [{ address: "hank@example.test", accountId: hank }]);
  await waitFor(async () => (await deliveryRow(looped.deliveries[0]!.id)).state === "delivered");
  assert.equal((await entriesFor(looped.deliveries[0]!.id))[0].folder, "INBOX");
  const count = (await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE source = 'forward' AND position('hank@example.test'::bytea in raw) > 0")).rows[0].n;
  assert.equal(count, 0);
});

test("the header prefix never carries control characters", () => {
  assert.equal(headerPrefix("a\r\nb@x", "c@y").toString(), "Return-Path: <ab@x>\r\nDelivered-To: c@y\r\n");
  assert.equal(headerPrefix("", "c@y").toString(), "Return-Path: <>\r\nDelivered-To: c@y\r\n");
});

test("a rule sees the whole of a long header field: an address far down a large To: list matches", async () => {
  const lena = await account(env.pool, "lena@example.test");
  const mona = await account(env.pool, "mona@example.test");
  for (const address of ["lena@example.test", "mona@example.test"]) {
    await addFilterRule(env.pool, address, { condition: { kind: "header", header: "To", op: "contains", value: address }, action: { kind: "fileinto", folder: "Mine" } });
  }
  const crowd = Array.from({ length: 150 }, (_, i) => `Person Number ${i} <person-${i}@big.example.test>`);
  const to = [...crowd, "Lena <lena@example.test>", "Mona <mona@example.test>"].join(",\r\n ");
  const raw = `From: boss@big.example.test\r\nTo: ${to}\r\nSubject: all hands\r\n\r\nhello\r\n`;
  assert.ok(to.length > 6_000);
  // Not dispatched: filed here, the second copy from the summary the first one stored.
  const accepted = await send(env.pool, null, raw, [{ address: "lena@example.test", accountId: lena }, { address: "mona@example.test", accountId: mona }]);
  for (const delivery of accepted.deliveries) {
    const outcome = await deliverLocal({ pool: env.pool, logger }, delivery.id);
    assert.deepEqual(outcome, { status: "delivered", folder: "Mine", uid: 1 }, delivery.finalRecipient);
  }
});

test("a full mailbox: a forward that keeps a copy bounces and forwards nothing; one that keeps none still forwards", async () => {
  const olga = await account(env.pool, "olga@example.test", 10);
  const paul = await account(env.pool, "paul@example.test", 10);
  await addFilterRule(env.pool, "olga@example.test", { condition: { kind: "header", header: "Subject", op: "exists" }, action: { kind: "forward", to: "olga@remote.example", keepCopy: true } });
  await addFilterRule(env.pool, "paul@example.test", { condition: { kind: "header", header: "Subject", op: "exists" }, action: { kind: "forward", to: "paul@remote.example" } });
  const kept = await send(env.pool, null, message("forward kept but full"), [{ address: "olga@example.test", accountId: olga }]);
  const moved = await send(env.pool, null, message("forward only, full"), [{ address: "paul@example.test", accountId: paul }]);
  assert.deepEqual(await deliverLocal({ pool: env.pool, logger }, kept.deliveries[0]!.id), { status: "bounced", code: 552, enhanced: "5.2.2", text: "Mailbox full" });
  const forwarded = await deliverLocal({ pool: env.pool, logger }, moved.deliveries[0]!.id);
  assert.equal(forwarded.status, "forwarded");
  const targets = (await env.pool.query(
    "SELECT d.final_recipient FROM messages m JOIN deliveries d ON d.message_id = m.id WHERE m.source = 'forward' AND d.final_recipient IN ('olga@remote.example', 'paul@remote.example')",
  )).rows.map((r) => r.final_recipient);
  assert.deepEqual(targets, ["paul@remote.example"]);
  const used = (await env.pool.query("SELECT address, used_bytes FROM accounts WHERE id = ANY($1) ORDER BY address", [[olga, paul]])).rows;
  assert.deepEqual(used, [{ address: "olga@example.test", used_bytes: 0 }, { address: "paul@example.test", used_bytes: 0 }]);
  const events = (await env.pool.query("SELECT event FROM delivery_events WHERE delivery_id = $1 ORDER BY id", [kept.deliveries[0]!.id])).rows.map((e) => e.event);
  assert.deepEqual(events, ["accepted", "bounced"]);
});

test("an account removed while its delivery is queued: the copy bounces 5.1.1 with a DSN, and nothing is filed", async () => {
  const quinn = await account(env.pool, "quinn@example.test");
  const accepted = await send(env.pool, null, message("removed meanwhile"), [{ address: "quinn@example.test", accountId: quinn }]);
  await removeAccount(env.pool, "quinn@example.test");
  const deliveryId = accepted.deliveries[0]!.id;
  assert.deepEqual(await deliverLocal({ pool: env.pool, logger }, deliveryId), { status: "bounced", code: 550, enhanced: "5.1.1", text: "Mailbox unavailable: no such account" });
  const row = await deliveryRow(deliveryId);
  assert.deepEqual([row.state, row.dsn_state], ["bounced", "pending"]);
  assert.equal((await entriesFor(deliveryId)).length, 0);
});
