import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { addAccount, addAlias, addDomain } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload } from "../../../packages/smtp-intake/src/testing.ts";
import { startMda, type Mda } from "../../mda/src/mda.ts";
import { startInbound, type Inbound } from "../../mta-inbound/src/inbound.ts";
import { startMsa, type Msa } from "../../msa/src/server.ts";
import { testSettings, testTls } from "../../msa/test/helpers.ts";
import { startOutbound, type OutboundService } from "../src/service.ts";
import { startDns, testConfig } from "./helpers.ts";
import { startScriptedMx } from "./scripted-mx.ts";

// A Quoted-string local part (RFC 5321 4.1.2) through the whole chain: accepted on 25 and 587,
// looked up in its canonical form, written quoted into Return-Path/Delivered-To and into the
// relay's MAIL FROM/RCPT TO (as a loopback MX records the lines), and bounced to when quoted.
// (Remote local parts are given in lower case: this system lower-cases every local part.)

const logger = createLogger("test", process.env.TEST_LOG_LEVEL ?? "silent");
let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDns>>;
let mx: Awaited<ReturnType<typeof startScriptedMx>>;
let outbound: OutboundService;
let mda: Mda;
let inbound: Inbound;
let msa: Msa;

before(async () => {
  env = await createTestEnv();
  await addDomain(env.pool, "example.test");
  await addAccount(env.pool, { address: '"John Doe"@example.test', password: "john-Secret-pw-1" });
  await addAlias(env.pool, "fwd@example.test", ['"bad guy"@dest.test', '"x \\"y\\" z"@dest.test']);
  // One MX for the remote domains; it refuses "bad guy" and records every command line.
  mx = await startScriptedMx("127.0.0.31", 0, { reply: (command) => (/^RCPT TO:<"bad guy"@/i.test(command) ? "550 5.1.1 No such user" : undefined) });
  dns = await startDns({
    "dest.test": { mx: [{ exchange: "mx.dest.test", priority: 10 }] },
    "origin.test": { mx: [{ exchange: "mx.dest.test", priority: 10 }] },
    "mx.dest.test": { a: ["127.0.0.31"] },
  });
  const config = testConfig({ DNS_SERVERS: dns.server, RELAY_DEST_PORT: String(mx.port), RELAY_SCHEDULER_INTERVAL: "200ms", RELAY_DSN_INTERVAL: "200ms" });
  outbound = startOutbound({ pool: env.pool, bus: env.bus, logger, config });
  mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_ENABLED: false } });
  inbound = await startInbound({
    pool: env.pool,
    bus: env.bus,
    logger,
    config: { MAIL_HOSTNAME: "mx.example.test", SMTP_PORT: 0, SMTP_HOST: "127.0.0.1", INBOUND_AUTH_CHECKS: false },
  });
  msa = await startMsa({ pool: env.pool, bus: env.bus, logger, tls: await testTls(), settings: testSettings({ authBeforeTls: true }) });
});

after(async () => {
  await msa?.stop();
  await inbound?.stop();
  await mda?.stop();
  await outbound?.stop();
  await mx?.close();
  await dns?.close();
  await env?.close();
});

async function send(port: number, commands: string[], body: string): Promise<void> {
  const client = await RawSmtp.connect(port);
  assert.equal((await client.reply()).code, 220);
  assert.equal((await client.command("EHLO client.remote.example")).code, 250);
  for (const command of commands) assert.match((await client.command(command)).text, /^2\d\d /, command);
  assert.equal((await client.command("DATA")).code, 354);
  assert.match((await client.command(dataPayload(body))).text, /^250 /);
  await client.command("QUIT");
  client.close();
}

/** The stored copies in the account's mailbox, each with the trace lines the MDA put in front. */
async function mailbox(address: string): Promise<string[]> {
  const result = await env.pool.query<{ header_prefix: Buffer; raw: Buffer }>(
    `SELECT e.header_prefix, m.raw FROM mailbox_entries e JOIN accounts a ON a.id = e.account_id
       JOIN messages m ON m.id = e.message_id WHERE a.address = $1 ORDER BY e.id`,
    [address],
  );
  return result.rows.map((r) => Buffer.concat([r.header_prefix, r.raw]).toString("latin1"));
}

/** The MAIL and RCPT lines of every transaction the MX saw, one array per MAIL. */
function transactions(): string[][] {
  const all: string[][] = [];
  for (const line of mx.commands()) {
    if (/^MAIL /i.test(line)) all.push([line]);
    else if (/^RCPT /i.test(line)) all.at(-1)!.push(line);
  }
  return all;
}

test("port 25: a quoted sender to a quoted local account and an alias of quoted remote addresses; the bounce goes back to the quoted sender", async () => {
  await send(inbound.port, ['MAIL FROM:<"a b"@origin.test>', 'RCPT TO:<"John\\ Doe"@example.test>', "RCPT TO:<fwd@example.test>"], "Subject: port 25\r\n\r\nhello\r\n");

  const copy = (await waitFor(async () => (await mailbox('"john doe"@example.test')).find((m) => m.includes("Subject: port 25"))))!;
  assert.match(copy, /^Return-Path: <"a b"@origin\.test>\r\nDelivered-To: "john doe"@example\.test\r\n/);

  const relayed = (await waitFor(() => transactions().find((t) => t[0]!.startsWith('MAIL FROM:<"a b"@origin.test>'))))!;
  assert.deepEqual(relayed.slice(1).sort(), ['RCPT TO:<"bad guy"@dest.test>', 'RCPT TO:<"x \\"y\\" z"@dest.test>']);
  // The DSN for "bad guy" goes to the sender, quoted as it was.
  const bounce = (await waitFor(() => transactions().find((t) => t[0]!.startsWith("MAIL FROM:<>") && t.some((l) => l.includes("origin.test")))))!;
  assert.equal(bounce.length, 2);
  assert.match(bounce[1]!, /^RCPT TO:<"a b"@origin\.test>( |$)/);
});

test("port 587: the account logs in and sends as itself however it quotes its name; the relay writes the canonical quoting; its bounce reaches its mailbox", async () => {
  const login = Buffer.from('\0"John Doe"@example.test\0john-Secret-pw-1').toString("base64");
  await send(msa.submissionPort, [`AUTH PLAIN ${login}`, 'MAIL FROM:<"john\\ doe"@Example.test>', 'RCPT TO:<"ann\\ other"@dest.test>', 'RCPT TO:<"bad guy"@dest.test>'], 'From: "john doe"@example.test\r\nSubject: port 587\r\n\r\nhello\r\n');

  const relayed = (await waitFor(() => transactions().find((t) => t[0]!.startsWith('MAIL FROM:<"john doe"@example.test>'))))!;
  assert.deepEqual(relayed.slice(1).sort(), ['RCPT TO:<"ann other"@dest.test>', 'RCPT TO:<"bad guy"@dest.test>']);
  const bounce = (await waitFor(async () => (await mailbox('"john doe"@example.test')).find((m) => m.startsWith("Return-Path: <>"))))!;
  assert.match(bounce, /^Return-Path: <>\r\nDelivered-To: "john doe"@example\.test\r\n/);
  assert.match(bounce, /^To: <"john doe"@example\.test>\r$/m);
  assert.match(bounce, /Final-Recipient: rfc822; ?"bad guy"@dest\.test/i);
});
