// Postfix hands mail to the MDA over LMTP (virtual_transport = lmtp:inet:...), as an existing
// MTA in front of mailstack would. A Postfix instance of this test's own (own config, queue and
// data directories, own port), so the system's Postfix settings and other instances are untouched
// (only its directory is listed in alternate_config_directories, as Postfix requires).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { promisify } from "node:util";
import { createLogger } from "@mailstack/telemetry";
import { freePort, createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { startMda, type Mda } from "../src/mda.ts";
import { account } from "./helpers.ts";

const run = promisify(execFile);
const DIR = "/tmp/mailstack-mda-lmtp-postfix";
const QUEUE = "/var/spool/postfix-mdalmtp";
const DATA = "/var/lib/postfix-mdalmtp";
const LOG = "/var/log/postfix-mdalmtp.log";
const available = existsSync("/usr/sbin/postfix") && process.getuid?.() === 0;

let env: TestEnv;
let mda: Mda;
let postfixPort: number;

before(async () => {
  if (!available) return;
  env = await createTestEnv();
  mda = await startMda({
    pool: env.pool,
    bus: env.bus,
    logger: createLogger("mda-test", "silent"),
    config: { LMTP_PORT: 0, LMTP_HOST: "127.0.0.1", MAIL_HOSTNAME: "mda.lmtp.test" },
  });
  postfixPort = await freePort();
  await run("postfix", ["-c", DIR, "stop"]).catch(() => undefined);
  mkdirSync(DIR, { recursive: true });
  mkdirSync(QUEUE, { recursive: true });
  mkdirSync(DATA, { recursive: true });
  await run("chown", ["postfix", DATA]);
  const master = readFileSync("/etc/postfix/master.cf", "utf8").replace(/^smtp(\s+)inet/m, `${postfixPort}$1inet`);
  writeFileSync(`${DIR}/master.cf`, master);
  writeFileSync(
    `${DIR}/main.cf`,
    [
      "compatibility_level = 3.6",
      `queue_directory = ${QUEUE}`,
      `data_directory = ${DATA}`,
      "myhostname = postfix.lmtp.test",
      "mydestination =",
      "inet_interfaces = 127.0.0.1",
      "inet_protocols = ipv4",
      "mynetworks = 127.0.0.0/8",
      "virtual_mailbox_domains = lmtp.test",
      `virtual_transport = lmtp:inet:127.0.0.1:${mda.lmtpPort}`,
      "smtpd_reject_unlisted_recipient = no",
      `maillog_file = ${LOG}`,
      "alias_maps =",
      "alias_database =",
      "",
    ].join("\n"),
  );
  await run("postconf", ["-c", DIR, "-F", "*/*/chroot = n"]);
  const listed = (await run("postconf", ["-h", "alternate_config_directories"])).stdout.trim();
  if (!listed.split(/[\s,]+/).includes(DIR)) await run("postconf", ["-e", `alternate_config_directories = ${listed} ${DIR}`.trim()]);
  await run("postfix", ["-c", DIR, "check"]);
  await run("postfix", ["-c", DIR, "start"]);
});

after(async () => {
  if (!available) return;
  await run("postfix", ["-c", DIR, "stop"]).catch(() => undefined);
  await mda.stop();
  await env.close();
});

test("Postfix delivers through LMTP; an over-quota recipient's 552 5.2.2 becomes Postfix's own bounce, one only", { skip: !available && "needs Postfix and root" }, async () => {
  const ok = await account(env.pool, "ok@lmtp.test");
  const full = await account(env.pool, "full@lmtp.test", 100);
  const sender = await account(env.pool, "sender@lmtp.test");
  const { stdout } = await run("swaks", [
    "--server", "127.0.0.1", "--port", String(postfixPort), "--from", "sender@lmtp.test",
    "--to", "ok@lmtp.test,full@lmtp.test", "--header", "Subject: via postfix", "--body", "Hello through Postfix and LMTP.",
  ]);
  assert.match(stdout, /250 2\.0\.0 Ok: queued/);

  const entry = await waitFor(async () =>
    (await env.pool.query(
      "SELECT e.header_prefix, m.raw, m.source FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE e.account_id = $1",
      [ok],
    )).rows[0], 30_000, 100);
  assert.equal(entry.source, "lmtp");
  const copy = Buffer.concat([entry.header_prefix, entry.raw]).toString();
  assert.ok(copy.startsWith("Return-Path: <sender@lmtp.test>\r\nDelivered-To: ok@lmtp.test\r\nReceived: from postfix.lmtp.test"), copy.slice(0, 300));
  assert.match(copy, /Subject: via postfix/);
  assert.match(copy, /Hello through Postfix and LMTP\./);

  // Postfix got 552 5.2.2 for full@ and bounced to the sender (through LMTP again, from <>).
  const bouncesOf = async () =>
    (await env.pool.query(
      "SELECT e.header_prefix, m.raw FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE e.account_id = $1",
      [sender],
    )).rows.filter((r) => /5\.2\.2/.test(r.raw.toString()));
  await waitFor(async () => (await bouncesOf()).length > 0, 30_000, 100);
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  const bounce = await bouncesOf();
  assert.equal(bounce.length, 1);
  assert.ok(bounce[0].header_prefix.toString().startsWith("Return-Path: <>\r\n"));
  assert.match(bounce[0].raw.toString(), /full@lmtp\.test/);
  assert.equal((await env.pool.query("SELECT count(*)::int AS n FROM mailbox_entries WHERE account_id = $1", [full])).rows[0].n, 0);
  // Our own row for full@ is bounced with its DSN suppressed: Postfix told the sender already.
  const row = (await env.pool.query("SELECT state, dsn_state FROM deliveries WHERE account_id = $1", [full])).rows;
  assert.deepEqual(row, [{ state: "bounced", dsn_state: "suppressed" }]);
  if (existsSync(LOG)) assert.match(readFileSync(LOG, "utf8"), /said: 552 5\.2\.2 Mailbox full/);
});
