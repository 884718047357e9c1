// Postfix as the receiving MX of the relay: a private Postfix instance (testkit's startPostfix)
// that delivers dest.test and its sister domains to maildirs under /tmp (virtual_mailbox_domains),
// with one smtpd per behaviour on its own loopback address (the same port, RELAY_DEST_PORT):
// 127.0.0.1 plain, 127.0.0.2 smtpd_recipient_limit = 2, 127.0.0.3 without 8BITMIME in its EHLO,
// 127.0.0.4 with smtputf8_enable = no. Each logs under a syslog_name of its own.
import assert from "node:assert/strict";
import { chownSync, existsSync, mkdirSync, readdirSync, readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { simpleParser } from "mailparser";
import { addAccount, addDomain } from "@mailstack/db";
import { loadTlsCredentials } from "@mailstack/runtime";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, freePort, postfixAvailable, startPostfix, waitFor, type Postfix, type TestEnv } from "@mailstack/testkit";
import { startOutbound, type OutboundService } from "../src/service.ts";
import { deliveryStates, startDns, submit, testConfig } from "./helpers.ts";

const skip = !postfixAvailable && "needs Postfix and root";
const ROOT = "/tmp/mailstack-outbound-postfix";
const VMAIL = `${ROOT}/vmail`;
const USERS = ["a@dest.test", "b@dest.test", "c@dest.test", "a@limit.test", "b@limit.test", "c@limit.test", "a@no8bit.test", "a@noutf8.test", "b@noutf8.test"];

let env: TestEnv;
let dns: Awaited<ReturnType<typeof startDns>>;
let postfix: Postfix;
let outbound: OutboundService;

before(async () => {
  if (skip) return;
  env = await createTestEnv();
  await addDomain(env.pool, "ours.test");
  await addAccount(env.pool, { address: "sender@ours.test", password: "pw" });
  const tls = await loadTlsCredentials({ dir: `${ROOT}-tls`, hostname: "mx.dest.test" });
  const mx = (address: string) => ({ mx: [{ exchange: `mx.${address}`, priority: 10 }] });
  dns = await startDns({
    "dest.test": mx("dest.test"), "mx.dest.test": { a: ["127.0.0.1"] },
    "limit.test": mx("limit.test"), "mx.limit.test": { a: ["127.0.0.2"] },
    "no8bit.test": mx("no8bit.test"), "mx.no8bit.test": { a: ["127.0.0.3"] },
    "noutf8.test": mx("noutf8.test"), "mx.noutf8.test": { a: ["127.0.0.4"] },
  });
  const maildirs = USERS.map((u) => `${u}=${u.split("@")[1]}/${u.split("@")[0]}/`).join(", ");
  const smtpd = (address: string, name: string, ...options: string[]) => `${address}:${port} inet n - n - - smtpd -o syslog_name=postfix/${name} ${options.map((o) => `-o ${o}`).join(" ")}`;
  const port = await freePort();
  postfix = await startPostfix({
    root: ROOT,
    port,
    myhostname: "mx.dest.test",
    main: {
      virtual_mailbox_domains: "dest.test, limit.test, no8bit.test, noutf8.test",
      virtual_mailbox_base: VMAIL,
      virtual_mailbox_maps: `inline:{ ${maildirs} }`,
      virtual_uid_maps: "static:65534",
      virtual_gid_maps: "static:65534",
      smtpd_tls_security_level: "may",
      smtpd_tls_chain_files: tls.source,
      smtpd_tls_loglevel: "1",
      smtputf8_enable: "yes",
    },
    master: [
      // Its replies in the log too (debug_peer_list), to show the 452.
      smtpd("127.0.0.2", "limit", "smtpd_recipient_limit=2", "debug_peer_list=127.0.0.1"),
      smtpd("127.0.0.3", "no8bit", "smtpd_discard_ehlo_keywords=8bitmime"),
      smtpd("127.0.0.4", "noutf8", "smtputf8_enable=no"),
    ],
  });
  // The virtual agent writes as the mailbox owner (static uid/gid 65534): its base is theirs.
  mkdirSync(VMAIL);
  chownSync(VMAIL, 65534, 65534);
  const config = testConfig({
    DNS_SERVERS: dns.server,
    RELAY_DEST_PORT: String(port),
    RELAY_BACKOFF: "1s",
    RELAY_SCHEDULER_INTERVAL: "200ms",
    RELAY_DSN_INTERVAL: "200ms",
    RELAY_IDLE_CONNECTION: "1s",
  });
  outbound = startOutbound({ pool: env.pool, bus: env.bus, logger: createLogger("mta-outbound", "silent"), config });
});

after(async () => {
  if (skip) return;
  await outbound.stop();
  await postfix.stop();
  await dns.close();
  await env.close();
});

/** The files Postfix's virtual agent wrote to address's maildir. */
function maildir(address: string): Buffer[] {
  const [local, domain] = address.split("@");
  const dir = `${VMAIL}/${domain}/${local}/new`;
  return existsSync(dir) ? readdirSync(dir).sort().map((name) => readFileSync(`${dir}/${name}`)) : [];
}

/** Lines of Postfix's log that include text. */
function linesOf(text: string): string {
  return postfix.log().split("\n").filter((l) => l.includes(text)).join("\n");
}

async function finalStates(messageId: number) {
  return waitFor(async () => {
    const rows = await deliveryStates(env.pool, messageId);
    return rows.every((r) => r.state === "delivered" || r.state === "bounced") ? rows : null;
  }, 20_000, 100);
}

/** Our DSNs to sender@ours.test that mention marker (a Message-ID), parsed by mailparser once there is one. */
async function dsnAbout(marker: string) {
  const found = await waitFor(async () => {
    const rows = (await env.pool.query("SELECT raw FROM messages WHERE source = 'bounce' AND envelope_from = '' ORDER BY id")).rows as Array<{ raw: Buffer }>;
    const about = rows.filter((r) => r.raw.includes(marker));
    return about.length ? about : null;
  }, 15_000, 100);
  assert.equal(found.length, 1, "one DSN for the message");
  const raw = found[0]!.raw;
  const parsed = await simpleParser(raw);
  // mailparser shows message/delivery-status inline after the text; message/global-delivery-status is an attachment.
  const text = parsed.text ?? "";
  const global = parsed.attachments.find((a) => a.contentType === "message/global-delivery-status");
  const fields = text.includes("Reporting-MTA:") ? text.slice(text.indexOf("Reporting-MTA:")) : (global?.content.toString("utf8") ?? "");
  return { raw, parsed, status: fields.replace(/\r?\n[ \t]+/g, " ") };
}

function message(subject: string, id: string, body = "Hello from mailstack.\r\n"): string {
  return `From: Sender <sender@ours.test>\r\nTo: Someone <someone@dest.test>\r\nSubject: ${subject}\r\nMessage-ID: <${id}@ours.test>\r\nDate: Fri, 27 Nov 2026 09:00:00 +0000\r\n\r\n${body}`;
}

test("delivery to Postfix over opportunistic STARTTLS: the maildir file holds our message byte for byte", { skip }, async () => {
  const raw = message("to postfix", "mx-1", "Line one\r\n.a dot line\r\n\r\nlast line\r\n");
  const accepted = await submit(env.pool, env.bus, { from: "sender@ours.test", to: ["a@dest.test"], raw });
  const [row] = await finalStates(accepted.messageId);
  assert.equal(row!.state, "delivered");
  assert.equal(row!.remote_mta, "mx.dest.test");
  const queueId = /^250 2\.0\.0 Ok: queued as (\w+)$/.exec(row!.last_reply ?? "")?.[1];
  assert.ok(queueId, row!.last_reply ?? "");
  await waitFor(() => /status=sent \(delivered to maildir\)/.test(linesOf(queueId)), 10_000, 100);
  const [file] = maildir("a@dest.test");
  assert.ok(file);
  const text = file.toString("latin1");
  // Postfix's lines on top (its Received says ESMTPS: TLS was used), then exactly our bytes.
  const trace = new RegExp(`^Return-Path: <sender@ours\\.test>\\nX-Original-To: a@dest\\.test\\nDelivered-To: a@dest\\.test\\nReceived: from relay\\.test \\(localhost \\[127\\.0\\.0\\.1\\]\\)\\n\\tby mx\\.dest\\.test \\(Postfix\\) with ESMTPS id ${queueId}\\n\\tfor <a@dest\\.test>; [^\\n]+\\n`).exec(text);
  assert.ok(trace, text.slice(0, 400));
  assert.equal(text.slice(trace[0].length), raw.replace(/\r\n/g, "\n"), "then our message, as maildir stores it (LF line ends)");
  assert.match(linesOf("postfix/smtpd["), /Anonymous TLS connection established from localhost\[127\.0\.0\.1\]: TLSv1\.3/);
});

test("Postfix refuses one of three recipients (550 5.1.1): the other two go in one transaction, one DSN names only the third", { skip }, async () => {
  const raw = message("three recipients", "mx-3");
  const accepted = await submit(env.pool, env.bus, { from: "sender@ours.test", to: ["b@dest.test", "nobody@dest.test", "c@dest.test"], envid: "ENV-3", raw });
  const rows = await finalStates(accepted.messageId);
  assert.deepEqual(rows.map((r) => [r.final_recipient, r.state, r.last_status]), [
    ["b@dest.test", "delivered", "2.0.0"],
    ["nobody@dest.test", "bounced", "5.1.1"],
    ["c@dest.test", "delivered", "2.0.0"],
  ]);
  const queueId = /queued as (\w+)/.exec(rows[0]!.last_reply ?? "")?.[1];
  assert.ok(queueId);
  assert.match(rows[2]!.last_reply ?? "", new RegExp(`queued as ${queueId}$`), "b and c: one Postfix queue file, one transaction");
  assert.match(linesOf(`${queueId}: from=<sender@ours.test>`), /nrcpt=2 /);
  assert.match(linesOf("reject: RCPT from localhost[127.0.0.1]"), /550 5\.1\.1 <nobody@dest\.test>: Recipient address rejected: User unknown in virtual mailbox table; from=<sender@ours\.test> to=<nobody@dest\.test>/);
  await waitFor(() => maildir("b@dest.test").length === 1 && maildir("c@dest.test").length === 1, 10_000, 100);
  for (const address of ["b@dest.test", "c@dest.test"]) assert.ok(maildir(address)[0]!.toString().endsWith(raw.replace(/\r\n/g, "\n")), address);
  const dsn = await dsnAbout(`Final-Recipient: rfc822;nobody@dest.test`);
  assert.equal(dsn.parsed.subject, "Undelivered Mail Returned to Sender");
  assert.match(dsn.status, /Original-Envelope-Id: ENV-3/);
  assert.match(dsn.status, /Action: failed/);
  assert.match(dsn.status, /Status: 5\.1\.1/);
  assert.match(dsn.status, /Remote-MTA: dns; mx\.dest\.test/);
  assert.match(dsn.status, /Diagnostic-Code: smtp; 550 5\.1\.1 <nobody@dest\.test>: Recipient address rejected: User unknown in virtual mailbox table/);
  assert.doesNotMatch(dsn.status, /b@dest\.test|c@dest\.test/);
});

test("smtpd_recipient_limit = 2: Postfix's 452 4.5.3 for the third recipient, which goes in a second transaction on the same connection", { skip }, async () => {
  const accepted = await submit(env.pool, env.bus, { from: "sender@ours.test", to: ["a@limit.test", "b@limit.test", "c@limit.test"], raw: message("over the limit", "mx-limit") });
  const rows = await finalStates(accepted.messageId);
  assert.deepEqual(rows.map((r) => [r.state, r.attempts]), [["delivered", 1], ["delivered", 1], ["delivered", 1]], "each delivered on the first attempt, none deferred");
  const queueIds = new Set(rows.map((r) => /queued as (\w+)/.exec(r.last_reply ?? "")?.[1]));
  assert.equal(queueIds.size, 2, "two Postfix queue files: two transactions");
  await waitFor(() => USERS.filter((u) => u.endsWith("@limit.test")).every((u) => maildir(u).length === 1), 10_000, 100);
  assert.match(linesOf("postfix/limit/smtpd["), /> localhost\[127\.0\.0\.1\]: 452 4\.5\.3 Error: too many recipients/);
  // One session: two MAIL, four RCPT (the 452 among them), two DATA.
  const sessions = await waitFor(() => linesOf("postfix/limit/smtpd[").match(/disconnect from .*/g), 10_000, 100);
  assert.deepEqual(sessions.map((l) => l.replace(/^disconnect from localhost\[127\.0\.0\.1\] /, "")), ["ehlo=2 starttls=1 mail=2 rcpt=4 data=2 quit=1 commands=12"]);
});

test("Postfix without 8BITMIME in its EHLO: an 8-bit message is not sent and bounces with 5.6.3 (no conversion)", { skip }, async () => {
  const raw = Buffer.concat([
    Buffer.from("From: sender@ours.test\r\nTo: a@no8bit.test\r\nSubject: eight bit\r\nMessage-ID: <mx-8bit@ours.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"),
    Buffer.from("Grüße\r\n", "utf8"),
  ]);
  const accepted = await submit(env.pool, env.bus, { from: "sender@ours.test", to: ["a@no8bit.test"], raw });
  const [row] = await finalStates(accepted.messageId);
  assert.deepEqual([row!.state, row!.last_status], ["bounced", "5.6.3"]);
  const dsn = await dsnAbout("mx-8bit@ours.test");
  assert.match(dsn.status, /Final-Recipient: rfc822;a@no8bit\.test/);
  assert.match(dsn.status, /Status: 5\.6\.3/);
  assert.match(dsn.status, /Diagnostic-Code: X-mailstack; [^\n]*8BITMIME/);
  // Postfix saw a session but no message: nothing was queued there, nothing delivered.
  assert.doesNotMatch(linesOf("postfix/no8bit/"), /: client=/);
  assert.equal(maildir("a@no8bit.test").length, 0);
});

test("Postfix with smtputf8_enable = no: a message with a UTF-8 header field bounces with 5.6.9 for every recipient, nothing sent", { skip }, async () => {
  const raw = Buffer.from("From: sender@ours.test\r\nTo: a@noutf8.test\r\nSubject: Grüße aus Köln\r\nMessage-ID: <mx-utf8@ours.test>\r\n\r\nHallo.\r\n", "utf8");
  const accepted = await submit(env.pool, env.bus, { from: "sender@ours.test", to: ["a@noutf8.test", "b@noutf8.test"], raw });
  const rows = await finalStates(accepted.messageId);
  assert.deepEqual(rows.map((r) => [r.state, r.last_status]), [["bounced", "5.6.9"], ["bounced", "5.6.9"]]);
  const dsn = await dsnAbout("mx-utf8@ours.test");
  assert.match(dsn.status, /Final-Recipient: rfc822;a@noutf8\.test/);
  assert.match(dsn.status, /Final-Recipient: rfc822;b@noutf8\.test/);
  assert.match(dsn.status, /Status: 5\.6\.9/);
  assert.match(dsn.status, /Diagnostic-Code: X-mailstack; [^\n]*SMTPUTF8/);
  assert.doesNotMatch(linesOf("postfix/noutf8/"), /: client=/);
  assert.equal(maildir("a@noutf8.test").length + maildir("b@noutf8.test").length, 0);
});

test("a stored message with bare LF and a lone \\n.\\n (an SMTP smuggling attempt) reaches Postfix as one message, every bare CR or LF a line end", { skip }, async () => {
  const raw = Buffer.from("From: sender@ours.test\nTo: c@dest.test\nSubject: bare newlines\nMessage-ID: <mx-lf@ours.test>\n\nline one\n.\nMAIL FROM:<evil@x>\r\nlast\rend\n");
  const accepted = await submit(env.pool, env.bus, { from: "sender@ours.test", to: ["c@dest.test"], raw });
  const [row] = await finalStates(accepted.messageId);
  assert.equal(row!.state, "delivered", row!.last_reply ?? "");
  const queueId = /queued as (\w+)/.exec(row!.last_reply ?? "")?.[1];
  await waitFor(() => /status=sent \(delivered to maildir\)/.test(linesOf(`${queueId}: to=<c@dest.test>`)), 10_000, 100);
  const file = maildir("c@dest.test").find((f) => f.includes("mx-lf@ours.test"))!.toString();
  assert.ok(file.endsWith("\n\nline one\n.\nMAIL FROM:<evil@x>\nlast\nend\n"), file);
  assert.doesNotMatch(linesOf("evil@x"), /from=<evil@x>/, "no second message");
});

test("after all of the above, Postfix's smtpd logged no complaint about our client (improper pipelining, protocol errors, lost connections)", { skip }, async () => {
  const complaints = postfix.log().split("\n").filter((l) => /smtpd\[\d+\]: (warning|fatal|panic|improper command pipelining|lost connection)/.test(l));
  assert.deepEqual(complaints, []);
  assert.match(linesOf("smtpd["), /disconnect from localhost\[127\.0\.0\.1\] /, "there were sessions");
});
