import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { addAccount } from "@mailstack/db";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload, sampleMessage } from "../src/testing.ts";
import type { IntakeServer } from "../src/index.ts";
import { openSession, seedDirectory, startIntake } from "./fixtures.ts";

// RFC 5321 4.1.2 mailboxes as clients send them: Quoted-string local parts (qtextSMTP,
// quoted-pairSMTP), the length limits of 4.5.3.1, and what is stored for them.

let env: TestEnv;
let inbound: IntakeServer; // port 25: local recipients only
let submission: IntakeServer; // port 587: may relay

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  await addAccount(env.pool, { address: '"John Doe"@example.test', password: "secret-3" });
  inbound = await startIntake(env.pool, env.bus);
  submission = await startIntake(env.pool, env.bus, { service: "msa", source: "submission", allowRemote: true });
});

after(async () => {
  await inbound.stop(100);
  await submission.stop(100);
  await env.close();
});

async function transaction(client: RawSmtp, mail: string, rcpts: string[]): Promise<string> {
  assert.match((await client.command(mail)).text, /^250 /, mail);
  for (const rcpt of rcpts) assert.match((await client.command(rcpt)).text, /^250 /, rcpt);
  assert.equal((await client.command("DATA")).code, 354);
  const done = await client.command(dataPayload(sampleMessage()));
  const queueId = /queued as (\w+)/.exec(done.text)?.[1];
  assert.ok(queueId, done.text);
  return queueId;
}

async function stored(queueId: string): Promise<{ from: string; recipients: string[] }> {
  const message = await env.pool.query<{ id: number; envelope_from: string }>("SELECT id, envelope_from FROM messages WHERE queue_id = $1", [queueId]);
  const deliveries = await env.pool.query<{ final_recipient: string }>("SELECT final_recipient FROM deliveries WHERE message_id = $1 ORDER BY final_recipient", [message.rows[0]!.id]);
  return { from: message.rows[0]!.envelope_from, recipients: deliveries.rows.map((r) => r.final_recipient) };
}

describe("quoted local parts", () => {
  test("port 25: a quoted local part with a space in MAIL and RCPT is accepted; every quoting of one mailbox reaches it once, stored canonical", async () => {
    const client = await openSession(inbound.port());
    const queueId = await transaction(client, 'MAIL FROM:<"a b"@remote.example>', [
      'RCPT TO:<"john doe"@example.test>',
      'RCPT TO:<"John\\ Doe"@example.test>',
      'RCPT TO:<"user1"@example.test>',
      'RCPT TO:<"us\\er1"@Example.TEST>',
    ]);
    assert.deepEqual(await stored(queueId), { from: '"a b"@remote.example', recipients: ['"john doe"@example.test', "user1@example.test"] });
    client.close();
  });

  test("port 587: quoted remote recipients, with parameters after them, are stored quoted as needed", async () => {
    const client = await openSession(submission.port());
    const queueId = await transaction(client, 'MAIL FROM:<"Sender Name"@example.test> SIZE=100', [
      'RCPT TO:<"x\\ y"@remote.example> NOTIFY=FAILURE,DELAY',
      'RCPT TO:<"say \\"hi\\""@remote.example>',
      'RCPT TO:<"a>b <c>"@remote.example> NOTIFY=NEVER',
      'RCPT TO:<"back\\\\slash"@remote.example>',
      'RCPT TO:<"dots..here."@remote.example>',
      'RCPT TO:<""@remote.example>',
    ]);
    assert.deepEqual(await stored(queueId), {
      from: '"Sender Name"@example.test',
      recipients: ['""@remote.example', '"a>b <c>"@remote.example', '"back\\\\slash"@remote.example', '"dots..here."@remote.example', '"say \\"hi\\""@remote.example', '"x y"@remote.example'].sort(),
    });
    client.close();
  });

  test("a local part keeps its case (RFC 5321 2.4): a mailbox of ours named in two cases is one delivery, a remote A@r and a@r are two", async () => {
    const client = await openSession(submission.port());
    const queueId = await transaction(client, "MAIL FROM:<Bob.Sender@Origin.Example>", [
      "RCPT TO:<USER1@example.test>",
      "RCPT TO:<user1@Example.TEST>",
      "RCPT TO:<Team@example.test>",
      "RCPT TO:<Ann.Other@Remote.Example>",
      "RCPT TO:<ann.other@remote.example>",
      'RCPT TO:<"Ann Other"@remote.example>',
      'RCPT TO:<"Ann\ Other"@remote.example>',
    ]);
    assert.deepEqual(await stored(queueId), {
      from: "Bob.Sender@origin.example",
      recipients: ['"Ann Other"@remote.example', "Ann.Other@remote.example", "ann.other@remote.example", "user1@example.test", "user2@example.test"],
    });
    const rcpts = await env.pool.query<{ recipient: string }>(
      "SELECT d.recipient FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE m.queue_id = $1 AND d.kind = 'local' ORDER BY d.id",
      [queueId],
    );
    // The local copy records the RCPT as it was first given.
    assert.deepEqual(rcpts.rows.map((r) => r.recipient), ["USER1@example.test", "Team@example.test"]);
    client.close();
  });

  test("relay tricks inside a quoted local part, spaces or not, stay relay denied on both ports", async () => {
    for (const port of [inbound.port(), submission.port()]) {
      const client = await openSession(port);
      assert.equal((await client.command('MAIL FROM:<"a b"@remote.example>')).code, 250);
      for (const address of ['"user@remote.example"@example.test', '"some one@remote.example"@example.test', '"some one%remote.example"@example.test', '"remote.example!some one"@example.test', '@example.test:"a b"@remote.example']) {
        assert.match((await client.command(`RCPT TO:<${address}>`)).text, /^554 5\.7\.1 /, address);
      }
      client.close();
    }
  });

  test("malformed quoting and unquoted spaces are syntax errors", async () => {
    const client = await openSession(submission.port());
    assert.match((await client.command('MAIL FROM:<"a"b"@remote.example>')).text, /^5\d\d 5\.1\.7 /);
    assert.match((await client.command("MAIL FROM:<a b@remote.example>")).text, /^501 5\.1\.7 /);
    assert.equal((await client.command('MAIL FROM:<"a b"@remote.example>')).code, 250);
    for (const rcpt of ['<"unterminated@remote.example>', "<a b@remote.example>", '<"a b"@remote.example>NOTIFY=NEVER', '<"a b" @remote.example>', '<"a\\"@remote.example>']) {
      assert.match((await client.command(`RCPT TO:${rcpt}`)).text, /^5\d\d 5\.1\.3 /, rcpt);
    }
    client.close();
  });
});

describe("lengths and the null path (RFC 5321 4.5.3.1)", () => {
  const label = (c: string) => c.repeat(63);
  // A domain of exactly n octets made of valid labels.
  const domainOf = (n: number) => {
    const labels: string[] = [];
    let left = n;
    for (const c of "bcdefg") {
      if (left <= 64) break;
      labels.push(label(c));
      left -= 64;
    }
    labels.push("h".repeat(left - 5), "test");
    return labels.join(".");
  };

  test("a local part of 64 octets is accepted, 65 is 501 Path too long, quoted or not, in MAIL and RCPT", async () => {
    const client = await openSession(submission.port());
    assert.match((await client.command(`MAIL FROM:<${"s".repeat(65)}@remote.example>`)).text, /^501 5\.1\.7 /);
    assert.match((await client.command(`MAIL FROM:<"${"s".repeat(63)}"@remote.example>`)).text, /^501 5\.1\.7 /);
    assert.equal((await client.command(`MAIL FROM:<"${"s".repeat(62)}"@remote.example>`)).code, 250);
    assert.equal((await client.command(`RCPT TO:<${"a".repeat(64)}@remote.example>`)).code, 250);
    assert.equal((await client.command(`RCPT TO:<"${"b c".repeat(20)}00"@remote.example>`)).code, 250);
    assert.match((await client.command(`RCPT TO:<${"a".repeat(65)}@remote.example>`)).text, /^501 5\.1\.3 /);
    assert.match((await client.command(`RCPT TO:<"${"b c".repeat(21)}"@remote.example>`)).text, /^501 5\.1\.3 /);
    client.close();
  });

  test("UTF-8 local parts are measured in octets: 32 two-octet characters fit, 33 do not", async () => {
    const client = await openSession(submission.port());
    const utf8 = (n: number) => Buffer.from(`${"é".repeat(n)}@remote.example`, "utf8").toString("latin1");
    assert.equal((await client.command("MAIL FROM:<sender@example.test> SMTPUTF8")).code, 250);
    assert.equal((await client.command(`RCPT TO:<${utf8(32)}>`)).code, 250);
    assert.match((await client.command(`RCPT TO:<${utf8(33)}>`)).text, /^501 5\.1\.3 /);
    client.close();
  });

  test("a mailbox of 254 octets (a 256-octet path) is accepted, 255 is refused with 501", async () => {
    const client = await openSession(submission.port());
    const at254 = `${"a".repeat(64)}@${domainOf(189)}`;
    const at255 = `${"a".repeat(64)}@${domainOf(190)}`;
    assert.equal(at254.length, 254);
    assert.equal((await client.command(`MAIL FROM:<${at254}>`)).code, 250);
    assert.equal((await client.command(`RCPT TO:<${at254}>`)).code, 250);
    assert.match((await client.command(`RCPT TO:<${at255}>`)).text, /^501 5\.1\.3 /);
    assert.match((await client.command(`RCPT TO:<a@${domainOf(254)}>`)).text, /^501 5\.1\.3 /);
    client.close();
  });

  test("<> is the null reverse-path for MAIL only", async () => {
    const client = await openSession(inbound.port());
    assert.equal((await client.command("MAIL FROM:<>")).code, 250);
    assert.match((await client.command("RCPT TO:<>")).text, /^501 5\.1\.3 /);
    assert.match((await client.command('RCPT TO:<"">')).text, /^5\d\d 5\.1\.3 /);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    client.close();
  });
});
