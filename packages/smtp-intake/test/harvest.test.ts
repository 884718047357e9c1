// Probing addresses one RCPT after the other (a directory harvest) is cut short: after 20
// refused recipients the session ends with 421 4.7.0, as Postfix's smtpd_hard_error_limit does.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { dataPayload, sampleMessage } from "../src/testing.ts";
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
  await intake.stop(100);
  await env.close();
});

test("the 21st refused RCPT of a session is answered 421 4.7.0 and the connection closed", async () => {
  const client = await openSession(intake.port());
  assert.equal((await client.command("MAIL FROM:<prober@remote.example>")).code, 250);
  for (let i = 0; i < 20; i++) {
    assert.match((await client.command(`RCPT TO:<guess${i}@example.test>`)).text, /^550 5\.1\.1 /);
  }
  assert.match((await client.command("RCPT TO:<guess20@example.test>")).text, /^421 4\.7\.0 Too many refused recipients/);
  await client.waitClosed();
});

test("the count restarts after an accepted message, and valid recipients do not count", async () => {
  const client = await openSession(intake.port());
  const refuse = async (n: number, tag: string) => {
    for (let i = 0; i < n; i++) assert.match((await client.command(`RCPT TO:<${tag}${i}@example.test>`)).text, /^550 /);
  };
  assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
  await refuse(15, "typo");
  for (let i = 0; i < 30; i++) assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
  assert.equal((await client.command("DATA")).code, 354);
  client.write(dataPayload(sampleMessage()));
  assert.equal((await client.reply()).code, 250);
  assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
  await refuse(20, "again");
  assert.equal((await client.command("RCPT TO:<user2@example.test>")).code, 250);
  client.close();
});
