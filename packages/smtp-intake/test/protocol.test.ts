import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload, sampleMessage } from "../src/testing.ts";
import type { IntakeServer } from "../src/index.ts";
import { messageCount, openSession, seedDirectory, startIntake } from "./fixtures.ts";

let env: TestEnv;
let intake: IntakeServer;
const extra: IntakeServer[] = [];

before(async () => {
  env = await createTestEnv();
  await seedDirectory(env.pool);
  intake = await startIntake(env.pool, env.bus, { limits: { maxRecipients: 3, maxCommands: 40, maxClientsPerIp: 50 } });
});

after(async () => {
  for (const server of [intake, ...extra]) await server.stop(100);
  await env.close();
});

const open = (port = intake.port()): Promise<RawSmtp> => openSession(port);

describe("session basics", () => {
  test("EHLO advertises the extensions of the issue and no AUTH on port 25", async () => {
    const client = await RawSmtp.connect(intake.port());
    const greeting = await client.reply();
    assert.match(greeting.text, /^220 mx\.example\.test ESMTP/);
    const ehlo = await client.command("EHLO client.remote.example");
    const keywords = ehlo.lines.slice(1).map((l) => l.split(" ")[0]);
    for (const ext of ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS", "DSN"]) {
      assert.ok(keywords.includes(ext), `EHLO should advertise ${ext}: ${ehlo.text}`);
    }
    assert.ok(ehlo.lines.includes(`SIZE ${50 * 1024 * 1024}`), ehlo.text);
    assert.ok(!keywords.includes("AUTH"), "no AUTH on the inbound port");
    assert.equal((await client.command("HELO client.remote.example")).code, 250);
    client.close();
  });

  test("VRFY 252, EXPN 502, HELP and NOOP work, obsolete commands 502 5.5.1", async () => {
    const client = await open();
    const vrfy = await client.command("VRFY user1");
    // 2.0.0: X.5.2 is "syntax error" (RFC 3463), no status for a success.
    assert.match(vrfy.text, /^252 2\.0\.0 /);
    assert.match((await client.command("VRFY")).text, /^501 5\.5\.4 /);
    assert.match((await client.command("EXPN team")).text, /^502 5\.5\.1 /);
    assert.equal((await client.command("HELP")).code, 214);
    assert.match((await client.command("NOOP")).text, /^250 /);
    for (const verb of ["TURN", "SEND FROM:<a@b.example>", "SOML FROM:<a@b.example>", "SAML FROM:<a@b.example>"]) {
      assert.match((await client.command(verb)).text, /^502 5\.5\.1 /, verb);
    }
    client.close();
  });

  test("AUTH is not available on the inbound port", async () => {
    const client = await open();
    const auth = await client.command("AUTH PLAIN AHVzZXIxQGV4YW1wbGUudGVzdABzZWNyZXQtMQ==");
    assert.equal(auth.code, 500);
    client.close();
  });
});

describe("relay protection", () => {
  const refused = [
    "user%remote.example@example.test",
    "remote.example!user@example.test",
    "@example.test:user@remote.example",
    '"user@remote.example"@example.test',
    "user1@[127.0.0.1]",
    "user@remote.example",
    "user@sub.example.test",
  ];
  for (const address of refused) {
    test(`RCPT TO:<${address}> is relay denied 554 5.7.1`, async () => {
      const client = await open();
      assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
      const rcpt = await client.command(`RCPT TO:<${address}>`);
      assert.match(rcpt.text, /^554 5\.7\.1 /, `${address}: ${rcpt.text}`);
      client.close();
    });
  }

  test("an unknown local user is 550 5.1.1 at RCPT time; an alias loop is refused", async () => {
    const client = await open();
    await client.command("MAIL FROM:<sender@remote.example>");
    assert.match((await client.command("RCPT TO:<nobody@example.test>")).text, /^550 5\.1\.1 /);
    assert.match((await client.command("RCPT TO:<loop1@example.test>")).text, /^550 5\.4\.6 /);
    assert.match((await client.command("RCPT TO:<User1@Example.TEST>")).text, /^250 /);
    client.close();
  });
});

describe("internationalised addresses", () => {
  test("a UTF-8 address needs SMTPUTF8 (553 5.6.7); with it, it is routed like any other", async () => {
    const client = await open();
    const local = Buffer.from("jürgen@example.test", "utf8").toString("latin1");
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.match((await client.command(`RCPT TO:<${local}>`)).text, /^553 5\.6\.7 /);
    assert.equal((await client.command("RSET")).code, 250);
    assert.equal((await client.command("MAIL FROM:<sender@remote.example> SMTPUTF8")).code, 250);
    assert.match((await client.command(`RCPT TO:<${local}>`)).text, /^550 5\.1\.1 /, "parsed, then unknown here");
    client.close();
  });
});

describe("bounds", () => {
  test("the fourth recipient of a message is 452 4.5.3 with a limit of 3", async () => {
    const client = await open();
    await client.command("MAIL FROM:<sender@remote.example>");
    for (const r of ["user1", "user2", "team"]) assert.equal((await client.command(`RCPT TO:<${r}@example.test>`)).code, 250);
    assert.match((await client.command("RCPT TO:<first@example.test>")).text, /^452 4\.5\.3 /);
    client.close();
  });

  test("a command line over 1000 octets is refused and the session ends", async () => {
    const client = await open();
    const reply = await client.command(`NOOP ${"x".repeat(1100)}`);
    assert.equal(reply.code, 421);
    await client.waitClosed();
  });

  test("the session's command budget ends with 421 4.7.0", async () => {
    const client = await open();
    let last = await client.command("NOOP");
    for (let i = 0; i < 60 && last.code === 250; i++) last = await client.command("NOOP");
    assert.match(last.text, /^421 4\.7\.0 /);
    await client.waitClosed();
  });

  test("concurrent sessions per client IP are bounded with 421 4.7.0", async () => {
    const small = await startIntake(env.pool, env.bus, { limits: { maxClientsPerIp: 2 } });
    extra.push(small);
    const a = await open(small.port());
    const b = await open(small.port());
    const c = await RawSmtp.connect(small.port());
    assert.match((await c.reply()).text, /^421 4\.7\.0 /);
    await c.waitClosed();
    a.close();
    await new Promise((resolve) => setTimeout(resolve, 100));
    const d = await RawSmtp.connect(small.port());
    assert.equal((await d.reply()).code, 220, "a slot frees when a session ends");
    b.close();
    d.close();
  });

  test("an idle session is closed with 421 after the idle timeout", async () => {
    const idle = await startIntake(env.pool, env.bus, { limits: { idleTimeoutMs: 400 } });
    extra.push(idle);
    const client = await open(idle.port());
    const reply = await client.reply(5_000);
    assert.equal(reply.code, 421);
    await client.waitClosed();
  });

  test("the DATA phase has an absolute deadline even for a client that keeps trickling", async () => {
    const slow = await startIntake(env.pool, env.bus, { limits: { dataTimeoutMs: 800, idleTimeoutMs: 5_000 } });
    extra.push(slow);
    const before = await messageCount(env.pool);
    const client = await open(slow.port());
    await client.command("MAIL FROM:<sender@remote.example>");
    await client.command("RCPT TO:<user1@example.test>");
    assert.equal((await client.command("DATA")).code, 354);
    const started = Date.now();
    const trickle = setInterval(() => !client.closed && client.write("X-Slow: still here\r\n"), 150);
    try {
      const reply = await client.reply(5_000);
      assert.match(reply.text, /^421 4\.4\.2 /);
      assert.ok(Date.now() - started < 3_000);
    } finally {
      clearInterval(trickle);
    }
    await client.waitClosed();
    assert.equal(await messageCount(env.pool), before);
  });

  test("a client talking before the greeting gets 421 and no session", async () => {
    const strict = await startIntake(env.pool, env.bus, { limits: { greetingDelayMs: 300 } });
    extra.push(strict);
    const client = await RawSmtp.connect(strict.port());
    client.write("EHLO early.example\r\n");
    const reply = await client.reply();
    assert.equal(reply.code, 421);
    assert.match(reply.text, /too soon/i);
    await client.waitClosed();
  });

  test("an HTTP request on the port gets an error and the connection ends", async () => {
    const client = await RawSmtp.connect(intake.port());
    await client.reply();
    const reply = await client.command("GET / HTTP/1.1");
    assert.equal(reply.code, 421);
    await client.waitClosed();
  });
});

describe("pipelining and line endings", () => {
  test("a pipelined DATA after refused recipients is 554 5.5.1 and its body never runs", async () => {
    const before = await messageCount(env.pool);
    const client = await open();
    const smuggled = ["MAIL FROM:<evil@remote.example>", "RCPT TO:<user1@example.test>", "DATA", "Subject: injected", "", "evil", "."].join("\r\n");
    client.write(`MAIL FROM:<sender@remote.example>\r\nRCPT TO:<victim@remote.example>\r\nDATA\r\n${smuggled}\r\n`);
    assert.equal((await client.reply()).code, 250);
    assert.match((await client.reply()).text, /^554 5\.7\.1 /);
    assert.match((await client.reply()).text, /^554 5\.5\.1 /);
    await client.waitClosed();
    assert.equal(client.pending(), "", "no reply to any smuggled command");
    assert.equal(await messageCount(env.pool), before);
  });

  test("a command line ending in a bare LF is refused and changes nothing", async () => {
    const client = await open();
    client.write("MAIL FROM:<sender@remote.example>\n");
    assert.match((await client.reply()).text, /^500 5\.5\.2 /);
    const rcpt = await client.command("RCPT TO:<user1@example.test>");
    assert.equal(rcpt.code, 503, "MAIL FROM ended by a bare LF must not have started a transaction");
    client.close();
  });

  test("DATA without a transaction is 503", async () => {
    const client = await open();
    assert.equal((await client.command("DATA")).code, 503);
    client.close();
  });
});

describe("message content", () => {
  async function transaction(client: RawSmtp, payload: string | Buffer, mail = "MAIL FROM:<sender@remote.example>") {
    assert.equal((await client.command(mail)).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    assert.equal((await client.command("DATA")).code, 354);
    client.write(payload);
    return client.reply();
  }

  const smuggling: Array<[string, string]> = [
    ["<LF>.<CR><LF>", "\n.\r\n"],
    ["<CR>.<CR><LF>", "\r.\r\n"],
    ["<LF>.<LF>", "\n.\n"],
    ["<CR><LF>.<LF>", "\r\n.\n"],
    ["<CR><LF>.<CR>", "\r\n.\r"],
  ];
  for (const [name, ending] of smuggling) {
    test(`smuggling with ${name} produces no second message`, async () => {
      const before = await messageCount(env.pool);
      const client = await open();
      const body = `Subject: first\r\n\r\nfirst part${ending}MAIL FROM:<evil@remote.example>\r\nRCPT TO:<user2@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\n`;
      const reply = await transaction(client, body);
      assert.match(reply.text, /^550 5\.6\.11 /, reply.text);
      // Everything after the real terminator was answered as commands of a new transaction only once, or not at all.
      assert.equal(client.pending(), "");
      assert.equal(await messageCount(env.pool), before);
      assert.equal((await client.command("NOOP")).code, 250, "the session is still in a sane state");
      client.close();
    });
  }

  test("with normalisation configured, bare line endings become CRLF inside one message", async () => {
    const normalizing = await startIntake(env.pool, env.bus, { limits: { bareLineEndings: "normalize" } });
    extra.push(normalizing);
    const before = await messageCount(env.pool);
    const client = await open(normalizing.port());
    const reply = await transaction(client, "Subject: one\r\n\r\nline\n.\r\nMAIL FROM:<evil@remote.example>\r\n.\r\n");
    assert.equal(reply.code, 250, reply.text);
    assert.equal(await messageCount(env.pool), before + 1);
    const stored = await env.pool.query<{ raw: Buffer }>("SELECT raw FROM messages ORDER BY id DESC LIMIT 1");
    const raw = stored.rows[0]!.raw.toString("latin1");
    assert.ok(raw.endsWith("Subject: one\r\n\r\nline\r\n.\r\nMAIL FROM:<evil@remote.example>\r\n"), JSON.stringify(raw.slice(-80)));
    client.close();
  });

  test("with normalisation configured, a message with LF line endings and an 8-bit body is not taken for one with 8-bit headers", async () => {
    const normalizing = await startIntake(env.pool, env.bus, { limits: { bareLineEndings: "normalize" } });
    extra.push(normalizing);
    const client = await open(normalizing.port());
    const body = Buffer.concat([Buffer.from("Subject: lf only\n\n"), Buffer.from("héllo wörld\n", "utf8"), Buffer.from("\r\n.\r\n")]);
    const reply = await transaction(client, body, "MAIL FROM:<sender@remote.example> BODY=8BITMIME");
    assert.equal(reply.code, 250, reply.text);
    const stored = await env.pool.query<{ raw: Buffer }>("SELECT raw FROM messages ORDER BY id DESC LIMIT 1");
    assert.ok(stored.rows[0]!.raw.toString("utf8").endsWith("Subject: lf only\r\n\r\nhéllo wörld\r\n\r\n"));
    // An 8-bit header is still one after normalisation.
    const header = Buffer.concat([Buffer.from("Subject: "), Buffer.from("héllo\n\nbody\n", "utf8"), Buffer.from("\r\n.\r\n")]);
    assert.match((await transaction(client, header)).text, /^550 5\.6\.7 /);
    client.close();
  });

  test("NUL bytes are refused 554 5.6.0", async () => {
    const client = await open();
    const reply = await transaction(client, Buffer.from("Subject: nul\r\n\r\nhello\0world\r\n.\r\n", "latin1"));
    assert.match(reply.text, /^554 5\.6\.0 /);
    client.close();
  });

  test("8-bit headers need SMTPUTF8", async () => {
    const client = await open();
    const message = Buffer.concat([Buffer.from("Subject: "), Buffer.from("héllo", "utf8"), Buffer.from("\r\n\r\nbody\r\n.\r\n")]);
    assert.match((await transaction(client, message)).text, /^550 5\.6\.7 /);
    const ok = await transaction(client, message, "MAIL FROM:<sender@remote.example> SMTPUTF8");
    assert.equal(ok.code, 250, ok.text);
    client.close();
  });

  test("a message that has made 100 hops (Received: fields) is a mail loop: 554 5.4.6, nothing stored; 99 pass", async () => {
    const client = await open();
    const hops = (n: number) => Array.from({ length: n }, (_, i) => `Received: from hop${i}.example by hop${i + 1}.example;\r\n\tFri, 27 Nov 2026 09:00:00 +0000\r\n`).join("");
    const before = await messageCount(env.pool);
    const looped = await transaction(client, Buffer.from(dataPayload(`${hops(100)}${sampleMessage({ subject: "looping" })}`)));
    assert.match(looped.text, /^554 5\.4\.6 /);
    assert.equal(await messageCount(env.pool), before);
    const ok = await transaction(client, Buffer.from(dataPayload(`${hops(99)}${sampleMessage({ subject: "long way" })}`)));
    assert.equal(ok.code, 250, ok.text);
    client.close();
  });

  test("8-bit bodies are fine with 8BITMIME", async () => {
    const client = await open();
    const message = Buffer.concat([Buffer.from("Subject: x\r\n\r\n"), Buffer.from("héllo wörld", "utf8"), Buffer.from("\r\n.\r\n")]);
    assert.equal((await transaction(client, message, "MAIL FROM:<sender@remote.example> BODY=8BITMIME")).code, 250);
    client.close();
  });

  test("past the memory budget for message data a message is 452 4.3.1, and the budget frees up", async () => {
    const tight = await startIntake(env.pool, env.bus, { limits: { maxBufferedBytes: 8_000 } });
    extra.push(tight);
    const before = await messageCount(env.pool);
    const client = await open(tight.port());
    const big = await transaction(client, dataPayload(sampleMessage({ body: ("z".repeat(900) + "\r\n").repeat(12) })));
    assert.match(big.text, /^452 4\.3\.1 /);
    assert.equal(await messageCount(env.pool), before);
    // Each of these fits alone but two would not: the budget must be given back after each one.
    const half = dataPayload(sampleMessage({ body: ("z".repeat(900) + "\r\n").repeat(5) }));
    for (let i = 0; i < 3; i++) assert.equal((await transaction(client, half)).code, 250, `message ${i} fits again`);
    client.close();
  });

  test("an oversized message is 552 5.3.4 after the final dot and nothing is stored", async () => {
    const small = await startIntake(env.pool, env.bus, { limits: { maxMessageSize: 10_000 } });
    extra.push(small);
    const client = await open(small.port());
    assert.match((await client.command("MAIL FROM:<sender@remote.example> SIZE=20000")).text, /^552 5\.3\.4 /);
    const before = await messageCount(env.pool);
    const reply = await transaction(client, dataPayload(sampleMessage({ body: "y".repeat(900) + "\r\n".concat("z".repeat(900) + "\r\n").repeat(20) })));
    assert.match(reply.text, /^552 5\.3\.4 /);
    assert.equal(await messageCount(env.pool), before);
    const fits = await transaction(client, dataPayload(sampleMessage()));
    assert.equal(fits.code, 250, "the session goes on after a refused message");
    client.close();
  });
});
