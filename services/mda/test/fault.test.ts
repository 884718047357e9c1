// The fault test of issue 3: 2,000 messages while the MDA process is SIGKILLed and restarted
// twice and NATS is restarted once; afterwards every accepted message is in each of its
// mailboxes exactly once and no delivery is left pending.
//
// Messages go in over SMTP to the real mta-inbound process (as from a remote MTA: 250 means
// accepted; a 4xx while NATS is down is retried, as an MTA would). The MDA runs as a child
// process so it can be SIGKILLed. NATS is a nats-server of this test's own (own port, own -sd
// directory), so restarting it does not disturb anyone else using the system NATS.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connectBus, deleteStreams, provisionBus, type Bus } from "@mailstack/bus";
import { freePort, createTestDatabase, waitFor, type TestDatabase } from "@mailstack/testkit";
import { LineClient, account, message } from "./helpers.ts";

const MESSAGES = 2_000;
const mainPath = fileURLToPath(new URL("../src/main.ts", import.meta.url));
const inboundPath = fileURLToPath(new URL("../../mta-inbound/src/main.ts", import.meta.url));
const prefix = `fault${process.pid}`;

let db: TestDatabase;
let natsDir: string;
let natsPort: number;
let nats: ChildProcess | null = null;
let mda: ChildProcess | null = null;
let inbound: ChildProcess | null = null;
let smtpPort: number;
let bus: Bus | null = null;
const mdaLog: string[] = [];

async function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  await new Promise((resolve) => child.once("exit", resolve));
}

async function startNats(): Promise<void> {
  nats = spawn("nats-server", ["-a", "127.0.0.1", "-p", String(natsPort), "-js", "-sd", natsDir], { stdio: "ignore" });
  await waitFor(async () => {
    const probe = await connectBus({ url: `nats://127.0.0.1:${natsPort}`, name: "probe" }).catch(() => null);
    if (!probe) return false;
    await probe.close();
    return true;
  }, 15_000, 100);
}

async function stopNats(): Promise<void> {
  if (!nats) return;
  const child = nats;
  nats = null;
  child.kill("SIGTERM");
  await exited(child);
}

async function startMdaProcess(): Promise<void> {
  const opsPort = await freePort();
  const logFrom = mdaLog.length;
  const child = spawn(process.execPath, [mainPath], {
    env: {
      ...process.env,
      DATABASE_URL: db.url,
      NATS_URL: `nats://127.0.0.1:${natsPort}`,
      BUS_PREFIX: prefix,
      OPS_PORT: String(opsPort),
      LMTP_ENABLED: "false",
      // info: the startup steps are in the log that a start that never gets ready reports.
      LOG_LEVEL: "info",
      MDA_SWEEP_INTERVAL: "1s",
      MDA_SWEEP_UNDISPATCHED_AFTER: "2s",
      // Jobs the killed process held unacked come back after ack_wait (60 s); the sweeper is faster.
      MDA_SWEEP_STUCK_AFTER: "5s",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout!.on("data", (chunk) => mdaLog.push(String(chunk)));
  child.stderr!.on("data", (chunk) => mdaLog.push(String(chunk)));
  mda = child;
  // A start that never gets ready reports what /readyz says and the process's log since it started.
  await waitFor(async () => {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`mda exited (${child.exitCode ?? child.signalCode}): ${mdaLog.join("").slice(-2000)}`);
    const response = await fetch(`http://127.0.0.1:${opsPort}/readyz`).catch(() => null);
    return response?.status === 200;
  }, 60_000, 100).catch(async (error: Error) => {
    const readyz = await fetch(`http://127.0.0.1:${opsPort}/readyz`).then((r) => `${r.status} ${r.statusText}`, (e: Error) => e.message);
    throw new Error(`${error.message}; /readyz on ${opsPort}: ${readyz}; mda log since this start: ${mdaLog.slice(logFrom).join("").slice(0, 3000)}`);
  });
}

async function startInboundProcess(): Promise<void> {
  const opsPort = await freePort();
  smtpPort = await freePort();
  const log: string[] = [];
  const child = spawn(process.execPath, [inboundPath], {
    env: {
      ...process.env,
      DATABASE_URL: db.url,
      NATS_URL: `nats://127.0.0.1:${natsPort}`,
      BUS_PREFIX: prefix,
      OPS_PORT: String(opsPort),
      SMTP_PORT: String(smtpPort),
      SMTP_HOST: "127.0.0.1",
      MAIL_HOSTNAME: "mx.fault.test",
      INBOUND_AUTH_CHECKS: "false",
      INBOUND_SWEEP_INTERVAL: "1s",
      INBOUND_SWEEP_UNDISPATCHED_AFTER: "2s",
      TLS_DIR: natsDir,
      LOG_LEVEL: "warn",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout!.on("data", (chunk) => log.push(String(chunk)));
  child.stderr!.on("data", (chunk) => log.push(String(chunk)));
  inbound = child;
  await waitFor(async () => {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`mta-inbound exited (${child.exitCode ?? child.signalCode}): ${log.join("").slice(-2000)}`);
    return (await fetch(`http://127.0.0.1:${opsPort}/readyz`).catch(() => null))?.status === 200;
  }, 30_000, 100);
}

async function killMda(): Promise<void> {
  if (!mda) return;
  const child = mda;
  mda = null;
  child.kill("SIGKILL");
  await exited(child);
}

before(async () => {
  db = await createTestDatabase();
  natsDir = mkdtempSync(join(tmpdir(), "mda-fault-nats-"));
  natsPort = await freePort();
  await startNats();
});

after(async () => {
  for (const child of [mda, inbound]) {
    if (!child) continue;
    child.kill("SIGTERM");
    await exited(child);
  }
  if (bus) {
    await deleteStreams(bus).catch(() => undefined);
    await bus.close();
  }
  await stopNats();
  rmSync(natsDir, { recursive: true, force: true });
  await db.drop();
});

test("2,000 messages through two MDA SIGKILLs and a NATS restart: every copy filed exactly once, nothing pending", { timeout: 180_000 }, async () => {
  bus = await connectBus({ url: `nats://127.0.0.1:${natsPort}`, name: "fault-sender", prefix });
  await provisionBus(bus);
  const accounts: Array<{ id: number; address: string }> = [];
  for (let i = 0; i < 5; i++) {
    const address = `user${i}@fault.test`;
    accounts.push({ id: await account(db.pool, address), address });
  }
  await Promise.all([startMdaProcess(), startInboundProcess()]);

  /** Message i goes to one, two or three of the accounts. */
  const recipientsOf = (i: number) => accounts.filter((_, k) => k === i % 5 || (i % 3 === 0 && k === (i + 1) % 5) || (i % 7 === 0 && k === (i + 2) % 5));
  const accepted = new Set<number>();
  let sent = 0;
  let temporaryRefusals = 0;
  let reconnects = 0;
  const permanent: string[] = [];
  const faults: string[] = [];
  const started = Date.now();

  /** One SMTP session sending messages from the shared counter; a 4xx or a dropped connection is retried. */
  const sender = async () => {
    let client: LineClient | null = null;
    const open = async () => {
      client?.close();
      client = await LineClient.open(smtpPort);
      if (!/^220 /.test(await client.reply())) throw new Error("no greeting");
      if (!/^250 /.test(await client.command("EHLO load.remote.example"))) throw new Error("EHLO refused");
      return client;
    };
    const transaction = async (c: LineClient, i: number): Promise<string> => {
      let reply = await c.command("MAIL FROM:<load@remote.example>");
      if (!reply.startsWith("250")) return reply;
      for (const r of recipientsOf(i)) {
        reply = await c.command(`RCPT TO:<${r.address}>`);
        if (!reply.startsWith("250")) return reply;
      }
      reply = await c.command("DATA");
      if (!reply.startsWith("354")) return reply;
      c.write(`${message(`fault ${i}`, `${"body ".repeat(100)}\r\n`)}.\r\n`);
      return c.reply(30_000);
    };
    while (next < MESSAGES) {
      const i = next++;
      const fault = faultAt.get(i);
      // Faults run one after another (sending goes on meanwhile): a SIGKILL must hit an MDA that
      // finished starting, or the start it interrupts would wait for a process that is gone.
      if (fault) faultsRunning.push((lastFault = lastFault.then(fault)));
      for (let attempt = 0; ; attempt++) {
        assert.ok(attempt < 200, `message ${i} never accepted`);
        try {
          const c = client ?? (await open());
          const reply = await transaction(c, i);
          if (reply.startsWith("250")) {
            accepted.add(i);
            break;
          }
          if (reply.startsWith("5")) {
            permanent.push(`${i}: ${reply}`);
            break;
          }
          temporaryRefusals++;
          await c.command("RSET").catch(() => undefined);
        } catch {
          reconnects++;
          (client as LineClient | null)?.close();
          client = null;
        }
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      sent++;
    }
    (client as LineClient | null)?.close();
  };

  const faultsRunning: Array<Promise<void>> = [];
  let lastFault: Promise<void> = Promise.resolve();
  let next = 0;
  const faultAt = new Map<number, () => Promise<void>>([
    [400, async () => {
      faults.push(`SIGKILL mda at ${sent}`);
      await killMda();
      await startMdaProcess();
    }],
    [900, async () => {
      faults.push(`restart nats at ${sent}`);
      await stopNats();
      await new Promise((resolve) => setTimeout(resolve, 500));
      await startNats();
    }],
    [1_400, async () => {
      faults.push(`SIGKILL mda at ${sent}`);
      await killMda();
      await new Promise((resolve) => setTimeout(resolve, 300));
      await startMdaProcess();
    }],
  ]);

  // Ten concurrent SMTP sessions reusing their connections; at the marks above, the fault runs while sending goes on.
  await Promise.all(Array.from({ length: 10 }, sender));
  await Promise.all(faultsRunning);
  const sendSeconds = (Date.now() - started) / 1000;

  const totalDeliveries = [...accepted].reduce((sum, i) => sum + recipientsOf(i).length, 0);
  await waitFor(async () => {
    const pending = (await db.pool.query("SELECT count(*)::int AS n FROM deliveries WHERE state IN ('queued', 'deferred')")).rows[0].n;
    return pending === 0;
  }, 120_000, 500);
  const drainSeconds = (Date.now() - started) / 1000;

  assert.equal(faults.length, 3, faults.join("; "));
  assert.deepEqual(permanent, []);
  assert.equal(accepted.size, MESSAGES);
  const states = (await db.pool.query("SELECT state, count(*)::int AS n FROM deliveries GROUP BY state")).rows;
  assert.deepEqual(states, [{ state: "delivered", n: totalDeliveries }]);
  // A 4xx stored nothing: each accepted message is stored once.
  const stored = (await db.pool.query("SELECT (SELECT count(*)::int FROM messages) AS n, count(DISTINCT parsed->>'subject')::int AS subjects FROM message_parsed")).rows[0];
  assert.deepEqual(stored, { n: MESSAGES, subjects: MESSAGES });

  // Each delivery has exactly one entry, and each message is in each of its mailboxes exactly once.
  const entries = (await db.pool.query("SELECT count(*)::int AS n, count(DISTINCT delivery_id)::int AS d FROM mailbox_entries")).rows[0];
  assert.equal(entries.n, totalDeliveries);
  assert.equal(entries.d, totalDeliveries);
  const filed = (await db.pool.query(
    `SELECT p.parsed->>'subject' AS subject, a.address, count(*)::int AS n
       FROM mailbox_entries e JOIN message_parsed p ON p.message_id = e.message_id JOIN accounts a ON a.id = e.account_id GROUP BY 1, 2`,
  )).rows;
  assert.ok(filed.every((r) => r.n === 1), "no message twice in a mailbox");
  const expected = new Set([...accepted].flatMap((i) => recipientsOf(i).map((r) => `fault ${i}:${r.address}`)));
  assert.deepEqual(new Set(filed.map((r) => `${r.subject}:${r.address}`)), expected);

  // UIDs are dense (a rolled-back transaction gives its UID back) and quotas add up.
  const folders = (await db.pool.query(
    `SELECT f.account_id, f.uid_next, count(e.id)::int AS n, max(e.uid)::int AS top, a.used_bytes, coalesce(sum(e.size), 0)::bigint AS bytes
       FROM folders f JOIN accounts a ON a.id = f.account_id LEFT JOIN mailbox_entries e ON e.account_id = f.account_id AND e.folder = f.name
      GROUP BY f.account_id, f.uid_next, a.used_bytes`,
  )).rows;
  for (const f of folders) {
    assert.equal(f.uid_next - 1, f.n, `account ${f.account_id}: uid_next ${f.uid_next}, ${f.n} entries`);
    assert.equal(f.top, f.n);
    assert.equal(Number(f.used_bytes), Number(f.bytes));
  }
  const events = (await db.pool.query("SELECT count(*)::int AS n FROM delivery_events WHERE event = 'delivered'")).rows[0].n;
  assert.equal(events, totalDeliveries, "one delivered event per delivery");
  console.log(
    `fault test: ${MESSAGES} messages, ${totalDeliveries} deliveries; faults: ${faults.join(", ")}; ` +
      `${temporaryRefusals} temporary refusals and ${reconnects} reconnects retried by the sender; sent in ${sendSeconds.toFixed(1)} s, all filed after ${drainSeconds.toFixed(1)} s`,
  );
});
