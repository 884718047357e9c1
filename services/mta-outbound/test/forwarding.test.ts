import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { addAccount, addAlias, addDomain, addFilterRule, setAccountDisabled } from "@mailstack/db";
import { srsReverse, type SrsSettings } from "@mailstack/mail";
import { createLogger } from "@mailstack/telemetry";
import { waitFor } from "@mailstack/testkit";
import { mailFrom, mxTransactions, rcpts, sendOnPort25, startPort25Stack, stopPort25Stack, transactionsTo, type Port25Stack } from "./port25-stack.ts";

// Aliases, the catch-all and the MDA's forward rule end to end, with SRS on and off: port 25 of
// the inbound MTA, the MDA filing local copies, the relay sending remote ones to a loopback MX
// (which records every command) found through a loopback DNS server. What each flow checks:
// who gets a copy (once), the MAIL FROM of the forwarded copy, and where a bounce of it goes.

const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
const SRS: SrsSettings = { domain: "srs.example.test", secrets: ["acceptance-secret"], maxAgeDays: 21 };

type Stack = Port25Stack;

async function startStack(mxAddress: string, srs: SrsSettings | null): Promise<Stack> {
  return startPort25Stack({
    logger,
    mxAddress,
    srs,
    async setup(env) {
      await addDomain(env.pool, "example.test");
      await addDomain(env.pool, "catchall.test");
      for (const name of ["carol", "dave", "olga"]) await addAccount(env.pool, { address: `${name}@example.test`, password: `${name}-Secret-pw-1` });
      await addFilterRule(env.pool, "dave@example.test", { condition: { kind: "header", header: "subject", op: "contains", value: "fwdme" }, action: { kind: "forward", to: "refuse@dest.test" } });
      await addAccount(env.pool, { address: "erik@example.test", password: "erik-Secret-pw-1" });
      await addFilterRule(env.pool, "erik@example.test", { condition: { kind: "header", header: "subject", op: "exists" }, action: { kind: "forward", to: "refuse@dest.test" } });
      await setAccountDisabled(env.pool, "olga@example.test", true);
      await addAlias(env.pool, "inner@example.test", ["carol@example.test", "x2@dest.test"]);
      await addAlias(env.pool, "outer@example.test", ["inner@example.test", "x1@dest.test"]);
      await addAlias(env.pool, "*@catchall.test", ["catch@dest.test"]);
      await addAlias(env.pool, "two1@example.test", ["carol@example.test", "same@dest.test"]);
      await addAlias(env.pool, "two2@example.test", ["carol@example.test", "same@dest.test"]);
      await addAlias(env.pool, "mixed@example.test", ["carol@example.test", "far@dest.test"]);
      await addAlias(env.pool, "toolga@example.test", ["olga@example.test"]);
      // A->B->A, made by editing A after B was created (addAlias checks only that targets exist).
      await addAlias(env.pool, "loopa@example.test", ["carol@example.test"]);
      await addAlias(env.pool, "loopb@example.test", ["loopa@example.test"]);
      await env.pool.query("UPDATE aliases SET targets = '{loopb@example.test}' WHERE address = 'loopa@example.test'");
      // A self-target next to real ones: the loop leg is dropped, the others get the message.
      await addAlias(env.pool, "selfa@example.test", ["carol@example.test"]);
      await addAlias(env.pool, "selfb@example.test", ["selfa@example.test", "self@dest.test"]);
      await env.pool.query("UPDATE aliases SET targets = '{carol@example.test,selfa@example.test,selfb@example.test}' WHERE address = 'selfa@example.test'");
    },
    mxReply: (command) => (/^RCPT TO:<refuse@dest\.test>/i.test(command) ? "550 5.1.1 No such user" : undefined),
  });
}

const stopStack = stopPort25Stack;
const send = sendOnPort25;
const transactions = mxTransactions;
const to = transactionsTo;

/** The copies filed for an account of messages whose Subject has the text. */
async function filed(stack: Stack, account: string, subject: string): Promise<Array<{ envelope_from: string; header_prefix: string }>> {
  const result = await stack.env.pool.query<{ envelope_from: string; header_prefix: Buffer }>(
    `SELECT m.envelope_from, e.header_prefix FROM mailbox_entries e JOIN accounts a ON a.id = e.account_id JOIN messages m ON m.id = e.message_id
      WHERE a.address = $1 AND position($2 in convert_from(m.raw, 'UTF8')) > 0 ORDER BY e.id`,
    [account, subject],
  );
  return result.rows.map((r) => ({ envelope_from: r.envelope_from, header_prefix: r.header_prefix.toString() }));
}

/** Waits until every delivery of the messages from the sender is final. */
async function settled(stack: Stack, sender: string): Promise<void> {
  await waitFor(async () => {
    const result = await stack.env.pool.query(
      "SELECT count(*)::int AS open FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE m.envelope_from = $1 AND d.state NOT IN ('delivered', 'bounced', 'failed', 'expired')",
      [sender],
    );
    return result.rows[0].open === 0 ? true : null;
  });
}

function flows(name: string, mxAddress: string, srs: SrsSettings | null): void {
  describe(name, () => {
    let stack: Stack;
    before(async () => {
      stack = await startStack(mxAddress, srs);
    });
    after(() => stopStack(stack));

    /** The MAIL FROM expected for a copy an alias forwards from the sender. */
    const forwardedFrom = (sender: string) => (srs ? new RegExp(`^SRS0=.{4}=..=${sender.split("@")[1]!.replace(/\./g, "\\.")}=${sender.split("@")[0]}@srs\\.example\\.test$`) : new RegExp(`^${sender.replace(/\./g, "\\.")}$`));

    test("nested aliases mixing local and remote targets: one copy in the mailbox, both remote targets in one transaction", async () => {
      assert.match((await send(stack.inbound.port, "nest@origin.test", ["outer@example.test"], "Subject: nested\r\n\r\nhello\r\n"))[0]!, /^250 /);
      const relayed = (await waitFor(() => to(stack.mx, "x1@dest.test")[0]))!;
      assert.deepEqual(rcpts(relayed).sort(), ["x1@dest.test", "x2@dest.test"]);
      assert.match(mailFrom(relayed), forwardedFrom("nest@origin.test"));
      await settled(stack, "nest@origin.test");
      const copies = await filed(stack, "carol@example.test", "Subject: nested");
      assert.equal(copies.length, 1);
      assert.match(copies[0]!.header_prefix, /^Return-Path: <nest@origin\.test>\r\n/);
    });

    test("a catch-all with a remote target forwards mail for any address of its domain", async () => {
      assert.match((await send(stack.inbound.port, "cat@origin.test", ["whoever@catchall.test"], "Subject: catch-all\r\n\r\nhello\r\n"))[0]!, /^250 /);
      const relayed = (await waitFor(() => to(stack.mx, "catch@dest.test")[0]))!;
      assert.deepEqual(rcpts(relayed), ["catch@dest.test"]);
      assert.match(mailFrom(relayed), forwardedFrom("cat@origin.test"));
    });

    test("an alias loop is refused with 550 5.4.6; a self-target next to real targets is dropped and the others get one copy", async () => {
      assert.match((await send(stack.inbound.port, "loop@origin.test", ["loopa@example.test"], "unused"))[0]!, /^550 5\.4\.6 /);
      assert.match((await send(stack.inbound.port, "self@origin.test", ["selfa@example.test"], "Subject: self-target\r\n\r\nhello\r\n"))[0]!, /^250 /);
      const relayed = (await waitFor(() => to(stack.mx, "self@dest.test")[0]))!;
      assert.deepEqual(rcpts(relayed), ["self@dest.test"]);
      await settled(stack, "self@origin.test");
      assert.equal((await filed(stack, "carol@example.test", "Subject: self-target")).length, 1);
      assert.equal(to(stack.mx, "self@dest.test").length, 1);
    });

    test("an alias whose only target is a disabled account is refused with 550 5.2.1", async () => {
      assert.match((await send(stack.inbound.port, "dis@origin.test", ["toolga@example.test"], "unused"))[0]!, /^550 5\.2\.1 /);
    });

    test("a mailbox and a remote address named through two aliases and directly get one copy each", async () => {
      const replies = await send(stack.inbound.port, "twice@origin.test", ["two1@example.test", "two2@example.test", "carol@example.test"], "Subject: named twice\r\n\r\nhello\r\n");
      assert.deepEqual(replies.map((r) => r.slice(0, 4)), ["250 ", "250 ", "250 "]);
      await settled(stack, "twice@origin.test");
      assert.equal((await filed(stack, "carol@example.test", "Subject: named twice")).length, 1);
      const relayed = to(stack.mx, "same@dest.test");
      assert.equal(relayed.length, 1);
      assert.deepEqual(rcpts(relayed[0]!), ["same@dest.test"]);
    });

    test("a bounce (<>) to an alias with a local and a remote target stays <> on the remote copy", async () => {
      assert.match((await send(stack.inbound.port, "", ["mixed@example.test"], "Subject: null-sender fan-out\r\n\r\nbounce\r\n"))[0]!, /^250 /);
      const relayed = (await waitFor(() => to(stack.mx, "far@dest.test").find((t) => mailFrom(t) === "")))!;
      assert.deepEqual(rcpts(relayed), ["far@dest.test"]);
      assert.equal(transactions(stack.mx).filter((t) => rcpts(t).includes("far@dest.test") && mailFrom(t) !== "").length, 0);
      await settled(stack, "");
      const copies = await filed(stack, "carol@example.test", "Subject: null-sender fan-out");
      assert.equal(copies.length, 1);
      assert.match(copies[0]!.header_prefix, /^Return-Path: <>\r\n/);
    });

    test("the forward rule's copy goes from the account; its bounce comes back to the account's mailbox, once", async () => {
      assert.match((await send(stack.inbound.port, "rule@origin.test", ["dave@example.test"], "Subject: please fwdme\r\n\r\nhello\r\n"))[0]!, /^250 /);
      const refused = (await waitFor(() => to(stack.mx, "refuse@dest.test")[0]))!;
      assert.equal(mailFrom(refused), "dave@example.test");
      // The DSN (from <>) is filed for dave: its Subject does not carry the rule's text.
      const dsn = (await waitFor(async () => (await filed(stack, "dave@example.test", "refuse@dest.test")).find((c) => c.envelope_from === "")))!;
      assert.match(dsn.header_prefix, /^Return-Path: <>\r\n/);
      await settled(stack, "dave@example.test");
      assert.equal(to(stack.mx, "rule@origin.test").length, 0);
    });

    test("a rule forwarding everything to an address that refuses: the bounce of the copy is filed for the account, not forwarded to that address", async () => {
      assert.match((await send(stack.inbound.port, "all@origin.test", ["erik@example.test"], "Subject: forward all\r\n\r\nhello\r\n"))[0]!, /^250 /);
      const dsn = (await waitFor(async () => (await filed(stack, "erik@example.test", "refuse@dest.test")).find((c) => c.envelope_from === "")))!;
      assert.match(dsn.header_prefix, /^Return-Path: <>\r\n/);
      await settled(stack, "erik@example.test");
      assert.equal(to(stack.mx, "refuse@dest.test").filter((t) => mailFrom(t) === "").length, 0);
    });

    test("the same for a remote's later bounce of the forwarded copy (from <>, returning the copy's header)", async () => {
      const bounce = [
        "Subject: Undelivered Mail Returned to Sender",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"',
        "",
        "--b1",
        "Content-Type: text/plain",
        "",
        "refuse2@dest.test: mailbox full (late bounce)",
        "--b1",
        "Content-Type: text/rfc822-headers",
        "",
        "Delivered-To: erik@example.test",
        "Subject: forward all",
        "--b1--",
        "",
      ].join("\r\n");
      assert.match((await send(stack.inbound.port, "", ["erik@example.test"], bounce))[0]!, /^250 /);
      await waitFor(async () => ((await filed(stack, "erik@example.test", "late bounce")).length === 1 ? true : null));
      await settled(stack, "");
      await settled(stack, "erik@example.test");
      assert.equal(to(stack.mx, "refuse@dest.test").filter((t) => mailFrom(t) === "").length, 0);
    });

    test("the remote's bounce of a forwarded copy reaches the original sender, from <>", async () => {
      assert.match((await send(stack.inbound.port, "Alice@origin.test", ["mixed@example.test"], "Subject: to be bounced\r\n\r\nhello\r\n"))[0]!, /^250 /);
      const relayed = (await waitFor(() => to(stack.mx, "far@dest.test").find((t) => /alice/i.test(mailFrom(t)))))!;
      const sender = mailFrom(relayed);
      assert.match(sender, forwardedFrom("Alice@origin.test"));
      // The remote MX sends its bounce to the MAIL FROM it saw; some fold its case.
      for (const form of [sender, sender.toLowerCase(), sender.toUpperCase()]) {
        const replies = await send(stack.inbound.port, "", [form], `Subject: bounce ${form}\r\n\r\nbounce\r\n`);
        if (srs) assert.match(replies[0]!, /^250 /, form);
        else assert.match(replies[0]!, /^554 5\.7\.1 /, form);
      }
      if (!srs) return;
      assert.deepEqual(srsReverse(srs, sender, new Date()), { ok: true, address: "Alice@origin.test" });
      const back = await waitFor(() => {
        const seen = transactions(stack.mx).filter((t) => mailFrom(t) === "" && rcpts(t).some((r) => r.toLowerCase() === "alice@origin.test"));
        return seen.length >= 3 ? seen : null;
      });
      for (const t of back!) assert.equal(rcpts(t).length, 1);
    });
  });
}

flows("SRS on", "127.0.0.45", SRS);
flows("SRS off", "127.0.0.46", null);
