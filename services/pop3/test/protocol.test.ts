import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { addAccount, addDomain, removeAccount } from "@mailstack/db";
import { assertNoLoginTimingOracle, createTestEnv, runMailctl, waitFor, type TestEnv } from "@mailstack/testkit";
import type { Pop3Server } from "../src/server.ts";
import { createAccount, fileMessage, PopClient, startTestServer, unstuff, type TestAccount } from "./helpers.ts";

/** Larger than what the loopback socket buffers hold: the server's writes to a client that does not read block. */
const BIG_MESSAGE = `Subject: big\r\n\r\n${`${"x".repeat(78)}\r\n`.repeat(200_000)}`;

/** Logs in again and again until the maildrop lock is free (up to 5 s): the new client and its reply. */
async function loginWhenReleased(port: number, account: TestAccount): Promise<{ attempt: PopClient; reply: string }> {
  return waitFor(async () => {
    const attempt = (await PopClient.connect(port)).client;
    const reply = await attempt.login(account);
    if (reply.startsWith("+OK")) return { attempt, reply };
    attempt.close();
    return null;
  }, 5_000, 200);
}

let env: TestEnv;
let server: Pop3Server;

before(async () => {
  env = await createTestEnv();
  server = await startTestServer(env);
});

after(async () => {
  await server?.stop();
  await env?.close();
});

const plain = (address: string) => createAccount(env.pool, address);

test("greeting carries an APOP timestamp; wrong-state and unknown commands get -ERR without closing", async () => {
  const { client, greeting } = await PopClient.connect(server.port);
  assert.match(greeting, /^\+OK .*<[^<>@\s]+@[^<>\s]+>$/);
  for (const command of ["STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 0", "UIDL", "FROB", "PASS x"]) {
    assert.match(await client.command(command), /^-ERR /, command);
  }
  const capa = await client.command("CAPA");
  assert.equal(capa, "+OK capability list follows");
  const caps: string[] = [];
  for (let line = await client.line(); line !== "."; line = await client.line()) caps.push(line);
  for (const cap of ["TOP", "UIDL", "USER", "SASL PLAIN", "STLS", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]) assert.ok(caps.includes(cap), cap);
  assert.ok(caps.some((c) => c.startsWith("IMPLEMENTATION ")));
  assert.equal(await client.command("QUIT"), "+OK bye");
  await waitFor(() => client.closed, 5_000);
});

test("every TRANSACTION command: exact sizes, byte-stuffing, TOP, UIDL, bare LF normalised", async () => {
  const account = await plain("txn@example.test");
  const m1 = "Subject: one\r\nFrom: a@example.test\r\n\r\nhello\r\n.dot line\r\n..two dots\r\n.\r\nend\r\n";
  const m2 = "Subject: bare lf\nX: y\n\nline1\nline2"; // bare LFs, no final line break
  const prefix = "Return-Path: <a@example.test>\r\nDelivered-To: txn@example.test\r\n";
  await fileMessage(env.pool, account.id, m1, prefix);
  await fileMessage(env.pool, account.id, m2);
  const expected1 = prefix + m1;
  const expected2 = "Subject: bare lf\r\nX: y\r\n\r\nline1\r\nline2\r\n";

  const { client } = await PopClient.connect(server.port);
  const login = await client.login(account);
  const total = Buffer.byteLength(expected1) + Buffer.byteLength(expected2);
  assert.equal(login, `+OK maildrop has 2 messages (${total} octets)`);
  assert.equal(await client.command("STAT"), `+OK 2 ${total}`);

  client.send("LIST");
  const list = await client.multiline();
  assert.equal(list.body.toString(), `1 ${Buffer.byteLength(expected1)}\r\n2 ${Buffer.byteLength(expected2)}\r\n`);
  assert.equal(await client.command("LIST 2"), `+OK 2 ${Buffer.byteLength(expected2)}`);
  assert.equal(await client.command("LIST 3"), "-ERR no such message");
  assert.equal(await client.command("LIST x"), "-ERR invalid message number");

  client.send("RETR 1");
  const r1 = await client.multiline();
  assert.equal(r1.status, `+OK ${Buffer.byteLength(expected1)} octets`);
  assert.match(r1.body.toString(), /\r\n\.\.dot line\r\n\.\.\.two dots\r\n\.\.\r\nend\r\n$/);
  assert.equal(unstuff(r1.body).toString(), expected1);
  assert.equal(unstuff(r1.body).length, Buffer.byteLength(expected1), "RETR sends exactly the octets LIST reported");

  client.send("RETR 2");
  const r2 = await client.multiline();
  assert.equal(r2.body.toString(), expected2);
  assert.equal(r2.body.length, Buffer.byteLength(expected2));

  client.send("TOP 1 1");
  const top = await client.multiline();
  assert.equal(top.status, "+OK top of message follows");
  assert.equal(top.body.toString(), `${prefix}Subject: one\r\nFrom: a@example.test\r\n\r\nhello\r\n`);
  client.send("TOP 2 0");
  assert.equal((await client.multiline()).body.toString(), "Subject: bare lf\r\nX: y\r\n\r\n");
  assert.match(await client.command("TOP 1"), /^-ERR/);

  client.send("UIDL");
  const uidl = (await client.multiline()).body.toString().trim().split("\r\n");
  assert.equal(uidl.length, 2);
  const [, uid1] = uidl[0]!.split(" ");
  assert.match(uid1!, /^[\x21-\x7e]{1,70}$/);
  assert.equal(await client.command("UIDL 1"), `+OK 1 ${uid1}`);
  assert.equal(await client.command("NOOP"), "+OK");
  assert.match(await client.command("USER x"), /^-ERR/);
  assert.match(await client.command("STLS"), /^-ERR/);
  assert.equal(await client.command("QUIT"), "+OK bye (0 messages deleted)");

  // UIDLs are stable across sessions; the same message numbers come back.
  const again = (await PopClient.connect(server.port)).client;
  await again.login(account);
  assert.equal(await again.command("UIDL 1"), `+OK 1 ${uid1}`);
  again.send("UIDL");
  assert.deepEqual((await again.multiline()).body.toString().trim().split("\r\n"), uidl);
  await again.command("QUIT");

  // RETR recorded 'retrieved' journey events (written when the session ended).
  const retrieved = async () =>
    (await env.pool.query("SELECT count(*)::int AS n FROM delivery_events WHERE event = 'retrieved' AND service = 'pop3'")).rows[0].n as number;
  await waitFor(async () => (await retrieved()) === 2, 5_000);
});

test("retrieved events are written once the client pauses, while its session stays open", async () => {
  const account = await plain("pause@example.test");
  const filed = await fileMessage(env.pool, account.id, "Subject: pause\r\n\r\nbody\r\n");
  const count = async () =>
    (await env.pool.query("SELECT count(*)::int AS n FROM delivery_events WHERE event = 'retrieved' AND message_id = $1", [filed.messageId])).rows[0].n as number;
  const { client } = await PopClient.connect(server.port);
  await client.login(account);
  client.send("RETR 1");
  await client.multiline();
  assert.equal(await count(), 0, "not written during the download");
  await waitFor(async () => (await count()) === 1, 5_000);
  assert.equal(client.closed, false);
  assert.equal(await client.command("QUIT"), "+OK bye (0 messages deleted)");
});

test("a mailbox larger than one read-ahead batch: every RETR exact, in order, out of order, after TOP and DELE", async () => {
  const account = await plain("many@example.test");
  // Four kinds of stored message, so the prepared responses cover the clean case and each kind of fixing.
  const kinds = [
    (n: number) => `Subject: clean ${n}\r\n\r\nbody ${n}\r\n`,
    (n: number) => `Subject: dots ${n}\r\n\r\n.starts with a dot ${n}\r\n..\r\n`,
    (n: number) => `Subject: lf ${n}\n\nbare lf ${n}\nno final line break`,
    (n: number) => `.Subject-less first line ${n}\r\n\r\nx\r\n`,
  ];
  const expected: string[] = [];
  const count = 600;
  const rows = Array.from({ length: count }, (_, i) => kinds[i % kinds.length]!(i + 1));
  const prefix = "Delivered-To: many@example.test\r\n";
  // Filed in bulk (as fileMessage does, one statement): 600 transactions would dominate the test.
  await env.pool.query(
    `WITH m AS (INSERT INTO messages (queue_id, raw, size, envelope_from, source)
                SELECT md5(random()::text), convert_to(raw, 'UTF8'), octet_length(raw), '', 'inbound'
                  FROM unnest($2::text[]) WITH ORDINALITY AS t(raw, n) ORDER BY n RETURNING id)
     INSERT INTO mailbox_entries (account_id, folder, uid, message_id, header_prefix, size)
     SELECT $1, 'INBOX', row_number() OVER (ORDER BY id), id, convert_to($3, 'UTF8'), 0 FROM m`,
    [account.id, rows, prefix],
  );
  await env.pool.query("UPDATE folders SET uid_next = $2 WHERE account_id = $1 AND name = 'INBOX'", [account.id, count + 1]);
  for (const raw of rows) {
    let text = prefix + raw.replace(/\r?\n/g, "\r\n");
    if (!text.endsWith("\r\n")) text += "\r\n";
    expected.push(text);
  }

  const { client } = await PopClient.connect(server.port);
  await client.login(account);
  const retr = async (n: number) => {
    client.send(`RETR ${n}`);
    const response = await client.multiline();
    assert.equal(response.status, `+OK ${Buffer.byteLength(expected[n - 1]!)} octets`, `RETR ${n}`);
    assert.equal(unstuff(response.body).toString(), expected[n - 1], `RETR ${n}`);
  };
  for (let n = 1; n <= 300; n++) await retr(n);
  // Out of order, backwards, again, and TOP in between (which does not use up a read-ahead message).
  for (const n of [550, 549, 7, 7, 301]) await retr(n);
  client.send("TOP 302 0");
  assert.equal((await client.multiline()).body.toString(), expected[301]!.slice(0, expected[301]!.indexOf("\r\n\r\n") + 4));
  assert.equal(await client.command("DELE 303"), "+OK message 303 deleted");
  assert.equal(await client.command("RETR 303"), "-ERR message 303 already deleted");
  for (let n = 302; n <= count; n++) if (n !== 303) await retr(n);
  assert.equal(await client.command("RSET"), `+OK maildrop has ${count} messages (${expected.reduce((sum, text) => sum + Buffer.byteLength(text), 0)} octets)`);
  await retr(303);
  assert.equal(await client.command("QUIT"), "+OK bye (0 messages deleted)");
});

test("DELE + RSET restores; DELE + dropped connection deletes nothing; DELE + QUIT deletes atomically", async () => {
  const account = await plain("dele@example.test");
  for (let i = 1; i <= 3; i++) await fileMessage(env.pool, account.id, `Subject: ${i}\r\n\r\nbody ${i}\r\n`);
  const size = Buffer.byteLength("Subject: 1\r\n\r\nbody 1\r\n");

  let { client } = await PopClient.connect(server.port);
  await client.login(account);
  assert.equal(await client.command("DELE 1"), "+OK message 1 deleted");
  assert.equal(await client.command("DELE 1"), "-ERR message 1 already deleted");
  assert.equal(await client.command("RETR 1"), "-ERR message 1 already deleted");
  assert.equal(await client.command("LIST 1"), "-ERR message 1 already deleted");
  assert.equal(await client.command("STAT"), `+OK 2 ${2 * size}`);
  client.send("LIST");
  assert.equal((await client.multiline()).body.toString(), `2 ${size}\r\n3 ${size}\r\n`);
  assert.equal(await client.command("RSET"), `+OK maildrop has 3 messages (${3 * size} octets)`);
  assert.equal(await client.command("STAT"), `+OK 3 ${3 * size}`);
  assert.equal(await client.command("DELE 2"), "+OK message 2 deleted");
  client.close(); // dropped: no UPDATE state

  ({ client } = (await (async () => {
    // The lock is released when the dropped session ends.
    return waitFor(async () => {
      const attempt = await PopClient.connect(server.port);
      const reply = await attempt.client.login(account);
      if (reply.startsWith("+OK")) return attempt;
      attempt.client.close();
      return null;
    }, 5_000);
  })())!);
  assert.equal(await client.command("STAT"), `+OK 3 ${3 * size}`, "a dropped connection deletes nothing");
  assert.equal(await client.command("DELE 1"), "+OK message 1 deleted");
  assert.equal(await client.command("DELE 3"), "+OK message 3 deleted");
  assert.equal(await client.command("QUIT"), "+OK bye (2 messages deleted)");

  ({ client } = await PopClient.connect(server.port));
  await client.login(account);
  assert.equal(await client.command("STAT"), `+OK 1 ${size}`);
  client.send("RETR 1");
  assert.equal((await client.multiline()).body.toString(), "Subject: 2\r\n\r\nbody 2\r\n");
  await client.command("QUIT");
  const rows = await env.pool.query("SELECT uid, deleted FROM mailbox_entries WHERE account_id = $1 ORDER BY uid", [account.id]);
  assert.deepEqual(rows.rows.map((r) => r.deleted), [true, false, true]);
});

test("the maildrop lock: a second session gets -ERR [IN-USE]; the lock is released by QUIT", async () => {
  const account = await plain("lock@example.test");
  await fileMessage(env.pool, account.id, "Subject: x\r\n\r\ny\r\n");
  const first = (await PopClient.connect(server.port)).client;
  assert.match(await first.login(account), /^\+OK/);
  const second = (await PopClient.connect(server.port)).client;
  assert.match(await second.login(account), /^-ERR \[IN-USE\]/);
  // Still in AUTHORIZATION: the session stays usable.
  assert.equal(await second.command("NOOP"), "-ERR command not valid before authentication");
  assert.match(await first.command("QUIT"), /^\+OK/);
  assert.match(await second.login(account), /^\+OK maildrop has 1 messages/);
  await second.command("QUIT");
});

test("authentication: wrong password -ERR [AUTH]; AUTH PLAIN with initial response, continuation and cancel; APOP", async () => {
  const account = await plain("auth@example.test");
  const apopAccount = await createAccount(env.pool, "apop@example.test", "pw-apop", "apop-shared-secret");
  const { client, greeting } = await PopClient.connect(server.port);
  assert.equal(await client.command(`USER ${account.address}`), "+OK send PASS");
  assert.match(await client.command("PASS wrong"), /^-ERR \[AUTH\]/);
  assert.equal(await client.command("PASS secret-pw"), "-ERR USER first", "a failed PASS returns to the start of AUTHORIZATION");

  client.send("AUTH");
  assert.equal((await client.multiline()).body.toString(), "PLAIN\r\n");
  assert.equal(await client.command("AUTH CRAM-MD5"), "-ERR unsupported authentication mechanism");
  assert.equal(await client.command("AUTH PLAIN"), "+ ");
  assert.equal(await client.command("*"), "-ERR authentication cancelled");
  assert.equal(await client.command("AUTH PLAIN"), "+ ");
  assert.match(await client.command("not base64!"), /^-ERR \[AUTH\]/);
  const bad = Buffer.from(`\0${account.address}\0nope`).toString("base64");
  assert.match(await client.command(`AUTH PLAIN ${bad}`), /^-ERR \[AUTH\]/);
  const other = Buffer.from(`someone@else.test\0${account.address}\0secret-pw`).toString("base64");
  assert.match(await client.command(`AUTH PLAIN ${other}`), /^-ERR \[AUTH\]/, "authzid must be the user itself");
  assert.equal(await client.command("AUTH PLAIN"), "+ ");
  assert.match(await client.command(Buffer.from(`${account.address}\0${account.address}\0secret-pw`).toString("base64")), /^\+OK maildrop has 0 messages/);
  await client.command("QUIT");

  // AUTH PLAIN with an initial response.
  const ir = (await PopClient.connect(server.port)).client;
  assert.match(await ir.command(`AUTH PLAIN ${Buffer.from(`\0${account.address}\0secret-pw`).toString("base64")}`), /^\+OK/);
  await ir.command("QUIT");

  // APOP: refused clearly for an account without a stored secret, accepted with the right digest.
  const stamp = greeting.slice(greeting.indexOf("<"));
  const digest = (secret: string, ts: string) => createHash("md5").update(ts + secret).digest("hex");
  const c2 = (await PopClient.connect(server.port)).client;
  assert.match(await c2.command(`APOP ${account.address} ${digest("secret-pw", stamp)}`), /^-ERR \[AUTH\] APOP is not enabled/);
  const g3 = await PopClient.connect(server.port);
  const stamp3 = g3.greeting.slice(g3.greeting.indexOf("<"));
  assert.match(await g3.client.command(`APOP ${apopAccount.address} ${digest("wrong", stamp3)}`), /^-ERR \[AUTH\] invalid/);
  assert.match(await g3.client.command(`APOP ${apopAccount.address} ${digest("apop-shared-secret", stamp3)}`), /^\+OK maildrop has 0/);
  await g3.client.command("QUIT");
  c2.close();
});

test("APOP for an account whose secret an operator set with mailctl, and off again with --disable", async () => {
  const account = await plain("apop-admin@example.test");
  const set = await runMailctl(env.db.url, ["account", "apop", account.address], "Grüße secret\n");
  assert.equal(set.code, 0, set.stderr);
  const digest = (greeting: string, secret: string) => createHash("md5").update(greeting.slice(greeting.indexOf("<")) + secret).digest("hex");
  const first = await PopClient.connect(server.port);
  assert.match(await first.client.command(`APOP ${account.address} ${digest(first.greeting, "Grüße secret")}`), /^\+OK maildrop has 0/);
  await first.client.command("QUIT");
  // A password change leaves the APOP secret alone; --disable removes it.
  assert.equal((await runMailctl(env.db.url, ["account", "passwd", account.address], "new-pw\n")).code, 0);
  const second = await PopClient.connect(server.port);
  assert.match(await second.client.command(`APOP ${account.address} ${digest(second.greeting, "Grüße secret")}`), /^\+OK/);
  await second.client.command("QUIT");
  const off = await runMailctl(env.db.url, ["account", "apop", account.address, "--disable"]);
  assert.equal(off.code, 0, off.stderr);
  const third = await PopClient.connect(server.port);
  assert.match(await third.client.command(`APOP ${account.address} ${digest(third.greeting, "Grüße secret")}`), /^-ERR \[AUTH\] APOP is not enabled/);
  third.client.close();
  const empty = await runMailctl(env.db.url, ["account", "apop", account.address], "\n");
  assert.equal(empty.code, 2, "an empty secret is refused");
});

test("a NUL in a login name is a wrong login like any other, not an internal error that drops the client", async () => {
  const account = await plain("nul@example.test");
  const { client } = await PopClient.connect(server.port);
  assert.equal(await client.command("USER nul\0@example.test"), "+OK send PASS");
  assert.equal(await client.command("PASS secret-pw"), "-ERR [AUTH] invalid user name or password");
  assert.match(await client.command("APOP nul\0@example.test 0123456789abcdef0123456789abcdef"), /^-ERR \[AUTH\] APOP is not enabled/);
  assert.equal(await client.command("NOOP"), "-ERR command not valid before authentication", "the session goes on");
  const failures = await env.pool.query("SELECT failures FROM auth_failures WHERE scope = 'ip' AND key = '127.0.0.1'");
  assert.ok(failures.rows[0].failures >= 2, "counted against the client's IP");
  assert.match(await client.login(account), /^\+OK/);
  await client.command("QUIT");
});

test("bounds: over-long lines and pipelined commands", async () => {
  const account = await plain("bounds@example.test");
  await fileMessage(env.pool, account.id, "Subject: p\r\n\r\nq\r\n");
  const { client } = await PopClient.connect(server.port);
  assert.equal(await client.command(`NOOP ${"x".repeat(5000)}`), "-ERR line too long");
  assert.match(await client.command("CAPA"), /^\+OK/, "the session survives a long line");
  for (let line = await client.line(); line !== "."; line = await client.line());
  // An over-long SASL response ends the exchange; the next line is a command again.
  assert.equal(await client.command("AUTH PLAIN"), "+ ");
  assert.equal(await client.command("A".repeat(4000)), "-ERR line too long");
  assert.equal(await client.command("NOOP"), "-ERR command not valid before authentication");
  // Everything in one write (PIPELINING).
  client.send(Buffer.from(`USER ${account.address}\r\nPASS ${account.password}\r\nSTAT\r\nRETR 1\r\nQUIT\r\n`));
  assert.equal(await client.line(), "+OK send PASS");
  assert.match(await client.line(), /^\+OK maildrop has 1/);
  assert.match(await client.line(), /^\+OK 1 /);
  assert.equal((await client.multiline()).body.toString(), "Subject: p\r\n\r\nq\r\n");
  assert.match(await client.line(), /^\+OK bye/);
});

test("failed logins are rate-limited per account and per IP (shared in PostgreSQL)", async () => {
  await env.pool.query("DELETE FROM auth_failures"); // earlier tests failed logins from this IP too
  const limited = await startTestServer(env, { POP3_MAX_FAILURES_PER_ACCOUNT: 3, POP3_MAX_FAILURES_PER_IP: 5 });
  try {
    const account = await plain("throttle@example.test");
    const { client } = await PopClient.connect(limited.port);
    for (let i = 0; i < 3; i++) {
      await client.command(`USER ${account.address}`);
      assert.match(await client.command("PASS wrong"), /^-ERR \[AUTH\]/);
    }
    await client.command(`USER ${account.address}`);
    assert.match(await client.command(`PASS ${account.password}`), /^-ERR \[SYS\/TEMP\] too many failed logins/, "even the right password is refused while throttled");
    // Two more failures on other names exhaust the IP's budget.
    for (const name of ["x1@example.test", "x2@example.test"]) {
      await client.command(`USER ${name}`);
      assert.match(await client.command("PASS wrong"), /^-ERR \[AUTH\]/);
    }
    const fresh = await plain("fresh@example.test");
    await client.command(`USER ${fresh.address}`);
    assert.match(await client.command(`PASS ${fresh.password}`), /^-ERR \[SYS\/TEMP\]/);
    client.close();
  } finally {
    await limited.stop();
    await env.pool.query("DELETE FROM auth_failures");
  }
});

test("failed-login delay is applied before the -ERR", async () => {
  const slow = await startTestServer(env, { POP3_FAILED_LOGIN_DELAY: 400 });
  try {
    const { client } = await PopClient.connect(slow.port);
    await client.command("USER nobody@example.test");
    const started = Date.now();
    assert.match(await client.command("PASS wrong"), /^-ERR \[AUTH\]/);
    assert.ok(Date.now() - started >= 380, `answered after ${Date.now() - started} ms`);
    client.close();
  } finally {
    await slow.stop();
    await env.pool.query("DELETE FROM auth_failures");
  }
});

test("plaintext refused before TLS when not allowed; STLS discards pipelined input; then AUTH works", async () => {
  const strict = await startTestServer(env, { POP3_ALLOW_PLAINTEXT: "never" });
  try {
    const account = await plain("tls@example.test");
    await fileMessage(env.pool, account.id, "Subject: t\r\n\r\nsecret body\r\n");
    const { client } = await PopClient.connect(strict.port);
    client.send("CAPA");
    const caps = (await client.multiline()).body.toString();
    assert.ok(caps.includes("STLS") && !caps.includes("USER") && !caps.includes("SASL"), caps);
    assert.match(await client.command(`USER ${account.address}`), /^-ERR \[AUTH\] plaintext/);
    assert.match(await client.command(`PASS ${account.password}`), /^-ERR \[AUTH\] plaintext/);
    assert.match(await client.command(`AUTH PLAIN ${Buffer.from(`\0${account.address}\0${account.password}`).toString("base64")}`), /^-ERR \[AUTH\] plaintext/);

    // A command injected after STLS in the same packet must not survive the upgrade.
    client.send(Buffer.from(`STLS\r\nUSER ${account.address}\r\n`));
    assert.equal(await client.line(), "+OK begin TLS negotiation");
    await client.upgrade(strict.tls.cert);
    client.send("CAPA");
    const secureCaps = (await client.multiline()).body.toString();
    assert.ok(!secureCaps.includes("STLS") && secureCaps.includes("USER"), secureCaps);
    assert.equal(await client.command(`PASS ${account.password}`), "-ERR USER first", "the pipelined USER was discarded");
    assert.match(await client.command("STLS"), /^-ERR already using TLS/);
    assert.match(await client.command(`AUTH PLAIN ${Buffer.from(`\0${account.address}\0${account.password}`).toString("base64")}`), /^\+OK maildrop has 1/);
    client.send("RETR 1");
    assert.equal((await client.multiline()).body.toString(), "Subject: t\r\n\r\nsecret body\r\n");
    await client.command("QUIT");

    // Implicit TLS (POP3S): plaintext allowed since the channel is secure.
    const implicit = await PopClient.connect(strict.tlsPort, { tls: true, ca: strict.tls.cert });
    assert.match(implicit.greeting, /^\+OK/);
    implicit.client.send("CAPA");
    assert.ok(!(await implicit.client.multiline()).body.toString().includes("STLS"));
    assert.match(await implicit.client.login(account), /^\+OK maildrop has 1/);
    await implicit.client.command("QUIT");
  } finally {
    await strict.stop();
  }
});

test("loopback default allows plaintext; `always` too; POP-before-SMTP records logins only when enabled", async () => {
  const account = await plain("pbs@example.test");
  const { client } = await PopClient.connect(server.port);
  assert.match(await client.login(account), /^\+OK/);
  await client.command("QUIT");
  assert.equal((await env.pool.query("SELECT count(*)::int AS n FROM pop_logins")).rows[0].n, 0);

  const pbs = await startTestServer(env, { POP_BEFORE_SMTP: true, POP3_ALLOW_PLAINTEXT: "always" });
  try {
    const c = (await PopClient.connect(pbs.port)).client;
    assert.match(await c.login(account), /^\+OK/);
    await c.command("QUIT");
    const rows = await env.pool.query("SELECT host(ip) AS ip, account_id FROM pop_logins");
    assert.deepEqual(rows.rows, [{ ip: "127.0.0.1", account_id: account.id }]);
  } finally {
    await pbs.stop();
  }
});

test("autologout closes an idle session without UPDATE and releases the lock", async () => {
  const quick = await startTestServer(env, { POP3_AUTOLOGOUT: 300 });
  try {
    const account = await plain("idle@example.test");
    await fileMessage(env.pool, account.id, "Subject: i\r\n\r\nj\r\n");
    const { client } = await PopClient.connect(quick.port);
    await client.login(account);
    assert.equal(await client.command("DELE 1"), "+OK message 1 deleted");
    assert.match(await client.line(2_000), /^-ERR .*autologout/);
    await waitFor(() => client.closed, 2_000);
    const c2 = (await PopClient.connect(quick.port)).client;
    assert.match(await c2.login(account), /^\+OK maildrop has 1 messages/, "not deleted, and not locked");
    await c2.command("QUIT");
  } finally {
    await quick.stop();
  }
});

test("graceful stop: a session in TRANSACTION is told and closed, deleting nothing", async () => {
  const stoppable = await startTestServer(env);
  const account = await plain("stop@example.test");
  await fileMessage(env.pool, account.id, "Subject: s\r\n\r\nt\r\n");
  const { client } = await PopClient.connect(stoppable.port);
  await client.login(account);
  await client.command("DELE 1");
  await stoppable.stop();
  assert.match(await client.line(), /^-ERR \[SYS\/TEMP\] server shutting down/);
  await waitFor(() => client.closed, 2_000);
  const rows = await env.pool.query("SELECT deleted FROM mailbox_entries WHERE account_id = $1", [account.id]);
  assert.deepEqual(rows.rows, [{ deleted: false }]);
});

test("PostgreSQL connection lost mid-session: RETR and QUIT answer -ERR [SYS/TEMP], nothing lost, the lock goes with it", async () => {
  const account = await plain("pgfail@example.test");
  await fileMessage(env.pool, account.id, "Subject: f\r\n\r\ng\r\n");
  const { client } = await PopClient.connect(server.port);
  assert.match(await client.login(account), /^\+OK maildrop has 1/);
  assert.equal(await client.command("DELE 1"), "+OK message 1 deleted");
  // Kill this session's PostgreSQL connection (the one holding the lock).
  const killed = await env.pool.query(
    "SELECT pg_terminate_backend(pid) AS ok FROM pg_locks WHERE locktype = 'advisory' AND classid = 4207110 AND objid = $1",
    [account.id],
  );
  assert.equal(killed.rowCount, 1);
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.match(await client.command("RSET"), /^\+OK/);
  assert.equal(await client.command("RETR 1"), "-ERR [SYS/TEMP] could not read the message; try again later");
  assert.equal(await client.command("DELE 1"), "+OK message 1 deleted");
  assert.equal(await client.command("QUIT"), "-ERR [SYS/TEMP] deleted messages not removed; try again later");
  await waitFor(() => client.closed, 2_000);
  const again = (await PopClient.connect(server.port)).client;
  assert.match(await again.login(account), /^\+OK maildrop has 1 messages/, "nothing deleted, lock released");
  await again.command("QUIT");
});

test("a client that stops reading in the middle of a RETR is logged out after the autologout time: no UPDATE, lock released", async () => {
  const quick = await startTestServer(env, { POP3_AUTOLOGOUT: 400 });
  let stalled: PopClient | undefined;
  try {
    const account = await plain("stalled@example.test");
    await fileMessage(env.pool, account.id, BIG_MESSAGE);
    await fileMessage(env.pool, account.id, "Subject: small\r\n\r\nbody\r\n");
    const { client } = await PopClient.connect(quick.port);
    stalled = client;
    assert.match(await client.login(account), /^\+OK maildrop has 2 messages/);
    assert.equal(await client.command("DELE 2"), "+OK message 2 deleted");
    client.socket.pause(); // reads nothing more
    client.send("RETR 1");
    const again = await loginWhenReleased(quick.port, account);
    assert.match(again.reply, /^\+OK maildrop has 2 messages/, "lock released and nothing deleted");
    await again.attempt.command("QUIT");
  } finally {
    stalled?.close();
    await quick.stop();
  }
});

test("autologout counts commands, not bytes: a client trickling a line byte by byte is logged out", async () => {
  const quick = await startTestServer(env, { POP3_AUTOLOGOUT: 400 });
  try {
    const { client } = await PopClient.connect(quick.port);
    const started = Date.now();
    for (let i = 0; i < 40 && !client.closed; i++) {
      client.send(Buffer.from("N"));
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.ok(client.closed, "still connected after 4 s of a line that never ends");
    assert.ok(Date.now() - started < 2_000, `closed after ${Date.now() - started} ms`);
  } finally {
    await quick.stop();
  }
});

test("TOP accepts any non-negative line count, however many digits", async () => {
  const account = await plain("topdigits@example.test");
  await fileMessage(env.pool, account.id, "Subject: t\r\n\r\none\r\ntwo\r\n");
  const { client } = await PopClient.connect(server.port);
  await client.login(account);
  client.send("TOP 1 4294967296");
  const top = await client.multiline();
  assert.equal(top.status, "+OK top of message follows");
  assert.equal(top.body.toString(), "Subject: t\r\n\r\none\r\ntwo\r\n");
  client.send("TOP 1 000000000000000000001");
  assert.equal((await client.multiline()).body.toString(), "Subject: t\r\n\r\none\r\n");
  assert.match(await client.command("TOP 1 -1"), /^-ERR/);
  assert.equal(await client.command("QUIT"), "+OK bye (0 messages deleted)");
});

test("a deleted message is answered 'already deleted' by every command that names it", async () => {
  const account = await plain("already@example.test");
  await fileMessage(env.pool, account.id, "Subject: a\r\n\r\nb\r\n");
  const { client } = await PopClient.connect(server.port);
  await client.login(account);
  assert.equal(await client.command("DELE 1"), "+OK message 1 deleted");
  for (const command of ["DELE 1", "RETR 1", "LIST 1", "UIDL 1", "TOP 1 0"]) {
    assert.equal(await client.command(command), "-ERR message 1 already deleted", command);
  }
  assert.equal(await client.command("RETR 2"), "-ERR no such message");
  assert.equal(await client.command("RSET"), `+OK maildrop has 1 messages (${Buffer.byteLength("Subject: a\r\n\r\nb\r\n")} octets)`);
  assert.equal(await client.command("QUIT"), "+OK bye (0 messages deleted)");
});

test("a failed login takes as long for an unknown or disabled account as for a wrong password (no timing oracle)", async () => {
  const timed = await startTestServer(env, { POP3_MAX_FAILURES_PER_IP: 1000, POP3_MAX_FAILURES_PER_ACCOUNT: 1000 });
  try {
    const known = await plain("timing@example.test");
    const disabled = await plain("timing-off@example.test");
    await env.pool.query("UPDATE accounts SET disabled = true WHERE id = $1", [disabled.id]);
    const { client } = await PopClient.connect(timed.port);
    const failure = async (name: string, password: string) => {
      await client.command(`USER ${name}`);
      const started = performance.now();
      assert.match(await client.command(`PASS ${password}`), /^-ERR \[AUTH\] invalid user name or password/);
      return performance.now() - started;
    };
    await assertNoLoginTimingOracle({
      known: () => failure(known.address, "wrong"),
      unknown: (i) => failure(`nobody${i}@example.test`, "wrong"),
      disabled: () => failure(disabled.address, disabled.password),
    });
    client.close();
  } finally {
    await timed.stop();
    await env.pool.query("DELETE FROM auth_failures");
  }
});

test("bare AUTH lists PLAIN only where CAPA offers SASL PLAIN (not before TLS when plaintext is refused)", async () => {
  const strict = await startTestServer(env, { POP3_ALLOW_PLAINTEXT: "never" });
  try {
    const { client } = await PopClient.connect(strict.port);
    client.send("AUTH");
    const before = await client.multiline();
    assert.equal(before.status, "+OK supported mechanisms");
    assert.equal(before.body.toString(), "", "nothing a client could use here");
    assert.equal(await client.command("STLS"), "+OK begin TLS negotiation");
    await client.upgrade(strict.tls.cert);
    client.send("AUTH");
    assert.equal((await client.multiline()).body.toString(), "PLAIN\r\n");
    assert.equal(await client.command("QUIT"), "+OK bye");
  } finally {
    await strict.stop();
  }
});

test("a client that half-closes after pipelining its commands gets every reply and its QUIT is carried out (110, STLS, 995); without QUIT nothing is deleted", async () => {
  const body = (n: number) => `Subject: ${n}\r\n\r\nbody ${n}\r\n`;
  const size = Buffer.byteLength(body(1));
  const deletedFlags = async (accountId: number) =>
    (await env.pool.query("SELECT deleted FROM mailbox_entries WHERE account_id = $1 ORDER BY uid", [accountId])).rows.map((r) => r.deleted as boolean);
  // Writes the commands and half-closes (FIN) in one go, like `printf ... | nc -N`; returns every line until the server closes.
  const pipelineAndEnd = async (client: PopClient, commands: string[]) => {
    client.socket.end(commands.map((c) => `${c}\r\n`).join(""));
    const lines: string[] = [];
    for (;;) {
      try {
        lines.push(await client.line(5_000));
      } catch (error) {
        if (client.closed) return lines;
        throw error;
      }
    }
  };
  const kinds = [
    { name: "110", connect: async () => (await PopClient.connect(server.port)).client },
    {
      name: "STLS",
      connect: async () => {
        const { client } = await PopClient.connect(server.port);
        assert.equal(await client.command("STLS"), "+OK begin TLS negotiation");
        await client.upgrade(server.tls.cert);
        return client;
      },
    },
    { name: "995", connect: async () => (await PopClient.connect(server.tlsPort, { tls: true, ca: server.tls.cert })).client },
  ];
  for (const kind of kinds) {
    const account = await plain(`halfclose-${kind.name.toLowerCase()}@example.test`);
    for (let i = 1; i <= 2; i++) await fileMessage(env.pool, account.id, body(i));
    const login = [`USER ${account.address}`, `PASS ${account.password}`];

    // Without QUIT: every command answered, then the server closes; no UPDATE, the lock released.
    const noQuit = await pipelineAndEnd(await kind.connect(), [...login, "STAT", "DELE 1"]);
    assert.deepEqual(noQuit, ["+OK send PASS", `+OK maildrop has 2 messages (${2 * size} octets)`, `+OK 2 ${2 * size}`, "+OK message 1 deleted"], kind.name);
    assert.deepEqual(await deletedFlags(account.id), [false, false], `${kind.name}: a half-close without QUIT deletes nothing`);

    const withQuit = await pipelineAndEnd(await kind.connect(), [...login, "DELE 1", "QUIT"]);
    assert.deepEqual(withQuit, ["+OK send PASS", `+OK maildrop has 2 messages (${2 * size} octets)`, "+OK message 1 deleted", "+OK bye (1 messages deleted)"], kind.name);
    assert.deepEqual(await deletedFlags(account.id), [true, false], `${kind.name}: the QUIT before the half-close was carried out`);
  }

  // STLS and then a half-close: no handshake can follow, so the connection closes at once (not after the handshake timeout).
  const { client } = await PopClient.connect(server.port);
  const started = Date.now();
  assert.deepEqual(await pipelineAndEnd(client, ["STLS"]), ["+OK begin TLS negotiation"]);
  assert.ok(Date.now() - started < 2_000, `closed after ${Date.now() - started} ms`);
});

test("a half-closed client that does not read its RETR is still dropped after the autologout time, without UPDATE", async () => {
  const quick = await startTestServer(env, { POP3_AUTOLOGOUT: 400 });
  let stalled: PopClient | undefined;
  try {
    const account = await plain("halfclose-stalled@example.test");
    await fileMessage(env.pool, account.id, BIG_MESSAGE);
    const { client } = await PopClient.connect(quick.port);
    stalled = client;
    client.socket.pause();
    client.socket.end(`USER ${account.address}\r\nPASS ${account.password}\r\nDELE 1\r\nRSET\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n`);
    const again = await loginWhenReleased(quick.port, account);
    assert.match(again.reply, /^\+OK maildrop has 1 messages/, "lock released and nothing deleted");
    await again.attempt.command("QUIT");
  } finally {
    stalled?.close();
    await quick.stop();
  }
});

test("an account removed and added again within one second gets UIDLs its predecessor never had (RFC 1939 section 7)", async () => {
  await addDomain(env.pool, "reborn.test");
  const address = "reborn@reborn.test";
  const apopSecret = "reborn-apop-secret";
  const uidls: string[] = [];
  // From the start of a second, so that the three incarnations share it (as uid_validity in seconds did).
  do await new Promise((resolve) => setTimeout(resolve, 1000 - (Date.now() % 1000) + 5));
  while (Date.now() % 1000 > 100);
  const started = Date.now();
  for (let i = 0; i < 3; i++) {
    const account = await addAccount(env.pool, { address, password: "reborn-pw", apopSecret });
    await fileMessage(env.pool, account.id, `Subject: incarnation ${i}\r\n\r\nbody ${i}\r\n`);
    // APOP: no scrypt run, so the three fit in one second.
    const { client, greeting } = await PopClient.connect(server.port);
    const digest = createHash("md5").update(greeting.slice(greeting.indexOf("<")) + apopSecret).digest("hex");
    assert.match(await client.command(`APOP ${address} ${digest}`), /^\+OK maildrop has 1 messages/);
    const uidl = await client.command("UIDL 1");
    assert.match(uidl, /^\+OK 1 [\x21-\x7e]{1,70}$/);
    uidls.push(uidl.slice("+OK 1 ".length));
    assert.equal(await client.command("QUIT"), "+OK bye (0 messages deleted)");
    await removeAccount(env.pool, address);
  }
  const elapsed = Date.now() - started;
  assert.equal(new Set(uidls).size, 3, `UIDLs ${uidls.join(", ")} (three incarnations in ${elapsed} ms)`);
  // uid_validity: ascending, and within IMAP's 32 bits.
  const validities = uidls.map((uidl) => Number(uidl.split(".")[0]));
  assert.ok(validities[0]! < validities[1]! && validities[1]! < validities[2]! && validities[2]! <= 0xffffffff, validities.join(", "));

  // The MDA's upsert into an existing folder (every delivery) draws no uid_validity: the 32-bit range lasts.
  const account = await addAccount(env.pool, { address, password: "reborn-pw" });
  const drawn = async () => (await env.pool.query("SELECT last_value FROM folder_uid_validity")).rows[0].last_value as number;
  const before = await drawn();
  for (let i = 0; i < 5; i++) {
    await env.pool.query(
      `INSERT INTO folders (account_id, name, uid_next) VALUES ($1, 'INBOX', 2)
       ON CONFLICT (account_id, name) DO UPDATE SET uid_next = folders.uid_next + 1`,
      [account.id],
    );
  }
  assert.equal(await drawn(), before);
});

test("995: a client that leaves before its TLS handshake, or never starts one, holds nothing: stop() is prompt", async () => {
  const { connect } = await import("node:net");
  const opened = async (port: number) => {
    const socket = connect(port, "127.0.0.1");
    await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    return socket;
  };
  // A TCP probe: connects and leaves at once. Its server side must go with it, not at the handshake timeout.
  const probed = await startTestServer(env);
  (await opened(probed.tlsPort)).destroy();
  await new Promise((resolve) => setTimeout(resolve, 200));
  let started = performance.now();
  await probed.stop();
  assert.ok(performance.now() - started < 3_000, `stop() took ${(performance.now() - started).toFixed(0)} ms after a probe`);

  // A client that connects and never says a word: stop() ends its handshake instead of waiting for it.
  const waiting = await startTestServer(env);
  const silent = await opened(waiting.tlsPort);
  started = performance.now();
  await waiting.stop();
  assert.ok(performance.now() - started < 3_000, `stop() took ${(performance.now() - started).toFixed(0)} ms with a silent client`);
  silent.destroy();
});

test("SIGTERM-style stop() with a client that stopped reading mid-RETR ends within the grace, without UPDATE", async () => {
  const stopping = await startTestServer(env);
  const account = await plain("stopping@example.test");
  await fileMessage(env.pool, account.id, BIG_MESSAGE);
  await fileMessage(env.pool, account.id, "Subject: small\r\n\r\nbody\r\n");
  const { client } = await PopClient.connect(stopping.port);
  try {
    assert.match(await client.login(account), /^\+OK maildrop has 2 messages/);
    assert.equal(await client.command("DELE 2"), "+OK message 2 deleted");
    client.socket.pause(); // reads nothing more
    client.send("RETR 1");
    await new Promise((resolve) => setTimeout(resolve, 300));
    const started = performance.now();
    await stopping.stop();
    const took = performance.now() - started;
    assert.ok(took < 8_000, `stop() took ${took.toFixed(0)} ms (the autologout is 10 minutes)`);
  } finally {
    client.close();
  }
  const left = await env.pool.query("SELECT count(*)::int AS n FROM mailbox_entries WHERE account_id = $1 AND NOT deleted", [account.id]);
  assert.equal(left.rows[0].n, 2, "DELE without QUIT deletes nothing");
});
