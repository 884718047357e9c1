import assert from "node:assert/strict";
import { generateKeyPairSync } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { dkimSign } from "mailauth";
import { dkimVerify } from "mailauth/lib/dkim/verify.js";
import { addAccount, addDomain } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload, sampleMessage } from "@mailstack/smtp-intake/testing";
import { SpfVerdicts, createResolver, verifyDkim } from "../src/auth.ts";
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
  await addDomain(env.pool, "lenient.test");
  await addAccount(env.pool, { address: "user1@example.test", password: "p1" });
  await addAccount(env.pool, { address: "user2@lenient.test", password: "p2" });
  await env.pool.query("UPDATE domains SET dmarc_reject_action = 'quarantine' WHERE name = 'lenient.test'");
  dns = await startDnsServer({
    "remote.example": { TXT: ["v=spf1 ip4:127.0.0.1 -all"] },
    "spoofed.example": { TXT: ["v=spf1 ip4:192.0.2.1 -all"] },
    "_dmarc.spoofed.example": { TXT: ["v=DMARC1; p=reject"] },
    "soft.example": { TXT: ["v=spf1 ip4:192.0.2.1 -all"] },
    "_dmarc.soft.example": { TXT: ["v=DMARC1; p=quarantine"] },
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

async function deliver(from: string, to: string, message: string): Promise<{ code: number; text: string }> {
  const client = await RawSmtp.connect(inbound.port);
  await client.reply();
  await client.command("EHLO mail.remote.example");
  assert.equal((await client.command(`MAIL FROM:<${from}>`)).code, 250);
  assert.equal((await client.command(`RCPT TO:<${to}>`)).code, 250);
  assert.equal((await client.command("DATA")).code, 354);
  client.write(dataPayload(message));
  const reply = await client.reply();
  client.close();
  return reply;
}

async function lastMessage() {
  const result = await env.pool.query("SELECT * FROM messages ORDER BY id DESC LIMIT 1");
  return result.rows[0];
}

async function count(): Promise<number> {
  return (await env.pool.query("SELECT count(*)::int AS n FROM messages")).rows[0].n;
}

describe("SPF, DKIM and DMARC", () => {
  test("SPF pass is recorded in Authentication-Results: and on the message row; the rest is byte-for-byte", async () => {
    const message = sampleMessage({ from: "a@remote.example" });
    const reply = await deliver("a@remote.example", "user1@example.test", message);
    assert.equal(reply.code, 250, reply.text);
    const row = await lastMessage();
    const raw = row.raw.toString("latin1") as string;
    assert.match(raw, /^Received: [^]*?\r\nReceived-SPF: pass [^]*?\r\nAuthentication-Results: mx\.example\.test;\r\n [^]*spf=pass[^]*dmarc=none/);
    assert.ok(raw.endsWith(message), "the original message follows the trace headers unchanged");
    assert.equal(row.auth_results.spf.result, "pass");
    assert.ok(dns.queries.includes("TXT remote.example"), "the configured DNS server was asked");
  });

  test("a DKIM-signed message passes DKIM and DMARC", async () => {
    const message = sampleMessage({ from: "news@signed.example", subject: "signed" });
    const key = { signingDomain: "signed.example", selector: "sel", privateKey: privateKey.export({ type: "pkcs8", format: "pem" }).toString() };
    // mailauth reads signatureData; its type also wants the fields at the top. signTime is given:
    // without it mailauth computes t= twice (Math.round(Date.now() / 1000)), once for the signed
    // header and once for the header it returns, and when the two straddle a half second the
    // signature does not verify (about 1 in 500 signatures in a loop here).
    const signed = await dkimSign(message, { ...key, signTime: new Date(), signatureData: [key] });
    assert.equal(signed.errors.length, 0);
    const full = signed.signatures + message;
    const reply = await deliver("news@signed.example", "user1@example.test", full);
    assert.equal(reply.code, 250, reply.text);
    const row = await lastMessage();
    assert.deepEqual(row.auth_results.dkim.map((d: { result: string; domain: string }) => [d.result, d.domain]), [["pass", "signed.example"]]);
    assert.equal(row.auth_results.dmarc.result, "pass");
    assert.match(row.raw.toString("latin1"), /dkim=pass [^]*dmarc=pass/);
  });

  test("DMARC p=reject failing: 550 5.7.1 and nothing stored", async () => {
    const before = await count();
    const reply = await deliver("ceo@spoofed.example", "user1@example.test", sampleMessage({ from: "CEO <ceo@spoofed.example>" }));
    assert.match(reply.text, /^550 5\.7\.1 /);
    assert.equal(await count(), before);
  });

  test("a second From: field or address of the sender's own does not turn DMARC off: every From: domain is checked, the strictest counts", async () => {
    const before = await count();
    const twoFields = sampleMessage({ from: "CEO <ceo@spoofed.example>" }).replace("\r\nTo: ", "\r\nFrom: a@remote.example\r\nTo: ");
    const reply = await deliver("a@remote.example", "user1@example.test", twoFields);
    assert.match(reply.text, /^550 5\.7\.1 .*spoofed\.example/, reply.text);
    const twoAddresses = await deliver("a@remote.example", "user1@example.test", sampleMessage({ from: "CEO <ceo@spoofed.example>, a@remote.example" }));
    assert.match(twoAddresses.text, /^550 5\.7\.1 /, twoAddresses.text);
    // Group syntax (RFC 6854) hides no address from DMARC either.
    const group = await deliver("a@remote.example", "user1@example.test", sampleMessage({ from: "Board: CEO <ceo@spoofed.example>;" }));
    assert.match(group.text, /^550 5\.7\.1 /, group.text);
    assert.equal(await count(), before);

    // A malformed From: where a lenient parser finds only the sender's passing address while a
    // mail client may show another: each domain named in the field is evaluated.
    for (const from of [
      '"x" <a@remote.example> <ceo@spoofed.example>',
      "a@remote.example (ceo@spoofed.example)",
      '"ceo@spoofed.example" a@remote.example',
      "CEO ceo@spoofed.example <a@remote.example>",
      "=?UTF-8?Q?ceo=40spoofed.example?= <a@remote.example>",
    ]) {
      const ambiguous = await deliver("a@remote.example", "user1@example.test", sampleMessage({ from }));
      assert.match(ambiguous.text, /^550 5\.7\.1 .*spoofed\.example/, `${from}: ${ambiguous.text}`);
    }
    assert.equal(await count(), before);

    // Two From: addresses that pass (SPF-aligned remote.example twice): accepted, one result per domain.
    const ok = await deliver("a@remote.example", "user1@example.test", sampleMessage({ from: "a@remote.example, b@Remote.Example" }));
    assert.equal(ok.code, 250, ok.text);
    const row = await lastMessage();
    assert.equal(row.auth_results.dmarc.result, "none");
    assert.equal((row.raw.toString("latin1").match(/dmarc=/g) ?? []).length, 1);
  });

  test("DMARC p=reject failing for a domain whose action is quarantine: accepted into Junk", async () => {
    const reply = await deliver("ceo@spoofed.example", "user2@lenient.test", sampleMessage({ from: "ceo@spoofed.example" }));
    assert.equal(reply.code, 250, reply.text);
    const row = await lastMessage();
    const deliveries = await env.pool.query("SELECT folder FROM deliveries WHERE message_id = $1", [row.id]);
    assert.deepEqual(deliveries.rows.map((d) => d.folder), ["Junk"]);
    assert.equal(row.auth_results.dmarc.result, "fail");
    assert.equal(row.auth_results.dmarcAction, "quarantine");
  });

  test("DMARC p=quarantine failing: accepted into Junk", async () => {
    const reply = await deliver("x@soft.example", "user1@example.test", sampleMessage({ from: "x@soft.example" }));
    assert.equal(reply.code, 250, reply.text);
    const row = await lastMessage();
    const deliveries = await env.pool.query("SELECT folder FROM deliveries WHERE message_id = $1", [row.id]);
    assert.deepEqual(deliveries.rows.map((d) => d.folder), ["Junk"]);
  });
});

test("Authentication-Results: fields claiming our authserv-id are deleted (RFC 8601 5), with the checks on or off; others' stay", async () => {
  const forged = [
    "Authentication-Results: mx.example.test; dkim=pass header.d=bank.example; dmarc=pass header.from=bank.example",
    "Authentication-Results: (forged) MX.Example.Test 1;\r\n spf=pass smtp.mailfrom=bank.example",
  ];
  const theirs = "Authentication-Results: mx.remote.example;\r\n spf=pass smtp.mailfrom=remote.example";
  const original = sampleMessage({ from: "a@remote.example", subject: "forged results" });
  const message = `${forged[0]}\r\n${theirs}\r\n${forged[1]}\r\n${original}`;
  const expected = `${theirs}\r\n${original}`;

  const reply = await deliver("a@remote.example", "user1@example.test", message);
  assert.equal(reply.code, 250, reply.text);
  const raw = (await lastMessage()).raw.toString("latin1") as string;
  assert.ok(raw.endsWith(expected), raw);
  assert.equal(raw.match(/^Authentication-Results: mx\.example\.test;/gim)?.length, 1, "only the one we wrote");
  assert.doesNotMatch(raw, /bank\.example/);

  const unchecked = await startInbound({ pool: env.pool, bus: env.bus, logger, config: { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", INBOUND_AUTH_CHECKS: false } });
  try {
    const client = await RawSmtp.connect(unchecked.port);
    await client.reply();
    await client.command("EHLO mail.remote.example");
    assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    assert.equal((await client.command("DATA")).code, 354);
    // Only forged fields in the header: the header section keeps the rest, the body is untouched.
    client.write(dataPayload(`${forged[1]}\r\n${original}`));
    assert.equal((await client.reply()).code, 250);
    client.close();
    const stored = (await lastMessage()).raw.toString("latin1") as string;
    assert.match(stored, /^Received: [^]*?\+0000\r\nFrom: /);
    assert.ok(stored.endsWith(original), stored);
  } finally {
    await unchecked.stop();
  }
});

test("the resolver cache answers repeated lookups, including 'no such name', from memory", async () => {
  const resolve = createResolver([dns.address], { cacheTtlMs: 60_000 });
  const asked = () => dns.queries.filter((q) => q.endsWith("cache.remote.example") || q === "TXT remote.example").length;
  const before = asked();
  const [a, b] = await Promise.all([resolve("remote.example", "TXT"), resolve("remote.example", "TXT")]);
  assert.deepEqual(a, [["v=spf1 ip4:127.0.0.1 -all"]]);
  assert.deepEqual(b, a);
  await assert.rejects(resolve("nothing.cache.remote.example", "TXT"), { code: "ENOTFOUND" });
  await assert.rejects(resolve("nothing.cache.remote.example", "TXT"), { code: "ENOTFOUND" });
  assert.equal(asked() - before, 2, "one query per name");
  const uncached = createResolver([dns.address], { cacheTtlMs: 0 });
  await uncached("remote.example", "TXT");
  await uncached("remote.example", "TXT");
  assert.equal(asked() - before, 4);
});

test("an SPF verdict is reused per client IP, HELO and sender; a temporary error is not", async () => {
  const resolver = createResolver([dns.address], { cacheTtlMs: 0 });
  const asked = () => dns.queries.filter((q) => q === "TXT remote.example").length;
  const verdicts = new SpfVerdicts(60_000);
  const check = (sender: string, ip = "127.0.0.1") => verdicts.check({ ip, helo: "mx.remote.example", sender, mta: "mx.example.test", resolver });
  const before = asked();
  const first = await check("alice@remote.example");
  assert.equal(first.status.result, "pass");
  assert.deepEqual(await check("alice@remote.example"), first);
  assert.equal(asked() - before, 1, "evaluated once");
  const other = await check("bob@remote.example");
  assert.match(other.header, /bob@remote\.example/);
  assert.equal((await check("alice@remote.example", "192.0.2.9")).status.result, "fail");
  assert.equal(asked() - before, 3, "another sender or IP is evaluated afresh");

  let calls = 0;
  const failing = async () => {
    calls++;
    throw Object.assign(new Error("query timed out"), { code: "ETIMEOUT" });
  };
  const flaky = (sender: string) => verdicts.check({ ip: "127.0.0.1", helo: "mx.remote.example", sender, mta: "mx.example.test", resolver: failing });
  assert.equal((await flaky("carol@remote.example")).status.result, "temperror");
  await flaky("carol@remote.example");
  assert.equal(calls, 2);
});

test("DKIM verification driven directly gives mailauth's streamed results: signed, tampered, simple and relaxed, unsigned", async () => {
  const { privateKey: rsa, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const record = `v=DKIM1; k=rsa; p=${publicKey.export({ type: "spki", format: "der" }).toString("base64")}`;
  const resolver = async (name: string, type: string) => {
    if (type === "TXT" && name === "k1._domainkey.direct.example") return [[record]];
    throw Object.assign(new Error("NXDOMAIN"), { code: "ENOTFOUND" });
  };
  const pem = rsa.export({ type: "pkcs8", format: "pem" }).toString();
  const base = "From: Someone <a@direct.example>\r\nTo: b@example.test\r\nSubject: direct\r\nContent-Type: text/plain\r\n\r\nline  one \r\n\r\nline two\r\n\r\n\r\n";
  const messages: string[] = [base];
  for (const canonicalization of ["relaxed/relaxed", "simple/simple", "relaxed/simple"]) {
    const key = { signingDomain: "direct.example", selector: "k1", privateKey: pem, canonicalization };
    const signed = await dkimSign(base, { ...key, canonicalization, signTime: new Date(), signatureData: [key] } as never);
    messages.push(signed.signatures + base, (signed.signatures + base).replace("line two", "line 2"));
  }
  // An empty line first: no header fields, by RFC 5322; mailauth's parser reads on to the next one.
  messages.push(`\r\n${messages[1]}`);
  const options = { resolver, sender: "bounce@direct.example", minBitLength: 1024 };
  const outcomes: string[] = [];
  for (const text of messages) {
    const raw = Buffer.from(text);
    const direct = await verifyDkim(raw, options);
    const streamed = await dkimVerify(raw, options);
    assert.deepEqual(JSON.parse(JSON.stringify(direct)), JSON.parse(JSON.stringify(streamed)));
    assert.deepEqual((direct as { arc?: unknown }).arc, (streamed as { arc?: unknown }).arc);
    outcomes.push(direct.results.map((r) => r.status.result).join(",") || "none");
  }
  // The comparison covered passing and failing signatures, not only unsigned mail.
  assert.deepEqual(outcomes, ["none", "pass", "neutral", "pass", "neutral", "pass", "neutral", "pass"]);
});
