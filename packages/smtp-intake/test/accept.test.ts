import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import nodemailer from "nodemailer";
import { connectBus, provisionBus } from "@mailstack/bus";
import { createPool } from "@mailstack/db";
import { Replies } from "@mailstack/mail";
import { createTestEnv, tcpProxy, waitFor, type TestEnv } from "@mailstack/testkit";
import { RawSmtp, dataPayload, sampleMessage } from "../src/testing.ts";
import { SmtpError, type IntakeServer } from "../src/index.ts";
import { deliveryTargets, messageCount, openSession, seedDirectory, startIntake } from "./fixtures.ts";

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

async function send(client: RawSmtp, from: string, to: string[], message: string | Buffer) {
  assert.equal((await client.command(`MAIL FROM:<${from}>`)).code, 250);
  for (const rcpt of to) assert.equal((await client.command(`RCPT TO:<${rcpt}>`)).code, 250, rcpt);
  assert.equal((await client.command("DATA")).code, 354);
  client.write(typeof message === "string" ? dataPayload(message) : message);
  return client.reply();
}

async function lastMessage() {
  const result = await env.pool.query("SELECT * FROM messages ORDER BY id DESC LIMIT 1");
  return result.rows[0];
}

async function deliveriesOf(messageId: number) {
  const result = await env.pool.query("SELECT * FROM deliveries WHERE message_id = $1 ORDER BY final_recipient", [messageId]);
  return result.rows;
}

async function streamCount(name: string): Promise<number> {
  const info = await env.bus.jsm.streams.info(env.bus.stream(name));
  return info.state.messages;
}

describe("accepting a message", () => {
  test("the stored message is the received bytes with only our Received: header on top", async () => {
    const message = sampleMessage({ body: "Line one.\r\n.leading dot\r\n..two dots\r\nlast" });
    const client = await open();
    const jobsBefore = await streamCount("DELIVER");
    const reply = await send(client, "sender@remote.example", ["user1@example.test"], message);
    assert.match(reply.text, /^250 2\.0\.0 Ok: queued as [0-9A-Z]+$/);
    const queueId = reply.text.split(" ").pop();
    const row = await lastMessage();
    assert.equal(row.queue_id, queueId);
    const raw: Buffer = row.raw;
    const text = raw.toString("latin1");
    const headerEnd = text.indexOf("\r\n", text.indexOf("+0000")) + 2;
    const received = text.slice(0, headerEnd);
    assert.match(received, /^Received: from client\.remote\.example \(\[127\.0\.0\.1\]\)\r\n\tby mx\.example\.test \(mailstack\) with ESMTP id [0-9A-Z]+ \(trace [0-9a-f]{32}\)\r\n\tfor <user1@example\.test>;\r\n\t.+\+0000\r\n$/);
    assert.ok(received.includes(`(trace ${row.trace_id})`), "the trace id in Received: is the one on the row");
    assert.ok(raw.subarray(headerEnd).equals(Buffer.from(message, "latin1")), "the rest is byte-for-byte what was sent");
    assert.equal(row.size, raw.length);
    assert.equal(row.envelope_from, "sender@remote.example");
    assert.equal(row.source, "inbound");
    assert.equal(row.client_helo, "client.remote.example");
    assert.match(row.message_id_header, /^<.+@remote\.example>$/);
    const deliveries = await deliveriesOf(row.id);
    assert.equal(deliveries.length, 1);
    assert.equal(deliveries[0].kind, "local");
    assert.equal(deliveries[0].state, "queued");
    await waitFor(async () => (await deliveriesOf(row.id))[0].dispatched_at !== null);
    assert.equal(await streamCount("DELIVER"), jobsBefore + 1, "one mail.deliver.local job");
    client.close();
  });

  test("a message that starts with an empty line has no header fields: no Message-ID is taken from its body", async () => {
    const client = await open();
    const message = "\r\nMessage-ID: <in-the-body@remote.example>\r\n\r\nthe body\r\n";
    assert.equal((await send(client, "sender@remote.example", ["user1@example.test"], message)).code, 250);
    const row = await lastMessage();
    assert.ok(row.raw.toString("latin1").endsWith(`\r\n${message}`), "stored as received, under our Received:");
    assert.equal(row.message_id_header, null);
    client.close();
  });

  test("aliases fan out and merge into one delivery per final recipient", async () => {
    const client = await open();
    const reply = await send(client, "sender@remote.example", ["team@example.test", "user1@example.test", "first@example.test", "chain1@example.test", "anyone@other.test", "fwd@example.test"], sampleMessage());
    assert.equal(reply.code, 250);
    const row = await lastMessage();
    const deliveries = await deliveriesOf(row.id);
    assert.deepEqual(
      deliveries.map((d) => [d.final_recipient, d.kind]),
      [["someone@remote.example", "remote"], ["user1@example.test", "local"], ["user2@example.test", "local"]],
    );
    const received = row.raw.toString("latin1").split("\r\n\r\n")[0];
    assert.ok(!/\tfor </.test(received), "no `for` clause with several recipients");
    client.close();
  });

  test("a recipient given twice gets one copy", async () => {
    const client = await open();
    client.write("MAIL FROM:<sender@remote.example>\r\nRCPT TO:<user2@example.test>\r\nRCPT TO:<USER2@example.test>\r\nDATA\r\n");
    for (let i = 0; i < 3; i++) assert.equal((await client.reply()).code, 250);
    assert.equal((await client.reply()).code, 354);
    client.write(dataPayload(sampleMessage()));
    assert.equal((await client.reply()).code, 250);
    const row = await lastMessage();
    assert.deepEqual((await deliveriesOf(row.id)).map((d) => d.final_recipient), ["user2@example.test"]);
    client.close();
  });

  test("DSN parameters are stored with the message and its deliveries", async () => {
    const client = await open();
    assert.equal((await client.command("MAIL FROM:<> RET=HDRS ENVID=env+2Bid-42")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;original@example.test")).code, 250);
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage()));
    assert.equal((await client.reply()).code, 250);
    const row = await lastMessage();
    assert.equal(row.envelope_from, "");
    assert.equal(row.dsn_ret, "HDRS");
    assert.equal(row.dsn_envid, "env+id-42");
    const [delivery] = await deliveriesOf(row.id);
    assert.deepEqual(delivery.dsn_notify, ["SUCCESS", "FAILURE"]);
    assert.equal(delivery.dsn_orcpt, "rfc822;original@example.test");
    client.close();
  });

  test("a normal client (nodemailer) with STARTTLS, several messages on one connection", async () => {
    const transport = nodemailer.createTransport({ host: "127.0.0.1", port: intake.port(), secure: false, requireTLS: true, tls: { rejectUnauthorized: false }, pool: true, maxConnections: 1 });
    const before = await messageCount(env.pool);
    for (let i = 0; i < 3; i++) {
      const info = await transport.sendMail({ from: "sender@remote.example", to: "user1@example.test", subject: `n${i}`, text: "hello" });
      assert.deepEqual(info.accepted, ["user1@example.test"]);
      assert.match(info.response, /^250 2\.0\.0 Ok: queued as /);
    }
    transport.close();
    assert.equal(await messageCount(env.pool), before + 3);
    const row = await lastMessage();
    assert.match(row.raw.toString("latin1"), /with ESMTPS id /);
  });

  test("concurrent sessions are group-committed and each gets its own 250 after the commit", async () => {
    const grouped = await startIntake(env.pool, env.bus, { limits: { acceptConcurrency: 1 } });
    extra.push(grouped);
    const before = await messageCount(env.pool);
    const clients = await Promise.all(Array.from({ length: 20 }, () => open(grouped.port())));
    const replies = await Promise.all(clients.map((c, i) => send(c, "sender@remote.example", ["user1@example.test"], sampleMessage({ subject: `c${i}` }))));
    const queueIds = new Set(replies.map((r) => r.text.split(" ").pop()));
    assert.equal(queueIds.size, 20);
    for (const r of replies) assert.equal(r.code, 250);
    const stored = await env.pool.query("SELECT queue_id FROM messages WHERE queue_id = ANY($1)", [[...queueIds]]);
    assert.equal(stored.rowCount, 20, "every message that got 250 is in the database");
    assert.equal(await messageCount(env.pool), before + 20);
    const stats = grouped.stats();
    assert.ok(stats.largestBatch > 1 && stats.acceptTransactions < 20, `messages shared transactions: ${JSON.stringify(stats)}`);
    const events = await env.pool.query("SELECT count(*)::int AS n FROM delivery_events e JOIN messages m ON m.id = e.message_id WHERE m.queue_id = ANY($1) AND e.event = 'accepted'", [[...queueIds]]);
    assert.equal(events.rows[0].n, 20, "one accepted event per delivery");
    for (const c of clients) c.close();
  });
});

describe("hooks", () => {
  test("transformMessage can rewrite, choose the folder, attach auth results or refuse", async () => {
    const hooked = await startIntake(env.pool, env.bus, {
      async transformMessage(message) {
        if (message.sender === "blocked@remote.example") throw new SmtpError({ code: 550, enhanced: "5.7.1", text: "DMARC policy says no" });
        const header = Buffer.from(`Authentication-Results: mx.example.test; spf=pass\r\n`);
        return { raw: Buffer.concat([header, message.raw]), folder: "Junk", authResults: { spf: "pass" } };
      },
    });
    extra.push(hooked);
    const client = await open(hooked.port());
    assert.equal((await send(client, "ok@remote.example", ["user1@example.test", "fwd@example.test"], sampleMessage())).code, 250);
    const row = await lastMessage();
    assert.match(row.raw.toString("latin1"), /^Received: [^]*\r\nAuthentication-Results: mx\.example\.test; spf=pass\r\nFrom: /);
    assert.deepEqual(row.auth_results, { spf: "pass" });
    const folders = (await deliveriesOf(row.id)).map((d) => [d.final_recipient, d.folder]);
    assert.deepEqual(folders, [["someone@remote.example", "INBOX"], ["user1@example.test", "Junk"], ["user2@example.test", "Junk"]]);
    const refused = await send(client, "blocked@remote.example", ["user1@example.test"], sampleMessage());
    assert.equal(refused.text, "550 5.7.1 DMARC policy says no");
    client.close();
  });

  test("AUTH with an authenticate hook, required before MAIL, plus validateSender and remote recipients (the MSA shape)", async () => {
    const msa = await startIntake(env.pool, env.bus, {
      service: "msa",
      source: "submission",
      auth: {
        required: true,
        allowInsecure: true,
        authenticate: async ({ username, password }) => (username === "user1@example.test" && password === "secret-1" ? username : null),
      },
      allowRemote: (session) => session.user !== null,
      async validateSender(sender, session) {
        if (sender !== session.user) throw new SmtpError(Replies.senderNotOwned);
      },
    });
    extra.push(msa);
    const client = await open(msa.port());
    assert.equal((await client.command("MAIL FROM:<user1@example.test>")).code, 530);
    const bad = Buffer.from("\0user1@example.test\0wrong").toString("base64");
    assert.match((await client.command(`AUTH PLAIN ${bad}`)).text, /^535 5\.7\.8 /);
    const good = Buffer.from("\0user1@example.test\0secret-1").toString("base64");
    assert.equal((await client.command(`AUTH PLAIN ${good}`)).code, 235);
    assert.match((await client.command("MAIL FROM:<user2@example.test>")).text, /^553 5\.7\.1 /);
    const reply = await send(client, "user1@example.test", ["friend@remote.example"], sampleMessage());
    assert.equal(reply.code, 250);
    const row = await lastMessage();
    assert.equal(row.source, "submission");
    assert.equal(row.auth_user, "user1@example.test");
    assert.match(row.raw.toString("latin1"), /with ESMTPA id /);
    assert.deepEqual((await deliveriesOf(row.id)).map((d) => [d.final_recipient, d.kind, d.remote_domain]), [["friend@remote.example", "remote", "remote.example"]]);
    client.close();
  });
});

describe("failures answer 451 4.3.0 and keep nothing", () => {
  test("PostgreSQL going away after RCPT: DATA is 451 4.3.0 and nothing is half-written", async () => {
    const proxy = await tcpProxy(5432);
    const url = new URL(env.db.url);
    url.port = String(proxy.port);
    const pool = createPool({ url: url.toString(), max: 4 });
    const server = await startIntake(pool, env.bus);
    extra.push(server);
    const before = await messageCount(env.pool);
    const client = await open(server.port());
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    await proxy.cut();
    assert.equal((await client.command("RCPT TO:<user2@example.test>")).text.slice(0, 9), "451 4.3.0");
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage()));
    assert.match((await client.reply()).text, /^451 4\.3\.0 /);
    assert.equal(await messageCount(env.pool), before);
    client.close();
    await server.stop(100);
    await pool.end().catch(() => undefined);
  });

  test("NATS disconnected: DATA is 451 4.3.0 and nothing is stored", async () => {
    const proxy = await tcpProxy(4222);
    const bus = await connectBus({ url: `nats://127.0.0.1:${proxy.port}`, name: "intake-test-cut", prefix: env.testBus.prefix });
    await provisionBus(bus);
    const server = await startIntake(env.pool, bus);
    extra.push(server);
    const before = await messageCount(env.pool);
    const client = await open(server.port());
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    await proxy.cut();
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal((await client.command("DATA")).code, 354);
    client.write(dataPayload(sampleMessage()));
    assert.match((await client.reply()).text, /^451 4\.3\.0 /);
    assert.equal(await messageCount(env.pool), before);
    client.close();
    await server.stop(100);
    bus.nc.close().catch(() => undefined);
  });
});

describe("shutdown", () => {
  test("stop() lets a transaction in progress finish and refuses new connections", async () => {
    const server = await startIntake(env.pool, env.bus);
    const client = await open(server.port());
    assert.equal((await client.command("MAIL FROM:<sender@remote.example>")).code, 250);
    assert.equal((await client.command("RCPT TO:<user1@example.test>")).code, 250);
    assert.equal((await client.command("DATA")).code, 354);
    const stopping = server.stop(5_000);
    client.write(dataPayload(sampleMessage({ subject: "during shutdown" })));
    const reply = await client.reply();
    assert.equal(reply.code, 250);
    assert.equal((await client.command("QUIT")).code, 421, "no new command once shutdown began");
    await stopping;
    await assert.rejects(RawSmtp.connect(server.port()));
    assert.deepEqual((await deliveryTargets(env.pool)).includes("user1@example.test"), true);
  });
});
