// A message with many DKIM-Signature fields, each with a body length (l=) of its own, made
// mailauth hash the body once per signature and look up a key for each: one message from
// anybody held mta-inbound's event loop for seconds to minutes. Only the first
// MAX_DKIM_SIGNATURES are verified.
import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { after, before, test } from "node:test";
import { dkimSign } from "mailauth";
import { addAccount, addDomain } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload, sampleMessage } from "@mailstack/smtp-intake/testing";
import { MAX_DKIM_SIGNATURES } from "../src/auth.ts";
import { startInbound, type Inbound } from "../src/inbound.ts";
import { startDnsServer } from "./dns-server.ts";

const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
const publicKeyDer = publicKey.export({ type: "spki", format: "der" }).toString("base64");

let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDnsServer>>;
let inbound: Inbound;

before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  await addAccount(env.pool, { address: "user1@example.test", password: "p1" });
  dns = await startDnsServer({
    "signed.example": { TXT: ["v=spf1 -all"] },
    "_dmarc.signed.example": { TXT: ["v=DMARC1; p=reject"] },
    "sel._domainkey.signed.example": { TXT: [`v=DKIM1; k=rsa; p=${publicKeyDer}`] },
  });
  inbound = await startInbound({
    pool: env.pool,
    bus: env.bus,
    logger,
    config: { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", DNS_SERVERS: [dns.address] },
  });
});

after(async () => {
  await inbound.stop();
  await dns.close();
  await env.close();
});

test("only the first signatures are verified: the rest cost no DNS lookup and no pass over the body", async () => {
  const body = `${"0123456789abcdefghij\r\n".repeat(100_000)}`;
  const message = sampleMessage({ from: "news@signed.example", subject: "many signatures", body });
  const key = { signingDomain: "signed.example", selector: "sel", privateKey: privateKey.export({ type: "pkcs8", format: "pem" }).toString() };
  const signed = await dkimSign(message, { ...key, signTime: new Date(), signatureData: [key] });
  assert.equal(signed.errors.length, 0);
  const junk = Array.from({ length: 100 }, (_, i) =>
    `DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=junk${i}.example; s=s; h=from; l=${1_000_000 - i}; bh=AAAA; b=AAAA\r\n`).join("");

  const client = await RawSmtp.connect(inbound.port);
  await client.reply();
  await client.command("EHLO mail.remote.example");
  assert.equal((await client.command("MAIL FROM:<news@signed.example>")).code, 250);
  assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
  assert.equal((await client.command("DATA")).code, 354);
  client.write(dataPayload(signed.signatures + junk + message));
  const reply = await client.reply(60_000);
  client.close();
  // The valid signature is the top-most one: verified, so DMARC passes (SPF says -all).
  assert.equal(reply.code, 250, reply.text);
  const row = (await env.pool.query("SELECT auth_results FROM messages ORDER BY id DESC LIMIT 1")).rows[0];
  assert.equal(row.auth_results.dkim.length, MAX_DKIM_SIGNATURES);
  assert.deepEqual(row.auth_results.dkim[0], { result: "pass", domain: "signed.example", selector: "sel" });
  assert.equal(row.auth_results.dmarc.result, "pass");
  const keyLookups = dns.queries.filter((q) => q.includes("._domainkey."));
  assert.ok(keyLookups.length <= MAX_DKIM_SIGNATURES, `${keyLookups.length} key lookups`);
});
