import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { loadTlsCredentials } from "@mailstack/runtime";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, freePort, waitFor, type TestEnv } from "@mailstack/testkit";
import { startOutbound, type OutboundService } from "../src/service.ts";
import { deliveryStates, startDns, submit, testConfig } from "./helpers.ts";
import { startScriptedMx, type Script, type ScriptedConnection } from "./scripted-mx.ts";

// The relay worker against adverse remote servers and DNS answers, end to end (PostgreSQL, NATS,
// a DNS server and scripted MX hosts on loopback). testConfig names this relay "relay.test".

let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDns>>;
let outbound: OutboundService;
/** Stands in for this host's own port 25: like mta-inbound, it refuses to relay (554 5.7.1 at RCPT). */
let ourselves: Awaited<ReturnType<typeof startScriptedMx>>;
let good: Awaited<ReturnType<typeof startScriptedMx>>;
/** Replies, then closes the connection (a server going down). */
function closing(connection: ScriptedConnection, reply: string | null): string | null {
  connection.close();
  return reply;
}
/** Scripted MX hosts by domain: the domain's MX 10 is the server, its MX 20 mx.good.test when `backup` is set. */
const scripted = new Map<string, Awaited<ReturnType<typeof startScriptedMx>>>();
const adverse: Array<{ domain: string; host: string; backup: boolean; script: Script }> = [
  { domain: "mail421.test", host: "127.0.0.50", backup: true, script: { reply: (c, conn) => (c.startsWith("MAIL") ? closing(conn, "421 4.3.2 shutting down") : undefined) } },
  { domain: "dotclose.test", host: "127.0.0.51", backup: false, script: { dataReply: (_d, conn) => closing(conn, null) } },
  { domain: "dot421.test", host: "127.0.0.52", backup: false, script: { dataReply: (_d, conn) => closing(conn, "421 4.3.2 going down") } },
  { domain: "data421.test", host: "127.0.0.53", backup: false, script: { reply: (c, conn) => (c === "DATA" ? closing(conn, "421 4.3.2 going down") : undefined) } },
  { domain: "tls454.test", host: "127.0.0.54", backup: false, script: { extensions: ["PIPELINING", "STARTTLS", "8BITMIME"], reply: (c) => (c === "STARTTLS" ? "454 4.7.0 TLS not available" : undefined) } },
  { domain: "rcpt252.test", host: "127.0.0.55", backup: false, script: { reply: (c) => (c.startsWith("RCPT TO:<a") ? "252 2.1.5 Cannot VRFY user, but will accept message" : c.startsWith("RCPT TO:<b") ? "251 2.1.5 User not local; will forward" : undefined) } },
  { domain: "bare.test", host: "127.0.0.57", backup: false, script: { greeting: "220", extensions: [], reply: (c) => (/^(EHLO|MAIL|RCPT|RSET)/.test(c) ? "250" : c === "DATA" ? "354" : undefined), dataReply: () => "250" } },
  // One message per connection, as Exim's smtp_accept_max_per_connection: the next MAIL gets 421 and the connection is closed.
  { domain: "permsg.test", host: "127.0.0.59", backup: false, script: { reply: (c, conn) => (c.startsWith("MAIL") && conn.commands.filter((x) => x.startsWith("MAIL")).length > 1 ? closing(conn, "421 4.7.0 Too many messages on this connection") : undefined) } },
  // Accepts the connection and never greets (the greeting timeout, RFC 5321 4.5.3.2, is 2 s here).
  { domain: "mute.test", host: "127.0.0.60", backup: true, script: { greeting: null } },
  // Refuses service at its greeting; listed under two MX names (dup.test).
  { domain: "greet554.test", host: "127.0.0.62", backup: false, script: { greeting: "554 5.3.2 not now" } },
  { domain: "nodata354.test", host: "127.0.0.58", backup: false, script: { extensions: ["8BITMIME"], reply: (c) => (c === "DATA" ? "250 2.0.0 what data?" : undefined) } },
];

before(async () => {
  env = await createTestEnv();
  const port = await freePort();
  ourselves = await startScriptedMx("127.0.0.40", port, {
    reply: (command) => (command.startsWith("RCPT") ? "554 5.7.1 Relay access denied" : undefined),
  });
  good = await startScriptedMx("127.0.0.41", port);
  for (const a of adverse) scripted.set(a.domain, await startScriptedMx(a.host, port, a.script));
  // Offers STARTTLS but refuses a client without a certificate, after the TLS 1.3 handshake.
  const credentials = await loadTlsCredentials({ dir: mkdtempSync(join(tmpdir(), "relay-tls-")), hostname: "mx.certreq.test" });
  const certreq = { domain: "certreq.test", host: "127.0.0.61", backup: false, script: { tls: { key: credentials.key, cert: credentials.cert, requestCert: true } } };
  adverse.push(certreq);
  scripted.set(certreq.domain, await startScriptedMx(certreq.host, port, certreq.script));
  dns = await startDns({
    "relay.test": { a: ["127.0.0.40"] },
    "mx.good.test": { a: ["127.0.0.41"] },
    // Nothing listens on 127.0.0.42: the connection is refused.
    "down.primary.test": { a: ["127.0.0.42"] },
    // We are a backup MX of a domain we do not serve, and its primary is down.
    "backup.test": { mx: [{ exchange: "down.primary.test", priority: 10 }, { exchange: "relay.test", priority: 20 }] },
    // We are its best MX (named in another case, with the final dot): a host after us must not be tried.
    "loop.test": { mx: [{ exchange: "RELAY.TEST.", priority: 10 }, { exchange: "mx.good.test", priority: 20 }] },
    // A host equal in preference to us is discarded with us; a better one is used.
    "equal-us.test": { mx: [{ exchange: "mx.good.test", priority: 5 }, { exchange: "relay.test", priority: 10 }, { exchange: "down.primary.test", priority: 10 }] },
    // The same by address: an MX host (or the implicit MX) with this host's address is this host.
    "alias-us.test": { mx: [{ exchange: "down.primary.test", priority: 10 }, { exchange: "mx.alias-us.test", priority: 20 }] },
    "mx.alias-us.test": { a: ["127.0.0.40"] },
    "alias-best.test": { mx: [{ exchange: "mx.alias-us.test", priority: 10 }, { exchange: "mx.good.test", priority: 20 }] },
    "implicit-us.test": { a: ["127.0.0.40"] },
    // MX hosts that do not exist (NXDOMAIN) or have no A/AAAA (NODATA): final answers.
    "ghost.test": { mx: [{ exchange: "nothing.ghost.test", priority: 10 }, { exchange: "empty.ghost.test", priority: 20 }] },
    "empty.ghost.test": {},
    // The same with one MX host whose lookup fails (SERVFAIL): it may exist.
    "ghostly.test": { mx: [{ exchange: "nothing.ghost.test", priority: 10 }, { exchange: "broken.ghostly.test", priority: 20 }] },
    "broken.ghostly.test": { servfail: true },
    // A null MX among other MX records is no null MX (RFC 7505 3: it must be the only one): the others are used.
    "nullplus.test": { mx: [{ exchange: "", priority: 0 }, { exchange: "mx.good.test", priority: 10 }] },
    // DNS that never answers (DNS_TIMEOUT 300ms here): for the domain, and for its preferred MX host.
    "mute-dns.test": { silent: true },
    "mute-mx.test": { mx: [{ exchange: "mute.mute-mx.test", priority: 10 }, { exchange: "mx.good.test", priority: 20 }] },
    "mute.mute-mx.test": { silent: true },
    // Two MX names for one address: it is tried once per attempt.
    "dup.test": { mx: [{ exchange: "one.dup.test", priority: 10 }, { exchange: "two.dup.test", priority: 20 }] },
    "one.dup.test": { a: ["127.0.0.62"] },
    "two.dup.test": { a: ["127.0.0.62"] },
    // A failing MX host lookup is skipped for a usable one.
    "servfail-mx.test": { mx: [{ exchange: "broken.ghostly.test", priority: 10 }, { exchange: "mx.good.test", priority: 20 }] },
  });
  for (const a of adverse) {
    dns.zone[a.domain] = { mx: [{ exchange: `mx.${a.domain}`, priority: 10 }, ...(a.backup ? [{ exchange: "mx.good.test", priority: 20 }] : [])] };
    dns.zone[`mx.${a.domain}`] = { a: [a.host] };
  }
  const config = testConfig({
    DNS_SERVERS: dns.server,
    RELAY_DEST_PORT: String(port),
    RELAY_BACKOFF: "1h",
    RELAY_SCHEDULER_INTERVAL: "200ms",
    RELAY_DSN_INTERVAL: "200ms",
    RELAY_CONNECT_TIMEOUT: "2s",
    RELAY_GREETING_TIMEOUT: "2s",
    DNS_TIMEOUT: "300ms",
  });
  outbound = startOutbound({ pool: env.pool, bus: env.bus, logger: createLogger("mta-outbound", "silent"), config });
});

after(async () => {
  await outbound?.stop();
  await Promise.all([ourselves, good, ...scripted.values()].map((s) => s?.close()));
  await dns?.close();
  await env?.close();
});

/** The delivery rows of a message once each has had its first attempt. */
async function attempted(messageId: number) {
  return waitFor(async () => {
    const rows = await deliveryStates(env.pool, messageId);
    return rows.every((r) => r.attempts >= 1) ? rows : null;
  }, 15_000);
}

const rcptsTo = (server: typeof good, domain: string) => server.commands().filter((c) => c.startsWith("RCPT") && c.includes(`@${domain}>`));

test("an MX naming this host, or with its address: records at its preference and above are discarded (RFC 5321 5.1), never sent to ourselves", async () => {
  const backup = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["b@backup.test"] });
  const loop = await submit(env.pool, env.bus, { from: "", to: ["l@loop.test"] });
  const equal = await submit(env.pool, env.bus, { from: "", to: ["e@equal-us.test"] });
  const aliasBackup = await submit(env.pool, env.bus, { from: "", to: ["a@alias-us.test"] });
  const aliasBest = await submit(env.pool, env.bus, { from: "", to: ["a@alias-best.test"] });
  const implicit = await submit(env.pool, env.bus, { from: "", to: ["i@implicit-us.test"] });
  // The primary is down and we are only the backup: a temporary failure, not our own "relay denied" bounce.
  const [deferred] = await attempted(backup.messageId);
  assert.deepEqual([deferred!.state, deferred!.last_status], ["deferred", "4.4.1"]);
  // We are the best MX: the mail would loop back to us; it is returned as undeliverable.
  const [looped] = await attempted(loop.messageId);
  assert.deepEqual([looped!.state, looped!.last_status], ["bounced", "5.4.6"]);
  assert.match(looped!.last_reply ?? "", /loops back to myself/);
  const [delivered] = await attempted(equal.messageId);
  assert.deepEqual([delivered!.state, delivered!.remote_mta], ["delivered", "mx.good.test"]);
  // By address (RFC 5321 5.1: "any of the names or addresses by which it might be known").
  const [aliasDeferred] = await attempted(aliasBackup.messageId);
  assert.deepEqual([aliasDeferred!.state, aliasDeferred!.last_status], ["deferred", "4.4.1"]);
  for (const m of [aliasBest, implicit]) {
    const [row] = await attempted(m.messageId);
    assert.deepEqual([row!.state, row!.last_status], ["bounced", "5.4.6"], row!.final_recipient);
  }
  assert.equal(ourselves.connections.length, 0, "no connection to our own address");
  assert.equal(rcptsTo(good, "loop.test").length + rcptsTo(good, "alias-best.test").length, 0, "an MX less preferred than us is not tried");
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = ANY($1)", [[backup.messageId, aliasBackup.messageId]]);
});

test("MX hosts that do not exist or have no address bounce (5.4.4, RFC 5321 5.1); a failed lookup among them defers (4.4.3); DNS timeouts defer; a null MX among others is ignored", async () => {
  const ghost = await submit(env.pool, env.bus, { from: "", to: ["g@ghost.test"] });
  const ghostly = await submit(env.pool, env.bus, { from: "", to: ["g@ghostly.test"] });
  const skipped = await submit(env.pool, env.bus, { from: "", to: ["s@servfail-mx.test"] });
  const nullPlus = await submit(env.pool, env.bus, { from: "", to: ["n@nullplus.test"] });
  const muteDns = await submit(env.pool, env.bus, { from: "", to: ["m@mute-dns.test"] });
  const muteMx = await submit(env.pool, env.bus, { from: "", to: ["m@mute-mx.test"] });
  const [bounced] = await attempted(ghost.messageId);
  assert.deepEqual([bounced!.state, bounced!.last_status], ["bounced", "5.4.4"]);
  assert.match(bounced!.last_reply ?? "", /nothing\.ghost\.test, empty\.ghost\.test/);
  const [deferred] = await attempted(ghostly.messageId);
  assert.deepEqual([deferred!.state, deferred!.last_status], ["deferred", "4.4.3"]);
  const [delivered] = await attempted(skipped.messageId);
  assert.deepEqual([delivered!.state, delivered!.remote_mta], ["delivered", "mx.good.test"]);
  const [notNull] = await attempted(nullPlus.messageId);
  assert.deepEqual([notNull!.state, notNull!.remote_mta], ["delivered", "mx.good.test"]);
  // A DNS timeout is temporary, for the domain (4.4.3) as for an MX host (skipped for the next).
  const [timedOut] = await attempted(muteDns.messageId);
  assert.deepEqual([timedOut!.state, timedOut!.last_status], ["deferred", "4.4.3"]);
  const [viaNext] = await attempted(muteMx.messageId);
  assert.deepEqual([viaNext!.state, viaNext!.remote_mta], ["delivered", "mx.good.test"]);
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = ANY($1)", [[ghostly.messageId, muteDns.messageId]]);
});

test("adverse SMTP answers: a 421 anywhere defers or moves on, a hang-up after the dot is no delivery, a mute MX is left for the next, 251/252 and bare codes accept", async () => {
  // [recipients, expected [state, status, remote MTA] of each]
  const cases: Array<[string[], Array<[string, string, string]>]> = [
    // 421 to MAIL on a fresh connection: the next MX, in the same attempt.
    [["m@mail421.test"], [["delivered", "2.0.0", "mx.good.test"]]],
    // The server closes after the final dot without a reply: it may or may not have the message; not delivered.
    [["d@dotclose.test"], [["deferred", "4.4.2", "mx.dotclose.test"]]],
    // The first MX never greets: after the greeting timeout, the next one.
    [["s@mute.test"], [["delivered", "2.0.0", "mx.good.test"]]],
    // 421 as the reply to the final dot, and to DATA (no 354).
    [["d@dot421.test"], [["deferred", "4.3.2", "mx.dot421.test"]]],
    [["d@data421.test"], [["deferred", "4.3.2", "mx.data421.test"]]],
    // STARTTLS offered but refused (454): opportunistic TLS goes on in clear.
    [["t@tls454.test"], [["delivered", "2.0.0", "mx.tls454.test"]]],
    // 252 and 251 are positive completions (RFC 5321 4.2.1: judged by the first digit).
    [["a@rcpt252.test", "b@rcpt252.test"], [["delivered", "2.0.0", "mx.rcpt252.test"], ["delivered", "2.0.0", "mx.rcpt252.test"]]],
    // Every reply only a code ("220", "250", "354"), no EHLO keywords.
    [["x@bare.test"], [["delivered", "2.0.0", "mx.bare.test"]]],
    // DATA answered 250 instead of 354: no message was sent, so nothing was delivered.
    [["x@nodata354.test", "y@nodata354.test"], [["deferred", "4.0.0", "mx.nodata354.test"], ["deferred", "4.0.0", "mx.nodata354.test"]]],
  ];
  const ids: number[] = [];
  for (const [to, expected] of cases) {
    const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to });
    ids.push(accepted.messageId);
    const rows = await attempted(accepted.messageId);
    assert.deepEqual(rows.map((r) => [r.state, r.last_status, r.remote_mta]), expected, to.join(", "));
  }
  assert.deepEqual(scripted.get("mail421.test")!.commands().filter((c) => /^(RCPT|DATA)/.test(c)), [], "nothing after the 421");
  assert.deepEqual(scripted.get("nodata354.test")!.connections.flatMap((c) => c.messages), [], "no message data without a 354");
  assert.equal(scripted.get("tls454.test")!.connections[0]!.messages.length, 1);
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = ANY($1) AND state = 'deferred'", [ids]);
});

test("two pooled connections both at the server's per-connection limit (421 to MAIL): the retry is on a fresh connection, not the other pooled one", async () => {
  const server = scripted.get("permsg.test")!;
  // Two jobs at once: two connections, both idle in the pool afterwards.
  const first = await Promise.all(["p1", "p2"].map((name) => submit(env.pool, env.bus, { from: "alice@origin.test", to: [`${name}@permsg.test`] })));
  for (const m of first) assert.deepEqual((await attempted(m.messageId)).map((r) => r.state), ["delivered"]);
  assert.equal(server.connections.length, 2, "two connections carried the two jobs");
  const third = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["p3@permsg.test"] });
  const [row] = await attempted(third.messageId);
  assert.deepEqual([row!.state, row!.attempts], ["delivered", 1], row!.last_reply ?? "");
  assert.equal(server.connections.filter((c) => c.messages.length > 0).length, 3, "the third message went on a connection of its own");
});

test("opportunistic TLS: a server refusing our TLS after the handshake (client certificate required) gets the message in clear", async () => {
  const server = scripted.get("certreq.test")!;
  const accepted = await submit(env.pool, env.bus, { from: "alice@origin.test", to: ["c@certreq.test"] });
  const [row] = await attempted(accepted.messageId);
  assert.deepEqual([row!.state, row!.attempts], ["delivered", 1], row!.last_reply ?? "");
  assert.deepEqual(server.connections.map((c) => [c.secure, c.messages.length]), [[true, 0], [false, 1]], "a new connection, in clear");
});

test("an address behind two MX names is tried once per attempt", async () => {
  const server = scripted.get("greet554.test")!;
  const accepted = await submit(env.pool, env.bus, { from: "", to: ["d@dup.test"] });
  const [row] = await attempted(accepted.messageId);
  assert.deepEqual([row!.state, row!.remote_mta], ["deferred", "one.dup.test"]);
  assert.equal(server.connections.length, 1);
  await env.pool.query("UPDATE deliveries SET state = 'cancelled' WHERE message_id = $1", [accepted.messageId]);
});
