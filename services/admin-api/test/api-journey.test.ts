import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createApiToken } from "@mailstack/admin-ops";
import { addAccount, addDomain } from "@mailstack/db";
import { acceptMessage, recordEvents } from "@mailstack/queue";
import { startHarness, type ApiHarness } from "./helpers.ts";

let h: ApiHarness;
let queueId: string;
const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";

before(async () => {
  h = await startHarness({ JAEGER_UI_URL: "http://jaeger.example:16686/" });
  const pool = h.db.pool;
  await addDomain(pool, "local.test");
  await addDomain(pool, "other.test");
  const alice = await addAccount(pool, { address: "alice@local.test", password: "pw" });
  const raw = Buffer.from("Message-ID: <journey-1@sender.test>\r\nSubject: hi\r\n\r\nhello\r\n");
  const accepted = await acceptMessage(
    pool,
    { raw, envelopeFrom: "sender@sender.test", source: "inbound", messageIdHeader: "<journey-1@sender.test>", traceId },
    [
      { recipient: "alice@local.test", route: { kind: "local", accountId: alice.id, address: "alice@local.test" } },
      { recipient: "bob@remote.test", route: { kind: "remote", address: "bob@remote.test", domain: "remote.test" } },
    ],
    "mta-inbound",
  );
  queueId = accepted.queueId;
  const [local, remote] = accepted.deliveries;
  const messageId = accepted.messageId;
  // What the MDA and the relay would have recorded along the way.
  await recordEvents(pool, [
    { messageId, deliveryId: local!.id, event: "dispatched", service: "mta-inbound" },
    { messageId, deliveryId: remote!.id, event: "dispatched", service: "mta-inbound" },
    { messageId, deliveryId: local!.id, event: "delivered", service: "mda", detail: { folder: "INBOX", uid: 1 } },
    { messageId, deliveryId: remote!.id, event: "attempt", service: "mta-outbound", reply: "451 4.7.1 greylisted", detail: { mx: "mx.remote.test" } },
    { messageId, deliveryId: remote!.id, event: "deferred", service: "mta-outbound", reply: "451 4.7.1 greylisted" },
    { messageId, deliveryId: remote!.id, event: "attempt", service: "mta-outbound", reply: "250 2.0.0 queued as X" },
    { messageId, deliveryId: remote!.id, event: "delivered", service: "mta-outbound", reply: "250 2.0.0 queued as X" },
    { messageId, deliveryId: local!.id, event: "retrieved", service: "pop3" },
  ]);
  await pool.query("UPDATE deliveries SET state = 'delivered', attempts = 2, last_reply = '250 2.0.0 queued as X', remote_mta = 'mx.remote.test' WHERE id = $1", [remote!.id]);
  await pool.query("UPDATE deliveries SET state = 'delivered' WHERE id = $1", [local!.id]);
});
after(async () => h?.close());

type Journey = {
  messages: {
    queueId: string; messageId: string; traceId: string; traceUrl: string; envelopeFrom: string;
    recipients: { finalRecipient: string; state: string; folder: string | null; attempts: number; lastReply: string | null; events: { event: string; service: string; reply: string | null; detail: unknown }[] }[];
  }[];
};

test("journey by queue id: every recipient's state and history, and the trace link", async () => {
  const response = await h.call("GET", `/journey?queueId=${queueId}`);
  assert.equal(response.status, 200);
  const { messages } = (await response.json()) as Journey;
  assert.equal(messages.length, 1);
  const message = messages[0]!;
  assert.equal(message.queueId, queueId);
  assert.equal(message.traceId, traceId);
  assert.equal(message.traceUrl, `http://jaeger.example:16686/trace/${traceId}`);
  const alice = message.recipients.find((r) => r.finalRecipient === "alice@local.test")!;
  assert.equal(alice.state, "delivered");
  assert.deepEqual(alice.events.map((e) => e.event), ["accepted", "dispatched", "delivered", "retrieved"]);
  assert.deepEqual(alice.events[2]!.detail, { folder: "INBOX", uid: 1 });
  assert.equal(alice.folder, "INBOX");
  const bob = message.recipients.find((r) => r.finalRecipient === "bob@remote.test")!;
  assert.equal(bob.state, "delivered");
  assert.equal(bob.folder, null, "a remote delivery has no folder");
  assert.equal(bob.attempts, 2);
  assert.deepEqual(bob.events.map((e) => `${e.event}:${e.reply ?? ""}`), [
    "accepted:", "dispatched:", "attempt:451 4.7.1 greylisted", "deferred:451 4.7.1 greylisted",
    "attempt:250 2.0.0 queued as X", "delivered:250 2.0.0 queued as X",
  ]);
});

test("journey by Message-ID, with or without angle brackets; unknown ids are 404", async () => {
  for (const id of ["<journey-1@sender.test>", "journey-1@sender.test"]) {
    const response = await h.call("GET", `/journey?messageId=${encodeURIComponent(id)}`);
    assert.equal(response.status, 200);
    const { messages } = (await response.json()) as Journey;
    assert.deepEqual(messages.map((m) => m.queueId), [queueId]);
  }
  assert.equal((await h.call("GET", "/journey?queueId=NOSUCHID")).status, 404);
  assert.equal((await h.call("GET", `/journey?messageId=${encodeURIComponent("<none@x>")}`)).status, 404);
});

test("a tenant sees only its own recipients of a message it received, and nothing of others' mail", async () => {
  const { token: local } = await createApiToken(h.db.pool, "local-tenant", { domain: "local.test" });
  const seen = (await (await h.call("GET", `/journey?queueId=${queueId}`, { token: local })).json()) as Journey;
  assert.deepEqual(seen.messages[0]!.recipients.map((r) => r.finalRecipient), ["alice@local.test"]);
  const { token: other } = await createApiToken(h.db.pool, "other-tenant", { domain: "other.test" });
  const hidden = await h.call("GET", `/journey?queueId=${queueId}`, { token: other });
  assert.equal(hidden.status, 404);
});

test("a sender address from outside proves nothing: forging a tenant's domain in MAIL FROM shows that tenant no other tenant's recipients", async () => {
  const pool = h.db.pool;
  const alice = await pool.query("SELECT id FROM accounts WHERE address = 'alice@local.test'");
  const route = { kind: "local" as const, accountId: alice.rows[0].id as number, address: "alice@local.test" };
  // Mail from the Internet whose envelope sender claims other.test (anybody can write that).
  const forged = await acceptMessage(
    pool,
    { raw: Buffer.from("Message-ID: <forged@x.test>\r\n\r\nx\r\n"), envelopeFrom: "someone@other.test", source: "inbound", messageIdHeader: "<forged@x.test>" },
    [{ recipient: "alice@local.test", route }],
    "mta-inbound",
  );
  // Mail other.test really sent, through submission after a login.
  const sent = await acceptMessage(
    pool,
    { raw: Buffer.from("Message-ID: <sent@other.test>\r\n\r\nx\r\n"), envelopeFrom: "carl@other.test", authUser: "carl@other.test", source: "submission", messageIdHeader: "<sent@other.test>" },
    [{ recipient: "alice@local.test", route }],
    "msa",
  );
  const { token: other } = await createApiToken(pool, "other-tenant-2", { domain: "other.test" });
  for (const path of [`/journey?queueId=${forged.queueId}`, "/journey?messageId=forged@x.test"]) {
    const response = await h.call("GET", path, { token: other });
    assert.equal(response.status, 404, path);
  }
  const own = (await (await h.call("GET", `/journey?queueId=${sent.queueId}`, { token: other })).json()) as Journey;
  assert.deepEqual(own.messages[0]!.recipients.map((r) => r.finalRecipient), ["alice@local.test"], "a message it sent is shown in full");
  // The recipient's tenant still sees its own recipient of the forged message.
  const { token: local } = await createApiToken(pool, "local-tenant-2", { domain: "local.test" });
  const seen = (await (await h.call("GET", `/journey?queueId=${forged.queueId}`, { token: local })).json()) as Journey;
  assert.deepEqual(seen.messages[0]!.recipients.map((r) => r.finalRecipient), ["alice@local.test"]);
});
