// ORCPT of addr-type utf-8 (RFC 6533 3) at the intake, over a real socket: the 7-bit
// utf-8-addr-xtext form in any transaction, the utf-8-addr-unitext form (raw UTF-8) only with
// SMTPUTF8, stored decoded as utf-8;address.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { dataPayload, sampleMessage, type RawSmtp } from "../src/testing.ts";
import type { IntakeServer } from "../src/index.ts";
import { openSession, seedDirectory, startIntake } from "./fixtures.ts";

let env: TestEnv;
let intake: IntakeServer;

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  intake = await startIntake(env.pool, env.bus);
});

after(async () => {
  await intake?.stop(100);
  await env?.close();
});

/** RawSmtp writes commands as latin1: UTF-8 text goes as its bytes. */
const utf8 = (text: string) => Buffer.from(text, "utf8").toString("latin1");

async function storedOrcpts(): Promise<Array<string | null>> {
  const result = await env.pool.query<{ dsn_orcpt: string | null }>(
    "SELECT d.dsn_orcpt FROM deliveries d WHERE d.message_id = (SELECT max(id) FROM messages) ORDER BY d.id",
  );
  return result.rows.map((r) => r.dsn_orcpt);
}

async function send(client: RawSmtp, subject: string): Promise<void> {
  assert.equal((await client.command("DATA")).code, 354);
  client.write(dataPayload(sampleMessage({ subject })));
  assert.equal((await client.reply()).code, 250);
}

test("ORCPT=utf-8;utf-8-addr-xtext is accepted without SMTPUTF8 and stored decoded; the addr-type in any case", async () => {
  const client = await openSession(intake.port());
  assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
  const first = await client.command("RCPT TO:<user1@example.test> ORCPT=utf-8;m\\x{FC}ller\\x{2B}tag@b\\x{FC}cher.example");
  assert.equal(first.code, 250, first.text);
  const second = await client.command("RCPT TO:<user2@example.test> ORCPT=UTF-8;\\x{7528}\\x{6237}@example.test");
  assert.equal(second.code, 250, second.text);
  await send(client, "utf-8 orcpt, xtext form");
  assert.deepEqual(await storedOrcpts(), ["utf-8;m\u00fcller+tag@b\u00fccher.example", "utf-8;\u7528\u6237@example.test"]);
  client.close();
});

test("ORCPT=utf-8;utf-8-addr-unitext (raw UTF-8) is accepted only in a transaction with SMTPUTF8", async () => {
  const client = await openSession(intake.port());
  assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
  const refused = await client.command(utf8("RCPT TO:<user1@example.test> ORCPT=utf-8;m\u00fcller@example.test"));
  assert.match(refused.text, /^501 5\.6\.7 .*SMTPUTF8/);
  assert.equal((await client.command("RSET")).code, 250);
  assert.equal((await client.command("MAIL FROM:<a@remote.example> SMTPUTF8")).code, 250);
  const accepted = await client.command(utf8("RCPT TO:<user1@example.test> ORCPT=utf-8;m\u00fcller\\x{2B}x@example.test"));
  assert.equal(accepted.code, 250, accepted.text);
  await send(client, "utf-8 orcpt, unitext form");
  assert.deepEqual(await storedOrcpts(), ["utf-8;m\u00fcller+x@example.test"]);
  client.close();
});

test("a utf-8 ORCPT that is not RFC 6533's form is 501 5.5.4; other addr-types keep the xtext rules", async () => {
  const client = await openSession(intake.port());
  assert.equal((await client.command("MAIL FROM:<a@remote.example> SMTPUTF8")).code, 250);
  const bad = [
    "utf-8;m+C3+BCller@example.test", // RFC 3461 xtext is not the utf-8 type's encoding
    "utf-8;a=b@example.test",
    "utf-8;m\\x{fc}ller", // no domain
    "utf-8;\\x{41}@example.test", // not a HEXPOINT: "A" is written as itself
    "utf-8;m\\x{0FC}ller@example.test",
    "utf-8;a\\x{01}b@example.test", // a control character
    "utf-8;a\\b@example.test",
    `utf-8;${"a".repeat(490)}@example.test`, // over 500 characters
  ];
  for (const orcpt of bad) {
    assert.match((await client.command(`RCPT TO:<user1@example.test> ORCPT=${orcpt}`)).text, /^501 5\.5\.4 /, orcpt);
  }
  assert.match((await client.command(utf8("RCPT TO:<user1@example.test> ORCPT=rfc822;m\u00fcller@example.test"))).text, /^501 5\.5\.4 /, "raw UTF-8 is not xtext");
  assert.equal((await client.command("RCPT TO:<user1@example.test> ORCPT=rfc822;User1+2Bx@example.test")).code, 250);
  client.close();
});
