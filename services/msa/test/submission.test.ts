import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import nodemailer from "nodemailer";
import { dkimVerify } from "mailauth/lib/dkim/verify.js";
import type { DkimDnsRecord } from "@mailstack/dkim";
import { registry } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { startMsa, type Msa } from "../src/server.ts";
import { memoryLogger, PASSWORDS, python, pythonDkimVerify, rawTls, seedDirectory, swaks, testSettings, testTls } from "./helpers.ts";

let env: TestEnv;
let msa: Msa;
let records: Record<string, DkimDnsRecord>;
let tls: { key: string; cert: string };
const logs = memoryLogger();

before(async () => {
  env = await createTestEnv();
  records = await seedDirectory(env.pool);
  tls = await testTls();
  msa = await startMsa({ pool: env.pool, bus: env.bus, logger: logs.logger, settings: testSettings(), tls });
});

after(async () => {
  await msa?.stop();
  await env?.close();
});

async function storedBySubject(subject: string): Promise<{ id: number; raw: Buffer; envelope_from: string; auth_user: string | null }> {
  const rows = (await env.pool.query("SELECT id, raw, envelope_from, auth_user FROM messages ORDER BY id")).rows;
  const found = rows.filter((row) => row.raw.toString("latin1").includes(`Subject: ${subject}\r\n`));
  assert.equal(found.length, 1, `one stored message with subject ${subject}`);
  return found[0];
}

const resolver = async (name: string, type: string) => {
  const record = records[name];
  if (type === "TXT" && record) return [record.strings];
  throw Object.assign(new Error(`no TXT for ${name}`), { code: "ENOTFOUND" });
};
const txtValues = () => Object.fromEntries(Object.entries(records).map(([name, r]) => [name, r.value]));

function header(raw: Buffer): string {
  const text = raw.toString("latin1");
  return text.slice(0, text.indexOf("\r\n\r\n") + 2);
}

test("EHLO lists AUTH only after STARTTLS, and AUTH before TLS is refused", async () => {
  const result = await python(["ehlo", String(msa.submissionPort)]);
  assert.equal(result.before_tls, null);
  assert.equal(result.starttls, true);
  assert.match(result.after_tls, /PLAIN/);
  assert.match(result.after_tls, /LOGIN/);
  for (const extension of ["8bitmime", "dsn", "enhancedstatuscodes", "pipelining", "size", "smtputf8"]) {
    assert.ok(result.features.includes(extension), `${extension} advertised`);
  }
  assert.ok(result.auth_cmd_before_tls[0] >= 500, JSON.stringify(result));
  assert.match(result.auth_cmd_before_tls[1], /STARTTLS/);
});

test("MAIL before AUTH is refused with 530 5.7.0", async () => {
  const result = await python(["mail-before-auth", String(msa.submissionPort)]);
  assert.equal(result.mail[0], 530);
  assert.match(result.mail[1], /^5\.7\.0 /);
});

test("malformed SASL data is 501 5.5.2 and no password is checked", async () => {
  const result = await python(["malformed", String(msa.submissionPort)]);
  assert.deepEqual(result.plain_bad_base64, [501]);
  assert.equal(result.plain_missing_part, 501);
  assert.equal(result.plain_missing_password[0], 501);
  assert.match(result.plain_missing_password[1], /^5\.5\.2 .*missing password/);
  assert.equal(result.plain_other_authzid[0], 535);
  assert.match(result.plain_other_authzid[1], /^5\.7\.8 .*another user/);
  assert.equal(result.login_prompt, 334);
  assert.equal(result.login_bad_username[0], 501);
  assert.match(result.login_bad_username[1], /^5\.5\.2 /);
  assert.equal(result.still_open, 250);
  const failures = await env.pool.query("SELECT coalesce(sum(failures), 0)::int AS n FROM auth_failures WHERE scope = 'account' AND key = 'alice@example.test'");
  assert.equal(failures.rows[0].n, 0, "malformed data never reached the password check");
});

/** msa_auth_total by result, as /metrics shows it. */
async function authTotals(): Promise<Record<string, number>> {
  const totals: Record<string, number> = {};
  for (const match of (await registry.metrics()).matchAll(/^msa_auth_total\{result="(\w+)"\} (\d+)$/gm)) totals[match[1]!] = Number(match[2]);
  return totals;
}

test("wrong passwords get 535 5.7.8, then 421 4.7.0 closes the connection; failures are counted per IP and account", async () => {
  const started = Date.now();
  const before = await authTotals();
  const result = await python(["wrong-password", String(msa.submissionPort), "bob@example.test", PASSWORDS.wrong]);
  const attempts = result.attempts;
  assert.deepEqual(attempts[0], [535, "5.7.8 Authentication credentials invalid"]);
  assert.deepEqual(attempts[1], [535, "5.7.8 Authentication credentials invalid"]);
  assert.equal(attempts[2][0], 421);
  assert.match(attempts[2][1], /^4\.7\.0 /);
  assert.equal(attempts[3], "disconnected");
  // Slowed: 20 ms, 40 ms, 60 ms with the test's delay.
  assert.ok(Date.now() - started >= 120);
  const rows = (await env.pool.query("SELECT scope, key, failures FROM auth_failures WHERE key IN ('bob@example.test', '127.0.0.1')")).rows;
  assert.equal(rows.find((r) => r.scope === "account")?.failures, 3);
  assert.ok(rows.find((r) => r.scope === "ip")?.failures >= 3);
  // The third is a wrong password too, though its reply is the 421: invalid, not limited.
  const totals = await authTotals();
  assert.equal((totals.invalid ?? 0) - (before.invalid ?? 0), 3);
  assert.equal(totals.limited ?? 0, before.limited ?? 0);
});

test("after too many failures for one account even the right password is refused with 454 4.7.0", async () => {
  await python(["wrong-password", String(msa.submissionPort), "carol@example.test", PASSWORDS.wrong]);
  await python(["wrong-password", String(msa.submissionPort), "carol@example.test", PASSWORDS.wrong]);
  const result = await python(["submit", String(msa.submissionPort), "starttls", "carol@example.test", PASSWORDS.carol, "carol@example.test", "bob@example.test"], "Subject: x\r\n\r\nx\r\n");
  assert.equal(result.result, "error");
  assert.equal(result.code, 454);
  assert.match(result.message, /^4\.7\.0 /);
});

test("nodemailer over STARTTLS: one local and one remote recipient, fixed headers, DKIM verified by mailauth and python3-dkim", async () => {
  const accepted: string[] = [];
  const transport = nodemailer.createTransport({
    host: "127.0.0.1",
    port: msa.submissionPort,
    secure: false,
    requireTLS: true,
    auth: { user: "alice@example.test", pass: PASSWORDS.alice },
    tls: { rejectUnauthorized: false },
  });
  // A raw message as a minimal client would write it: no Date:, no Message-ID:, a domainless To:, a Bcc:.
  const raw = "From: Alice <alice@example.test>\r\nTo: bob, =?UTF-8?Q?R=C3=A9mi?= <remi@remote.example>\r\nBcc: hidden@remote.example\r\nSubject: nodemailer-1\r\n\r\nHello Bob,\r\n\r\nsee you.\r\n";
  const info = await transport.sendMail({ envelope: { from: "alice@example.test", to: ["bob@example.test", "remi@remote.example"] }, raw });
  transport.close();
  accepted.push(...(info.accepted as string[]));
  assert.deepEqual(accepted.sort(), ["bob@example.test", "remi@remote.example"]);
  assert.match(info.response, /^250 2\.0\.0 Ok: queued as /);

  const message = await storedBySubject("nodemailer-1");
  assert.equal(message.envelope_from, "alice@example.test");
  assert.equal(message.auth_user, "alice@example.test");
  const deliveries = (await env.pool.query("SELECT kind, final_recipient, remote_domain, state FROM deliveries WHERE message_id = $1 ORDER BY kind", [message.id])).rows;
  assert.deepEqual(deliveries, [
    { kind: "local", final_recipient: "bob@example.test", remote_domain: null, state: "queued" },
    { kind: "remote", final_recipient: "remi@remote.example", remote_domain: "remote.example", state: "queued" },
  ]);

  const head = header(message.raw);
  assert.match(head, /^DKIM-Signature: |\r\nDKIM-Signature: /);
  assert.match(head, /^Received: from client\.test|^Received: from \[?[\w.-]+/);
  assert.match(head, /\(Authenticated sender: alice@example\.test\)/);
  assert.match(head, /with ESMTPSA/);
  assert.match(head, /\r\nDate: [A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000\r\n/);
  assert.match(head, /\r\nMessage-ID: <[0-9a-f]+@msa\.example\.test>\r\n/);
  assert.match(head, /\r\nTo: <bob@example\.test>, /);
  assert.doesNotMatch(head, /Bcc:|hidden@/);
  assert.match(head, /DKIM-Signature: [^]*d=example\.test/);
  assert.match(head, /c=relaxed\/relaxed/);

  const verified = await dkimVerify(message.raw, { resolver });
  assert.deepEqual(verified.results.map((r) => [r.signingDomain, r.status.result]), [["example.test", "pass"]]);
  assert.deepEqual(await pythonDkimVerify(message.raw, txtValues()), [true]);
  // The verifiers can fail: a changed body does not verify.
  const tampered = Buffer.from(message.raw.toString("latin1").replace("see you.", "see you!"), "latin1");
  assert.deepEqual(await pythonDkimVerify(tampered, txtValues()), [false]);
});

test("smtplib on 465 (implicit TLS): From: with two owned addresses gets Sender: and an rsa-sha256 and an ed25519-sha256 signature", async () => {
  const data = "From: alice@example.test, Alice <alice@other.test>\r\nTo: bob@example.test\r\nSubject: smtplib-465\r\nDate: Fri, 27 Nov 2026 10:00:00 +0100\r\nMessage-ID: <fixed@client.test>\r\n\r\nTwo authors.\r\n";
  const result = await python(["submit", String(msa.submissionsPort), "implicit", "alice@example.test", PASSWORDS.alice, "alice@other.test", "bob@example.test"], data);
  assert.equal(result.result, "sent", JSON.stringify(result));
  const message = await storedBySubject("smtplib-465");
  const head = header(message.raw);
  assert.match(head, /\r\nSender: <alice@example\.test>\r\n/);
  assert.match(head, /\r\nMessage-ID: <fixed@client\.test>\r\n/);
  assert.match(head, /Date: Fri, 27 Nov 2026 10:00:00 \+0100/);
  const verified = await dkimVerify(message.raw, { resolver });
  const results = verified.results.map((r) => [r.signingDomain, r.status.result]).sort();
  assert.deepEqual(results, [["example.test", "pass"], ["other.test", "pass"]]);
  assert.match(head, /a=ed25519-sha256/);
  assert.match(head, /a=rsa-sha256/);
  assert.deepEqual(await pythonDkimVerify(message.raw, txtValues()), [true, true]);
});

test("a forged envelope sender or From: is refused with 553 5.7.1", async () => {
  const port = String(msa.submissionPort);
  const envelope = await python(["submit", port, "starttls", "alice@example.test", PASSWORDS.alice, "bob@example.test", "bob@example.test"], "From: bob@example.test\r\nSubject: forged-1\r\n\r\nx\r\n");
  assert.equal(envelope.result, "error");
  assert.equal(envelope.code, 553);
  assert.match(envelope.message, /^5\.7\.1 /);

  const from = await python(["submit", port, "starttls", "alice@example.test", PASSWORDS.alice, "alice@example.test", "bob@example.test"], "From: The Boss <bob@example.test>\r\nSubject: forged-2\r\n\r\nx\r\n");
  assert.equal(from.result, "error");
  assert.equal(from.code, 553);
  assert.match(from.message, /^5\.7\.1 From: address <bob@example\.test> is not owned/);

  // A catch-all that targets the account gives no right to send as any address of that domain.
  const catchAll = await python(["submit", port, "starttls", "bob@example.test", PASSWORDS.bob, "anything@other.test", "alice@example.test"], "Subject: forged-3\r\n\r\nx\r\n");
  assert.equal(catchAll.code, 553);

  const swaksForged = await swaks([
    "--server", "127.0.0.1", "--port", port, "--tls", "--auth", "PLAIN", "--auth-user", "alice@example.test",
    "--auth-password", PASSWORDS.alice, "--from", "alice@example.test", "--to", "bob@example.test",
    "--header", "From: bob@example.test", "--header", "Subject: forged-4", "--ehlo", "client.test",
  ]);
  assert.notEqual(swaksForged.code, 0);
  assert.match(swaksForged.output, /<~?\*+ 553 5\.7\.1 From: address/);
  const stored = await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE raw::text LIKE '%forged-%'");
  assert.equal(stored.rows[0].n, 0);
});

test("swaks: AUTH LOGIN on 465 and AUTH PLAIN after STARTTLS on 587, sending as an alias", async () => {
  const common = ["--auth-user", "alice@example.test", "--auth-password", PASSWORDS.alice, "--to", "bob@example.test", "--ehlo", "client.test"];
  const login = await swaks(["--server", "127.0.0.1", "--port", String(msa.submissionsPort), "--tlsc", "--auth", "LOGIN", "--from", "sales@example.test", "--header", "Subject: swaks-465", ...common]);
  assert.equal(login.code, 0, login.output);
  assert.match(login.output, /<~ {2}235 2\.7\.0/);
  const plain = await swaks(["--server", "127.0.0.1", "--port", String(msa.submissionPort), "--tls", "--auth", "PLAIN", "--from", "alice@example.test", "--header", "Subject: swaks-587", ...common]);
  assert.equal(plain.code, 0, plain.output);
  const viaAlias = await storedBySubject("swaks-465");
  assert.equal(viaAlias.envelope_from, "sales@example.test");
  const verified = await dkimVerify(viaAlias.raw, { resolver });
  assert.equal(verified.results[0]?.status.result, "pass");
});

test("the inbound port's smuggling guard applies: a bare-LF dot inside DATA is refused (550 5.6.11), nothing stored", async () => {
  const client = await rawTls(msa.submissionsPort);
  assert.match(await client.reply(), /^220 /);
  assert.match(await client.command("EHLO client.test"), /^250 /);
  assert.match(await client.command(`AUTH PLAIN ${Buffer.from(`\0alice@example.test\0${PASSWORDS.alice}`).toString("base64")}`), /^235 /);
  assert.match(await client.command("MAIL FROM:<alice@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<bob@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  const smuggled = "From: alice@example.test\r\nSubject: smuggle-1\r\n\r\nx\n.\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<victim@remote.example>\r\nDATA\r\nSubject: smuggle-2\r\n\r\ny\r\n.\r\n";
  assert.match(await client.command(smuggled.slice(0, -2)), /^550 5\.6\.11 /);
  client.socket.end();
  const stored = await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE position('smuggle' in convert_from(raw, 'LATIN1')) > 0");
  assert.equal(stored.rows[0].n, 0);
});

test("a message without a valid header block is refused with 554 5.6.0", async () => {
  const result = await python(["submit", String(msa.submissionPort), "starttls", "alice@example.test", PASSWORDS.alice, "alice@example.test", "bob@example.test"], "this is not a header\r\njust text\r\n");
  assert.equal(result.result, "error");
  assert.equal(result.code, 554);
  assert.match(result.message, /^5\.6\.0 .*no valid header block/);
});

test("per-account message and recipient limits answer 451 4.7.1", async () => {
  const limited = await startMsa({
    pool: env.pool, bus: env.bus, logger: logs.logger, tls,
    settings: testSettings({ submission: { maxMessages: 2, maxRecipients: 3, windowMs: 3_600_000 } }),
  });
  try {
    const port = String(limited.submissionPort);
    const send = (to: string, subject: string) =>
      python(["submit", port, "starttls", "dave@example.test", PASSWORDS.dave, "dave@example.test", to], `From: dave@example.test\r\nSubject: ${subject}\r\n\r\nx\r\n`);
    const counted = async (messages: number) =>
      waitFor(async () => (await env.pool.query("SELECT messages FROM submission_counters c JOIN accounts a ON a.id = c.account_id WHERE a.address = 'dave@example.test'")).rows[0]?.messages === messages);

    assert.equal((await send("bob@example.test,alice@example.test", "rate-1")).result, "sent");
    await counted(1);
    const second = await send("bob@example.test,carol@example.test", "rate-2");
    assert.equal(second.result, "sent");
    assert.deepEqual(second.refused, { "carol@example.test": [451, "4.7.1 Recipient rate limit exceeded for this account, try again later"] });
    await counted(2);
    const third = await send("bob@example.test", "rate-3");
    assert.equal(third.result, "error");
    assert.equal(third.code, 451);
    assert.match(third.message, /^4\.7\.1 Message rate limit/);
  } finally {
    await limited.stop();
  }
});

test("per-IP failure limit: further logins from the address are refused unchecked with 454 4.7.0", async () => {
  await env.pool.query("DELETE FROM auth_failures");
  const strict = await startMsa({
    pool: env.pool, bus: env.bus, logger: logs.logger, tls,
    settings: testSettings({ auth: { failureDelayMs: 1, maxFailuresPerConnection: 3, maxFailuresPerIp: 2, maxFailuresPerAccount: 100, windowMs: 900_000 } }),
  });
  try {
    const port = String(strict.submissionPort);
    const result = await python(["wrong-password", port, "nobody@example.test", PASSWORDS.wrong]);
    assert.deepEqual(result.attempts.slice(0, 2).map((a: [number]) => a[0]), [535, 535]);
    const blocked = await python(["submit", port, "starttls", "alice@example.test", PASSWORDS.alice, "alice@example.test", "bob@example.test"], "Subject: x\r\n\r\nx\r\n");
    assert.equal(blocked.code, 454);
    assert.match(blocked.message, /^4\.7\.0 Too many failed/);
  } finally {
    await strict.stop();
    await env.pool.query("DELETE FROM auth_failures");
  }
});

test("no password ever reaches the logs", () => {
  const text = logs.lines.join("");
  assert.ok(text.includes("authentication failed"), "the log was captured");
  for (const password of Object.values(PASSWORDS)) assert.ok(!text.includes(password), `password ${password} logged`);
  for (const password of Object.values(PASSWORDS)) assert.ok(!text.includes(Buffer.from(password).toString("base64")));
});
