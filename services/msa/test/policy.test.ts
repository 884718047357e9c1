import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createPool, setAccountDisabled, setAccountPassword } from "@mailstack/db";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp } from "@mailstack/smtp-intake/testing";
import { startMsa } from "../src/server.ts";
import { memoryLogger, PASSWORDS, python, seedDirectory, testSettings, testTls } from "./helpers.ts";

let env: TestEnv;
let tls: { key: string; cert: string };
const { logger } = memoryLogger();

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  tls = await testTls();
});
after(async () => env?.close());

async function withMsa<T>(overrides: Parameters<typeof testSettings>[0], fn: (ports: { submission: number; submissions: number }) => Promise<T>): Promise<T> {
  const msa = await startMsa({ pool: env.pool, bus: env.bus, logger, tls, settings: testSettings(overrides) });
  try {
    return await fn({ submission: msa.submissionPort, submissions: msa.submissionsPort });
  } finally {
    await msa.stop();
  }
}

test("POP-before-SMTP: off by default; when on, a recent POP3 login from the IP lets it submit as that account without AUTH", async () => {
  const message = "From: alice@example.test\r\nSubject: pop-before-smtp\r\n\r\nx\r\n";
  // What the POP3 service records after a login (migration 030): the last login per client IP.
  await env.pool.query("INSERT INTO pop_logins (ip, account_id) SELECT '127.0.0.1', id FROM accounts WHERE address = 'alice@example.test'");

  const off = await withMsa({}, ({ submission }) => python(["noauth-submit", String(submission), "alice@example.test", "bob@example.test"], message));
  assert.equal(off.code, 530);

  await withMsa({ popBeforeSmtp: { enabled: true, windowMs: 600_000 } }, async ({ submission }) => {
    const sent = await python(["noauth-submit", String(submission), "alice@example.test", "bob@example.test"], message);
    assert.equal(sent.result, "sent", JSON.stringify(sent));
    assert.match(sent.ehlo_auth, /PLAIN/, "AUTH is still offered");
    // Only the logged-in account's addresses.
    const other = await python(["noauth-submit", String(submission), "carol@example.test", "bob@example.test"], "From: carol@example.test\r\nSubject: x\r\n\r\nx\r\n");
    assert.equal(other.code, 530);
    // An old login does not count.
    await env.pool.query("UPDATE pop_logins SET at = now() - interval '11 minutes'");
    const expired = await python(["noauth-submit", String(submission), "alice@example.test", "bob@example.test"], message);
    assert.equal(expired.code, 530);
    assert.match(expired.message, /^5\.7\.0 /);
  });
  const stored = await env.pool.query("SELECT envelope_from, auth_user FROM messages WHERE position('pop-before-smtp' in convert_from(raw, 'LATIN1')) > 0");
  assert.equal(stored.rowCount, 1);
  assert.equal(stored.rows[0].envelope_from, "alice@example.test");
});

test("POP-before-SMTP on: a client without a recent POP3 login still gets 421 4.7.0 after ten commands before AUTH; one with it does not", async () => {
  const noops = async (port: number, count: number): Promise<string[]> => {
    const client = await RawSmtp.connect(port);
    await client.reply();
    const replies: string[] = [];
    for (let i = 0; i < count; i++) {
      const r = await client.command(i === 0 ? "EHLO client.example" : "NOOP").catch(() => null);
      if (!r) break;
      replies.push(r.text);
      if (r.code === 421) break;
    }
    client.close();
    return replies;
  };
  await env.pool.query("DELETE FROM pop_logins");
  await withMsa({ popBeforeSmtp: { enabled: true, windowMs: 600_000 } }, async ({ submission }) => {
    const stranger = await noops(submission, 15);
    assert.equal(stranger.length, 11);
    assert.match(stranger[10]!, /^421 4\.7\.0 /);

    await env.pool.query("INSERT INTO pop_logins (ip, account_id) SELECT '127.0.0.1', id FROM accounts WHERE address = 'alice@example.test'");
    const popUser = await noops(submission, 15);
    assert.equal(popUser.length, 15);
    assert.ok(popUser.every((text) => text.startsWith("250")), popUser.join(" | "));
  });
  await env.pool.query("DELETE FROM pop_logins");
});

test("a disabled account cannot log in", async () => {
  await setAccountDisabled(env.pool, "carol@example.test", true);
  try {
    await withMsa({}, async ({ submission }) => {
      const result = await python(["submit", String(submission), "starttls", "carol@example.test", PASSWORDS.carol, "carol@example.test", "bob@example.test"], "Subject: x\r\n\r\nx\r\n");
      assert.equal(result.code, 535);
    });
  } finally {
    await setAccountDisabled(env.pool, "carol@example.test", false);
  }
});

test("SUBMISSION_AUTH_BEFORE_TLS allows AUTH on a plain connection; by default it is refused", async () => {
  const refused = await withMsa({}, ({ submission }) => python(["plain-auth", String(submission), "alice@example.test", PASSWORDS.alice]));
  assert.equal(refused.ehlo_auth, null);
  assert.ok(refused.auth[0] >= 500);
  const allowed = await withMsa({ authBeforeTls: true }, ({ submission }) => python(["plain-auth", String(submission), "alice@example.test", PASSWORDS.alice]));
  assert.match(allowed.ehlo_auth, /PLAIN/);
  assert.equal(allowed.auth[0], 235);
});

test("DSN parameters of a submission are kept on the message and its delivery", async () => {
  await withMsa({}, async ({ submission }) => {
    const result = await python(
      ["dsn-submit", String(submission), "alice@example.test", PASSWORDS.alice, "alice@example.test", "bob@example.test"],
      "From: alice@example.test\r\nSubject: dsn-params\r\n\r\nx\r\n",
    );
    assert.equal(result.result, "sent");
  });
  const row = (await env.pool.query(
    `SELECT m.dsn_envid, m.dsn_ret, d.dsn_notify, d.dsn_orcpt FROM messages m JOIN deliveries d ON d.message_id = m.id
      WHERE position('dsn-params' in convert_from(m.raw, 'LATIN1')) > 0`,
  )).rows[0];
  assert.equal(row.dsn_envid, "env-42");
  assert.equal(row.dsn_ret, "HDRS");
  assert.deepEqual(row.dsn_notify, ["SUCCESS", "FAILURE"]);
  assert.match(row.dsn_orcpt, /bob@example\.test/);
});

test("the login cache: a remembered login stops working as soon as the password changes", async () => {
  const auth = { failureDelayMs: 1, maxFailuresPerConnection: 3, maxFailuresPerIp: 1000, maxFailuresPerAccount: 100, windowMs: 900_000, cacheTtlMs: 60_000 };
  await withMsa({ auth }, async ({ submission }) => {
    const login = (password: string) => python(["plain-auth-tls", String(submission), "dave@example.test", password]);
    assert.equal((await login(PASSWORDS.dave)).auth[0], 235);
    assert.equal((await login(PASSWORDS.dave)).auth[0], 235, "a remembered login");
    assert.equal((await login(PASSWORDS.wrong)).auth[0], 535);
    await setAccountPassword(env.pool, "dave@example.test", "a-New-password-5");
    try {
      assert.equal((await login(PASSWORDS.dave)).auth[0], 535, "the old password no longer works");
      assert.equal((await login("a-New-password-5")).auth[0], 235);
    } finally {
      await setAccountPassword(env.pool, "dave@example.test", PASSWORDS.dave);
    }
  });
});

test("PostgreSQL unreachable: AUTH answers 454 4.7.0 (temporary), never 535", async () => {
  const broken = createPool({ url: "postgres://postgres@127.0.0.1:1/nowhere", max: 2 });
  const msa = await startMsa({ pool: broken, bus: env.bus, logger, tls, settings: testSettings() });
  try {
    const result = await python(["plain-auth-tls", String(msa.submissionPort), "alice@example.test", PASSWORDS.alice]);
    assert.equal(result.auth[0], 454);
    assert.match(result.auth[1], /^4\.7\.0 /);
  } finally {
    await msa.stop();
    await broken.end();
  }
});
