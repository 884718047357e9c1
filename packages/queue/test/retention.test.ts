import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestEnv, runMailctl, type TestEnv } from "@mailstack/testkit";
import { addAccount, addDomain, type AccountRow } from "@mailstack/db";
import { acceptMessage, purgeFinishedMessages } from "../src/index.ts";

let env: TestEnv;
let alice: AccountRow;
before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  alice = await addAccount(env.pool, { address: "alice@example.test", password: "x" });
});
after(async () => env.close());

const DAY = 24 * 3600 * 1000;

/** One message to alice (local) and one remote recipient, received `ageDays` ago, in the given states. */
async function message(
  label: string,
  options: { ageDays: number; local: "delivered" | "queued" | "filed"; remote: "delivered" | "deferred" | "bounced" | "bounced-dsn-pending" },
): Promise<number> {
  const accepted = await acceptMessage(
    env.pool,
    { raw: Buffer.from(`Subject: ${label}\r\n\r\nbody\r\n`), envelopeFrom: "s@remote.test", source: "inbound" },
    [
      { recipient: "alice@example.test", route: { kind: "local", accountId: alice.id, address: "alice@example.test" } },
      { recipient: "bob@far.test", route: { kind: "remote", address: "bob@far.test", domain: "far.test" } },
    ],
    "test",
  );
  const id = accepted.messageId;
  const [local, remote] = [accepted.deliveries.find((d) => d.kind === "local")!, accepted.deliveries.find((d) => d.kind === "remote")!];
  await env.pool.query("UPDATE messages SET received_at = now() - make_interval(days => $2) WHERE id = $1", [id, options.ageDays]);
  if (options.local !== "queued") await env.pool.query("UPDATE deliveries SET state = 'delivered' WHERE id = $1", [local.id]);
  if (options.local === "filed") {
    const uid = await env.pool.query<{ uid: number }>(
      "UPDATE folders SET uid_next = uid_next + 1 WHERE account_id = $1 AND name = 'INBOX' RETURNING uid_next - 1 AS uid",
      [alice.id],
    );
    await env.pool.query(
      "INSERT INTO mailbox_entries (account_id, folder, uid, message_id, delivery_id, header_prefix, size) VALUES ($1, 'INBOX', $2, $3, $4, ''::bytea, 20)",
      [alice.id, uid.rows[0]!.uid, id, local.id],
    );
  }
  const state = options.remote === "bounced-dsn-pending" ? "bounced" : options.remote;
  const dsn = options.remote === "bounced-dsn-pending" ? "pending" : options.remote === "bounced" ? "sent" : null;
  await env.pool.query("UPDATE deliveries SET state = $2, dsn_state = $3 WHERE id = $1", [remote.id, state, dsn]);
  return id;
}

async function exists(id: number): Promise<boolean> {
  return (await env.pool.query("SELECT 1 FROM messages WHERE id = $1", [id])).rowCount === 1;
}

async function publishedUpTo(eventId: number | "all"): Promise<void> {
  await env.pool.query("UPDATE event_outbox SET position = CASE WHEN $1::bigint IS NULL THEN (SELECT coalesce(max(id), 0) FROM delivery_events) ELSE $1 END WHERE name = 'nats'", [
    eventId === "all" ? null : eventId,
  ]);
}

test("finished messages in no mailbox are purged after the retention with their journey; everything still needed stays", async () => {
  const done = await message("done", { ageDays: 40, local: "delivered", remote: "delivered" });
  const bounced = await message("bounced", { ageDays: 40, local: "delivered", remote: "bounced" });
  const inMailbox = await message("in a mailbox", { ageDays: 40, local: "filed", remote: "delivered" });
  const waiting = await message("remote deferred", { ageDays: 40, local: "delivered", remote: "deferred" });
  const localQueued = await message("local queued", { ageDays: 40, local: "queued", remote: "delivered" });
  const dsnPending = await message("bounce not yet sent", { ageDays: 40, local: "delivered", remote: "bounced-dsn-pending" });
  const recent = await message("recent", { ageDays: 2, local: "delivered", remote: "delivered" });

  // Journey events not yet published to NATS hold a message back.
  await publishedUpTo(0);
  assert.equal(await purgeFinishedMessages(env.pool, { retentionMs: 30 * DAY }), 0);
  assert.ok(await exists(done));

  await publishedUpTo("all");
  assert.equal(await purgeFinishedMessages(env.pool, { retentionMs: 30 * DAY, batchSize: 1 }), 2, "batches repeat until done");
  assert.equal(await exists(done), false);
  assert.equal(await exists(bounced), false);
  for (const id of [done, bounced]) {
    const left = await env.pool.query("SELECT (SELECT count(*) FROM deliveries WHERE message_id = $1)::int + (SELECT count(*) FROM delivery_events WHERE message_id = $1)::int AS n", [id]);
    assert.equal(left.rows[0]!.n, 0, "deliveries and journey went with the message");
  }
  for (const id of [inMailbox, waiting, localQueued, dsnPending, recent]) assert.ok(await exists(id), `message ${id} is still needed`);

  // Once the owner deletes the last copy (POP3 DELE + QUIT flags the entry), the message goes
  // too, and the flagged entry with it.
  await env.pool.query("UPDATE mailbox_entries SET deleted = true WHERE message_id = $1", [inMailbox]);
  assert.equal(await purgeFinishedMessages(env.pool, { retentionMs: 30 * DAY }), 1);
  assert.equal(await exists(inMailbox), false);
  assert.equal((await env.pool.query("SELECT 1 FROM mailbox_entries WHERE message_id = $1", [inMailbox])).rowCount, 0);
});

test("mailctl queue purge deletes finished messages older than --older-than, and rejects a bad duration", async () => {
  const old = await message("a week old", { ageDays: 7, local: "delivered", remote: "delivered" });
  await publishedUpTo("all");
  const kept = await runMailctl(env.db.url, ["queue", "purge"]);
  assert.equal(kept.code, 0, kept.stderr);
  assert.ok(await exists(old), "the default retention is 30 days");

  const bad = await runMailctl(env.db.url, ["queue", "purge", "--older-than", "soon"]);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /invalid --older-than/);
  assert.ok(await exists(old));

  const purged = await runMailctl(env.db.url, ["queue", "purge", "--older-than", "5d"]);
  assert.equal(purged.code, 0, purged.stderr);
  assert.match(purged.stdout, /^1 finished message purged/m);
  assert.equal(await exists(old), false);
});
