/**
 * POP3 RETR throughput: one session of Python's poplib retrieving every message of a mailbox of
 * 5,000 messages of 4 KiB, from mailstack's pop3 service and from Dovecot (Debian's
 * dovecot-pop3d, its own instance via bench/pop3/dovecot.sh), same client, same run.
 *
 *   mailstack: the mailbox is filed the way the MDA files it (messages + mailbox_entries with a
 *              Return-Path/Delivered-To header prefix) into a database of this run's own; the
 *              pop3 service runs as its own process (node services/pop3/src/main.ts).
 *   reference: the same bytes (LF line endings, as a maildir holds them) in a maildir of
 *              uid 5000 that Dovecot serves on 127.0.0.1:2110.
 *
 * Round 1 is "cold" for both: mailstack computes and caches the POP3 sizes (pop3_message_sizes),
 * Dovecot builds its index. Then --rounds warm rounds, alternating between the two; the median
 * and the best round are reported (on a shared 2-core machine the best round is the least disturbed).
 * msgs/s = messages / time of the RETR loop; MB/s = octets (as RETR sends them) / that time.
 *
 *   node bench/pop3/run.ts [--count 5000] [--size 4096] [--rounds 3] [--no-dovecot]
 */
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { addAccount, addDomain, type Pool } from "../../packages/db/src/index.ts";
import { createTestEnv, freePort, type ServiceProcess, type TestEnv } from "../../packages/testkit/src/index.ts";
import { cpuMs, sh, benchLogDir, benchLogLevel, startBenchService } from "../lib.ts";

const { values } = parseArgs({
  options: {
    count: { type: "string", default: "5000" },
    size: { type: "string", default: "4096" },
    rounds: { type: "string", default: "7" },
    "no-dovecot": { type: "boolean", default: false },
  },
});
const COUNT = Number(values.count);
const SIZE = Number(values.size);
const ROUNDS = Number(values.rounds);
const here = new URL(".", import.meta.url).pathname;
const USER = "user1@bench.test";
const PASSWORD = "bench-Password-1";
const DOVECOT_PORT = 2110;
const PREFIX = `Return-Path: <sender@remote.example>\r\nDelivered-To: ${USER}\r\n`;

interface Run {
  count: number;
  size: number;
  octets: number;
  login_s: number;
  retr_s: number;
}


/** A deterministic 4 KiB message (CRLF), some body lines starting with ".", like real mail. */
function message(i: number): Buffer {
  const head =
    `From: Sender ${i} <sender@remote.example>\r\nTo: <${USER}>\r\nSubject: bench message ${i}\r\n` +
    `Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench-${i}@remote.example>\r\nMIME-Version: 1.0\r\n` +
    "Content-Type: text/plain; charset=us-ascii\r\n\r\n";
  const lines: string[] = [];
  let length = head.length;
  for (let n = 0; length < SIZE; n++) {
    const text = `${n % 17 === 0 ? "." : ""}line ${n} of message ${i}: ${"lorem ipsum dolor sit amet ".repeat(2)}`.slice(0, 70);
    const line = `${text}\r\n`;
    lines.push(line);
    length += line.length;
  }
  const body = Buffer.from(head + lines.join(""));
  // Trim to exactly SIZE octets, still ending in CRLF.
  return Buffer.concat([body.subarray(0, SIZE - 2), Buffer.from("\r\n")]);
}

async function fillMailstack(pool: Pool, messages: Buffer[]): Promise<void> {
  await addDomain(pool, "bench.test");
  const account = await addAccount(pool, { address: USER, password: PASSWORD });
  for (let start = 0; start < messages.length; start += 500) {
    const batch = messages.slice(start, start + 500);
    const ids = await pool.query<{ id: number }>(
      `INSERT INTO messages (queue_id, raw, size, envelope_from, source)
       SELECT 'bench' || n, raw, octet_length(raw), 'sender@remote.example', 'inbound'
         FROM unnest($1::bytea[], $2::int[]) AS t(raw, n) RETURNING id`,
      [batch, batch.map((_, k) => start + k)],
    );
    await pool.query(
      `INSERT INTO mailbox_entries (account_id, folder, uid, message_id, header_prefix, size)
       SELECT $1, 'INBOX', uid, id, $4::bytea, octet_length($4::bytea) + $5::int
         FROM unnest($2::bigint[], $3::bigint[]) AS t(id, uid)`,
      [account.id, ids.rows.map((r) => r.id), batch.map((_, k) => start + k + 1), Buffer.from(PREFIX), SIZE],
    );
  }
  await pool.query("UPDATE folders SET uid_next = $2 WHERE account_id = $1", [account.id, messages.length + 1]);
}

async function fillMaildir(messages: Buffer[]): Promise<void> {
  const maildir = (await sh(join(here, "dovecot.sh"), ["maildir", USER])).output.trim();
  await rm(join(maildir, ".."), { recursive: true, force: true });
  for (const sub of ["cur", "new", "tmp"]) await mkdir(join(maildir, sub), { recursive: true });
  // As Postfix's virtual(8) delivers: LF line endings, a plain unique name in new/.
  for (const [i, raw] of messages.entries()) {
    const text = Buffer.from((PREFIX + raw.toString("latin1")).replace(/\r\n/g, "\n"), "latin1");
    await writeFile(join(maildir, "new", `${1_790_000_000 + i}.V801I${i}M0.bench`), text);
  }
  await sh("chown", ["-R", "5000:5000", join(maildir, "..", "..")]);
}

async function client(port: number): Promise<Run> {
  const result = await sh("/usr/bin/python3", [join(here, "client.py"), "127.0.0.1", String(port), USER, PASSWORD]);
  if (result.code !== 0) throw new Error(`client.py failed: ${result.output}`);
  return JSON.parse(result.output) as Run;
}

/** CPU ms of a process (utime + stime), plus its waited-for children's when `children`. */

/** Dovecot's master: each session's pop3 process is its child, so its CPU lands in the master's cutime/cstime. */
async function dovecotMasterPid(): Promise<number> {
  return Number((await readFile("/tmp/mailstack-pop3-bench-dovecot/run/master.pid", "utf8")).trim());
}

function rate(run: Run) {
  return {
    msgsPerSecond: Math.round(run.count / run.retr_s),
    mbPerSecond: Number((run.octets / run.retr_s / 1e6).toFixed(1)),
    loginMs: Math.round(run.login_s * 1000),
  };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

/** Waits until the pop3 service has recorded this many 'retrieved' journey events in all. */
async function retrievedEvents(pool: TestEnv["pool"], total: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const n = (await pool.query<{ n: number }>("SELECT count(*)::int AS n FROM delivery_events WHERE event = 'retrieved'")).rows[0]!.n;
    if (n >= total) return;
    if (Date.now() > deadline) throw new Error(`only ${n} of ${total} retrieved events were recorded`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

let env: TestEnv | undefined;
let pop3: ServiceProcess | undefined;
let dovecot = false;
try {
  const messages = Array.from({ length: COUNT }, (_, i) => message(i));
  env = await createTestEnv();
  await fillMailstack(env.pool, messages);
  const port = await freePort();
  pop3 = await startBenchService("pop3", {
    ...env.env,
    POP3_HOST: "127.0.0.1",
    POP3_PORT: String(port),
    POP3S_PORT: String(await freePort()),
    TLS_DIR: "/tmp/mailstack-pop3-bench-tls",
    // For profiling: POP3_NODE_OPTIONS="--cpu-prof --cpu-prof-dir=/tmp/prof".
    ...(process.env.POP3_NODE_OPTIONS ? { NODE_OPTIONS: process.env.POP3_NODE_OPTIONS } : {}),
  });
  if (!values["no-dovecot"]) {
    await fillMaildir(messages);
    const started = await sh(join(here, "dovecot.sh"), ["start", USER, PASSWORD]);
    if (started.code !== 0) throw new Error(`dovecot did not start: ${started.output}`);
    dovecot = true;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }

  const results: Record<string, Run[]> = { mailstack: [], dovecot: [] };
  const cpu: number[] = [];
  const dovecotCpu: number[] = [];
  const master = dovecot ? await dovecotMasterPid() : 0;
  for (let round = 0; round <= ROUNDS; round++) {
    const before = await cpuMs(pop3.child.pid!);
    results.mailstack!.push(await client(port));
    // The service writes the round's journey events when the client pauses or leaves: wait for
    // them, so that work is counted in our CPU and does not run during Dovecot's round.
    await retrievedEvents(env.pool, (round + 1) * COUNT);
    cpu.push((await cpuMs(pop3.child.pid!)) - before);
    if (dovecot) {
      const dovecotBefore = await cpuMs(master, true);
      results.dovecot!.push(await client(DOVECOT_PORT));
      // The session's pop3 process exits after QUIT; wait for the master to reap it.
      await new Promise((resolve) => setTimeout(resolve, 300));
      dovecotCpu.push((await cpuMs(master, true)) - dovecotBefore);
    }
  }

  const summary: Record<string, unknown> = {};
  for (const [system, runs] of Object.entries(results)) {
    if (runs.length === 0) continue;
    const warm = runs.slice(1).map(rate);
    summary[system] = {
      cold: rate(runs[0]!),
      warm: {
        msgsPerSecond: median(warm.map((w) => w.msgsPerSecond)),
        mbPerSecond: median(warm.map((w) => w.mbPerSecond)),
        loginMs: median(warm.map((w) => w.loginMs)),
        best: Math.max(...warm.map((w) => w.msgsPerSecond)),
        bestMbPerSecond: Math.max(...warm.map((w) => w.mbPerSecond)),
        rounds: warm.map((w) => w.msgsPerSecond),
      },
      messages: runs[0]!.count,
      octets: runs[0]!.octets,
    };
  }
  (summary.mailstack as Record<string, unknown>).serverCpuMsPerMessageWarm = Number((median(cpu.slice(1)) / COUNT).toFixed(3));
  if (dovecot) (summary.dovecot as Record<string, unknown>).serverCpuMsPerMessageWarm = Number((median(dovecotCpu.slice(1)) / COUNT).toFixed(3));
  console.log(JSON.stringify({ count: COUNT, size: SIZE, rounds: ROUNDS, logLevel: benchLogLevel, logs: benchLogDir(), ...summary }, null, 2));
} finally {
  if (dovecot) await sh(join(here, "dovecot.sh"), ["stop"]);
  await pop3?.stop();
  await env?.close();
}
