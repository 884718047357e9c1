import assert from "node:assert/strict";
import { createServer, type Server } from "node:net";
import { after, before, test } from "node:test";
import { simpleParser } from "mailparser";
import { composeDsn } from "@mailstack/dsn";
import { createLogger, registry } from "@mailstack/telemetry";
import { createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { startOutbound, type OutboundService } from "../src/service.ts";
import { SmtpConnection, SmtpError, rfcTimeouts } from "../src/smtp-client.ts";
import { createRelay } from "../src/relay.ts";
import { DestinationResolver } from "../src/destination.ts";
import { relayConfig } from "../src/service.ts";
import { parseWithPython } from "../../../packages/dsn/test/python-email.ts";
import { deliveryStates, startDns, startMx, submit, testConfig, type ReceivedMessage } from "./helpers.ts";
import { startScriptedMx } from "./scripted-mx.ts";

let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDns>>;
let mxA: Awaited<ReturnType<typeof startMx>>;
let mxB: Awaited<ReturnType<typeof startMx>>;
let origin: Awaited<ReturnType<typeof startMx>>;
let plain: Awaited<ReturnType<typeof startMx>>;
let small: Awaited<ReturnType<typeof startMx>>;
let smart: Awaited<ReturnType<typeof startMx>>;
let oldTls: Awaited<ReturnType<typeof startMx>>;
let silent: Server;
let greet554: Awaited<ReturnType<typeof startScriptedMx>>;
let tooMany: Awaited<ReturnType<typeof startScriptedMx>>;
let idle421: Awaited<ReturnType<typeof startScriptedMx>>;
let ipLiteral: Awaited<ReturnType<typeof startScriptedMx>>;
let dropper: Awaited<ReturnType<typeof startScriptedMx>>;
let afterDot: Awaited<ReturnType<typeof startScriptedMx>>;
let noUtf8: Awaited<ReturnType<typeof startScriptedMx>>;
let resetting: Awaited<ReturnType<typeof startScriptedMx>>;
let oneEach: Awaited<ReturnType<typeof startScriptedMx>>;
let slow: Awaited<ReturnType<typeof startScriptedMx>>;
let asciiOnly: Awaited<ReturnType<typeof startScriptedMx>>;
let eaiAscii: Awaited<ReturnType<typeof startScriptedMx>>;
let eaiUtf8: Awaited<ReturnType<typeof startScriptedMx>>;
let outbound: OutboundService;
let relayEnv: Record<string, string>;
const flakyAttempts = new Map<string, number>();

before(async () => {
  env = await createTestEnv();
  // Remote MX hosts on distinct loopback addresses sharing one port (RELAY_DEST_PORT).
  mxA = await startMx("127.0.0.2", 0, {
    onRcpt(address) {
      if (address.startsWith("bad")) return { code: 550, message: "5.1.1 No such user here" };
      if (address.startsWith("flaky")) {
        const seen = (flakyAttempts.get(address) ?? 0) + 1;
        flakyAttempts.set(address, seen);
        if (seen === 1) return { code: 451, message: "4.3.2 Try again later" };
      }
      return null;
    },
  });
  const port = mxA.port;
  mxB = await startMx("127.0.0.3", port);
  origin = await startMx("127.0.0.4", port);
  plain = await startMx("127.0.0.5", port, { noTls: true, hide8BitMime: true });
  small = await startMx("127.0.0.6", port, { size: 2000 });
  smart = await startMx("127.0.0.8", 0, { auth: { user: "relay", pass: "s3cret" } });
  // Offers STARTTLS but only TLS 1.0/1.1, which the client refuses: the handshake fails.
  oldTls = await startMx("127.0.0.10", port, { tls: { minVersion: "TLSv1", maxVersion: "TLSv1.1" } });
  // An MX that accepts connections and never says a word.
  silent = createServer(() => undefined);
  await new Promise<void>((resolve) => silent.listen(port, "127.0.0.7", resolve));
  // Scripted MX hosts for the answers smtp-server does not give.
  greet554 = await startScriptedMx("127.0.0.11", port, { greeting: "554 5.7.1 mx.greet554.test no SMTP service for you" });
  // At most two RCPTs per transaction: the third gets 452 (or the old 552 for toomany552.test).
  let rcpts = 0;
  tooMany = await startScriptedMx("127.0.0.12", port, {
    reply(command) {
      if (command.startsWith("MAIL")) rcpts = 0;
      if (!command.startsWith("RCPT")) return undefined;
      if (++rcpts <= 2) return undefined;
      return command.includes("@toomany552.test") ? "552 5.5.3 Too many recipients" : "452 4.5.3 Too many recipients";
    },
  });
  // Gives up on an idle connection with a 421, and closes it only a while later.
  idle421 = await startScriptedMx("127.0.0.13", port, {
    dataReply(_data, connection) {
      setTimeout(() => connection.write("421 4.4.2 mx.stale.test Error: timeout exceeded\r\n"), 50);
      setTimeout(() => connection.close(), 1_500);
      return undefined;
    },
  });
  ipLiteral = await startScriptedMx("127.0.0.14", port);
  // Drops the connection when the client says DATA.
  dropper = await startScriptedMx("127.0.0.15", port, {
    reply(command, connection) {
      if (command !== "DATA") return undefined;
      connection.close();
      return null;
    },
  });
  noUtf8 = await startScriptedMx("127.0.0.17", port, { extensions: ["PIPELINING", "8BITMIME", "DSN"] });
  // Refuses recipients named "bad..." with a reply that has no enhanced status code.
  // One message per connection: the second MAIL gets 421 and the connection is closed.
  oneEach = await startScriptedMx("127.0.0.19", port, {
    reply(command, connection) {
      if (!command.startsWith("MAIL") || connection.commands.filter((c) => c.startsWith("MAIL")).length < 2) return undefined;
      connection.close();
      return "421 4.7.0 mx.busy.test Too many messages on this connection";
    },
  });
  // Answers the final dot only after 1.2 s: longer than the short lease of the lease test.
  slow = await startScriptedMx("127.0.0.20", port, {
    dataReply(_data, connection) {
      setTimeout(() => connection.write("250 2.0.0 queued after a while\r\n"), 1_200);
      return null;
    },
  });
  // 8BITMIME and DSN but no SMTPUTF8, for the per-recipient SMTPUTF8 tests.
  asciiOnly = await startScriptedMx("127.0.0.21", port, { extensions: ["PIPELINING", "8BITMIME", "DSN"] });
  // For the RFC 6533 tests (DSNs of internationalized messages, utf-8 ORCPT): DSN without and with SMTPUTF8.
  eaiAscii = await startScriptedMx("127.0.0.22", port, { extensions: ["PIPELINING", "8BITMIME", "DSN"] });
  eaiUtf8 = await startScriptedMx("127.0.0.23", port);
  resetting = await startScriptedMx("127.0.0.18", port, { reply: (command) => (command.startsWith("RCPT TO:<bad") ? "550 no such user" : undefined) });
  afterDot = await startScriptedMx("127.0.0.16", port, { dataReply: (data) => (data.includes("reject-me") ? "554 5.6.0 Content refused" : "451 4.3.0 Queue full, later") });
  dns = await startDns({
    "pref.test": { mx: [{ exchange: "mx-b.pref.test", priority: 20 }, { exchange: "mx-a.pref.test", priority: 10 }] },
    "mx-a.pref.test": { a: ["127.0.0.2"] },
    "mx-b.pref.test": { a: ["127.0.0.3"] },
    "fall.test": { mx: [{ exchange: "dead.fall.test", priority: 10 }, { exchange: "mx-b.fall.test", priority: 20 }] },
    "dead.fall.test": { a: ["127.0.0.9"] },
    "mx-b.fall.test": { a: ["127.0.0.3"] },
    "implicit.test": { a: ["127.0.0.3"] },
    "nullmx.test": { mx: [{ exchange: "", priority: 0 }] },
    "origin.test": { mx: [{ exchange: "mx.origin.test", priority: 10 }] },
    "mx.origin.test": { a: ["127.0.0.4"] },
    "bounce.test": { mx: [{ exchange: "mx.bounce.test", priority: 10 }] },
    "mx.bounce.test": { a: ["127.0.0.2"] },
    "flaky.test": { mx: [{ exchange: "mx.flaky.test", priority: 10 }] },
    "mx.flaky.test": { a: ["127.0.0.2"] },
    "expire.test": { mx: [{ exchange: "mx.expire.test", priority: 10 }] },
    "mx.expire.test": { a: ["127.0.0.9"] },
    "slow.test": { mx: [{ exchange: "mx.expire.test", priority: 10 }] },
    "plain.test": { mx: [{ exchange: "mx.plain.test", priority: 10 }] },
    "plainok.test": { mx: [{ exchange: "mx.plain.test", priority: 10 }] },
    "mx.plain.test": { a: ["127.0.0.5"] },
    "small.test": { mx: [{ exchange: "mx.small.test", priority: 10 }] },
    "mx.small.test": { a: ["127.0.0.6"] },
    "servfail.test": { servfail: true },
    "oldtls.test": { mx: [{ exchange: "mx.oldtls.test", priority: 10 }] },
    "mx.oldtls.test": { a: ["127.0.0.10"] },
    "silent.test": { mx: [{ exchange: "mx.silent.test", priority: 10 }] },
    "mx.silent.test": { a: ["127.0.0.7"] },
    "v6.test": { mx: [{ exchange: "mx.v6.test", priority: 10 }] },
    "mx.v6.test": { aaaa: ["::1"] },
    "v6implicit.test": { aaaa: ["::1"] },
    "greet554.test": { mx: [{ exchange: "mx.greet554.test", priority: 10 }, { exchange: "mx-b.pref.test", priority: 20 }] },
    "mx.greet554.test": { a: ["127.0.0.11"] },
    "greetonly.test": { mx: [{ exchange: "mx.greet554.test", priority: 10 }] },
    "toomany.test": { mx: [{ exchange: "mx.toomany.test", priority: 10 }] },
    "toomany552.test": { mx: [{ exchange: "mx.toomany.test", priority: 10 }] },
    "mx.toomany.test": { a: ["127.0.0.12"] },
    "stale.test": { mx: [{ exchange: "mx.stale.test", priority: 10 }] },
    "mx.stale.test": { a: ["127.0.0.13"] },
    "iplit.test": { mx: [{ exchange: "127.0.0.14", priority: 10 }, { exchange: "mx-b.pref.test", priority: 20 }] },
    "cname.test": { mx: [{ exchange: "alias.cname.test", priority: 10 }] },
    "alias.cname.test": { cname: "mx-b.pref.test" },
    "noaddr.test": { mx: [{ exchange: "nowhere.noaddr.test", priority: 10 }, { exchange: "empty.noaddr.test", priority: 15 }, { exchange: "mx-b.pref.test", priority: 20 }] },
    "empty.noaddr.test": {},
    "drop.test": { mx: [{ exchange: "mx.drop.test", priority: 10 }, { exchange: "mx-b.pref.test", priority: 20 }] },
    "mx.drop.test": { a: ["127.0.0.15"] },
    "dot.test": { mx: [{ exchange: "mx.dot.test", priority: 10 }] },
    "mx.dot.test": { a: ["127.0.0.16"] },
    "busy.test": { mx: [{ exchange: "mx.busy.test", priority: 10 }] },
    "mx.busy.test": { a: ["127.0.0.19"] },
    "rset.test": { mx: [{ exchange: "mx.rset.test", priority: 10 }] },
    "lease.test": { mx: [{ exchange: "mx.lease.test", priority: 10 }] },
    "mx.lease.test": { a: ["127.0.0.20"] },
    "mx.rset.test": { a: ["127.0.0.18"] },
    "equal.test": { mx: [{ exchange: "c.equal.test", priority: 5 }, { exchange: "a.equal.test", priority: 1 }, { exchange: "b.equal.test", priority: 1 }] },
    "a.equal.test": { a: ["127.0.0.2"] },
    "b.equal.test": { a: ["127.0.0.3"] },
    "c.equal.test": { a: ["127.0.0.4"] },
    "noutf8.test": { mx: [{ exchange: "mx.noutf8.test", priority: 10 }] },
    "mx.noutf8.test": { a: ["127.0.0.17"] },
    "asciionly.test": { mx: [{ exchange: "mx.asciionly.test", priority: 10 }] },
    "mx.asciionly.test": { a: ["127.0.0.21"] },
    "eai-ascii.test": { mx: [{ exchange: "mx.eai-ascii.test", priority: 10 }] },
    "mx.eai-ascii.test": { a: ["127.0.0.22"] },
    "eai-utf8.test": { mx: [{ exchange: "mx.eai-utf8.test", priority: 10 }] },
    "mx.eai-utf8.test": { a: ["127.0.0.23"] },
  });
  relayEnv = {
    DNS_SERVERS: dns.server,
    RELAY_DEST_PORT: String(port),
    RELAY_BACKOFF: "1s",
    RELAY_SCHEDULER_INTERVAL: "200ms",
    RELAY_DSN_INTERVAL: "200ms",
    RELAY_CONNECT_TIMEOUT: "2s",
    RELAY_REQUIRE_TLS_DOMAINS: "plain.test",
    RELAY_IDLE_CONNECTION: "3s",
    RELAY_GREETING_TIMEOUT: "1s",
    RELAY_SMARTHOST_DOMAINS: `smart.test=127.0.0.8:${smart.port}`,
    RELAY_SMARTHOST_USER: "relay",
    RELAY_SMARTHOST_PASSWORD: "s3cret",
    RELAY_SMARTHOST_TLS_VERIFY: "false",
  };
  const config = testConfig(relayEnv);
  outbound = startOutbound({ pool: env.pool, bus: env.bus, logger: createLogger("mta-outbound", "silent"), config });
});

after(async () => {
  await outbound?.stop();
  await Promise.all([mxA, mxB, origin, plain, small, smart, oldTls, greet554, tooMany, idle421, ipLiteral, dropper, afterDot, noUtf8, resetting, oneEach, slow, asciiOnly, eaiAscii, eaiUtf8].map((s) => s?.close()));
  silent?.close();
  await dns?.close();
  await env?.close();
});

const to = (server: { received: ReceivedMessage[] }, address: string) => server.received.filter((m) => m.to.includes(address));

async function finalStates(messageId: number, timeoutMs = 15_000): Promise<Awaited<ReturnType<typeof deliveryStates>>> {
  return waitFor(async () => {
    const rows = await deliveryStates(env.pool, messageId);
    return rows.every((r) => r.state === "delivered" || r.state === "bounced") ? rows : null;
  }, timeoutMs).then((rows) => rows!);
}

/** The DSNs that reached the sender's MX for the given original recipient. */
async function dsnsFor(recipient: string, count = 1): Promise<ReceivedMessage[]> {
  const found = await waitFor(() => {
    const list = origin.received.filter((m) => m.from === "" && m.body.toString().includes(recipient));
    return list.length >= count ? list : null;
  }, 15_000);
  return found!;
}

test("delivers to the preferred MX in one transaction with every recipient of the domain, over STARTTLS", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["one@pref.test", "two@pref.test"] });
  const rows = await finalStates(accepted.messageId);
  assert.deepEqual(rows.map((r) => r.state), ["delivered", "delivered"]);
  assert.equal(rows[0]!.remote_mta, "mx-a.pref.test");
  const got = to(mxA, "one@pref.test");
  assert.equal(got.length, 1, "one transaction");
  assert.deepEqual(got[0]!.to.sort(), ["one@pref.test", "two@pref.test"]);
  assert.equal(got[0]!.secure, true, "opportunistic STARTTLS was used");
  assert.equal(to(mxB, "one@pref.test").length, 0);
});

test("falls back to the next MX when the preferred one refuses connections", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["x@fall.test"] });
  const rows = await finalStates(accepted.messageId);
  assert.equal(rows[0]!.state, "delivered");
  assert.equal(rows[0]!.remote_mta, "mx-b.fall.test");
  assert.equal(to(mxB, "x@fall.test").length, 1);
});

test("uses the implicit MX (A record) when a domain has no MX", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["y@implicit.test"] });
  const rows = await finalStates(accepted.messageId);
  assert.equal(rows[0]!.state, "delivered");
  assert.equal(to(mxB, "y@implicit.test").length, 1);
});

test("delivers to an IPv6-only MX (AAAA)", async () => {
  const v6 = await startMx("::1", mxA.port);
  try {
    const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["z@v6.test"] });
    const rows = await finalStates(accepted.messageId);
    assert.equal(rows[0]!.state, "delivered");
    assert.equal(v6.received.length, 1);
  } finally {
    await v6.close();
  }
});

test("a null MX bounces at once, and the DSN reaches the sender", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["n@nullmx.test"] });
  const rows = await finalStates(accepted.messageId);
  assert.equal(rows[0]!.state, "bounced");
  assert.equal(rows[0]!.last_status, "5.1.10");
  assert.equal(rows[0]!.attempts, 1);
  const [dsn] = await dsnsFor("n@nullmx.test");
  assert.deepEqual(dsn!.to, ["alice@origin.test"]);
  assert.match(dsn!.body.toString(), /Status: 5\.1\.10/);
});

test("per-recipient results: 5xx recipients bounce, others are delivered, and ONE DSN covers both failures", async () => {
  const accepted = await submit(env.pool, env.bus, {
    from: "alice@origin.test",
    to: ["good@bounce.test", "bad1@bounce.test", "bad2@bounce.test"],
    envid: "ENV-42",
  });
  const rows = await finalStates(accepted.messageId);
  assert.deepEqual(rows.map((r) => [r.final_recipient, r.state]), [
    ["good@bounce.test", "delivered"],
    ["bad1@bounce.test", "bounced"],
    ["bad2@bounce.test", "bounced"],
  ]);
  assert.equal(to(mxA, "good@bounce.test").length, 1);
  await dsnsFor("bad1@bounce.test");
  await new Promise((resolve) => setTimeout(resolve, 500));
  const dsns = origin.received.filter((m) => m.from === "" && m.body.toString().includes("bounce.test"));
  assert.equal(dsns.length, 1, "the two failures of one message give one bounce");

  const parsed = await simpleParser(dsns[0]!.body);
  assert.match(parsed.headers.get("content-type") ? String((parsed.headers.get("content-type") as { value: string }).value) : "", /multipart\/report/);
  assert.equal(parsed.subject, "Undelivered Mail Returned to Sender");
  // mailparser shows the message/delivery-status part inline, after the human-readable part.
  assert.match(parsed.text ?? "", /could not be delivered/);
  const text = (parsed.text ?? "").slice((parsed.text ?? "").indexOf("Reporting-MTA:"));
  assert.match(dsns[0]!.body.toString(), /Content-Type: message\/delivery-status/);
  assert.match(text, /Reporting-MTA: dns; relay\.test/);
  assert.match(text, /Original-Envelope-Id: ENV-42/);
  assert.match(text, /Final-Recipient: rfc822;bad1@bounce\.test/);
  assert.match(text, /Final-Recipient: rfc822;bad2@bounce\.test/);
  assert.doesNotMatch(text, /good@bounce\.test/);
  assert.match(text, /Action: failed/);
  assert.match(text, /Status: 5\.1\.1/);
  assert.match(text, /Remote-MTA: dns; mx\.bounce\.test/);
  assert.match(text, /Diagnostic-Code: smtp; 550 5\.1\.1 No such user here/);
  const original = parsed.attachments.find((a) => a.contentType === "message/rfc822");
  assert.ok(original, "the original message is returned (RET unset, small message)");
  assert.match(original.content.toString(), /Subject: test/);
});

test("a 4xx is deferred with next_attempt_at, then delivered on the scheduled retry", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["flaky@flaky.test"] });
  const deferred = await waitFor(async () => {
    const rows = await deliveryStates(env.pool, accepted.messageId);
    return rows[0]!.attempts >= 1 ? rows[0] : null;
  });
  assert.equal(deferred!.state, "deferred");
  assert.match(deferred!.last_reply!, /^451 4\.3\.2/);
  assert.ok(deferred!.next_attempt_at, "next attempt scheduled");
  const rows = await finalStates(accepted.messageId);
  assert.equal(rows[0]!.state, "delivered");
  assert.equal(rows[0]!.attempts, 2);
  assert.equal(to(mxA, "flaky@flaky.test").length, 1);
});

test("a delivery past the maximum queue lifetime bounces instead of being deferred", async () => {
  const accepted = await submit(env.pool, env.bus, {
    from: "alice@origin.test",
    to: ["old@expire.test"],
    beforeDispatch: (id) => env.pool.query("UPDATE messages SET received_at = now() - interval '6 days' WHERE id = $1", [id]).then(() => undefined),
  });
  const rows = await finalStates(accepted.messageId);
  assert.equal(rows[0]!.state, "bounced");
  assert.equal(rows[0]!.last_status, "5.4.7");
  const events = await env.pool.query("SELECT event FROM delivery_events WHERE message_id = $1 ORDER BY id", [accepted.messageId]);
  assert.ok(events.rows.some((e) => e.event === "expired"));
  const [dsn] = await dsnsFor("old@expire.test");
  assert.match(dsn!.body.toString(), /delivery time expired/);
});

test("a delivery deferred for longer than the delay threshold gets ONE delay notice (Action: delayed)", async () => {
  const accepted = await submit(env.pool, env.bus, {
    from: "alice@origin.test",
    to: ["late@slow.test"],
    beforeDispatch: (id) => env.pool.query("UPDATE deliveries SET created_at = now() - interval '5 hours' WHERE message_id = $1", [id]).then(() => undefined),
  });
  const [dsn] = await dsnsFor("late@slow.test");
  const text = dsn!.body.toString();
  assert.match(text, /Action: delayed/);
  assert.match(text, /Subject: Delayed Mail/);
  // Will-Retry-Until (RFC 3464 2.3.9): the arrival plus RELAY_MAX_QUEUE_LIFETIME (5d by default), when it would expire.
  const view = await parseWithPython(dsn!.body);
  const received = (await env.pool.query<{ received_at: Date }>("SELECT received_at FROM messages WHERE id = $1", [accepted.messageId])).rows[0]!.received_at;
  assert.equal(new Date(view.status[1]!["Will-Retry-Until"]!).getTime(), Math.floor(received.getTime() / 1000) * 1000 + 5 * 86_400_000);
  const row = await waitFor(async () => {
    const rows = await deliveryStates(env.pool, accepted.messageId);
    return rows[0]!.attempts >= 2 ? rows[0] : null;
  }, 15_000);
  assert.equal(row!.state === "deferred" || row!.state === "queued", true, "still being retried");
  assert.equal(row!.dsn_state, "sent");
  assert.equal(origin.received.filter((m) => m.from === "" && m.body.toString().includes("late@slow.test")).length, 1, "one notice, not one per attempt");
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [accepted.messageId]);
});

test("TLS required for a domain whose MX offers no STARTTLS defers; opportunistic goes in clear", async () => {
  const required = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["t@plain.test"] });
  const row = await waitFor(async () => {
    const rows = await deliveryStates(env.pool, required.messageId);
    return rows[0]!.attempts >= 1 ? rows[0] : null;
  });
  assert.equal(row!.state, "deferred");
  assert.equal(row!.last_status, "4.7.10");
  assert.equal(to(plain, "t@plain.test").length, 0);
  const optional = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["t@plainok.test"] });
  await finalStates(optional.messageId);
  const got = to(plain, "t@plainok.test");
  assert.equal(got.length, 1);
  assert.equal(got[0]!.secure, false);
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [required.messageId]);
});

test("8-bit data to a server without 8BITMIME and a message over the server's SIZE bounce clearly", async () => {
  const eight = await submit(env.pool, env.bus, {
    from: "",
    to: ["e@plainok.test"],
    raw: Buffer.from("Subject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n", "latin1"),
  });
  const big = await submit(env.pool, env.bus, { from: "", to: ["b@small.test"], raw: `Subject: big\r\n\r\n${"x".repeat(70)}\r\n`.repeat(40) });
  const [e] = await finalStates(eight.messageId);
  const [b] = await finalStates(big.messageId);
  assert.equal(e!.state, "bounced");
  assert.equal(e!.last_status, "5.6.3");
  assert.equal(b!.state, "bounced");
  assert.equal(b!.last_status, "5.3.4");
  assert.equal(to(small, "b@small.test").length, 0);
  // Null sender: no bounce of a bounce.
  const dsn = await waitFor(async () => {
    const rows = await deliveryStates(env.pool, eight.messageId);
    return rows[0]!.dsn_state === "suppressed" ? rows[0] : null;
  });
  assert.equal(dsn!.dsn_state, "suppressed");
});

test("what goes out is CRLF-only and dot-stuffed, whatever the stored message holds", async () => {
  // Bare LF and a bare "\n.\n" (an SMTP smuggling attempt) in the stored bytes.
  const raw = Buffer.from("Subject: smuggle\n\nline one\n.\nMAIL FROM:<evil@x>\r\n..double\r\nlast\rend");
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["s@pref.test"], raw });
  await finalStates(accepted.messageId);
  const got = to(mxA, "s@pref.test");
  assert.equal(got.length, 1, "one message, not two");
  // smtp-server removes the stuffing: the receiver sees the lines as they were, with CRLF.
  assert.equal(got[0]!.body.toString(), "Subject: smuggle\r\n\r\nline one\r\n.\r\nMAIL FROM:<evil@x>\r\n..double\r\nlast\r\nend\r\n");
});

test("DSN parameters are passed on when the server offers DSN", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["d@pref.test"], notify: ["SUCCESS", "FAILURE"], orcpt: "rfc822;D@pref.test", ret: "HDRS", envid: "E1" });
  await finalStates(accepted.messageId);
  const got = to(mxA, "d@pref.test")[0]!;
  assert.equal(got.mailParams.RET, "HDRS");
  assert.equal(got.mailParams.ENVID, "E1");
  assert.equal(got.rcptParams[0]!.NOTIFY, "SUCCESS,FAILURE");
  assert.equal(got.rcptParams[0]!.ORCPT, "rfc822;D@pref.test");
});

test("several jobs to one host reuse connections", async () => {
  const before = mxA.connections();
  // One after the other, so each job finds the previous one's connection idle.
  for (let i = 0; i < 10; i++) {
    const m = await submit(env.pool, env.bus, { from: "alice@origin.test", to: [`r${i}@bounce.test`] });
    await finalStates(m.messageId);
  }
  const opened = mxA.connections() - before;
  assert.ok(opened <= 2, `10 messages used ${opened} new connections`);
  assert.equal(mxA.received.filter((m) => /^r\d@bounce\.test$/.test(m.to[0]!)).length, 10);
});

test("a server that never greets times out (RFC 5321 4.5.3.2) and the delivery is deferred", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["q@silent.test"] });
  const row = await waitFor(async () => {
    const rows = await deliveryStates(env.pool, accepted.messageId);
    return rows[0]!.attempts >= 1 ? rows[0] : null;
  });
  assert.equal(row!.state, "deferred");
  assert.equal(row!.last_status, "4.4.2");
  assert.match(row!.last_reply!, /timed out .* greeting/);
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [accepted.messageId]);
});

test("a per-domain smart host replaces MX lookup, with AUTH over required STARTTLS", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["p@smart.test"] });
  const [row] = await finalStates(accepted.messageId);
  assert.equal(row!.state, "delivered");
  const got = to(smart, "p@smart.test");
  assert.equal(got.length, 1);
  assert.equal(got[0]!.secure, true);
  assert.equal(got[0]!.user, "relay");
});

test("relay results and attempt durations are on /metrics", async () => {
  const text = await registry.metrics();
  const delivered = /mail_relay_recipient_results_total\{outcome="delivered"\} (\d+)/.exec(text);
  assert.ok(delivered && Number(delivered[1]) >= 10, "delivered results counted");
  assert.match(text, /mail_relay_recipient_results_total\{outcome="bounced"\} [1-9]/);
  assert.match(text, /mail_relay_attempt_seconds_count [1-9]/);
  // Observed for delivered results only: a deferred or bounced one cannot become a duplicate.
  const unrecorded = /mail_relay_unrecorded_seconds_count (\d+)/.exec(text);
  assert.ok(unrecorded && Number(unrecorded[1]) >= 10 && Number(unrecorded[1]) <= Number(delivered![1]), `unrecorded window observations: ${unrecorded?.[1]}`);
});

test("opportunistic TLS: a failed STARTTLS handshake is retried in clear", async () => {
  // The server does offer STARTTLS, and the handshake itself fails...
  await assert.rejects(
    SmtpConnection.open({ hostname: "mx.oldtls.test", address: "127.0.0.10", port: mxA.port, heloName: "t", tls: "opportunistic", timeouts: rfcTimeouts }),
    (error) => error instanceof SmtpError && error.stage === "starttls",
  );
  // ...so the relay delivers on a new connection without TLS.
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["o@oldtls.test"] });
  const [row] = await finalStates(accepted.messageId);
  assert.equal(row!.state, "delivered");
  const got = to(oldTls, "o@oldtls.test");
  assert.equal(got.length, 1);
  assert.equal(got[0]!.secure, false);
});

test("the same job handled three times at once (two workers, and twice in one) is sent once", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["once1@pref.test", "once2@pref.test"], dispatch: false });
  const logger = createLogger("test", "silent");
  const one = createRelay({ pool: env.pool, logger, config: relayConfig(testConfig(relayEnv)) });
  const two = createRelay({ pool: env.pool, logger, config: relayConfig(testConfig(relayEnv)) });
  const job = { messageId: accepted.messageId, domain: "pref.test", deliveryIds: accepted.deliveries.map((d) => d.id) };
  await Promise.all([one.handle(job), one.handle(job), two.handle(job)]);
  await Promise.all([one.handle(job), two.handle(job)]); // already delivered: nothing to do
  await Promise.all([one.close(), two.close()]);
  const rows = await deliveryStates(env.pool, accepted.messageId);
  assert.deepEqual(rows.map((r) => [r.state, r.attempts]), [["delivered", 1], ["delivered", 1]]);
  assert.equal(to(mxA, "once1@pref.test").length, 1);
});

test("a worker renews its lease while a slow attempt lasts: another worker cannot take the job and send it again", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["holder@lease.test"], dispatch: false });
  const logger = createLogger("test", "silent");
  const shortLease = { ...testConfig({ ...relayEnv, RELAY_LEASE: "300ms" }) };
  const one = createRelay({ pool: env.pool, logger, config: relayConfig(shortLease) });
  const two = createRelay({ pool: env.pool, logger, config: relayConfig(shortLease) });
  const job = { messageId: accepted.messageId, domain: "lease.test", deliveryIds: accepted.deliveries.map((d) => d.id) };
  const first = one.handle(job);
  // Well past the first lease, while the remote still holds back its answer to the dot.
  await waitFor(() => slow.connections.some((c) => c.messages.length > 0), 5_000);
  await new Promise((resolve) => setTimeout(resolve, 600));
  const { rows } = await env.pool.query<{ lease_owner: string | null; held: boolean }>(
    "SELECT lease_owner, lease_until > now() AS held FROM deliveries WHERE id = $1",
    [accepted.deliveries[0]!.id],
  );
  assert.deepEqual(rows[0], { lease_owner: one.workerId, held: true }, "the lease is still the first worker's");
  await two.handle(job);
  await first;
  await Promise.all([one.close(), two.close()]);
  assert.equal(slow.connections.reduce((n, c) => n + c.messages.length, 0), 1, "the remote got one copy");
  const states = await deliveryStates(env.pool, accepted.messageId);
  assert.deepEqual(states.map((r) => [r.state, r.attempts]), [["delivered", 1]]);
});

test("DNS: SERVFAIL defers (4.4.3), a domain that does not exist bounces (5.1.2)", async () => {
  const broken = await submit(env.pool, env.bus, { from: "", to: ["a@servfail.test"] });
  const missing = await submit(env.pool, env.bus, { from: "", to: ["a@nowhere.test"] });
  const row = await waitFor(async () => {
    const rows = await deliveryStates(env.pool, broken.messageId);
    return rows[0]!.attempts >= 1 ? rows[0] : null;
  });
  assert.equal(row!.state, "deferred");
  assert.equal(row!.last_status, "4.4.3");
  const [gone] = await finalStates(missing.messageId);
  assert.equal(gone!.state, "bounced");
  assert.equal(gone!.last_status, "5.1.2");
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [broken.messageId]);
});

test("a 554 greeting: QUIT, then the next MX (RFC 5321 3.1, 5.1)", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["g@greet554.test"] });
  const [row] = await finalStates(accepted.messageId);
  assert.equal(row!.state, "delivered");
  assert.equal(row!.remote_mta, "mx-b.pref.test");
  assert.equal(row!.attempts, 1);
  await waitFor(() => greet554.commands().includes("QUIT"), 2_000);
  assert.deepEqual(greet554.commands(), ["QUIT"], "nothing but QUIT to a server that refused service");
});

test("every MX refusing at its greeting (554) defers the delivery, it does not bounce", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["g@greetonly.test"] });
  const row = await waitFor(async () => {
    const [r] = await deliveryStates(env.pool, accepted.messageId);
    return r && r.attempts >= 1 ? r : null;
  });
  assert.equal(row.state, "deferred");
  assert.match(row.last_status ?? "", /^4\./);
  assert.match(row.last_reply ?? "", /554/);
  // No more attempts for the rest of this file.
  await env.pool.query("UPDATE deliveries SET state = 'cancelled', next_attempt_at = NULL WHERE message_id = $1", [accepted.messageId]);
});

test("452 (and the old 552) 'too many recipients': the rest go in further transactions at once, none bounces", async () => {
  const four = ["a", "b", "c", "d"].map((n) => `${n}@toomany.test`);
  const five = ["a", "b", "c", "d", "e"].map((n) => `${n}@toomany552.test`);
  const first = await submit(env.pool, env.bus, { from: "alice@origin.test", to: four });
  const second = await submit(env.pool, env.bus, { from: "alice@origin.test", to: five });
  for (const [accepted, count] of [[first, 4], [second, 5]] as const) {
    const rows = await finalStates(accepted.messageId);
    assert.deepEqual(rows.map((r) => [r.state, r.attempts]), Array(count).fill(["delivered", 1]), "each delivered on the first attempt");
  }
  const messages = tooMany.connections.flatMap((c) => c.messages);
  assert.equal(messages.length, 2 + 3, "two transactions for four recipients, three for five");
});

test("a pooled connection the server gave up on while idle (421, not yet closed) is not a failed attempt", async () => {
  const first = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["one@stale.test"] });
  await finalStates(first.messageId);
  await waitFor(() => idle421.connections[0]!.commands.length > 0 && idle421.connections.length === 1, 2_000);
  await new Promise((resolve) => setTimeout(resolve, 200)); // the 421 has arrived; the socket is still open
  const second = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["two@stale.test"] });
  const [row] = await finalStates(second.messageId);
  assert.deepEqual([row!.state, row!.attempts], ["delivered", 1]);
  const events = await env.pool.query("SELECT event FROM delivery_events WHERE message_id = $1 ORDER BY id", [second.messageId]);
  assert.ok(!events.rows.some((e) => e.event === "deferred"), "no deferral recorded");
  assert.equal(idle421.connections.length, 2, "a fresh connection carried the second message");
  assert.ok(!idle421.connections[0]!.commands.some((c) => c.includes("two@stale.test")), "nothing of it went to the stale one");
});

test("a pooled connection whose next MAIL gets 421 (and is closed): the job goes on a fresh connection, no failed attempt", async () => {
  for (const name of ["one", "two"]) {
    const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: [`${name}@busy.test`] });
    const [row] = await finalStates(accepted.messageId);
    assert.deepEqual([row!.state, row!.attempts], ["delivered", 1], name);
  }
  assert.equal(oneEach.connections.length, 2);
  assert.equal(oneEach.connections.flatMap((c) => c.messages).length, 2);
});

test("MX selection: an MX holding an IP address is skipped; an MX that is an alias (CNAME) or has no address is followed or skipped", async () => {
  const literal = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["i@iplit.test"] });
  const alias = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["c@cname.test"] });
  const noAddress = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["n@noaddr.test"] });
  const [viaLiteral] = await finalStates(literal.messageId);
  assert.equal(viaLiteral!.state, "delivered");
  assert.equal(viaLiteral!.remote_mta, "mx-b.pref.test");
  assert.equal(ipLiteral.connections.length, 0, "no connection to the address in the MX record");
  const [viaAlias] = await finalStates(alias.messageId);
  assert.deepEqual([viaAlias!.state, viaAlias!.remote_mta], ["delivered", "alias.cname.test"]);
  assert.equal(to(mxB, "c@cname.test").length, 1);
  const [viaThird] = await finalStates(noAddress.messageId);
  assert.deepEqual([viaThird!.state, viaThird!.remote_mta, viaThird!.attempts], ["delivered", "mx-b.pref.test", 1]);
});

test("the implicit MX of a domain with only an AAAA record, on ::1", async () => {
  const v6 = await startMx("::1", mxA.port);
  try {
    const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["w@v6implicit.test"] });
    const [row] = await finalStates(accepted.messageId);
    assert.deepEqual([row!.state, row!.remote_mta], ["delivered", "v6implicit.test"]);
    assert.equal(v6.received.length, 1);
  } finally {
    await v6.close();
  }
});

test("a server that drops the connection mid-transaction: the next MX delivers", async () => {
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["d@drop.test"] });
  const [row] = await finalStates(accepted.messageId);
  assert.deepEqual([row!.state, row!.remote_mta, row!.attempts], ["delivered", "mx-b.pref.test", 1]);
  assert.ok(dropper.commands().includes("DATA"));
});

test("after the final dot: 5xx bounces with the server's status, 4xx defers", async () => {
  const refused = await submit(env.pool, env.bus, { from: "", to: ["r@dot.test"], raw: "Subject: x\r\n\r\nreject-me\r\n" });
  const later = await submit(env.pool, env.bus, { from: "", to: ["l@dot.test"] });
  const [bounced] = await finalStates(refused.messageId);
  assert.deepEqual([bounced!.state, bounced!.last_status, bounced!.last_reply], ["bounced", "5.6.0", "554 5.6.0 Content refused"]);
  const row = await waitFor(async () => {
    const rows = await deliveryStates(env.pool, later.messageId);
    return rows[0]!.attempts >= 1 ? rows[0] : null;
  });
  assert.deepEqual([row!.state, row!.last_status], ["deferred", "4.3.0"]);
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [later.messageId]);
});

test("the bounce as Python's email package reads it: ORCPT as Original-Recipient, the remote's status and reply, the 8-bit original", async () => {
  const raw = Buffer.from("From: <alice@origin.test>\r\nSubject: py\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u00fc\u00dfe\r\n", "utf8");
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["bad-py@bounce.test"], orcpt: "rfc822;Bad-Py@Bounce.test", envid: "PY-1", raw });
  await finalStates(accepted.messageId);
  const [dsn] = await dsnsFor("bad-py@bounce.test");
  assert.equal(dsn!.mailParams.BODY, "8BITMIME", "the 8-bit report went with BODY=8BITMIME");
  const view = await parseWithPython(dsn!.body);
  assert.deepEqual(view.defects, []);
  assert.equal(view.subject, "Undelivered Mail Returned to Sender");
  assert.deepEqual(view.parts.map((p) => [p.type, p.cte]).filter(([type]) => type !== "text/plain"), [
    ["multipart/report", "8bit"],
    ["message/delivery-status", null],
    ["message/rfc822", "8bit"],
  ]);
  const [perMessage, perRecipient] = view.status;
  assert.equal(perMessage!["Reporting-MTA"], "dns; relay.test");
  assert.equal(perMessage!["Original-Envelope-Id"], "PY-1");
  assert.match(perMessage!["Arrival-Date"]!, /^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000$/);
  assert.deepEqual(
    { ...perRecipient, "Last-Attempt-Date": undefined },
    {
      "Original-Recipient": "rfc822;Bad-Py@Bounce.test",
      "Final-Recipient": "rfc822;bad-py@bounce.test",
      Action: "failed",
      Status: "5.1.1",
      "Remote-MTA": "dns; mx.bounce.test",
      "Diagnostic-Code": "smtp; 550 5.1.1 No such user here",
      "Last-Attempt-Date": undefined,
    },
  );
});

test("UTF-8 header fields to a server without SMTPUTF8 bounce with 5.6.9 and nothing is sent (RFC 6531 3.2, 3.5)", async () => {
  const raw = Buffer.from("From: <alice@origin.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHallo.\r\n", "utf8");
  const accepted = await submit(env.pool, env.bus, { from: "", to: ["u@noutf8.test"], raw });
  const [row] = await finalStates(accepted.messageId);
  assert.deepEqual([row!.state, row!.last_status], ["bounced", "5.6.9"]);
  assert.match(row!.last_reply!, /SMTPUTF8/);
  assert.ok(!noUtf8.commands().some((c) => c.startsWith("MAIL")), "no MAIL was sent");
});

test("a non-ASCII recipient at a server without SMTPUTF8 bounces alone (5.6.7); the message goes to its ASCII recipients (RFC 6531 3.2)", async () => {
  // ASCII header fields (the UTF-8 recipient is not named in them): the message itself needs no SMTPUTF8.
  const ascii = "From: <alice@origin.test>\r\nTo: <ascii@asciionly.test>\r\nSubject: per recipient\r\nMessage-ID: <ascii-1@origin.test>\r\n\r\nHello.\r\n";
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["ascii@asciionly.test", "\u7528\u6237@asciionly.test"], raw: ascii });
  const rows = await finalStates(accepted.messageId);
  assert.deepEqual(rows.map((r) => [r.final_recipient, r.state, r.last_status]), [
    ["ascii@asciionly.test", "delivered", "2.0.0"],
    ["\u7528\u6237@asciionly.test", "bounced", "5.6.7"],
  ]);
  assert.equal(rows[1]!.last_reply, "the recipient address is not ASCII and mx.asciionly.test does not offer SMTPUTF8 (RFC 6531 3.2)");
  assert.equal(rows[1]!.remote_mta, "mx.asciionly.test");
  const sent = asciiOnly.connections.flatMap((c) => c.commands).filter((c) => /^(MAIL|RCPT)/.test(c));
  assert.deepEqual(sent, ["MAIL FROM:<alice@origin.test>", "RCPT TO:<ascii@asciionly.test>"], "only the ASCII recipient, and no SMTPUTF8");
  assert.equal(asciiOnly.connections.flatMap((c) => c.messages).length, 1);
  // The sender learns about the one refused recipient, with our own diagnostic.
  const [dsn] = await dsnsFor("\u7528\u6237@asciionly.test");
  const report = dsn!.body.toString("utf8");
  // An ASCII message: a plain delivery-status, the address in its 7-bit utf-8-addr-xtext form (RFC 6533 3).
  assert.match(report, /Final-Recipient: utf-8;\\x\{7528\}\\x\{6237\}@asciionly\.test\r\nAction: failed\r\nStatus: 5\.6\.7\r\n/);
  assert.match(report, /Diagnostic-Code: X-mailstack; the recipient address is not ASCII and\s+mx\.asciionly\.test does not offer SMTPUTF8/);
  assert.doesNotMatch(report, /Final-Recipient: rfc822;ascii@asciionly\.test/);

  // UTF-8 header fields: the message itself needs SMTPUTF8, so every recipient fails and nothing is sent.
  const raw = Buffer.from("From: <alice@origin.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHallo.\r\n", "utf8");
  const international = await submit(env.pool, env.bus, { from: "", to: ["ascii2@asciionly.test", "\u7528\u62372@asciionly.test"], raw });
  const failed = await finalStates(international.messageId);
  assert.deepEqual(failed.map((r) => [r.state, r.last_status]), [["bounced", "5.6.9"], ["bounced", "5.6.9"]]);
  assert.match(failed[0]!.last_reply!, /UTF-8 header fields.*SMTPUTF8/);
  assert.equal(asciiOnly.connections.flatMap((c) => c.commands).filter((c) => c.startsWith("MAIL")).length, 1, "no MAIL for it");
});

test("a DSN returning an internationalized original (message/global, message/global-headers) goes unencoded with SMTPUTF8 to a server that offers it (RFC 6531 3.2, RFC 6533)", async () => {
  const original = (from: string, id: string) => Buffer.from(`From: <${from}>\r\nTo: <x@bounce.test>\r\nSubject: Gr\u00fc\u00dfe\r\nMessage-ID: <${id}@origin.test>\r\n\r\nHallo.\r\n`, "utf8");
  const full = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["bad-intl-full@bounce.test"], raw: original("alice@origin.test", "intl-full") });
  const headers = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["bad-intl-hdrs@bounce.test"], raw: original("alice@origin.test", "intl-hdrs"), ret: "HDRS" });
  await Promise.all([finalStates(full.messageId), finalStates(headers.messageId)]);
  const [dsnFull] = await dsnsFor("bad-intl-full@bounce.test");
  const [dsnHeaders] = await dsnsFor("bad-intl-hdrs@bounce.test");
  for (const [dsn, returned] of [[dsnFull!, "message/global"], [dsnHeaders!, "message/global-headers"]] as const) {
    // The report's own header is ASCII: only its returned part holds the UTF-8 header fields.
    assert.equal(dsn.mailParams.SMTPUTF8, true, `the DSN with ${returned} went with SMTPUTF8`);
    assert.equal(dsn.mailParams.BODY, "8BITMIME");
    const view = await parseWithPython(dsn.body);
    const types = view.parts.map((p) => p.type);
    assert.equal(types[0], "multipart/report");
    assert.ok(types.includes("message/global-delivery-status") && types.includes(returned), types.join(" "));
    assert.match(dsn.body.toString("utf8"), /\r\nSubject: Gr\u00fc\u00dfe\r\n/);
    assert.doesNotMatch(dsn.body.toString("latin1"), /base64/i, "a server with SMTPUTF8 gets the 8-bit form");
  }
});

/** The messages from <> that a scripted MX took, with the dot-stuffing undone. */
function bouncesAt(server: Awaited<ReturnType<typeof startScriptedMx>>, recipient: string): Buffer[] {
  return server.connections
    .filter((c) => c.commands.includes("MAIL FROM:<>") && c.commands.some((l) => l.startsWith(`RCPT TO:<${recipient}>`)))
    .flatMap((c) => c.messages.map((m) => Buffer.from(m.replace(/^\.\./gm, "."), "latin1")));
}

test("a DSN of ours to a server without SMTPUTF8: its message/global* parts go base64-encoded and 7-bit, and a parser reads them back (RFC 6533, RFC 6532 3.7)", async () => {
  const original = Buffer.from("From: J\u00fcrgen <carol@eai-ascii.test>\r\nTo: <x@bounce.test>\r\nSubject: Gr\u00fc\u00dfe\r\nMessage-ID: <eai-carol@eai-ascii.test>\r\n\r\nHallo.\r\n", "utf8");
  const lost = await submit(env.pool, env.bus, { from: "carol@eai-ascii.test", to: ["bad-eai@bounce.test"], raw: original, orcpt: "utf-8;m\u00fcller@bounce.test", envid: "EAI-1" });
  await finalStates(lost.messageId);
  const dsnDelivery = await waitFor(async () => {
    const result = await env.pool.query<{ state: string; last_reply: string }>(
      "SELECT d.state, d.last_reply FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE m.source = 'bounce' AND d.final_recipient = 'carol@eai-ascii.test'",
    );
    const row = result.rows[0];
    return row && (row.state === "delivered" || row.state === "bounced") ? row : null;
  }, 15_000);
  assert.equal(dsnDelivery!.state, "delivered", dsnDelivery!.last_reply);
  const mail = eaiAscii.connections.flatMap((c) => c.commands).filter((c) => c.startsWith("MAIL FROM:<>"));
  assert.deepEqual(mail, ["MAIL FROM:<>"], "neither SMTPUTF8 nor BODY=8BITMIME: the report is 7-bit");
  const [raw] = bouncesAt(eaiAscii, "carol@eai-ascii.test");
  assert.ok(!raw!.some((byte) => byte > 0x7f), "no 8-bit byte");
  assert.match(raw!.toString("latin1"), /Content-Type: message\/global\r\nContent-Transfer-Encoding: base64\r\n/);

  const parsed = await simpleParser(raw!);
  assert.equal(parsed.subject, "Undelivered Mail Returned to Sender");
  const status = parsed.attachments.find((a) => a.contentType === "message/global-delivery-status")!.content.toString("utf8");
  assert.match(status, /^Reporting-MTA: dns; relay\.test\r\nOriginal-Envelope-Id: EAI-1\r\n/);
  assert.match(status, /\r\n\r\nOriginal-Recipient: utf-8;m\u00fcller@bounce\.test\r\nFinal-Recipient: rfc822;bad-eai@bounce\.test\r\nAction: failed\r\nStatus: 5\.1\.1\r\n/);
  assert.match(status, /\r\nDiagnostic-Code: smtp; 550 5\.1\.1 No such user here\r\n/);
  const returned = parsed.attachments.find((a) => a.contentType === "message/global")!.content;
  assert.deepEqual(returned, original, "the original comes back byte for byte");
  const inner = await simpleParser(returned);
  assert.equal(inner.subject, "Gr\u00fc\u00dfe");
  assert.equal(inner.from?.value[0]?.name, "J\u00fcrgen");

  // A sender address that is not ASCII cannot be written to that server at all: the DSN fails (5.6.7), reported to nobody.
  const cjk = await submit(env.pool, env.bus, { from: "\u7528\u6237@eai-ascii.test", to: ["bad-eai-cjk@bounce.test"], raw: original });
  await finalStates(cjk.messageId);
  const refused = await waitFor(async () => {
    const result = await env.pool.query<{ state: string; last_status: string; dsn_state: string | null }>(
      "SELECT d.state, d.last_status, d.dsn_state FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE m.source = 'bounce' AND d.final_recipient = $1",
      ["\u7528\u6237@eai-ascii.test"],
    );
    const row = result.rows[0];
    return row && row.state === "bounced" && row.dsn_state === "suppressed" ? row : null;
  }, 15_000);
  assert.equal(refused!.last_status, "5.6.7");
  assert.equal(bouncesAt(eaiAscii, "\u7528\u6237@eai-ascii.test").length, 0);
});

test("a message that is not our own DSN is never re-encoded: UTF-8 in a returned part of someone else's report still needs SMTPUTF8 (5.6.9)", async () => {
  const report = composeDsn({
    reportingMta: "mx.elsewhere.test",
    to: "alice@origin.test",
    ret: "HDRS",
    original: Buffer.from("From: <alice@origin.test>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nx\r\n", "utf8"),
    recipients: [{ finalRecipient: "x@elsewhere.test", action: "failed", status: "5.1.1" }],
  }).raw;
  // A remote server's DSN from <>, forwarded: it may carry that server's DKIM signature.
  const forwarded = await submit(env.pool, env.bus, { from: "", to: ["fwd-dsn@eai-ascii.test"], raw: report });
  const [row] = await finalStates(forwarded.messageId);
  assert.deepEqual([row!.state, row!.last_status], ["bounced", "5.6.9"]);
  assert.equal(bouncesAt(eaiAscii, "fwd-dsn@eai-ascii.test").length, 0);
});

test("a utf-8 ORCPT is passed on as utf-8-addr-xtext, or as utf-8-addr-unitext in a transaction with SMTPUTF8 (RFC 6533 3)", async () => {
  const ascii = (id: string) => `From: <alice@origin.test>\r\nSubject: orcpt\r\nMessage-ID: <${id}@origin.test>\r\n\r\nHello.\r\n`;
  const orcpt = "utf-8;m\u00fcller+x@origin.test";
  const noUtf8Hop = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["o1@eai-ascii.test"], raw: ascii("orcpt-1"), orcpt, notify: ["FAILURE"] });
  const unused = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["o2@eai-utf8.test"], raw: ascii("orcpt-2"), orcpt });
  const used = await submit(env.pool, env.bus, {
    from: "alice@origin.test",
    to: ["o3@eai-utf8.test"],
    raw: Buffer.from("From: <alice@origin.test>\r\nSubject: Gr\u00fc\u00dfe\r\nMessage-ID: <orcpt-3@origin.test>\r\n\r\nHallo.\r\n", "utf8"),
    orcpt,
  });
  for (const m of [noUtf8Hop, unused, used]) assert.deepEqual((await finalStates(m.messageId)).map((r) => r.state), ["delivered"]);
  const rcpt = (server: Awaited<ReturnType<typeof startScriptedMx>>, to: string) => server.commands().find((c) => c.startsWith(`RCPT TO:<${to}>`));
  assert.equal(rcpt(eaiAscii, "o1@eai-ascii.test"), "RCPT TO:<o1@eai-ascii.test> NOTIFY=FAILURE ORCPT=utf-8;m\\x{FC}ller\\x{2B}x@origin.test");
  assert.equal(rcpt(eaiUtf8, "o2@eai-utf8.test"), "RCPT TO:<o2@eai-utf8.test> ORCPT=utf-8;m\\x{FC}ller\\x{2B}x@origin.test", "SMTPUTF8 offered but not used");
  assert.equal(rcpt(eaiUtf8, "o3@eai-utf8.test"), "RCPT TO:<o3@eai-utf8.test> ORCPT=utf-8;m\u00fcller\\x{2B}x@origin.test");
  assert.ok(eaiUtf8.commands().some((c) => /^MAIL FROM:<alice@origin\.test> .*BODY=8BITMIME SMTPUTF8$/.test(c)), "that transaction used SMTPUTF8");
});

test("a connection is reused after RSET for the next job; a 5xx without an enhanced code bounces as 5.0.0", async () => {
  const bad = await submit(env.pool, env.bus, { from: "", to: ["bad@rset.test"] });
  const [bounced] = await finalStates(bad.messageId);
  assert.deepEqual([bounced!.state, bounced!.last_status, bounced!.last_reply], ["bounced", "5.0.0", "550 no such user"]);
  const good = await submit(env.pool, env.bus, { from: "", to: ["good@rset.test"] });
  const [delivered] = await finalStates(good.messageId);
  assert.equal(delivered!.state, "delivered");
  assert.equal(resetting.connections.length, 1, "one connection for both jobs");
  const commands = resetting.connections[0]!.commands.filter((c) => !c.startsWith("EHLO"));
  assert.deepEqual(commands.slice(0, 5).map((c) => c.split(":")[0]), ["MAIL FROM", "RCPT TO", "DATA", "RSET", "MAIL FROM"]);
});

test("MX order: ascending preference, random order among equal preferences (RFC 5321 5.1)", async () => {
  const resolver = new DestinationResolver(relayConfig(testConfig(relayEnv)).destination);
  const orders = new Set<string>();
  for (let i = 0; i < 40; i++) {
    const destination = await resolver.resolve("equal.test");
    const names = destination.hosts.map((h) => h.hostname);
    assert.equal(names[2], "c.equal.test", "the higher preference comes last");
    orders.add(names.slice(0, 2).join(","));
  }
  assert.deepEqual([...orders].sort(), ["a.equal.test,b.equal.test", "b.equal.test,a.equal.test"]);
});
