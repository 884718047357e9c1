// RFC conformance of the SMTP server as a peer sees it: ESMTP parameters (RFC 5321, 3461,
// 4954), postmaster (RFC 5321 4.5.1), trace fields on a message without a header section,
// AUTH inside a transaction (RFC 4954 4). Everything over real sockets.
import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import { after, before, describe, test } from "node:test";
import { SMTPServer } from "smtp-server";
import { addAccount } from "@mailstack/db";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload, sampleMessage } from "../src/testing.ts";
import type { IntakeServer } from "../src/index.ts";
import { openSession, seedDirectory, startIntake } from "./fixtures.ts";

let env: TestEnv;
let intake: IntakeServer;
const extra: IntakeServer[] = [];

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  intake = await startIntake(env.pool, env.bus);
});

after(async () => {
  for (const server of [intake, ...extra]) await server.stop(100);
  await env.close();
});

const open = (port = intake.port()): Promise<RawSmtp> => openSession(port);

async function lastStored(): Promise<{ raw: string; dsn_envid: string | null; dsn_ret: string | null; orcpt: string | null; targets: string[] }> {
  const message = await env.pool.query<{ id: number; raw: Buffer; dsn_envid: string | null; dsn_ret: string | null }>(
    "SELECT id, raw, dsn_envid, dsn_ret FROM messages ORDER BY id DESC LIMIT 1",
  );
  const row = message.rows[0]!;
  const deliveries = await env.pool.query<{ final_recipient: string; kind: string; dsn_orcpt: string | null }>(
    "SELECT final_recipient, kind, dsn_orcpt FROM deliveries WHERE message_id = $1 ORDER BY id",
    [row.id],
  );
  return {
    raw: row.raw.toString("latin1"),
    dsn_envid: row.dsn_envid,
    dsn_ret: row.dsn_ret,
    orcpt: deliveries.rows[0]?.dsn_orcpt ?? null,
    targets: deliveries.rows.map((d) => `${d.kind}:${d.final_recipient}`),
  };
}

describe("ESMTP parameters", () => {
  test("a MAIL or RCPT parameter we do not implement is 555 5.5.4; AUTH= is one on a port without AUTH", async () => {
    const client = await open();
    for (const mail of ["MAIL FROM:<a@remote.example> FOO=BAR", "MAIL FROM:<a@remote.example> MT-PRIORITY=3", "MAIL FROM:<a@remote.example> AUTH=<>"]) {
      assert.match((await client.command(mail)).text, /^555 5\.5\.4 /, mail);
    }
    assert.equal((await client.command("MAIL FROM:<a@remote.example> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x")).code, 250);
    assert.match((await client.command("RCPT TO:<user1@example.test> XYZ")).text, /^555 5\.5\.4 /);
    assert.equal((await client.command("RCPT TO:<user1@example.test> NOTIFY=FAILURE ORCPT=rfc822;user1@example.test")).code, 250);
    client.close();
  });

  test("an unsupported parameter with control or 8-bit characters is not echoed as sent: replies stay printable US-ASCII (RFC 5321 4.2)", async () => {
    const client = await open();
    client.write(Buffer.from("MAIL FROM:<a@remote.example> X\u0000Y=1\r\n", "latin1"));
    assert.equal((await client.reply()).text, "555 5.5.4 Unsupported parameter X?Y");
    client.write(Buffer.from("MAIL FROM:<a@remote.example> FÖÖ\r\n", "utf8"));
    assert.equal((await client.reply()).text, "555 5.5.4 Unsupported parameter F????");
    assert.equal((await client.command("NOOP")).code, 250);
    client.close();
  });

  test("ENVID, ORCPT: malformed xtext, non-printable values and over-long values are 501 5.5.4", async () => {
    const client = await open();
    const badEnvids = ["a=b", "a+0", "a+2b", "a+0D+0Ab", "x".repeat(101)];
    for (const envid of badEnvids) {
      assert.match((await client.command(`MAIL FROM:<a@remote.example> ENVID=${envid}`)).text, /^501 5\.5\.4 /, envid);
    }
    assert.equal((await client.command(`MAIL FROM:<a@remote.example> ENVID=${"x".repeat(100)}`)).code, 250);
    const badOrcpts = ["rfc822;a+zz", "rfc822;a=b", "rfc822;a+7F", `rfc822;${"a".repeat(500)}`, ";a@b.example"];
    for (const orcpt of badOrcpts) {
      assert.match((await client.command(`RCPT TO:<user1@example.test> ORCPT=${orcpt}`)).text, /^501 5\.5\.4 /, orcpt);
    }
    client.close();
  });

  test("ENVID and ORCPT in xtext are stored decoded", async () => {
    const client = await open();
    assert.equal((await client.command("MAIL FROM:<a@remote.example> RET=HDRS ENVID=id+2B1")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test> ORCPT=rfc822;User1+2Bx@example.test")).code, 250);
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage({ subject: "xtext" })));
    assert.equal((await client.reply()).code, 250);
    const stored = await lastStored();
    assert.equal(stored.dsn_envid, "id+1");
    assert.equal(stored.dsn_ret, "HDRS");
    assert.equal(stored.orcpt, "rfc822;User1+x@example.test");
    client.close();
  });

  test("a refused MAIL leaves no SMTPUTF8, RET or ENVID behind for the next transaction", async () => {
    const client = await open();
    const refused = await client.command(`MAIL FROM:<${"a".repeat(65)}@remote.example> SMTPUTF8 RET=HDRS ENVID=leaked`);
    assert.match(refused.text, /^501 5\.1\.7 /, "a local part over 64 octets (RFC 5321 4.5.3.1.10: 501 Path too long)");
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    assert.equal((await client.command("DATA")).code, 354);
    const eightBitHeader = Buffer.concat([Buffer.from("Subject: "), Buffer.from("héllo", "utf8"), Buffer.from("\r\n\r\nbody\r\n.\r\n")]);
    client.write(eightBitHeader);
    assert.match((await client.reply()).text, /^550 5\.6\.7 /, "SMTPUTF8 was not given with this MAIL");
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage({ subject: "no leftovers" })));
    assert.equal((await client.reply()).code, 250);
    const stored = await lastStored();
    assert.equal(stored.dsn_ret, null);
    assert.equal(stored.dsn_envid, null);
    client.close();
  });

  test("with SMTPUTF8 an address that is not UTF-8 is a syntax error", async () => {
    const client = await open();
    const reply = await client.command("MAIL FROM:<\xfc@remote.example> SMTPUTF8");
    assert.match(reply.text, /^553 5\.1\.7 /);
    client.close();
  });
});

describe("postmaster (RFC 5321 4.5.1)", () => {
  test("<postmaster> in any case, and postmaster at a served domain without such an address, go to the configured postmaster", async () => {
    const server = await startIntake(env.pool, env.bus, { postmaster: "user2@example.test" });
    extra.push(server);
    for (const rcpt of ["<postmaster>", "<PostMaster>", "<POSTMASTER@Example.TEST>"]) {
      const client = await open(server.port());
      assert.equal((await client.command("MAIL FROM:<>")).code, 250);
      const accepted = await client.command(`RCPT TO:${rcpt}`);
      assert.equal(accepted.code, 250, `${rcpt}: ${accepted.text}`);
      assert.equal((await client.command("DATA")).code, 354);
      client.write(dataPayload(sampleMessage({ subject: `to ${rcpt}` })));
      assert.equal((await client.reply()).code, 250);
      assert.deepEqual((await lastStored()).targets, ["local:user2@example.test"], rcpt);
      client.close();
    }
  });

  test("without a postmaster setting, <postmaster> is postmaster@hostname: never relayed elsewhere, 550 when not served here", async () => {
    const client = await open();
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.match((await client.command("RCPT TO:<postmaster>")).text, /^550 5\.1\.1 /, "the host name mx.example.test is not served");
    client.close();
    // A server that relays for its session (the msa) must still not send it to another host.
    const relaying = await startIntake(env.pool, env.bus, { allowRemote: true });
    extra.push(relaying);
    const submitter = await open(relaying.port());
    assert.equal((await submitter.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.match((await submitter.command("RCPT TO:<postmaster>")).text, /^550 5\.1\.1 /);
    assert.equal((await submitter.command("RCPT TO:<someone@remote.example>")).code, 250, "other remote recipients still are");
    submitter.close();
  });
});

describe("trace fields", () => {
  for (const [name, body] of [
    ["a body line", "just a body line\r\nsecond line\r\n"],
    ["a line starting with a space", " leading space\r\n"],
    ["an mbox From_ line", "From someone@remote.example Fri Nov 27 09:00:00 2026\r\nhello\r\n"],
  ] as const) {
    test(`a message starting with ${name} gets an empty header section under our Received:`, async () => {
      const client = await open();
      assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
      assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
      assert.equal((await client.command("DATA")).code, 354);
      client.write(dataPayload(body));
      assert.equal((await client.reply()).code, 250);
      const { raw } = await lastStored();
      assert.match(raw, /^Received: [^]*?\r\n\t[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000\r\n\r\n/);
      assert.ok(raw.endsWith(`\r\n\r\n${body}`), JSON.stringify(raw));
      client.close();
    });
  }

  test("a message with a header section, or an empty one, is stored as sent under our Received:", async () => {
    for (const message of ["Subject: folded\r\n  continued\r\n\tmore\r\nX-A:  b \r\n\r\nbody\r\n", "\r\nbody after an empty header section\r\n"]) {
      const client = await open();
      assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
      assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
      assert.equal((await client.command("DATA")).code, 354);
      client.write(dataPayload(message));
      assert.equal((await client.reply()).code, 250);
      const { raw } = await lastStored();
      assert.ok(raw.endsWith(`+0000\r\n${message}`), JSON.stringify(raw));
      client.close();
    }
  });
});

describe("AUTH (RFC 4954)", () => {
  test("AUTH inside a mail transaction is 503 5.5.1", async () => {
    const server = await startIntake(env.pool, env.bus, {
      auth: { required: false, allowInsecure: true, authenticate: async ({ username }) => username },
    });
    extra.push(server);
    const client = await open(server.port());
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    const plain = Buffer.from("\0user1@example.test\0secret-1").toString("base64");
    assert.match((await client.command(`AUTH PLAIN ${plain}`)).text, /^503 5\.5\.1 /);
    assert.equal((await client.command("RSET")).code, 250);
    assert.equal((await client.command(`AUTH PLAIN ${plain}`)).code, 235, "allowed outside a transaction");
    client.close();
  });
});

describe("Received: with types (RFC 3848, RFC 6531)", () => {
  test("ESMTP, ESMTPS after STARTTLS, SMTP for HELO, ESMTPS (not SMTPS) for HELO after STARTTLS, UTF8SMTP(S) with SMTPUTF8", async () => {
    const cases: Array<[string, boolean, string, string?]> = [
      ["EHLO", false, "ESMTP"],
      ["EHLO", true, "ESMTPS"],
      ["HELO", false, "SMTP"],
      ["HELO", true, "ESMTPS"],
      ["EHLO", false, "UTF8SMTP", " SMTPUTF8"],
      ["EHLO", true, "UTF8SMTPS", " SMTPUTF8"],
    ];
    for (const [greeting, secure, expected, mailParameters = ""] of cases) {
      const client = await RawSmtp.connect(intake.port());
      await client.reply();
      if (secure) {
        await client.command("EHLO client.remote.example");
        assert.equal((await client.command("STARTTLS")).code, 220);
        await client.startTls();
      }
      assert.equal((await client.command(`${greeting} client.remote.example`)).code, 250);
      assert.equal((await client.command(`MAIL FROM:<sender@remote.example>${mailParameters}`)).code, 250);
      assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
      assert.equal((await client.command("DATA")).code, 354);
      client.write(dataPayload(sampleMessage({ subject: `${greeting} ${secure}${mailParameters}` })));
      assert.equal((await client.reply()).code, 250);
      const { raw } = await lastStored();
      assert.match(raw, new RegExp(`^Received: from client\\.remote\\.example \\(\\[127\\.0\\.0\\.1\\]\\)\\r\\n\\tby mx\\.example\\.test \\(mailstack\\) with ${expected} id `), `${greeting} secure=${secure}${mailParameters}`);
      client.close();
    }
  });
});

describe("Received: names the recipient and the AUTH identity as they are", () => {
  /** One transaction with UTF-8 commands (RawSmtp.command writes latin1); resolves with the stored message as UTF-8. */
  async function sendUtf8(client: RawSmtp, mail: string, rcpt: string): Promise<string> {
    for (const line of [mail, rcpt]) {
      client.write(Buffer.from(`${line}\r\n`, "utf8"));
      assert.equal((await client.reply()).code, 250, line);
    }
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage({ subject: mail })));
    assert.equal((await client.reply()).code, 250);
    const row = await env.pool.query<{ raw: Buffer }>("SELECT raw FROM messages ORDER BY id DESC LIMIT 1");
    return row.rows[0]!.raw.toString("utf8").split("\r\n\r\n")[0]!;
  }

  test("a UTF-8 mailbox (SMTPUTF8) and a quoted local part with a space keep every character in `for`; a UTF-8 login is UTF-8 or an encoded-word, a login with a space keeps it", async () => {
    await addAccount(env.pool, { address: "müller@example.test", password: "secret-ü" });
    await addAccount(env.pool, { address: '"John Doe"@example.test', password: "secret-jd" });
    const server = await startIntake(env.pool, env.bus, {
      service: "msa",
      source: "submission",
      auth: {
        required: true,
        allowInsecure: true,
        authenticate: async ({ username, password }) => ((username === "müller@example.test" && password === "secret-ü") || (username === '"John Doe"@example.test' && password === "secret-jd") ? username : null),
      },
    });
    extra.push(server);
    const client = await open(server.port());
    assert.equal((await client.command(`AUTH PLAIN ${Buffer.from("\0müller@example.test\0secret-ü").toString("base64")}`)).code, 235);

    const utf8 = await sendUtf8(client, "MAIL FROM:<müller@example.test> SMTPUTF8", "RCPT TO:<müller@example.test>");
    assert.match(utf8, /^Received: from client\.remote\.example \(\[127\.0\.0\.1\]\)\r\n\t\(Authenticated sender: müller@example\.test\)\r\n\tby .* with UTF8SMTPA id .*\r\n\tfor <müller@example\.test>;\r\n/);

    // Without SMTPUTF8 the header stays ASCII: the login becomes an RFC 2047 encoded-word.
    const quoted = await sendUtf8(client, "MAIL FROM:<user1@example.test>", 'RCPT TO:<"John Doe"@example.test>');
    assert.match(quoted, /\r\n\t\(Authenticated sender: =\?utf-8\?B\?bcO8bGxlckBleGFtcGxlLnRlc3Q=\?=\)\r\n\tby .* with ESMTPA id .*\r\n\tfor <"John Doe"@example\.test>;\r\n/);
    assert.doesNotMatch(quoted, /[^\x00-\x7f]/, "no 8-bit header in a message without SMTPUTF8");
    client.close();

    // A login with a space in its quoted local part keeps it in the comment.
    const spaced = await open(server.port());
    assert.equal((await spaced.command(`AUTH PLAIN ${Buffer.from('\0"John Doe"@example.test\0secret-jd').toString("base64")}`)).code, 235);
    const comment = await sendUtf8(spaced, "MAIL FROM:<user1@example.test>", "RCPT TO:<user1@example.test>");
    assert.match(comment, /\r\n\t\(Authenticated sender: "John Doe"@example\.test\)\r\n/);
    spaced.close();
  });
});

test("a HELO name with a quote or a semicolon cannot break our Received: (the date stays after the one ';')", async () => {
  const client = await RawSmtp.connect(intake.port());
  await client.reply();
  assert.equal((await client.command('EHLO we"ird;name')).code, 250);
  assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
  assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
  assert.equal((await client.command("DATA")).code, 354);
  client.write(dataPayload(sampleMessage({ subject: "odd helo" })));
  assert.equal((await client.reply()).code, 250);
  client.close();
  const received = /^Received: ([^]*?)\r\n(?![ \t])/.exec((await lastStored()).raw)![1]!;
  assert.match(received, /^from weirdname \(\[127\.0\.0\.1\]\)\r\n/);
  assert.equal(received.split(";").length, 2, received);
  assert.doesNotMatch(received, /"/);
});

test("DATA and RSET with an argument are 501 5.5.4 and change nothing (RFC 5321 4.1.1.4, 4.1.1.5)", async () => {
  const client = await open();
  assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
  assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
  assert.match((await client.command("RSET now")).text, /^501 5\.5\.4 /);
  assert.match((await client.command("DATA please")).text, /^501 5\.5\.4 /);
  // The transaction is still there: DATA without an argument goes on.
  assert.equal((await client.command("DATA")).code, 354);
  client.write(dataPayload(sampleMessage({ subject: "after 501s" })));
  assert.equal((await client.reply()).code, 250);
  assert.equal((await client.command("RSET")).code, 250);
  client.close();

  // With every RCPT refused, "DATA x" and the body pipelined behind it still end the session.
  const injector = await open();
  const body = "MAIL FROM:<evil@remote.example>\r\nRCPT TO:<user1@example.test>\r\nDATA\r\nSubject: injected-by-data-arg\r\n\r\nx\r\n.\r\n";
  injector.write(`MAIL FROM:<a@remote.example>\r\nRCPT TO:<nobody@elsewhere.example>\r\nDATA x\r\n${body}`);
  assert.equal((await injector.reply()).code, 250);
  assert.match((await injector.reply()).text, /^554 5\.7\.1 /);
  assert.match((await injector.reply()).text, /^554 5\.5\.1 /);
  await new Promise((resolve) => setTimeout(resolve, 300));
  const injected = await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE position('injected-by-data-arg' in convert_from(raw, 'LATIN1')) > 0");
  assert.equal(injected.rows[0].n, 0);
  injector.close();
});

// smtp-server's own 421 replies carried 4.4.2 ("bad connection") whatever the reason; a careful
// MTA (Postfix) says 4.3.2 for overload and shutdown, 4.7.0 for a client refused by policy or for
// too many errors, and keeps 4.4.2 for timeouts (patches/smtp-server@3.21.6.patch).
describe("421 replies carry the RFC 3463 code of their reason", () => {
  test("too many sessions overall: 421 4.3.2 instead of the greeting", async () => {
    const small = await startIntake(env.pool, env.bus, { limits: { maxClients: 1 } });
    extra.push(small);
    const first = await open(small.port());
    const second = await RawSmtp.connect(small.port());
    assert.match((await second.reply()).text, /^421 4\.3\.2 .*Too many connected clients/);
    await second.waitClosed();
    first.close();
  });

  test("a command while the server shuts down, and a session idle until the grace period ends: 421 4.3.2", async () => {
    const server = await startIntake(env.pool, env.bus);
    const busy = await open(server.port());
    const idle = await open(server.port());
    assert.equal((await busy.command("MAIL FROM:<a@remote.example>")).code, 250);
    const stopping = server.stop(400);
    assert.match((await busy.command("RCPT TO:<user1@example.test>")).text, /^421 4\.3\.2 Server shutting down/);
    await busy.waitClosed();
    assert.match((await idle.reply(5_000)).text, /^421 4\.3\.2 Server shutting down/);
    await idle.waitClosed();
    await stopping;
  });

  test("talking before the greeting: 421 4.5.1 (out of sequence)", async () => {
    const strict = await startIntake(env.pool, env.bus, { limits: { greetingDelayMs: 300 } });
    extra.push(strict);
    const client = await RawSmtp.connect(strict.port());
    client.write("EHLO early.example\r\n");
    assert.match((await client.reply()).text, /^421 4\.5\.1 .*You talk too soon/);
    await client.waitClosed();
  });

  test("an HTTP request: 421 4.7.0", async () => {
    const client = await open();
    assert.match((await client.command("POST / HTTP/1.1")).text, /^421 4\.7\.0 HTTP requests not allowed/);
    await client.waitClosed();
  });

  test("ten unrecognized commands: 500 5.5.2 each, then 421 4.7.0", async () => {
    const client = await open();
    for (let i = 1; i < 10; i++) assert.match((await client.command(`BOGUS${i}`)).text, /^500 5\.5\.2 /);
    assert.match((await client.command("BOGUS10")).text, /^421 4\.7\.0 Error: too many unrecognized commands/);
    await client.waitClosed();
  });

  test("a command line over the limit: 421 4.5.2 (RFC 5321 4.2.2 counts it a syntax error)", async () => {
    const client = await open();
    assert.match((await client.command(`NOOP ${"x".repeat(2000)}`)).text, /^421 4\.5\.2 Error: Command line too long/);
    await client.waitClosed();
  });

  test("the idle timeout keeps 421 4.4.2", async () => {
    const idle = await startIntake(env.pool, env.bus, { limits: { idleTimeoutMs: 300 } });
    extra.push(idle);
    const client = await open(idle.port());
    assert.match((await client.reply(5_000)).text, /^421 4\.4\.2 Timeout/);
    await client.waitClosed();
  });

  test("a command trickled a byte at a time is cut off at the idle timeout (slowloris), a slow hook is not", async () => {
    const slow = await startIntake(env.pool, env.bus, {
      limits: { idleTimeoutMs: 600 },
      validateSender: () => new Promise((resolve) => setTimeout(resolve, 1_500)),
    });
    extra.push(slow);
    const client = await open(slow.port());
    // Each byte comes well within the idle timeout, the line never ends.
    const started = Date.now();
    const trickle = setInterval(() => client.write("N"), 100);
    try {
      assert.match((await client.reply(5_000)).text, /^421 4\.4\.2 Command took too long/);
      assert.ok(Date.now() - started < 3_000, `cut off after ${Date.now() - started} ms`);
    } finally {
      clearInterval(trickle);
    }
    await client.waitClosed();
    // Waiting for our own answer (a hook taking longer than the idle timeout) is not the client's slowness.
    const patient = await open(slow.port());
    assert.equal((await patient.command("MAIL FROM:<someone@remote.example>")).code, 250);
    assert.equal((await patient.command("RCPT TO:<user1@example.test>")).code, 250);
    patient.close();
  });

  test("smtp-server's own bound on commands before AUTH (ours replaces it in smtp-intake) says 421 4.7.0", async () => {
    const plain = new SMTPServer({ authOptional: false, maxAllowedUnauthenticatedCommands: 2, hideENHANCEDSTATUSCODES: false, allowInsecureAuth: true, logger: false, ...({ greetingDelay: 0 } as object) });
    await new Promise<void>((resolve) => plain.listen(0, "127.0.0.1", resolve));
    try {
      const client = await RawSmtp.connect((plain.server.address() as AddressInfo).port);
      assert.equal((await client.reply()).code, 220);
      assert.equal((await client.command("EHLO client.example")).code, 250);
      assert.match((await client.command("NOOP")).text, /^421 4\.7\.0 Error: too many unauthenticated commands/);
      await client.waitClosed();
    } finally {
      await new Promise<void>((resolve) => plain.close(() => resolve()));
    }
  });
});

// RFC 5321 4.5.3.1.8 bounds the recipients buffered, and a repeated RCPT may be accepted; a
// mailbox of ours named again in another case or quoting is the same recipient, so it is accepted
// and counted once (SMTP_MAX_RECIPIENTS, Received's `for`), while a remote A@r and a@r are two.
describe("a recipient named twice in one transaction", () => {
  test("a mailbox of ours in another case or quoting: one delivery, counted once, and Received keeps its `for`", async () => {
    const small = await startIntake(env.pool, env.bus, { limits: { maxRecipients: 2 } });
    extra.push(small);
    const client = await open(small.port());
    assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
    for (const rcpt of ["USER1@example.test", "user1@example.test", '"user1"@Example.TEST', "user2@example.test"]) {
      assert.equal((await client.command(`RCPT TO:<${rcpt}>`)).code, 250, rcpt);
    }
    assert.match((await client.command("RCPT TO:<team@example.test>")).text, /^452 4\.5\.3 /, "the third distinct recipient");
    assert.equal((await client.command("RSET")).code, 250);

    assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
    for (const rcpt of ["USER1@example.test", "user1@example.test"]) assert.equal((await client.command(`RCPT TO:<${rcpt}>`)).code, 250, rcpt);
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage({ subject: "named twice" })));
    assert.equal((await client.reply()).code, 250);
    const stored = await lastStored();
    assert.deepEqual(stored.targets, ["local:user1@example.test"]);
    assert.match(stored.raw, /^Received: [^;]*\r\n\tfor <USER1@example\.test>;/, "the address as first given");

    // An alias and the mailbox it leads to are two RCPTs but one final recipient: `for` stays.
    assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
    for (const rcpt of ["first@example.test", "user1@example.test"]) assert.equal((await client.command(`RCPT TO:<${rcpt}>`)).code, 250, rcpt);
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage({ subject: "alias and mailbox" })));
    assert.equal((await client.reply()).code, 250);
    const merged = await lastStored();
    assert.deepEqual(merged.targets, ["local:user1@example.test"]);
    assert.match(merged.raw, /^Received: [^;]*\r\n\tfor <first@example\.test>;/);
    client.close();
  });

  test("remote addresses differing in case are two recipients, and both count toward SMTP_MAX_RECIPIENTS", async () => {
    const relay = await startIntake(env.pool, env.bus, { allowRemote: true, limits: { maxRecipients: 2 } });
    extra.push(relay);
    const client = await open(relay.port());
    assert.equal((await client.command("MAIL FROM:<a@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<Bob@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<bob@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<Bob@remote.example>")).code, 250, "the same one again");
    assert.match((await client.command("RCPT TO:<BOB@remote.example>")).text, /^452 4\.5\.3 /);
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage({ subject: "remote case" })));
    assert.equal((await client.reply()).code, 250);
    const stored = await lastStored();
    assert.deepEqual(stored.targets, ["remote:Bob@remote.example", "remote:bob@remote.example"]);
    assert.doesNotMatch(stored.raw.split("\r\n\r\n")[0]!, /\tfor </, "two recipients: no `for`");
    client.close();
  });
});
