// The fault test of issue 3: 2,000 messages while the MDA process is SIGKILLed and restarted
// twice and NATS is restarted once; afterwards every accepted message is in each of its
// mailboxes exactly once and no delivery is left pending.
//
// NATS here is a nats-server of this test's own (own port, own -sd directory), so restarting
// it does not disturb anyone else using the system NATS.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connectBus, deleteStreams, provisionBus, type Bus } from "@mailstack/bus";
import { acceptMessage, dispatchAccepted, type AcceptedMessage } from "@mailstack/queue";
import { createTestDatabase, waitFor, type TestDatabase } from "@mailstack/testkit";
import { account, message } from "./helpers.ts";

const MESSAGES = 2_000;
const mainPath = fileURLToPath(new URL("../src/main.ts", import.meta.url));
const prefix = `fault${process.pid}`;

let db: TestDatabase;
let natsDir: string;
let natsPort: number;
let nats: ChildProcess | null = null;
let mda: ChildProcess | null = null;
let bus: Bus | null = null;
const mdaLog: string[] = [];

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

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
  const child = spawn(process.execPath, [mainPath], {
    env: {
      ...process.env,
      DATABASE_URL: db.url,
      NATS_URL: `nats://127.0.0.1:${natsPort}`,
      BUS_PREFIX: prefix,
      OPS_PORT: String(opsPort),
      LMTP_ENABLED: "false",
      LOG_LEVEL: "warn",
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
  await waitFor(async () => {
    if (child.exitCode !== null) throw new Error(`mda exited: ${mdaLog.join("").slice(-2000)}`);
    const response = await fetch(`http://127.0.0.1:${opsPort}/readyz`).catch(() => null);
    return response?.status === 200;
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
  if (mda) {
    mda.kill("SIGTERM");
    await exited(mda);
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
  await startMdaProcess();

  const accepted: AcceptedMessage[] = [];
  let sent = 0;
  let publishFailures = 0;
  const faults: string[] = [];
  const started = Date.now();

  const sendOne = async (i: number) => {
    // One, two or three recipients per message.
    const recipients = accounts.filter((_, k) => k === i % 5 || (i % 3 === 0 && k === (i + 1) % 5) || (i % 7 === 0 && k === (i + 2) % 5));
    const result = await acceptMessage(
      db.pool,
      { raw: Buffer.from(message(`fault ${i}`, `${"body ".repeat(100)}\r\n`)), envelopeFrom: "load@remote.example", source: "inbound" },
      recipients.map((r) => ({ recipient: r.address, route: { kind: "local", accountId: r.id, address: r.address } })),
      "fault-test",
    );
    accepted.push(result);
    // As the SMTP services do: publish after commit; a failure is left to the sweeper.
    await dispatchAccepted(bus!, db.pool, result).catch(() => publishFailures++);
  };

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

  // Ten concurrent senders; at the marks above, the fault runs while sending goes on.
  const faultsRunning: Array<Promise<void>> = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: 10 }, async () => {
      while (next < MESSAGES) {
        const i = next++;
        const fault = faultAt.get(i);
        if (fault) faultsRunning.push(fault());
        await sendOne(i);
        sent++;
      }
    }),
  );
  await Promise.all(faultsRunning);
  const sendSeconds = (Date.now() - started) / 1000;

  const totalDeliveries = accepted.reduce((sum, a) => sum + a.deliveries.length, 0);
  await waitFor(async () => {
    const pending = (await db.pool.query("SELECT count(*)::int AS n FROM deliveries WHERE state IN ('queued', 'deferred')")).rows[0].n;
    return pending === 0;
  }, 120_000, 500);
  const drainSeconds = (Date.now() - started) / 1000;

  assert.equal(faults.length, 3, faults.join("; "));
  assert.equal(accepted.length, MESSAGES);
  const states = (await db.pool.query("SELECT state, count(*)::int AS n FROM deliveries GROUP BY state")).rows;
  assert.deepEqual(states, [{ state: "delivered", n: totalDeliveries }]);

  // Each delivery has exactly one entry, each (message, account) pair appears exactly once.
  const entries = (await db.pool.query("SELECT count(*)::int AS n, count(DISTINCT delivery_id)::int AS d FROM mailbox_entries")).rows[0];
  assert.equal(entries.n, totalDeliveries);
  assert.equal(entries.d, totalDeliveries);
  const doubled = (await db.pool.query("SELECT message_id, account_id FROM mailbox_entries GROUP BY 1, 2 HAVING count(*) > 1")).rows;
  assert.deepEqual(doubled, []);
  const expected = new Set(accepted.flatMap((a) => a.deliveries.map((d) => `${a.messageId}:${d.finalRecipient}`)));
  const filed = (await db.pool.query("SELECT e.message_id, a.address FROM mailbox_entries e JOIN accounts a ON a.id = e.account_id")).rows;
  assert.deepEqual(new Set(filed.map((r) => `${r.message_id}:${r.address}`)), expected);

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
      `${publishFailures} publishes failed (repaired by the sweeper); sent in ${sendSeconds.toFixed(1)} s, all filed after ${drainSeconds.toFixed(1)} s`,
  );
});
