// LMTP keeps every accepted RCPT (repeats too: each gets its own reply after DATA); the list is
// bounded by LMTP_MAX_RECIPIENTS per transaction, as smtp-intake bounds SMTP's.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { startMda, type Mda } from "../src/mda.ts";
import { LineClient, account, message } from "./helpers.ts";

let env: TestEnv;
let mda: Mda;

before(async () => {
  env = await createTestEnv();
  mda = await startMda({
    pool: env.pool,
    bus: env.bus,
    logger: createLogger("mda-test", "silent"),
    config: { LMTP_PORT: 0, LMTP_HOST: "127.0.0.1", LMTP_MAX_RECIPIENTS: 5, MAIL_HOSTNAME: "mx.example.test" },
  });
  await account(env.pool, "limit1@example.test");
  await account(env.pool, "limit2@example.test");
});

after(async () => {
  await mda.stop();
  await env.close();
});

test("RCPTs past LMTP_MAX_RECIPIENTS (repeats counted) get 452 4.5.3; the accepted ones are delivered, one reply each", async () => {
  const client = await LineClient.open(mda.lmtpPort!);
  assert.match(await client.reply(), /^220 /);
  assert.match(await client.command("LHLO client.example"), /^250 /);
  assert.match(await client.command("MAIL FROM:<sender@remote.example>"), /^250 /);
  for (let i = 0; i < 5; i++) {
    assert.match(await client.command(`RCPT TO:<limit${(i % 2) + 1}@example.test>`), /^250 /, `RCPT ${i + 1}`);
  }
  assert.match(await client.command("RCPT TO:<limit1@example.test>"), /^452 4\.5\.3 /);
  assert.match(await client.command("RCPT TO:<limit2@example.test>"), /^452 4\.5\.3 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("lmtp limit")}.\r\n`);
  for (let i = 0; i < 5; i++) assert.match(await client.reply(), /^250 /, `reply ${i + 1}`);
  // The next transaction starts afresh.
  assert.match(await client.command("MAIL FROM:<sender@remote.example>"), /^250 /);
  assert.match(await client.command("RCPT TO:<limit1@example.test>"), /^250 /);
  assert.match(await client.command("QUIT"), /^221 /);
  client.close();
});
