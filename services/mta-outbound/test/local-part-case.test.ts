import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { addAccount, addAlias, addDomain } from "@mailstack/db";
import { waitFor } from "@mailstack/testkit";
import { startChain, type Chain } from "./chain.ts";

// RFC 5321 2.4: a local part is case-sensitive except at its own host. Through the whole chain:
// our mailboxes are found however their local part is cased (and get one copy), while a sender
// or a remote recipient keeps the case it was given in: stored, in Return-Path, in the relay's
// MAIL FROM/RCPT TO (as a loopback MX records the lines) and in bounces.

let chain: Chain;

before(async () => {
  chain = await startChain({
    seed: async (pool) => {
      await addDomain(pool, "example.test");
      await addAccount(pool, { address: "alice@example.test", password: "alice-Secret-pw-1" });
      await addAccount(pool, { address: "carol@example.test", password: "carol-Secret-pw-1" });
      // Written by the admin with capitals: the remote targets keep them, the local one is found.
      await addAlias(pool, "list@example.test", ["Ann.Other@Dest.Test", "Gone.User@Dest.Test", "Carol@Example.Test"]);
    },
    // The MX refuses Gone.User, whatever its case, so that a bounce goes back.
    reply: (command) => (/^RCPT TO:<gone\.user@/i.test(command) ? "550 5.1.1 No such user" : undefined),
  });
});

after(async () => {
  await chain?.close();
});

/** How many deliveries the message with this subject has to an account (a second copy would be a second one). */
async function deliveriesTo(account: string, subject: string): Promise<number> {
  const result = await chain.env.pool.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM deliveries d JOIN accounts a ON a.id = d.account_id JOIN messages m ON m.id = d.message_id
      WHERE a.address = $1 AND position($2::bytea IN m.raw) > 0`,
    [account, Buffer.from(`Subject: ${subject}`)],
  );
  return result.rows[0]!.n;
}

async function envelopeFrom(subject: string): Promise<string | undefined> {
  const result = await chain.env.pool.query<{ envelope_from: string }>(
    "SELECT envelope_from FROM messages WHERE source IN ('inbound', 'submission') AND position($1::bytea IN raw) > 0",
    [Buffer.from(`Subject: ${subject}`)],
  );
  return result.rows[0]?.envelope_from;
}

test("port 25: a mixed-case sender is stored, written in Return-Path, relayed and bounced to as given; the alias's remote target keeps its case; local mixed-case RCPTs reach one mailbox once", async () => {
  await chain.send(
    chain.inbound.port,
    ["MAIL FROM:<Bob.Sender@Origin.Test>", "RCPT TO:<List@Example.Test>", "RCPT TO:<ALICE@example.test>", "RCPT TO:<alice@Example.TEST>"],
    "Subject: case 25\r\n\r\nhello\r\n",
  );
  assert.equal(await envelopeFrom("case 25"), "Bob.Sender@origin.test");

  const copies = await waitFor(async () => {
    const found = (await chain.mailbox("alice@example.test")).filter((m) => m.includes("Subject: case 25"));
    return found.length > 0 ? found : undefined;
  });
  const carol = (await waitFor(async () => (await chain.mailbox("carol@example.test")).find((m) => m.includes("Subject: case 25"))))!;
  assert.match(carol, /^Return-Path: <Bob\.Sender@origin\.test>\r\nDelivered-To: carol@example\.test\r\n/);

  const relayed = (await waitFor(() => chain.transactions().find((t) => t[0]!.startsWith("MAIL FROM:<Bob.Sender@origin.test>"))))!;
  assert.deepEqual(relayed.slice(1).sort(), ["RCPT TO:<Ann.Other@dest.test>", "RCPT TO:<Gone.User@dest.test>"]);

  // The DSN for Gone.User goes to the sender as given, and names the refused recipient as given.
  const bounce = (await waitFor(() => chain.transactions().find((t) => t[0]!.startsWith("MAIL FROM:<>") && t.some((l) => l.includes("origin.test")))))!;
  assert.equal(bounce.length, 2);
  assert.match(bounce[1]!, /^RCPT TO:<Bob\.Sender@origin\.test>( |$)/);
  const dsn = await chain.env.pool.query<{ raw: Buffer }>("SELECT raw FROM messages WHERE source = 'bounce' AND position('Bob.Sender@origin.test'::bytea IN raw) > 0");
  assert.equal(dsn.rows.length, 1);
  assert.match(dsn.rows[0]!.raw.toString("latin1"), /Final-Recipient: rfc822; ?Gone\.User@dest\.test/i);

  // ALICE@ and alice@ were one mailbox: one copy, filed under the account's own name.
  assert.equal(await deliveriesTo("alice@example.test", "case 25"), 1);
  assert.equal(copies!.length, 1);
  assert.match(copies![0]!, /^Return-Path: <Bob\.Sender@origin\.test>\r\nDelivered-To: alice@example\.test\r\n/);
});

test("port 587: Alice@Example.Test logs in and sends as herself; the relay writes her address and remote recipients as given, A@r and a@r both; CAROL@ and carol@ get one copy", async () => {
  const login = Buffer.from("\0Alice@Example.Test\0alice-Secret-pw-1").toString("base64");
  await chain.send(
    chain.msa.submissionPort,
    [
      `AUTH PLAIN ${login}`,
      "MAIL FROM:<Alice@Example.Test>",
      "RCPT TO:<Ann.Other@Dest.Test>",
      "RCPT TO:<ann.other@dest.test>",
      "RCPT TO:<CAROL@example.test>",
      "RCPT TO:<carol@EXAMPLE.test>",
    ],
    "From: Alice <Alice@Example.Test>\r\nSubject: case 587\r\n\r\nhello\r\n",
  );
  assert.equal(await envelopeFrom("case 587"), "Alice@example.test");

  const relayed = (await waitFor(() => chain.transactions().find((t) => t[0]!.startsWith("MAIL FROM:<Alice@example.test>"))))!;
  // RFC 5321 2.4: the remote host may hold two mailboxes there; like Postfix, both are sent.
  assert.deepEqual(relayed.slice(1).sort(), ["RCPT TO:<Ann.Other@dest.test>", "RCPT TO:<ann.other@dest.test>"]);

  const copies = await waitFor(async () => {
    const found = (await chain.mailbox("carol@example.test")).filter((m) => m.includes("Subject: case 587"));
    return found.length > 0 ? found : undefined;
  });
  assert.equal(await deliveriesTo("carol@example.test", "case 587"), 1);
  assert.equal(copies!.length, 1);
  assert.match(copies![0]!, /^Return-Path: <Alice@example\.test>\r\nDelivered-To: carol@example\.test\r\n/);
});
