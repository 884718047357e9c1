import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { generateDsns } from "@mailstack/dsn";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { startMda, type Mda } from "../src/mda.ts";
import { account, message, send } from "./helpers.ts";

let env: TestEnv;
let mda: Mda;
before(async () => {
  env = await createTestEnv();
  mda = await startMda({ pool: env.pool, bus: env.bus, logger: createLogger("mda-test", "silent"), config: { LMTP_ENABLED: false } });
});
after(async () => {
  await mda.stop();
  await env.close();
});

const dsnOptions = { reportingMta: "mx.example.test", service: "test" };

test("an over-quota delivery produces one bounce to the envelope sender, which lands in the sender's mailbox", async () => {
  const sender = await account(env.pool, "writer@example.test");
  const full = await account(env.pool, "full@example.test", 10);
  const accepted = await send(env.pool, env.bus, message("will bounce"), [{ address: "full@example.test", accountId: full }], "writer@example.test");
  const deliveryId = accepted.deliveries[0]!.id;
  await waitFor(async () => (await env.pool.query("SELECT state FROM deliveries WHERE id = $1", [deliveryId])).rows[0].state === "bounced");

  assert.equal(await generateDsns(env.bus, env.pool, dsnOptions), 1);
  assert.equal((await env.pool.query("SELECT dsn_state FROM deliveries WHERE id = $1", [deliveryId])).rows[0].dsn_state, "sent");
  const bounces = (await env.pool.query("SELECT id, envelope_from, raw FROM messages WHERE source = 'bounce'")).rows;
  assert.equal(bounces.length, 1);
  assert.equal(bounces[0].envelope_from, "", "a bounce is sent from <>");
  const report = (bounces[0].raw as Buffer).toString();
  assert.match(report, /multipart\/report; *report-type=("?)delivery-status/i);
  assert.match(report, /Status: 5\.2\.2/);
  assert.match(report, /Final-Recipient: rfc822; *full@example\.test/i);

  // The MDA files the bounce into the sender's INBOX, with Return-Path: <>.
  const entry = await waitFor(async () =>
    (await env.pool.query("SELECT header_prefix FROM mailbox_entries WHERE account_id = $1 AND message_id = $2", [sender, bounces[0].id])).rows[0],
  );
  assert.equal(entry.header_prefix.toString(), "Return-Path: <>\r\nDelivered-To: writer@example.test\r\n");
  assert.equal(await generateDsns(env.bus, env.pool, dsnOptions), 0, "one DSN only");
});

test("an over-quota delivery of a message from <> produces no bounce", async () => {
  const full = await account(env.pool, "full2@example.test", 10);
  const before = (await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE source = 'bounce'")).rows[0].n;
  const accepted = await send(env.pool, env.bus, message("bounce of a bounce"), [{ address: "full2@example.test", accountId: full }], "");
  await waitFor(async () => (await env.pool.query("SELECT state FROM deliveries WHERE id = $1", [accepted.deliveries[0]!.id])).rows[0].state === "bounced");
  await generateDsns(env.bus, env.pool, dsnOptions);
  assert.equal((await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE source = 'bounce'")).rows[0].n, before);
  assert.equal((await env.pool.query("SELECT dsn_state FROM deliveries WHERE id = $1", [accepted.deliveries[0]!.id])).rows[0].dsn_state, "suppressed");
});

test("NOTIFY=SUCCESS: a filed copy gets one \"delivered\" notice from us, the final MTA (RFC 3461 5.2.2); none from <> or without SUCCESS", async () => {
  const sender = await account(env.pool, "asks@example.test");
  const rcpt = await account(env.pool, "gets@example.test");
  const dsnState = async (id: number) => (await env.pool.query("SELECT state, dsn_state FROM deliveries WHERE id = $1", [id])).rows[0];
  // Sent together, so the consumer sees them in one batch.
  const [asked, fromNull, failureOnly] = await Promise.all([
    send(env.pool, env.bus, message("tell me"), [{ address: "gets@example.test", accountId: rcpt, notify: ["SUCCESS", "FAILURE"] }], "asks@example.test"),
    send(env.pool, env.bus, message("from null"), [{ address: "gets@example.test", accountId: rcpt, notify: ["SUCCESS"] }], ""),
    send(env.pool, env.bus, message("failures only"), [{ address: "gets@example.test", accountId: rcpt, notify: ["FAILURE"] }], "asks@example.test"),
  ]);
  const ids = [asked, fromNull, failureOnly].map((a) => a.deliveries[0]!.id);
  await waitFor(async () => (await Promise.all(ids.map(dsnState))).every((r) => r.state === "delivered"));
  assert.deepEqual(await Promise.all(ids.map(dsnState)), [
    { state: "delivered", dsn_state: "pending" },
    { state: "delivered", dsn_state: null },
    { state: "delivered", dsn_state: null },
  ]);

  assert.equal(await generateDsns(env.bus, env.pool, dsnOptions), 1);
  assert.equal((await dsnState(ids[0]!)).dsn_state, "sent");
  const notice = (await env.pool.query(
    "SELECT m.raw FROM messages m JOIN deliveries d ON d.message_id = m.id WHERE m.source = 'bounce' AND d.account_id = $1",
    [sender],
  )).rows;
  assert.equal(notice.length, 1);
  const report = (notice[0].raw as Buffer).toString();
  assert.match(report, /^Subject: Successful Mail Delivery Report\r$/m);
  assert.match(report, /^Final-Recipient: rfc822; *gets@example\.test\r$/m);
  assert.match(report, /^Action: delivered\r$/m);
  assert.match(report, /^Status: 2\.0\.0\r$/m);
  assert.equal(await generateDsns(env.bus, env.pool, dsnOptions), 0, "one notice only");
});

test("a success notice does not tell the sender which folder the copy was filed in, nor its UID", async () => {
  const sender = await account(env.pool, "curious@example.test");
  const rcpt = await account(env.pool, "private@example.test");
  const spam = message("flagged", "Buy now.\r\n", "X-Spam-Flag: YES\r\n");
  const accepted = await send(env.pool, env.bus, spam, [{ address: "private@example.test", accountId: rcpt, notify: ["SUCCESS"] }], "curious@example.test");
  const id = accepted.deliveries[0]!.id;
  const row = await waitFor(async () => {
    const r = (await env.pool.query("SELECT state, folder, last_reply FROM deliveries WHERE id = $1", [id])).rows[0];
    return r.state === "delivered" ? r : null;
  });
  // The copy went to Junk, which the journey keeps for the administrator.
  assert.equal(row.folder, "Junk");
  assert.match(row.last_reply, /Junk as UID \d+/);

  assert.equal(await generateDsns(env.bus, env.pool, dsnOptions), 1);
  const notice = (await env.pool.query(
    "SELECT m.raw FROM messages m JOIN deliveries d ON d.message_id = m.id WHERE m.source = 'bounce' AND d.account_id = $1",
    [sender],
  )).rows;
  assert.equal(notice.length, 1);
  const report = (notice[0].raw as Buffer).toString();
  assert.match(report, /^Action: delivered\r$/m);
  assert.match(report, /^Status: 2\.0\.0\r$/m);
  assert.doesNotMatch(report, /Junk|UID/, "the recipient's folders and mailbox size are not the sender's business");
});
