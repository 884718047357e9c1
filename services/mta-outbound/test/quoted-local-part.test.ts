import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { addAccount, addAlias, addDomain } from "@mailstack/db";
import { waitFor } from "@mailstack/testkit";
import { startChain, type Chain } from "./chain.ts";

// A Quoted-string local part (RFC 5321 4.1.2) through the whole chain: accepted on 25 and 587,
// looked up in its canonical form, written quoted into Return-Path/Delivered-To and into the
// relay's MAIL FROM/RCPT TO (as a loopback MX records the lines), and bounced to when quoted.
// (The case of local parts: local-part-case.test.ts.)

let chain: Chain;

before(async () => {
  chain = await startChain({
    seed: async (pool) => {
      await addDomain(pool, "example.test");
      await addAccount(pool, { address: '"John Doe"@example.test', password: "john-Secret-pw-1" });
      await addAlias(pool, "fwd@example.test", ['"bad guy"@dest.test', '"x \\"y\\" z"@dest.test']);
    },
    // The MX refuses "bad guy".
    reply: (command) => (/^RCPT TO:<"bad guy"@/i.test(command) ? "550 5.1.1 No such user" : undefined),
  });
});

after(async () => {
  await chain?.close();
});

test("port 25: a quoted sender to a quoted local account and an alias of quoted remote addresses; the bounce goes back to the quoted sender", async () => {
  await chain.send(chain.inbound.port, ['MAIL FROM:<"a b"@origin.test>', 'RCPT TO:<"John\\ Doe"@example.test>', "RCPT TO:<fwd@example.test>"], "Subject: port 25\r\n\r\nhello\r\n");

  const copy = (await waitFor(async () => (await chain.mailbox('"john doe"@example.test')).find((m) => m.includes("Subject: port 25"))))!;
  assert.match(copy, /^Return-Path: <"a b"@origin\.test>\r\nDelivered-To: "john doe"@example\.test\r\n/);

  const relayed = (await waitFor(() => chain.transactions().find((t) => t[0]!.startsWith('MAIL FROM:<"a b"@origin.test>'))))!;
  assert.deepEqual(relayed.slice(1).sort(), ['RCPT TO:<"bad guy"@dest.test>', 'RCPT TO:<"x \\"y\\" z"@dest.test>']);
  // The DSN for "bad guy" goes to the sender, quoted as it was.
  const bounce = (await waitFor(() => chain.transactions().find((t) => t[0]!.startsWith("MAIL FROM:<>") && t.some((l) => l.includes("origin.test")))))!;
  assert.equal(bounce.length, 2);
  assert.match(bounce[1]!, /^RCPT TO:<"a b"@origin\.test>( |$)/);
});

test("port 587: the account logs in and sends as itself however it quotes its name; the relay writes the canonical quoting; its bounce reaches its mailbox", async () => {
  const login = Buffer.from('\0"John Doe"@example.test\0john-Secret-pw-1').toString("base64");
  await chain.send(chain.msa.submissionPort, [`AUTH PLAIN ${login}`, 'MAIL FROM:<"john\\ doe"@Example.test>', 'RCPT TO:<"ann\\ other"@dest.test>', 'RCPT TO:<"bad guy"@dest.test>'], 'From: "john doe"@example.test\r\nSubject: port 587\r\n\r\nhello\r\n');

  const relayed = (await waitFor(() => chain.transactions().find((t) => t[0]!.startsWith('MAIL FROM:<"john doe"@example.test>'))))!;
  assert.deepEqual(relayed.slice(1).sort(), ['RCPT TO:<"ann other"@dest.test>', 'RCPT TO:<"bad guy"@dest.test>']);
  const bounce = (await waitFor(async () => (await chain.mailbox('"john doe"@example.test')).find((m) => m.startsWith("Return-Path: <>"))))!;
  assert.match(bounce, /^Return-Path: <>\r\nDelivered-To: "john doe"@example\.test\r\n/);
  assert.match(bounce, /^To: <"john doe"@example\.test>\r$/m);
  assert.match(bounce, /Final-Recipient: rfc822; ?"bad guy"@dest\.test/i);
});
