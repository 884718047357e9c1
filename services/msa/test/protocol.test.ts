// The submission ports as a client sees them, over real sockets: the replies RFC 4954 and
// RFC 3207 ask for around AUTH and TLS.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import tls from "node:tls";
import { assertNoLoginTimingOracle, createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp } from "@mailstack/smtp-intake/testing";
import { startMsa, type Msa } from "../src/server.ts";
import { memoryLogger, PASSWORDS, seedDirectory, testSettings, testTls } from "./helpers.ts";

let env: TestEnv;
let msa: Msa;
const { logger, lines } = memoryLogger();

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  msa = await startMsa({ pool: env.pool, bus: env.bus, logger, settings: testSettings(), tls: await testTls() });
});

after(async () => {
  await msa?.stop();
  await env?.close();
});

const plain = (user: string, password: string) => Buffer.from(`\0${user}\0${password}`).toString("base64");

async function overStartTls(): Promise<RawSmtp> {
  const client = await RawSmtp.connect(msa.submissionPort);
  assert.equal((await client.reply()).code, 220);
  assert.equal((await client.command("EHLO client.example")).code, 250);
  assert.equal((await client.command("STARTTLS")).code, 220);
  await client.startTls();
  assert.equal((await client.command("EHLO client.example")).code, 250);
  return client;
}

async function implicitTls(): Promise<RawSmtp> {
  const socket = tls.connect({ port: msa.submissionsPort, host: "127.0.0.1", rejectUnauthorized: false });
  await new Promise<void>((resolve, reject) => socket.once("secureConnect", () => resolve()).once("error", reject));
  const client = new RawSmtp(socket);
  assert.equal((await client.reply()).code, 220);
  return client;
}

test("AUTH before STARTTLS on 587 is 538 5.7.11 (RFC 4954 section 6)", async () => {
  const client = await RawSmtp.connect(msa.submissionPort);
  await client.reply();
  await client.command("EHLO client.example");
  const reply = await client.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`);
  assert.match(reply.text, /^538 5\.7\.11 .*STARTTLS/);
  client.close();
});

test("STARTTLS on 465, where TLS is already active, is 503 5.5.1 and the session goes on", async () => {
  const client = await implicitTls();
  const ehlo = await client.command("EHLO client.example");
  assert.ok(!ehlo.lines.some((line) => /^STARTTLS/i.test(line)), "not offered");
  assert.match((await client.command("STARTTLS")).text, /^503 5\.5\.1 /);
  assert.equal((await client.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`)).code, 235);
  client.close();
});

test("cancelled AUTH exchanges do not count as commands without authentication; ten other commands end with 421 4.7.0", async () => {
  const client = await overStartTls();
  for (let i = 0; i < 6; i++) {
    assert.equal((await client.command("AUTH LOGIN")).code, 334);
    assert.match((await client.command("*")).text, /^501 /, "RFC 4954 4: * cancels with 501");
  }
  assert.equal((await client.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`)).code, 235);
  client.close();

  const idle = await overStartTls(); // EHLO, STARTTLS, EHLO: three so far
  let last = await idle.command("NOOP");
  for (let i = 0; i < 10 && last.code === 250; i++) last = await idle.command("NOOP");
  assert.match(last.text, /^421 4\.7\.0 /);
  await idle.waitClosed();
});

test("MAIL FROM with AUTH=<> or an xtext AUTH= is accepted after AUTH; a malformed AUTH= is 501 5.5.4", async () => {
  const client = await implicitTls();
  await client.command("EHLO client.example");
  assert.equal((await client.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`)).code, 235);
  assert.equal((await client.command("MAIL FROM:<alice@example.test> AUTH=<>")).code, 250);
  assert.equal((await client.command("RSET")).code, 250);
  assert.equal((await client.command("MAIL FROM:<alice@example.test> AUTH=alice+40example.test")).code, 250);
  assert.equal((await client.command("RSET")).code, 250);
  assert.match((await client.command("MAIL FROM:<alice@example.test> AUTH=a+zz")).text, /^501 5\.5\.4 /);
  assert.match((await client.command("MAIL FROM:<alice@example.test> FOO=1")).text, /^555 5\.5\.4 /);
  client.close();
});

test("AUTH with \"=\", the empty initial response (RFC 4954 4), is 501 5.5.2 as an empty response", async () => {
  const client = await implicitTls();
  await client.command("EHLO client.example");
  assert.match((await client.command("AUTH PLAIN =")).text, /^501 5\.5\.2 .*empty response/);
  assert.match((await client.command("AUTH LOGIN =")).text, /^501 5\.5\.2 .*missing user name/);
  assert.equal((await client.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`)).code, 235);
  client.close();

  const exchange = await implicitTls();
  await exchange.command("EHLO client.example");
  assert.equal((await exchange.command("AUTH PLAIN")).code, 334);
  assert.match((await exchange.command("=")).text, /^501 5\.5\.2 .*empty response/);
  assert.equal((await exchange.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`)).code, 235);
  exchange.close();
});

test("malformed AUTH data and another authorization identity count as failed logins: 421 4.7.0 at the connection's limit, no password checked", async () => {
  const failuresOf = async (key: string) =>
    (await env.pool.query<{ failures: number }>("SELECT failures FROM auth_failures WHERE scope = 'account' AND key = $1", [key])).rows[0]?.failures ?? 0;
  const before = await failuresOf("bob@example.test");
  const secret = "never-Logged-pw-7";
  const asOther = Buffer.from(`alice@example.test\0bob@example.test\0${secret}`).toString("base64");

  // The limit is 3 failures on a connection (testSettings), whatever mix of refusals.
  const client = await implicitTls();
  await client.command("EHLO client.example");
  assert.match((await client.command("AUTH PLAIN not*base64")).text, /^501 5\.5\.2 /);
  assert.match((await client.command(`AUTH PLAIN ${asOther}`)).text, /^535 5\.7\.8 /);
  assert.equal((await client.command("AUTH LOGIN")).code, 334);
  assert.match((await client.command("!!")).text, /^421 4\.7\.0 /);
  await client.waitClosed();

  // Each kind alone ends the connection too (before: 501 or 535 for ever).
  for (const token of [asOther, Buffer.from(`\0bob@example.test\0`).toString("base64")]) {
    const looping = await implicitTls();
    await looping.command("EHLO client.example");
    const replies: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await looping.command(`AUTH PLAIN ${token}`).catch(() => null);
      if (!r) break;
      replies.push(r.text.slice(0, 9));
      if (r.code === 421) break;
    }
    assert.equal(replies.length, 3, replies.join(", "));
    assert.match(replies[2]!, /^421 4\.7\.0/);
    await looping.waitClosed();
  }

  assert.equal(await failuresOf("bob@example.test"), before, "no password was checked, so none was counted");
  assert.ok(!lines.some((line) => line.includes(secret) || line.includes(asOther)), "neither the password nor the SASL data is logged");
  assert.ok(lines.some((line) => line.includes("another authorization identity")), "the refusal is logged with its reason");
});

test("STARTTLS forgets a login made before it (RFC 3207 4.2), also where MAIL without AUTH is possible", async () => {
  const lax = await startMsa({
    pool: env.pool,
    bus: env.bus,
    logger,
    settings: testSettings({ authBeforeTls: true, popBeforeSmtp: { enabled: true, windowMs: 600_000 } }),
    tls: await testTls(),
  });
  const client = await RawSmtp.connect(lax.submissionPort);
  try {
    await client.reply();
    await client.command("EHLO client.example");
    assert.equal((await client.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`)).code, 235);
    assert.equal((await client.command("STARTTLS")).code, 220);
    await client.startTls();
    await client.command("EHLO client.example");
    // No POP3 login from this address either: nothing left to submit as.
    assert.match((await client.command("MAIL FROM:<alice@example.test>")).text, /^530 5\.7\.0 /);
  } finally {
    client.close();
    await lax.stop();
  }
});

test("a failed AUTH takes as long for an unknown or disabled account as for a wrong password (no timing oracle)", async () => {
  await env.pool.query("UPDATE accounts SET disabled = true WHERE address = 'dave@example.test'");
  const timed = await startMsa({
    pool: env.pool, bus: env.bus, logger,
    settings: testSettings({ auth: { failureDelayMs: 0, maxFailuresPerConnection: 100, maxFailuresPerIp: 1000, maxFailuresPerAccount: 1000, windowMs: 900_000 } }),
    tls: await testTls(),
  });
  try {
    const socket = tls.connect({ port: timed.submissionsPort, host: "127.0.0.1", rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => socket.once("secureConnect", () => resolve()).once("error", reject));
    const client = new RawSmtp(socket);
    assert.equal((await client.reply()).code, 220);
    assert.equal((await client.command("EHLO client.example")).code, 250);
    const failure = async (user: string, password: string) => {
      const started = performance.now();
      assert.match((await client.command(`AUTH PLAIN ${plain(user, password)}`)).text, /^535 5\.7\.8 /);
      return performance.now() - started;
    };
    await assertNoLoginTimingOracle({
      known: () => failure("alice@example.test", "wrong"),
      unknown: (i) => failure(`nobody${i}@example.test`, "wrong"),
      disabled: () => failure("dave@example.test", PASSWORDS.dave),
    });
    client.close();
  } finally {
    await timed.stop();
    await env.pool.query("UPDATE accounts SET disabled = false WHERE address = 'dave@example.test'");
    await env.pool.query("DELETE FROM auth_failures");
  }
});

test("a recipient named again in another case or quoting counts once toward the account's recipient rate", async () => {
  const limited = await startMsa({
    pool: env.pool, bus: env.bus, logger, tls: await testTls(),
    settings: testSettings({ submission: { maxMessages: 100, maxRecipients: 2, windowMs: 3_600_000 } }),
  });
  try {
    const client = await RawSmtp.connect(limited.submissionPort);
    assert.equal((await client.reply()).code, 220);
    assert.equal((await client.command("EHLO client.example")).code, 250);
    assert.equal((await client.command("STARTTLS")).code, 220);
    await client.startTls();
    assert.equal((await client.command("EHLO client.example")).code, 250);
    assert.equal((await client.command(`AUTH PLAIN ${plain("carol@example.test", PASSWORDS.carol)}`)).code, 235);
    assert.equal((await client.command("MAIL FROM:<carol@example.test>")).code, 250);
    for (const rcpt of ["bob@example.test", "BOB@example.test", '"bob"@example.test', "alice@example.test"]) {
      assert.equal((await client.command(`RCPT TO:<${rcpt}>`)).code, 250, rcpt);
    }
    assert.match((await client.command("RCPT TO:<dave@example.test>")).text, /^451 4\.7\.1 Recipient rate/);
    assert.equal((await client.command("DATA")).code, 354);
    client.write("From: carol@example.test\r\nSubject: twice\r\n\r\nx\r\n.\r\n");
    assert.equal((await client.reply()).code, 250);
    client.close();
  } finally {
    await limited.stop();
  }
});

test("a submitted Authentication-Results: that claims our host name is deleted (RFC 8601 5); another host's stays", async () => {
  const client = await overStartTls();
  assert.equal((await client.command(`AUTH PLAIN ${plain("alice@example.test", PASSWORDS.alice)}`)).code, 235);
  assert.equal((await client.command("MAIL FROM:<alice@example.test>")).code, 250);
  assert.equal((await client.command("RCPT TO:<bob@example.test>")).code, 250);
  assert.equal((await client.command("DATA")).code, 354);
  const theirs = "Authentication-Results: mx.remote.example; spf=pass smtp.mailfrom=remote.example";
  client.write(`Authentication-Results: MSA.example.test; dkim=pass header.d=bank.example\r\n${theirs}\r\nFrom: alice@example.test\r\nSubject: forged\r\n\r\nx\r\n.\r\n`);
  const done = await client.reply();
  assert.equal(done.code, 250, done.text);
  client.close();
  const queueId = /queued as (\w+)/.exec(done.text)![1];
  const row = await env.pool.query<{ raw: Buffer }>("SELECT raw FROM messages WHERE queue_id = $1", [queueId]);
  const raw = row.rows[0]!.raw.toString("latin1");
  assert.doesNotMatch(raw, /bank\.example/);
  assert.ok(raw.includes(`\r\n${theirs}\r\nFrom: alice@example.test\r\n`), raw);
});
