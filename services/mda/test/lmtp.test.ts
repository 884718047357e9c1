import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { addAlias } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, type TestEnv } from "@mailstack/testkit";
import { startMda, type Mda } from "../src/mda.ts";
import { LineClient, account, message } from "./helpers.ts";

let env: TestEnv;
let mda: Mda;
let port: number;

before(async () => {
  env = await createTestEnv();
  mda = await startMda({
    pool: env.pool,
    bus: env.bus,
    logger: createLogger("mda-test", "silent"),
    config: { LMTP_PORT: 0, LMTP_HOST: "127.0.0.1", LMTP_MAX_SIZE: 20_000, MAIL_HOSTNAME: "mx.example.test" },
  });
  port = mda.lmtpPort!;
  await account(env.pool, "full@example.test", 100);
  await account(env.pool, "ok1@example.test");
  await account(env.pool, "ok2@example.test");
  await addAlias(env.pool, "team@example.test", ["ok1@example.test", "ok2@example.test"]);
});

after(async () => {
  await mda.stop();
  await env.close();
});

async function session(): Promise<LineClient> {
  const client = await LineClient.open(port);
  assert.match(await client.reply(), /^220 mx\.example\.test .*LMTP/);
  assert.match(await client.command("LHLO client.example"), /^250 /);
  return client;
}

async function entries(address: string) {
  return (
    await env.pool.query(
      `SELECT e.folder, e.uid, e.header_prefix, m.raw, m.source FROM mailbox_entries e
         JOIN accounts a ON a.id = e.account_id JOIN messages m ON m.id = e.message_id
        WHERE a.address = $1 ORDER BY e.id`,
      [address],
    )
  ).rows;
}

test("after DATA each recipient gets its own reply: 250 for the delivered ones, 552 5.2.2 for the full mailbox", async () => {
  const client = await session();
  assert.match(await client.command("MAIL FROM:<sender@remote.example>"), /^250 /);
  assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<full@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<nobody@example.test>"), /^550 5\.1\.1 /);
  assert.match(await client.command("RCPT TO:<someone@not-ours.example>"), /^554 /);
  assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  const body = message("lmtp one", "line one\r\n..dotted\r\n");
  client.write(`${body}.\r\n`);
  const replies = [await client.reply(), await client.reply(), await client.reply()];
  assert.match(replies[0]!, /^250 /, "ok1");
  assert.match(replies[1]!, /^552 5\.2\.2 Mailbox full/, "full");
  assert.match(replies[2]!, /^250 /, "ok2");
  assert.match(await client.command("QUIT"), /^221 /);
  client.close();

  for (const address of ["ok1@example.test", "ok2@example.test"]) {
    const rows = await entries(address);
    assert.equal(rows.length, 1);
    assert.equal(rows[0].source, "lmtp");
    const copy = Buffer.concat([rows[0].header_prefix, rows[0].raw]).toString();
    assert.ok(copy.startsWith(`Return-Path: <sender@remote.example>\r\nDelivered-To: ${address}\r\nReceived: from client.example`), copy.slice(0, 200));
    // The dot-stuffing is undone and the body is kept as sent.
    assert.ok(copy.endsWith(body.replace("..dotted", ".dotted")), copy);
  }
  assert.equal((await entries("full@example.test")).length, 0);
  const full = (await env.pool.query("SELECT state, dsn_state, last_reply FROM deliveries WHERE final_recipient = 'full@example.test'")).rows;
  // The LMTP client was told: it bounces, so no DSN of our own.
  assert.deepEqual(full, [{ state: "bounced", dsn_state: "suppressed", last_reply: "552 5.2.2 Mailbox full" }]);
});

test("a quoted local part (RFC 5321 4.1.2): any quoting of the account's name reaches it once, one reply per RCPT; the trace lines quote it", async () => {
  await account(env.pool, '"John Doe"@example.test');
  const client = await session();
  assert.match(await client.command('MAIL FROM:<"a b"@remote.example>'), /^250 /);
  assert.match(await client.command('RCPT TO:<"John\\ Doe"@example.test>'), /^250 /);
  assert.match(await client.command('RCPT TO:<"john doe"@example.test>'), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("lmtp quoted")}.\r\n`);
  assert.match(await client.reply(), /^250 /);
  assert.match(await client.reply(), /^250 /);
  assert.match(await client.command("QUIT"), /^221 /);
  client.close();
  const rows = await entries('"john doe"@example.test');
  assert.equal(rows.length, 1);
  assert.match(rows[0].header_prefix.toString(), /^Return-Path: <"a b"@remote\.example>\r\nDelivered-To: "john doe"@example\.test\r\n/);
});

test("an alias fans out at RCPT, a recipient given twice gets one copy, several transactions per connection", async () => {
  const client = await session();
  for (let i = 0; i < 2; i++) {
    assert.match(await client.command("MAIL FROM:<>"), /^250 /);
    assert.match(await client.command("RCPT TO:<team@example.test>"), /^250 /);
    assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 /);
    assert.match(await client.command("RCPT TO:<OK1@example.test>"), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write(`${message(`fan out ${i}`)}.\r\n`);
    // RFC 2033 §4.2: one reply per successful RCPT, the repeated one included.
    assert.match(await client.reply(), /^250 /);
    assert.match(await client.reply(), /^250 /);
    assert.match(await client.reply(), /^250 /);
  }
  client.write("NOOP\r\n");
  assert.match(await client.reply(), /^250 /, "no extra reply was pending");
  client.close();
  const ok1 = (await entries("ok1@example.test")).filter((r) => /fan out/.test(r.raw.toString()));
  const ok2 = (await entries("ok2@example.test")).filter((r) => /fan out/.test(r.raw.toString()));
  assert.equal(ok1.length, 2, "one copy per message for ok1 despite alias + direct + repeat");
  assert.equal(ok2.length, 2);
  assert.ok(ok1[0].header_prefix.toString().startsWith("Return-Path: <>\r\n"));
});

test("a message over the size limit gets 552 for every recipient and stores nothing", async () => {
  const before = (await env.pool.query("SELECT count(*)::int AS n FROM messages")).rows[0].n;
  const client = await session();
  assert.match(await client.command("MAIL FROM:<sender@remote.example>"), /^250 /);
  assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("too large", `${"z".repeat(998)}\r\n`.repeat(30))}.\r\n`);
  assert.match(await client.reply(), /^552 /);
  assert.match(await client.reply(), /^552 /);
  client.close();
  assert.equal((await env.pool.query("SELECT count(*)::int AS n FROM messages")).rows[0].n, before);
});

test("SMTP commands that have no place in LMTP are refused", async () => {
  const client = await LineClient.open(port);
  await client.reply();
  assert.match(await client.command("EHLO client.example"), /^500 /);
  assert.match(await client.command("MAIL FROM:<a@b.example>"), /^503 /);
  client.close();
});

test("Python's smtplib.LMTP (an independent LMTP client) delivers, and is refused 552 5.2.2 for the full mailbox", async () => {
  const { execFile } = await import("node:child_process");
  // smtplib reads one reply after DATA, so it sends one recipient per transaction.
  const script = [
    "import smtplib, sys, json",
    "c = smtplib.LMTP('127.0.0.1', int(sys.argv[1]))",
    "out = {}",
    "for rcpt in ['ok2@example.test', 'full@example.test']:",
    "    try:",
    "        c.sendmail('py@remote.example', [rcpt], b'Subject: from python\\r\\n\\r\\nhi\\r\\n')",
    "        out[rcpt] = [250, '']",
    "    except smtplib.SMTPDataError as e:",
    "        out[rcpt] = [e.smtp_code, e.smtp_error.decode()]",
    "c.quit()",
    "print(json.dumps(out))",
  ].join("\n");
  const stdout = await new Promise<string>((resolve, reject) =>
    execFile("/usr/bin/python3", ["-c", script, String(port)], (error, out, err) => (error ? reject(new Error(err || error.message)) : resolve(out))),
  );
  const result = JSON.parse(stdout);
  assert.equal(result["ok2@example.test"][0], 250);
  assert.equal(result["full@example.test"][0], 552);
  assert.match(result["full@example.test"][1], /^5\.2\.2 /);
  const rows = (await entries("ok2@example.test")).filter((r) => /from python/.test(r.raw.toString()));
  assert.equal(rows.length, 1);
});

test("only clients in LMTP_ALLOWED_NETWORKS may connect", async () => {
  const { startLmtp } = await import("../src/lmtp.ts");
  const { allowedClient, networkList } = await import("../src/networks.ts");
  const list = networkList(["10.0.0.0/8", "::1/128", "192.0.2.7"]);
  assert.equal(allowedClient(list, "10.1.2.3"), true);
  assert.equal(allowedClient(list, "::ffff:10.1.2.3"), true);
  assert.equal(allowedClient(list, "::1"), true);
  assert.equal(allowedClient(list, "192.0.2.7"), true);
  assert.equal(allowedClient(list, "192.0.2.8"), false);
  assert.equal(allowedClient(list, "127.0.0.1"), false);
  assert.throws(() => networkList(["10.0.0.0/33"]));
  assert.throws(() => networkList(["example.com"]));

  const closed = await startLmtp(
    { pool: env.pool, logger: createLogger("mda-test", "silent") },
    { port: 0, host: "127.0.0.1", maxSize: 1000, maxClients: 5, socketTimeout: 5000, hostname: "mx.example.test", allowedNetworks: ["10.0.0.0/8"] },
  );
  try {
    const client = await LineClient.open(closed.port);
    assert.match(await client.reply(), /^554 5\.7\.1 /);
    client.close();
  } finally {
    await closed.stop();
  }
});

/** A session of its own on an LMTP server started with other options (the shared one keeps the defaults). */
async function withLmtp<T>(options: Partial<import("../src/lmtp.ts").LmtpOptions>, fn: (port: number) => Promise<T>): Promise<T> {
  const { startLmtp } = await import("../src/lmtp.ts");
  const server = await startLmtp(
    { pool: env.pool, logger: createLogger("mda-test", "silent") },
    { port: 0, host: "127.0.0.1", maxSize: 20_000, maxClients: 5, socketTimeout: 5000, hostname: "mx.example.test", allowedNetworks: ["127.0.0.1"], ...options },
  );
  try {
    return await fn(server.port);
  } finally {
    await server.stop();
  }
}

async function countMessages(pattern: string): Promise<number> {
  return (await env.pool.query("SELECT count(*)::int AS n FROM messages WHERE position($1 in convert_from(raw, 'LATIN1')) > 0", [pattern])).rows[0].n;
}

test("LHLO advertises ENHANCEDSTATUSCODES and the replies carry them (RFC 2034); HELO and EHLO are refused", async () => {
  const client = await LineClient.open(port);
  await client.reply();
  assert.match(await client.command("HELO client.example"), /^500 5\.5\.1 /);
  assert.match(await client.command("EHLO client.example"), /^500 5\.5\.1 /);
  assert.match(await client.command("LHLO client.example"), /^250 /);
  assert.deepEqual(
    client.lastReplyLines.slice(1).map((line) => line.slice(4).split(" ")[0]).sort(),
    ["8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING", "SIZE", "SMTPUTF8"],
  );
  assert.match(await client.command("DATA"), /^503 5\.5\.1 /);
  assert.match(await client.command("MAIL FROM:<sender@remote.example> SIZE=999999"), /^552 5\.3\.4 /);
  assert.match(await client.command("MAIL FROM:<sender@remote.example> BODY=8BITMIME SIZE=100"), /^250 2\.\d\.\d /);
  assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 2\.\d\.\d /);
  assert.match(await client.command("RCPT TO:<nobody@example.test>"), /^550 5\.1\.1 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("enhanced codes")}.\r\n`);
  assert.match(await client.reply(), /^250 2\.0\.0 Delivered \([0-9A-Z]+\)$/);
  assert.match(await client.command("RSET"), /^250 2\.\d\.\d /);
  assert.match(await client.command("NOOP"), /^250 2\.\d\.\d /);
  assert.match(await client.command("QUIT"), /^221 2\.\d\.\d /);
  client.close();
});

test("a recipient given twice gets two replies after DATA, in RCPT order, and one copy (RFC 2033 §4.2)", async () => {
  const client = await session();
  assert.match(await client.command("MAIL FROM:<sender@remote.example>"), /^250 /);
  assert.match(await client.command("RCPT TO:<full@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<OK2@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("twice given", "x\r\n".repeat(60))}.\r\n`);
  assert.match(await client.reply(), /^552 5\.2\.2 /, "full");
  assert.match(await client.reply(), /^250 2\.0\.0 /, "ok2");
  assert.match(await client.reply(), /^250 2\.0\.0 /, "OK2");
  assert.match(await client.command("NOOP"), /^250 /, "no reply was left over or missing");
  // Over the size limit: one 552 per RCPT as well.
  assert.match(await client.command("MAIL FROM:<sender@remote.example>"), /^250 /);
  assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
  assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("twice too large", `${"z".repeat(998)}\r\n`.repeat(30))}.\r\n`);
  assert.match(await client.reply(), /^552 5\.3\.4 /);
  assert.match(await client.reply(), /^552 5\.3\.4 /);
  assert.match(await client.command("NOOP"), /^250 /);
  client.close();
  assert.equal((await entries("ok2@example.test")).filter((r) => /twice given/.test(r.raw.toString())).length, 1);
  assert.equal(await countMessages("twice too large"), 0);
});

test("smuggling material in DATA (bare LF, bare CR, <LF>.<CR><LF>, NUL) is refused for every recipient and nothing is stored", async () => {
  const payloads = [
    ["lf-dot", "x\n.\r\nMAIL FROM:<evil@remote.example>\r\nRCPT TO:<ok2@example.test>\r\nDATA\r\nSubject: smuggled-lf-dot\r\n\r\ny\r\n", /^550 5\.6\.11 /],
    ["dot-lf", "x\r\n.\nMAIL FROM:<evil@remote.example>\r\nRCPT TO:<ok2@example.test>\r\nDATA\r\nSubject: smuggled-dot-lf\r\n\r\ny\r\n", /^550 5\.6\.11 /],
    ["cr", "x\r.\rMAIL FROM:<evil@remote.example>\r\nSubject: smuggled-cr\r\n", /^550 5\.6\.11 /],
    ["nul", "x\u0000y\r\n", /^554 5\.6\.0 /],
  ] as const;
  for (const [name, body, expected] of payloads) {
    const client = await session();
    assert.match(await client.command("MAIL FROM:<sender@remote.example>"), /^250 /);
    assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 /);
    assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write(`Subject: smuggle-${name}\r\n\r\n${body}.\r\n`);
    assert.match(await client.reply(), expected, name);
    assert.match(await client.reply(), expected, name);
    assert.match(await client.command("NOOP"), /^250 /, `${name}: nothing smuggled ran as a command`);
    client.close();
    assert.equal(await countMessages(`smuggle-${name}`), 0, name);
  }
  assert.equal(await countMessages("smuggled-"), 0);
});

test("with LMTP_BARE_LINE_ENDINGS=normalize a bare LF or CR becomes CRLF and the message is one message", async () => {
  await withLmtp({ bareLineEndings: "normalize" }, async (lmtpPort) => {
    const client = await LineClient.open(lmtpPort);
    await client.reply();
    await client.command("LHLO client.example");
    await client.command("MAIL FROM:<sender@remote.example>");
    assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write("Subject: normalized bare\r\n\r\nx\n.\r\nMAIL FROM:<evil@remote.example>\rend\r\n.\r\n");
    assert.match(await client.reply(), /^250 2\.0\.0 /);
    client.close();
  });
  const rows = (await entries("ok1@example.test")).filter((r) => /normalized bare/.test(r.raw.toString()));
  assert.equal(rows.length, 1);
  assert.ok(rows[0].raw.toString().endsWith("Subject: normalized bare\r\n\r\nx\r\n.\r\nMAIL FROM:<evil@remote.example>\r\nend\r\n"));
});

test("a body pipelined behind DATA after every RCPT was refused never runs as commands; a bare-LF command line is refused", async () => {
  const client = await session();
  client.write(
    "MAIL FROM:<sender@remote.example>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n"
    + "MAIL FROM:<evil@remote.example>\r\nRCPT TO:<ok2@example.test>\r\nDATA\r\nSubject: injected-by-pipelining\r\n\r\nx\r\n.\r\n",
  );
  assert.match(await client.reply(), /^250 /);
  assert.match(await client.reply(), /^550 5\.1\.1 /);
  assert.match(await client.reply(), /^554 5\.5\.1 /);
  assert.equal(await client.closed(), true, "the connection is closed with the pipelined body unread");
  assert.doesNotMatch(client.pending(), /^(250|354)/m);
  client.close();
  assert.equal(await countMessages("injected-by-pipelining"), 0);

  const second = await session();
  second.write("MAIL FROM:<sender@remote.example>\n");
  assert.match(await second.reply(), /^500 5\.5\.2 /);
  assert.match(await second.command("RCPT TO:<ok1@example.test>"), /^503 /, "the bare-LF MAIL did not start a transaction");
  second.close();
});

test("the Message-ID is stored with an LMTP message, so its journey can be found by it", async () => {
  const client = await session();
  await client.command("MAIL FROM:<sender@remote.example>");
  await client.command("RCPT TO:<ok1@example.test>");
  await client.command("DATA");
  client.write(`${message("lmtp journey id")}.\r\n`);
  const queueId = /\(([0-9A-Z]+)\)/.exec(await client.reply())![1];
  client.close();
  const rows = (await env.pool.query("SELECT queue_id, source FROM messages WHERE message_id_header = '<lmtpjourneyid@remote.example>'")).rows;
  assert.deepEqual(rows, [{ queue_id: queueId, source: "lmtp" }]);
});

test("a message sent again after the client lost our replies is not filed twice: the earlier replies are given again", async () => {
  const body = message("sent twice", "the same bytes\r\n");
  const transaction = async (recipients: string[], text = body) => {
    const client = await session();
    await client.command("MAIL FROM:<retry@remote.example>");
    for (const r of recipients) assert.match(await client.command(`RCPT TO:<${r}>`), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write(`${text}.\r\n`);
    const replies = [];
    for (let i = 0; i < recipients.length; i++) replies.push(await client.reply());
    client.close();
    return replies;
  };
  const first = await transaction(["ok1@example.test", "full@example.test"]);
  assert.match(first[0]!, /^250 2\.0\.0 Delivered \(([0-9A-Z]+)\)$/);
  assert.match(first[1]!, /^552 5\.2\.2 /);
  const queueId = /\(([0-9A-Z]+)\)/.exec(first[0]!)![1]!;
  // The client did not see those replies and sends the same message again, plus a new recipient.
  const again = await transaction(["ok1@example.test", "full@example.test", "ok2@example.test"]);
  assert.match(again[0]!, new RegExp(`^250 2\\.0\\.0 Delivered \\(${queueId}\\)`));
  assert.match(again[1]!, /^552 5\.2\.2 /);
  assert.match(again[2]!, /^250 2\.0\.0 Delivered \((?![^)]*\b${queueId}\b)/);
  assert.equal((await entries("ok1@example.test")).filter((r) => /sent twice/.test(r.raw.toString())).length, 1);
  assert.equal((await entries("ok2@example.test")).filter((r) => /sent twice/.test(r.raw.toString())).length, 1);
  // Other bytes under the same Message-ID are another message.
  await transaction(["ok1@example.test"], message("sent twice", "other bytes\r\n"));
  assert.equal((await entries("ok1@example.test")).filter((r) => /sent twice/.test(r.raw.toString())).length, 2);
  // With the window at 0 the check is off.
  await withLmtp({ duplicateWindow: 0 }, async (lmtpPort) => {
    const client = await LineClient.open(lmtpPort);
    await client.reply();
    await client.command("LHLO client.example");
    await client.command("MAIL FROM:<retry@remote.example>");
    await client.command("RCPT TO:<ok1@example.test>");
    await client.command("DATA");
    client.write(`${body}.\r\n`);
    assert.match(await client.reply(), /^250 /);
    client.close();
  });
  assert.equal((await entries("ok1@example.test")).filter((r) => /sent twice/.test(r.raw.toString())).length, 3);
});

test("LMTP_QUOTA_FULL_TEMPFAIL: a full mailbox is 452 4.2.2 for its recipient, the copy is cancelled, no DSN", async () => {
  await withLmtp({ quotaFullTempfail: true }, async (lmtpPort) => {
    const client = await LineClient.open(lmtpPort);
    await client.reply();
    await client.command("LHLO client.example");
    await client.command("MAIL FROM:<sender@remote.example>");
    assert.match(await client.command("RCPT TO:<full@example.test>"), /^250 /);
    assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write(`${message("tempfail quota", "x\r\n".repeat(60))}.\r\n`);
    assert.match(await client.reply(), /^452 4\.2\.2 Mailbox full/);
    assert.match(await client.reply(), /^250 2\.0\.0 /);
    client.close();
  });
  const rows = (await env.pool.query(
    `SELECT d.state, d.dsn_state, d.last_reply FROM deliveries d JOIN messages m ON m.id = d.message_id
      WHERE d.final_recipient = 'full@example.test' AND position('tempfail quota' in convert_from(m.raw, 'LATIN1')) > 0`,
  )).rows;
  assert.deepEqual(rows, [{ state: "cancelled", dsn_state: null, last_reply: "452 4.2.2 Mailbox full" }]);
});

test("a message that does not begin with a header field keeps its first line out of our Received: field", async () => {
  const client = await session();
  for (const [subject, text] of [["indented", " indented first line\r\nSubject: x\r\n\r\nheaderless-indented\r\n"], ["plain", "no header here, headerless-plain\r\n"]] as const) {
    await client.command("MAIL FROM:<sender@remote.example>");
    await client.command("RCPT TO:<ok1@example.test>");
    await client.command("DATA");
    client.write(`${text}.\r\n`);
    assert.match(await client.reply(), /^250 /, subject);
  }
  client.close();
  for (const [marker, text] of [["headerless-indented", " indented first line\r\nSubject: x\r\n\r\nheaderless-indented\r\n"], ["headerless-plain", "no header here, headerless-plain\r\n"]] as const) {
    const row = (await entries("ok1@example.test")).find((r) => r.raw.toString().includes(marker))!;
    const raw = row.raw.toString();
    // Our Received: field, then an empty line (an empty header section of the message's own), then the text as sent.
    assert.match(raw, /^Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n\tby mx\.example\.test \(mailstack\) with LMTP id [0-9A-Z]+[^\r\n]*\r\n\t[^\r\n]+\r\n\r\n/, marker);
    assert.ok(raw.endsWith(`\r\n\r\n${text}`), marker);
  }
});

test("a client over IPv6 is written as an IPv6 address literal in our Received: field (RFC 5321 4.1.3)", async () => {
  await withLmtp({ host: "::1", allowedNetworks: ["::1/128"] }, async (v6Port) => {
    const client = await LineClient.open(v6Port, "::1");
    assert.match(await client.reply(), /^220 /);
    assert.match(await client.command("LHLO client6.example"), /^250 /);
    await client.command("MAIL FROM:<sender@remote.example>");
    assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write("Subject: over-ipv6\r\n\r\nhello\r\n.\r\n");
    assert.match(await client.reply(), /^250 /);
    client.close();
  });
  const row = (await entries("ok2@example.test")).find((r) => r.raw.toString().includes("over-ipv6"))!;
  assert.match(row.raw.toString(), /^Received: from client6\.example \(\[IPv6:::1\]\)\r\n\tby mx\.example\.test \(mailstack\) with LMTP id /);
});

test("DATA and RSET with an argument are 501 5.5.4, as at the SMTP ports", async () => {
  const client = await session();
  await client.command("MAIL FROM:<sender@remote.example>");
  assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 /);
  assert.match(await client.command("RSET now"), /^501 5\.5\.4 /);
  assert.match(await client.command("DATA please"), /^501 5\.5\.4 /);
  assert.match(await client.command("DATA"), /^354 /, "the transaction is still there");
  client.write("Subject: after-501\r\n\r\nx\r\n.\r\n");
  assert.match(await client.reply(), /^250 /);
  client.close();
});

test("a recipient path over RFC 5321's limits is 501 5.1.3 Path too long, as at the SMTP ports", async () => {
  const client = await session();
  await client.command("MAIL FROM:<sender@remote.example>");
  assert.match(await client.command(`RCPT TO:<${"a".repeat(65)}@example.test>`), /^501 5\.1\.3 Path too long/);
  assert.match(await client.command(`RCPT TO:<${"a".repeat(64)}@example.test>`), /^550 5\.1\.1 /, "64 octets is a name, just not one of ours");
  assert.match(await client.command("RCPT TO:<a b@example.test>"), /^5\d\d /);
  client.close();
});

test("LHLO offers SMTPUTF8; a UTF-8 transaction is filed with 'with UTF8LMTP' in our Received: field (RFC 6531 3.7.3)", async () => {
  const client = await LineClient.open(port);
  assert.match(await client.reply(), /^220 /);
  assert.match(await client.command("LHLO client.example"), /^250 /);
  assert.ok(client.lastReplyLines.includes("250-SMTPUTF8"), client.lastReplyLines.join("|"));
  assert.match(await client.command("MAIL FROM:<jörg@remote.example> SMTPUTF8"), /^250 /);
  assert.match(await client.command("RCPT TO:<ok2@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write("Subject: grüße utf8-over-lmtp\r\n\r\nhello\r\n.\r\n");
  assert.match(await client.reply(), /^250 /);
  client.close();
  const row = (await entries("ok2@example.test")).find((r) => r.raw.toString().includes("utf8-over-lmtp"))!;
  assert.match(row.raw.toString(), /^Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n\tby mx\.example\.test \(mailstack\) with UTF8LMTP id /);
});

test("a full mailbox reached through several RCPTs is bounced once: by the client when its RCPT got the failure, else by our DSN", async () => {
  await account(env.pool, "full2@example.test", 100);
  await addAlias(env.pool, "fulls@example.test", ["full@example.test", "full2@example.test"]);
  await addAlias(env.pool, "mixed@example.test", ["full2@example.test", "ok2@example.test"]);
  const transaction = async (subject: string, recipients: string[]) => {
    const client = await session();
    await client.command("MAIL FROM:<sender@remote.example>");
    for (const r of recipients) assert.match(await client.command(`RCPT TO:<${r}>`), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write(`${message(subject, "x\r\n".repeat(60))}.\r\n`);
    const replies = [];
    for (let i = 0; i < recipients.length; i++) replies.push(await client.reply());
    client.close();
    const rows = (await env.pool.query(
      `SELECT d.final_recipient, d.state, d.dsn_state FROM deliveries d JOIN messages m ON m.id = d.message_id
        WHERE m.message_id_header = $1 ORDER BY d.id`,
      [`<${subject.replace(/\W/g, "")}@remote.example>`],
    )).rows;
    return { replies, rows };
  };
  // Every member of the alias is full: the client is told 552 and bounces; no DSN of ours.
  const all = await transaction("alias all full", ["fulls@example.test", "ok1@example.test"]);
  assert.match(all.replies[0]!, /^552 5\.2\.2 /);
  assert.match(all.replies[1]!, /^250 /);
  assert.deepEqual(all.rows, [
    { final_recipient: "full@example.test", state: "bounced", dsn_state: "suppressed" },
    { final_recipient: "full2@example.test", state: "bounced", dsn_state: "suppressed" },
    { final_recipient: "ok1@example.test", state: "delivered", dsn_state: null },
  ]);
  // A member named alone as well: its RCPT gets the 552, so the client's bounce covers it.
  const alone = await transaction("member named alone", ["full@example.test", "fulls@example.test"]);
  assert.match(alone.replies[0]!, /^552 5\.2\.2 /);
  assert.match(alone.replies[1]!, /^552 5\.2\.2 /);
  assert.deepEqual(alone.rows.map((r) => r.dsn_state), ["suppressed", "suppressed"]);
  // Part of the alias was delivered: the client hears 250, so the full member's bounce is our DSN.
  const mixed = await transaction("alias partly full", ["mixed@example.test"]);
  assert.match(mixed.replies[0]!, /^250 2\.0\.0 Delivered/);
  assert.deepEqual(mixed.rows, [
    { final_recipient: "full2@example.test", state: "bounced", dsn_state: "pending" },
    { final_recipient: "ok2@example.test", state: "delivered", dsn_state: null },
  ]);
});

test("a retransmission to an alias and one of its members files no second copy for that member", async () => {
  const body = message("alias and member sent twice", "same bytes\r\n");
  const transaction = async () => {
    const client = await session();
    await client.command("MAIL FROM:<retry@remote.example>");
    assert.match(await client.command("RCPT TO:<team@example.test>"), /^250 /);
    assert.match(await client.command("RCPT TO:<ok1@example.test>"), /^250 /);
    assert.match(await client.command("DATA"), /^354 /);
    client.write(`${body}.\r\n`);
    const replies = [await client.reply(), await client.reply()];
    client.close();
    return replies;
  };
  const first = await transaction();
  const queueId = /\(([0-9A-Z]+)\)/.exec(first[0]!)![1]!;
  const again = await transaction();
  for (const reply of again) assert.match(reply, new RegExp(`^250 2\\.0\\.0 Delivered \\(${queueId}\\), a copy of a message already received`));
  for (const address of ["ok1@example.test", "ok2@example.test"]) {
    assert.equal((await entries(address)).filter((r) => /alias and member sent twice/.test(r.raw.toString())).length, 1, address);
  }
});
