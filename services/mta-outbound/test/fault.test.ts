import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, openSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { connectBus, provisionBus, type Bus } from "@mailstack/bus";
import { acceptMessage, dispatchAccepted } from "@mailstack/queue";
import { freePort, createTestDatabase, waitFor, type TestDatabase } from "@mailstack/testkit";
import { startMx } from "./helpers.ts";

// The fault test: 2,000 remote deliveries, three relay worker processes, one of them
// SIGKILLed twice, and the NATS server restarted once. Every message must reach the sink;
// duplicates (a remote 250 whose result a killed worker never recorded) are counted.

const TOTAL = 2_000;
const root = new URL("../../../", import.meta.url).pathname;

let db: TestDatabase;
let bus: Bus;
let natsPort: number;
let natsDir: string;
let nats: ChildProcess | null = null;
const workers: ChildProcess[] = [];
let sink: Awaited<ReturnType<typeof startMx>>;
const logDir = mkdtempSync(join(tmpdir(), "relay-fault-logs-"));
let keepLogs = false;

async function startNats(): Promise<void> {
  nats = spawn("nats-server", ["-js", "-a", "127.0.0.1", "-p", String(natsPort), "-sd", natsDir], { stdio: "ignore" });
  await waitFor(
    () =>
      new Promise<boolean>((resolve) => {
        const probe = connect(natsPort, "127.0.0.1");
        probe.once("connect", () => {
          probe.destroy();
          resolve(true);
        });
        probe.once("error", () => resolve(false));
      }),
    10_000,
  );
}

async function stopNats(): Promise<void> {
  const proc = nats;
  nats = null;
  if (!proc || proc.exitCode !== null) return;
  await new Promise<void>((resolve) => {
    proc.once("exit", () => resolve());
    proc.kill("SIGTERM");
  });
}

function startWorker(index: number, env: Record<string, string>): ChildProcess {
  const log = openSync(join(logDir, `worker-${index}.log`), "a");
  const child = spawn(process.execPath, [join(root, "services/mta-outbound/src/main.ts")], {
    cwd: root,
    env: { ...process.env, ...env, OPS_PORT: "0" },
    stdio: ["ignore", log, log],
  });
  workers.push(child);
  return child;
}

function kill(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once("exit", () => resolve());
    child.kill(signal);
  });
}

before(async () => {
  db = await createTestDatabase();
  natsPort = await freePort();
  natsDir = mkdtempSync(join(tmpdir(), "relay-fault-nats-"));
  await startNats();
  bus = await connectBus({ url: `nats://127.0.0.1:${natsPort}`, name: "fault-test", prefix: "fault" });
  await provisionBus(bus);
  sink = await startMx("127.0.0.1", 0, { noTls: true });
});

after(async () => {
  await Promise.all(workers.map((w) => kill(w, "SIGKILL")));
  await sink?.close();
  await bus?.close().catch(() => undefined);
  await stopNats();
  await db?.drop();
  if (natsDir) rmSync(natsDir, { recursive: true, force: true });
  if (!keepLogs) rmSync(logDir, { recursive: true, force: true });
});

test("2,000 deliveries through three workers, one SIGKILLed twice and NATS restarted: all arrive", { timeout: 170_000 }, async (t) => {
  const env = {
    DATABASE_URL: db.url,
    DATABASE_POOL_SIZE: "10",
    NATS_URL: `nats://127.0.0.1:${natsPort}`,
    BUS_PREFIX: "fault",
    LOG_LEVEL: process.env.FAULT_LOG_LEVEL ?? "warn",
    MAIL_HOSTNAME: "relay.fault.test",
    RELAY_SMARTHOST: `127.0.0.1:${sink.port}`,
    RELAY_CONCURRENCY: "20",
    RELAY_LEASE: "15s",
    RELAY_SCHEDULER_INTERVAL: "500ms",
    RELAY_BACKOFF: "1s",
    RELAY_CONNECT_TIMEOUT: "3s",
    RELAY_SWEEP_INTERVAL: "2s",
  };
  const started = Date.now();
  startWorker(0, env);
  let victim = startWorker(1, env);
  startWorker(2, env);

  // Accept and dispatch the messages the way the SMTP services do, ten at a time.
  let next = 0;
  const acceptOne = async () => {
    while (next < TOTAL) {
      const n = next++;
      const raw = Buffer.from(`From: <s@origin.test>\r\nTo: <r${n}@far.test>\r\nSubject: fault ${n}\r\nMessage-ID: <fault-${n}@origin.test>\r\n\r\nbody ${n}\r\n`);
      const route = { kind: "remote" as const, address: `r${n}@far.test`, domain: "far.test" };
      const accepted = await acceptMessage(db.pool, { raw, envelopeFrom: "s@origin.test", source: "submission", messageIdHeader: `<fault-${n}@origin.test>` }, [{ recipient: route.address, route }], "test");
      // A publish failing while NATS is down is left to the sweeper, like an SMTP service would.
      await dispatchAccepted(bus, db.pool, accepted).catch(() => undefined);
    }
  };
  const accepting = Promise.all(Array.from({ length: 10 }, acceptOne));

  const delivered = async () => Number((await db.pool.query("SELECT count(*) AS n FROM deliveries WHERE state = 'delivered'")).rows[0].n);
  const at = (count: number) => waitFor(async () => (await delivered()) >= count, 120_000, 100);

  await at(300);
  t.diagnostic(`first SIGKILL at ${Date.now() - started} ms`);
  await kill(victim, "SIGKILL");
  victim = startWorker(1, env);

  await at(800);
  await stopNats();
  t.diagnostic(`NATS stopped at ${Date.now() - started} ms`);
  await new Promise((resolve) => setTimeout(resolve, 2_000));
  await startNats();
  t.diagnostic(`NATS restarted at ${Date.now() - started} ms`);

  await at(1_300);
  t.diagnostic(`second SIGKILL at ${Date.now() - started} ms`);
  await kill(victim, "SIGKILL");
  startWorker(1, env);
  await accepting;

  await waitFor(async () => (await delivered()) === TOTAL, 150_000, 250);
  const elapsed = Date.now() - started;

  const seen = new Map<string, number>();
  const firstAt = new Map<string, number>();
  for (const message of sink.received) {
    const id = /Message-ID: <(fault-\d+)@/i.exec(message.body.toString())?.[1] ?? "?";
    seen.set(id, (seen.get(id) ?? 0) + 1);
    if (!firstAt.has(id)) firstAt.set(id, message.at - started);
  }
  const duplicates = [...seen.values()].reduce((sum, count) => sum + count - 1, 0);
  t.diagnostic(`delivered ${TOTAL} in ${elapsed} ms; sink received ${sink.received.length}; distinct ${seen.size}; duplicates ${duplicates}`);
  const duplicated = [...seen].filter(([, count]) => count > 1).map(([id]) => `${id} first accepted at ${firstAt.get(id)} ms`);
  if (duplicated.length) {
    t.diagnostic(`duplicated: ${duplicated.join("; ")}`);
    const ids = await db.pool.query("SELECT id FROM messages WHERE message_id_header = ANY($1) ORDER BY id", [[...seen].filter(([, c]) => c > 1).map(([id]) => `<${id}@origin.test>`)]);
    t.diagnostic(`duplicated message ids: ${ids.rows.map((r) => r.id).join(",")}; worker logs in ${logDir}`);
    keepLogs = true;
  }
  assert.equal(seen.size, TOTAL, "every message reached the sink");
  assert.ok(!seen.has("?"));
  const states = await db.pool.query("SELECT state, count(*)::int AS n FROM deliveries GROUP BY state");
  assert.deepEqual(states.rows, [{ state: "delivered", n: TOTAL }]);
  // Only a kill between a remote 250 and the commit of its result may duplicate; at most the killed worker's in-flight jobs.
  assert.ok(duplicates <= 2 * Number(env.RELAY_CONCURRENCY), `${duplicates} duplicates`);
});
