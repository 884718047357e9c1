import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { addAccount, addAlias, addDomain, addFilterRule } from "@mailstack/db";
import { srsForward, srsReverse, srsTimestamp, type SrsSettings } from "@mailstack/mail";
import { createLogger } from "@mailstack/telemetry";
import { waitFor } from "@mailstack/testkit";
import { mailFrom, sendOnPort25, startPort25Stack, stopPort25Stack, transactionsTo, type Port25Stack } from "./port25-stack.ts";

// The Sender Rewriting Scheme over real sockets: mail from a remote sender that an alias (or the
// MDA's forward rule) sends on to a remote address leaves with an SRS0 MAIL FROM in SRS_DOMAIN;
// a bounce to that address on port 25 goes back to the sender; made-up, altered or expired SRS
// addresses are refused with 550; our own senders and <> are not rewritten; without SRS_DOMAIN
// nothing changes. The loopback MX records every command line.

const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
const DAY = 86_400_000;
const SRS: SrsSettings = { domain: "srs.example.test", secrets: ["current-secret", "previous-secret"], maxAgeDays: 21 };

type Stack = Port25Stack;

/** The directory and MX of these tests, with or without SRS. */
async function startStack(mxAddress: string, srs: SrsSettings | null): Promise<Stack> {
  let laterTries = 0;
  return startPort25Stack({
    logger,
    mxAddress,
    srs,
    moreMxDomains: ["fwd.other.test"],
    async setup(env) {
      await addDomain(env.pool, "example.test");
      await addAccount(env.pool, { address: "carol@example.test", password: "carol-Secret-pw-1" });
      await addAccount(env.pool, { address: "dave@example.test", password: "dave-Secret-pw-1" });
      await addFilterRule(env.pool, "dave@example.test", { condition: { kind: "header", header: "subject", op: "exists" }, action: { kind: "forward", to: "dave@dest.test" } });
      await addAlias(env.pool, "fwd@example.test", ["bob@dest.test", "carol@example.test"]);
      await addAlias(env.pool, "gone@example.test", ["nobody@dest.test"]);
      await addAlias(env.pool, "later@example.test", ["later@dest.test"]);
    },
    mxReply: (command) => {
      if (/^RCPT TO:<nobody@dest\.test>/i.test(command)) return "550 5.1.1 No such user";
      if (/^RCPT TO:<later@dest\.test>/i.test(command) && laterTries++ === 0) return "451 4.3.0 Try again later";
      return undefined;
    },
  });
}

const stopStack = stopPort25Stack;
const send = sendOnPort25;
const to = transactionsTo;

describe("SRS on (SRS_DOMAIN set)", () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack("127.0.0.41", SRS);
  });
  after(() => stopStack(stack));

  test("a remote sender's mail to an alias of a remote address leaves with an SRS0 sender; a bounce to that address goes back to the sender", async () => {
    const replies = await send(stack.inbound.port, "alice@origin.test", ["fwd@example.test"], "Subject: forwarded\r\n\r\nhello\r\n");
    assert.match(replies[0]!, /^250 /);
    const relayed = (await waitFor(() => to(stack.mx, "bob@dest.test")[0]))!;
    const sender = mailFrom(relayed);
    assert.match(sender, /^SRS0=[A-Za-z0-9+/]{4}=[A-Z2-7]{2}=origin\.test=alice@srs\.example\.test$/);
    // Signed with the first secret, stamped with the day the message was accepted.
    const { rows } = await stack.env.pool.query<{ received_at: Date }>("SELECT received_at FROM messages WHERE envelope_from = 'alice@origin.test'");
    assert.equal(sender, srsForward({ ...SRS, secrets: [SRS.secrets[0]!] }, "alice@origin.test", rows[0]!.received_at));
    assert.equal(sender.split("=")[2], srsTimestamp(rows[0]!.received_at));
    assert.deepEqual(srsReverse(SRS, sender, new Date()), { ok: true, address: "alice@origin.test" });

    // A remote MX's bounce to the SRS address (in lower case, as some systems fold it) is taken
    // on port 25 and relayed, from <>, to the original sender.
    assert.match((await send(stack.inbound.port, "", [sender.toLowerCase()], "Subject: Undelivered Mail Returned to Sender\r\n\r\nbounce\r\n"))[0]!, /^250 /);
    const back = (await waitFor(() => to(stack.mx, "alice@origin.test").find((t) => mailFrom(t) === "")))!;
    assert.deepEqual(back.slice(1), ["RCPT TO:<alice@origin.test>"]);
    const delivery = await stack.env.pool.query("SELECT recipient, final_recipient, kind, remote_domain FROM deliveries WHERE recipient = $1", [sender.toLowerCase()]);
    assert.deepEqual(delivery.rows, [{ recipient: sender.toLowerCase(), final_recipient: "alice@origin.test", kind: "remote", remote_domain: "origin.test" }]);
  });

  test("the alias's local target gets the message with the original Return-Path; the DSN for a refused remote target goes to the original sender", async () => {
    assert.match((await send(stack.inbound.port, "erin@origin.test", ["fwd@example.test", "gone@example.test"], "Subject: two aliases\r\n\r\nhello\r\n"))[1]!, /^250 /);
    const refused = (await waitFor(() => to(stack.mx, "nobody@dest.test")[0]))!;
    assert.match(mailFrom(refused), /^SRS0=.{4}=..=origin\.test=erin@srs\.example\.test$/);
    const dsn = (await waitFor(() => to(stack.mx, "erin@origin.test").find((t) => mailFrom(t) === "")))!;
    assert.equal(dsn.length, 2);
    assert.match(dsn[1]!, /^RCPT TO:<erin@origin\.test>( NOTIFY=NEVER)?$/);
    const local = await waitFor(async () => {
      const result = await stack.env.pool.query<{ header_prefix: Buffer }>(
        "SELECT e.header_prefix FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE m.envelope_from = 'erin@origin.test'",
      );
      return result.rows[0];
    });
    assert.match(local.header_prefix.toString(), /^Return-Path: <erin@origin\.test>\r\n/);
  });

  test("a deferred forward is retried with the same SRS address", async () => {
    assert.match((await send(stack.inbound.port, "frank@origin.test", ["later@example.test"], "Subject: retried\r\n\r\nhello\r\n"))[0]!, /^250 /);
    const attempts = (await waitFor(() => {
      const seen = to(stack.mx, "later@dest.test");
      return seen.length >= 2 ? seen : null;
    }))!;
    assert.match(mailFrom(attempts[0]!), /^SRS0=.{4}=..=origin\.test=frank@srs\.example\.test$/);
    assert.equal(mailFrom(attempts[1]!), mailFrom(attempts[0]!));
  });

  test("a made-up, altered or expired SRS address is refused at RCPT with 550 5.1.1; so is one signed with a secret we do not have", async () => {
    const now = new Date();
    const good = srsForward(SRS, "alice@origin.test", now)!;
    const [, hash, stamp] = good.split("=");
    const bad = [
      "SRS0=AAAA=" + stamp + "=origin.test=alice@srs.example.test",
      good.replace("=alice@", "=mallory@"),
      good.replace("=origin.test=", "=victim.test="),
      good.replace(`SRS0=${hash}=`, "SRS0="),
      srsForward({ ...SRS, secrets: ["attacker-secret"] }, "victim@origin.test", now)!,
      srsForward(SRS, "alice@origin.test", new Date(now.getTime() - 22 * DAY))!,
      "SRS1=AAAA=fwd.other.test==AAAA=" + stamp + "=origin.test=alice@srs.example.test",
    ];
    const replies = await send(stack.inbound.port, "", bad, "unused");
    for (const [i, text] of replies.entries()) assert.match(text, /^550 5\.1\.1 /, bad[i]);
    // One signed with the previous secret, at its last valid day, is still good.
    const older = srsForward({ ...SRS, secrets: [SRS.secrets[1]!] }, "alice@origin.test", new Date(now.getTime() - 21 * DAY))!;
    assert.match((await send(stack.inbound.port, "", [older], "Subject: old\r\n\r\nbounce\r\n"))[0]!, /^250 /);
  });

  test("SRS1: another forwarder's SRS0 sender is rewritten to SRS1, and a bounce to it goes to that forwarder", async () => {
    const theirs = srsForward({ domain: "fwd.other.test", secrets: ["their-secret"], maxAgeDays: 21 }, "grace@origin.test", new Date())!;
    assert.match((await send(stack.inbound.port, theirs, ["fwd@example.test"], "Subject: twice forwarded\r\n\r\nhello\r\n"))[0]!, /^250 /);
    const relayed = (await waitFor(() => to(stack.mx, "bob@dest.test").find((t) => mailFrom(t).startsWith("SRS1="))))!;
    const ours = mailFrom(relayed);
    assert.ok(ours.endsWith(`=fwd.other.test=${theirs.slice(4, theirs.indexOf("@"))}@srs.example.test`), ours);
    assert.match((await send(stack.inbound.port, "", [ours], "Subject: bounce\r\n\r\nbounce\r\n"))[0]!, /^250 /);
    const back = (await waitFor(() => to(stack.mx, theirs).find((t) => mailFrom(t) === "")))!;
    assert.deepEqual(back.slice(1), [`RCPT TO:<${theirs}>`]);
  });

  test("not rewritten: a sender in a domain we serve, the null sender, and the copy the MDA's forward rule sends (its sender is the account)", async () => {
    assert.match((await send(stack.inbound.port, "carol@example.test", ["fwd@example.test"], "Subject: local sender\r\n\r\nhello\r\n"))[0]!, /^250 /);
    assert.ok(await waitFor(() => to(stack.mx, "bob@dest.test").find((t) => mailFrom(t) === "carol@example.test")));
    assert.match((await send(stack.inbound.port, "", ["later@example.test"], "Subject: null sender\r\n\r\nhello\r\n"))[0]!, /^250 /);
    assert.ok(await waitFor(() => to(stack.mx, "later@dest.test").find((t) => mailFrom(t) === "")));
    assert.match((await send(stack.inbound.port, "henry@origin.test", ["dave@example.test"], "Subject: rule\r\n\r\nhello\r\n"))[0]!, /^250 /);
    const forwarded = (await waitFor(() => to(stack.mx, "dave@dest.test")[0]))!;
    assert.equal(mailFrom(forwarded), "dave@example.test");
    assert.ok(!stack.mx.commands().some((line) => /^MAIL FROM:<SRS[01]=[^>]*=(example\.test=carol|example\.test=dave)@/i.test(line)));
  });
});

describe("SRS off (the default)", () => {
  let stack: Stack;
  before(async () => {
    stack = await startStack("127.0.0.42", null);
  });
  after(() => stopStack(stack));

  test("forwarded mail keeps its sender, and an SRS address is no recipient of ours", async () => {
    assert.match((await send(stack.inbound.port, "alice@origin.test", ["fwd@example.test"], "Subject: forwarded\r\n\r\nhello\r\n"))[0]!, /^250 /);
    const relayed = (await waitFor(() => to(stack.mx, "bob@dest.test")[0]))!;
    assert.equal(mailFrom(relayed), "alice@origin.test");
    // srs.example.test is not a domain this system serves: relaying there is denied, as before.
    const valid = srsForward(SRS, "alice@origin.test", new Date())!;
    assert.match((await send(stack.inbound.port, "", [valid], "unused"))[0]!, /^554 5\.7\.1 /);
  });
});
