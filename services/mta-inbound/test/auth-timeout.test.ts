// A sender cannot switch DMARC off by making the checks slow: a check running past
// INBOUND_AUTH_TIMEOUT used to make the whole verdict temperror and the message was accepted,
// so an envelope domain whose DNS never answers (SPF), or DKIM signatures pointing there, let a
// message with a From: of a p=reject domain through. SPF and DKIM get the time limit; DMARC is
// evaluated with what they found (a check that ran out of time passes nothing), in a time of its
// own; a p=reject failure that a slow check might have turned is refused for now (451), not for good.
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { after, before, test } from "node:test";
import { dkimSign } from "mailauth";
import { addAccount, addDomain } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload, sampleMessage } from "@mailstack/smtp-intake/testing";
import { MAX_FROM_DOMAINS } from "../src/auth.ts";
import { startInbound, type Inbound } from "../src/inbound.ts";
import { startDnsServer } from "./dns-server.ts";

const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });

let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDnsServer>>;
let inbound: Inbound;

before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  await addAccount(env.pool, { address: "user1@example.test", password: "p1" });
  dns = await startDnsServer({
    "bank.example": { TXT: ["v=spf1 ip4:192.0.2.1 -all"] },
    "_dmarc.bank.example": { TXT: ["v=DMARC1; p=reject"] },
    "slow.example": { drop: true },
    "s._domainkey.slow.example": { drop: true },
    "_dmarc.slow.example": { drop: true },
    "remote.example": { TXT: ["v=spf1 ip4:127.0.0.1 -all"] },
  });
  inbound = await startInbound({
    pool: env.pool,
    bus: env.bus,
    logger,
    config: { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", DNS_SERVERS: [dns.address], INBOUND_AUTH_TIMEOUT: 1_000 },
  });
});

after(async () => {
  await inbound.stop();
  await dns.close();
  await env.close();
});

async function deliver(from: string, message: string): Promise<{ code: number; text: string }> {
  const client = await RawSmtp.connect(inbound.port);
  await client.reply();
  await client.command("EHLO mail.remote.example");
  assert.equal((await client.command(`MAIL FROM:<${from}>`)).code, 250);
  assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
  assert.equal((await client.command("DATA")).code, 354);
  client.write(dataPayload(message));
  const reply = await client.reply(30_000);
  client.close();
  return reply;
}

const count = async () => (await env.pool.query("SELECT count(*)::int AS n FROM messages")).rows[0].n as number;

test("an envelope domain whose DNS never answers does not get a p=reject From: through", async () => {
  const before = await count();
  const reply = await deliver("x@slow.example", sampleMessage({ from: "ceo@bank.example", subject: "slow SPF" }));
  assert.match(reply.text, /^451 4\.7\.1 The DMARC policy of bank\.example could not be checked in time/);
  assert.equal(await count(), before);
});

test("nor does a DKIM signature whose key never comes", async () => {
  const message = sampleMessage({ from: "ceo@bank.example", subject: "slow DKIM" });
  // A correct body hash, so that the verifier goes on to look the key up (which never comes).
  const key = { signingDomain: "slow.example", selector: "s", privateKey: privateKey.export({ type: "pkcs8", format: "pem" }).toString() };
  const signed = await dkimSign(message, { ...key, signTime: new Date(), signatureData: [key] });
  assert.equal(signed.errors.length, 0);
  const before = await count();
  const reply = await deliver("x@remote.example", signed.signatures + message);
  assert.match(reply.text, /^451 4\.7\.1 The DMARC policy of bank\.example could not be checked in time/);
  assert.equal(await count(), before);
});

test("a slow second From: domain does not hide the first one's failure when SPF and DKIM were complete", async () => {
  const before = await count();
  const reply = await deliver("x@remote.example", sampleMessage({ from: "ceo@bank.example, someone@slow.example", subject: "slow DMARC" }));
  assert.match(reply.text, /^550 5\.7\.1 Message rejected by the DMARC policy of bank\.example/);
  assert.equal(await count(), before);
});

test("a From: naming more than MAX_FROM_DOMAINS domains is refused before any DMARC lookup", async () => {
  const from = Array.from({ length: MAX_FROM_DOMAINS + 1 }, (_, i) => `a@d${i}.example`).join(",\r\n ");
  const lookups = () => dns.queries.filter((q) => q.includes("_dmarc.d")).length;
  const before = lookups();
  const reply = await deliver("x@remote.example", sampleMessage({ from, subject: "many From: domains" }));
  assert.match(reply.text, /^550 5\.7\.1 More than 20 domains in the From: field/);
  assert.equal(lookups(), before);
  // As many as allowed are evaluated and accepted.
  const fewer = Array.from({ length: MAX_FROM_DOMAINS }, (_, i) => `a@e${i}.example`).join(", ");
  assert.equal((await deliver("x@remote.example", sampleMessage({ from: fewer, subject: "20 From: domains" }))).code, 250);
});

test("a slow check still gives temperror, not a refusal, when no policy says to refuse", async () => {
  const reply = await deliver("x@slow.example", sampleMessage({ from: "someone@remote.example", subject: "slow but harmless" }));
  assert.equal(reply.code, 250, reply.text);
  const row = (await env.pool.query("SELECT auth_results, raw FROM messages ORDER BY id DESC LIMIT 1")).rows[0];
  assert.equal(row.auth_results.spf.result, "temperror");
  assert.match(row.raw.toString("latin1"), /spf=temperror/);
});
