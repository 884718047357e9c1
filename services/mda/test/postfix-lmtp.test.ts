// Postfix hands mail to the MDA over LMTP (virtual_transport = lmtp:inet:...), as an existing
// MTA in front of mailstack would. A Postfix instance of this test's own (testkit's
// startPostfix: its directories under /tmp, its own port, nothing of /etc/postfix changed).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createServer, connect, type Server, type Socket } from "node:net";
import { promisify } from "node:util";
import { createLogger } from "@mailstack/telemetry";
import { createTestEnv, postfixAvailable, startPostfix, waitFor, type Postfix, type TestEnv } from "@mailstack/testkit";
import { startMda, type Mda } from "../src/mda.ts";
import { startLmtp, type LmtpServer } from "../src/lmtp.ts";
import { account } from "./helpers.ts";

const run = promisify(execFile);
const available = postfixAvailable;

let env: TestEnv;
let mda: Mda;
let tempfailLmtp: LmtpServer;
let proxy: LossyProxy;
let postfix: Postfix;
let postfixPort: number;

/**
 * A TCP relay between Postfix and the MDA that, while `dropNextReply` is set, cuts the
 * connection right after the client's final dot: the MDA commits and answers, Postfix never
 * hears it (what a network failure or a crash at that moment does).
 */
class LossyProxy {
  dropNextReply = false;
  dropped = 0;
  readonly server: Server;
  port = 0;
  constructor(target: number) {
    this.server = createServer((client) => {
      const upstream = connect(target, "127.0.0.1");
      let tail = "";
      let cutting = false;
      const cut = (a: Socket, b: Socket) => { a.destroy(); b.destroy(); };
      client.on("data", (data: Buffer) => {
        upstream.write(data);
        // Postfix pipelines QUIT behind the final dot: look for the dot line anywhere in the chunk.
        const text = tail + data.toString("latin1");
        tail = text.slice(-4);
        if (this.dropNextReply && text.includes("\r\n.\r\n")) {
          this.dropNextReply = false;
          this.dropped++;
          cutting = true;
          // Give the MDA the time to commit and answer, then lose the answer.
          setTimeout(() => cut(client, upstream), 500);
        }
      });
      upstream.on("data", (data: Buffer) => {
        if (!cutting) client.write(data);
      });
      client.on("error", () => upstream.destroy());
      upstream.on("error", () => client.destroy());
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
  }
  async listen(): Promise<void> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = (this.server.address() as { port: number }).port;
  }
}

function postfixLog(): string {
  return postfix.log();
}

before(async () => {
  if (!available) return;
  env = await createTestEnv();
  const logger = createLogger("mda-test", "silent");
  mda = await startMda({ pool: env.pool, bus: env.bus, logger, config: { LMTP_PORT: 0, LMTP_HOST: "127.0.0.1", MAIL_HOSTNAME: "mda.lmtp.test" } });
  tempfailLmtp = await startLmtp(
    { pool: env.pool, bus: env.bus, logger },
    { port: 0, host: "127.0.0.1", maxSize: 1_000_000, maxClients: 10, socketTimeout: 10_000, hostname: "mda.lmtp.test", allowedNetworks: ["127.0.0.1"], quotaFullTempfail: true },
  );
  proxy = new LossyProxy(mda.lmtpPort!);
  await proxy.listen();
  postfix = await startPostfix({
    root: "/tmp/mailstack-mda-lmtp-postfix",
    myhostname: "postfix.lmtp.test",
    main: {
      virtual_mailbox_domains: "lmtp.test, tempfail.lmtp.test, retry.lmtp.test",
      virtual_transport: `lmtp:inet:127.0.0.1:${mda.lmtpPort}`,
      transport_maps: `inline:{ tempfail.lmtp.test=lmtp:inet:127.0.0.1:${tempfailLmtp.port}, retry.lmtp.test=lmtp:inet:127.0.0.1:${proxy.port} }`,
      smtpd_reject_unlisted_recipient: "no",
    },
  });
  postfixPort = postfix.port;
});

after(async () => {
  if (!available) return;
  await postfix.stop();
  proxy.server.close();
  await tempfailLmtp.stop();
  await mda.stop();
  await env.close();
});

async function submit(from: string, to: string[], subject: string): Promise<string> {
  const { stdout } = await run("swaks", [
    "--server", "127.0.0.1", "--port", String(postfixPort), "--from", from, "--to", to.join(","),
    "--header", `Subject: ${subject}`, "--body", `Body of ${subject}.`,
  ]);
  const queued = /250 2\.0\.0 Ok: queued as (\w+)/.exec(stdout);
  assert.ok(queued, stdout);
  return queued[1]!;
}

async function entriesOf(accountId: number, subject: string) {
  return (await env.pool.query(
    "SELECT e.header_prefix, m.raw, m.source FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE e.account_id = $1",
    [accountId],
  )).rows.filter((r) => r.raw.toString().includes(`Subject: ${subject}`));
}

test("Postfix delivers through LMTP; an over-quota recipient's 552 5.2.2 becomes Postfix's own bounce, one only", { skip: !available && "needs Postfix and root" }, async () => {
  const ok = await account(env.pool, "ok@lmtp.test");
  const full = await account(env.pool, "full@lmtp.test", 100);
  const sender = await account(env.pool, "sender@lmtp.test");
  const queueId = await submit("sender@lmtp.test", ["ok@lmtp.test", "full@lmtp.test", "nobody@lmtp.test"], "via postfix");

  const entry = await waitFor(async () => (await entriesOf(ok, "via postfix"))[0], 30_000, 100);
  assert.equal(entry.source, "lmtp");
  const copy = Buffer.concat([entry.header_prefix, entry.raw]).toString();
  assert.ok(copy.startsWith("Return-Path: <sender@lmtp.test>\r\nDelivered-To: ok@lmtp.test\r\nReceived: from postfix.lmtp.test"), copy.slice(0, 300));
  assert.match(copy, /Body of via postfix\./);

  // Postfix got 552 5.2.2 for full@ and 550 5.1.1 for nobody@, and bounced once to the sender (through LMTP again, from <>).
  const bouncesOf = async () => (await entriesOf(sender, "Undelivered Mail Returned to Sender")).filter((r) => /5\.2\.2/.test(r.raw.toString()));
  await waitFor(async () => (await bouncesOf()).length > 0, 30_000, 100);
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  const bounce = await bouncesOf();
  assert.equal(bounce.length, 1);
  assert.ok(bounce[0].header_prefix.toString().startsWith("Return-Path: <>\r\n"));
  assert.match(bounce[0].raw.toString(), /full@lmtp\.test/);
  assert.match(bounce[0].raw.toString(), /nobody@lmtp\.test/);
  assert.equal((await env.pool.query("SELECT count(*)::int AS n FROM mailbox_entries WHERE account_id = $1", [full])).rows[0].n, 0);
  // Our own row for full@ is bounced with its DSN suppressed: Postfix told the sender already.
  const row = (await env.pool.query("SELECT state, dsn_state FROM deliveries WHERE account_id = $1", [full])).rows;
  assert.deepEqual(row, [{ state: "bounced", dsn_state: "suppressed" }]);
  const log = postfixLog();
  assert.match(log, new RegExp(`${queueId}: to=<ok@lmtp\\.test>.*dsn=2\\.0\\.0, status=sent \\(250 2\\.0\\.0 Delivered`));
  assert.match(log, new RegExp(`${queueId}: to=<full@lmtp\\.test>.*dsn=5\\.2\\.2, status=bounced .*said: 552 5\\.2\\.2 Mailbox full \\(in reply to end of DATA command\\)`));
  assert.match(log, new RegExp(`${queueId}: to=<nobody@lmtp\\.test>.*dsn=5\\.1\\.1, status=bounced .*said: 550 5\\.1\\.1 .*\\(in reply to RCPT TO command\\)`));
});

test("with LMTP_QUOTA_FULL_TEMPFAIL Postfix defers the full recipient (452 4.2.2) and delivers the others", { skip: !available && "needs Postfix and root" }, async () => {
  const ok = await account(env.pool, "ok@tempfail.lmtp.test");
  await account(env.pool, "full@tempfail.lmtp.test", 100);
  const queueId = await submit("someone@remote.example", ["ok@tempfail.lmtp.test", "full@tempfail.lmtp.test"], "tempfail via postfix");
  await waitFor(async () => (await entriesOf(ok, "tempfail via postfix")).length > 0, 30_000, 100);
  await waitFor(() => /to=<full@tempfail\.lmtp\.test>.*status=deferred/.test(postfixLog()), 30_000, 100);
  const log = postfixLog();
  assert.match(log, new RegExp(`${queueId}: to=<full@tempfail\\.lmtp\\.test>.*dsn=4\\.2\\.2, status=deferred .*said: 452 4\\.2\\.2 Mailbox full`));
  assert.match(log, new RegExp(`${queueId}: to=<ok@tempfail\\.lmtp\\.test>.*status=sent`));
  assert.doesNotMatch(log, new RegExp(`${queueId}: to=<full@tempfail\\.lmtp\\.test>.*status=bounced`));
});

test("Postfix sends a message again after losing our replies: the MDA recognises it and files one copy", { skip: !available && "needs Postfix and root" }, async () => {
  const ok = await account(env.pool, "ok@retry.lmtp.test");
  proxy.dropNextReply = true;
  const queueId = await submit("someone@remote.example", ["ok@retry.lmtp.test"], "retried by postfix");
  // Under a loaded machine (the whole suite in parallel) Postfix's retry has taken over 30 s once.
  await waitFor(() => new RegExp(`${queueId}: to=<ok@retry\\.lmtp\\.test>.*status=sent`).test(postfixLog()), 90_000, 200);
  assert.equal(proxy.dropped, 1);
  const log = postfixLog();
  // Postfix's own words for the lost reply, then the retry that our duplicate check answered.
  assert.match(log, new RegExp(`${queueId}: to=<ok@retry\\.lmtp\\.test>.*status=deferred .*(lost connection|Connection reset).*message may be sent more than once`));
  assert.match(log, new RegExp(`${queueId}: to=<ok@retry\\.lmtp\\.test>.*status=sent \\(250 2\\.0\\.0 Delivered \\(\\w+\\), a copy of a message already received\\)`));
  assert.equal((await entriesOf(ok, "retried by postfix")).length, 1);
});
