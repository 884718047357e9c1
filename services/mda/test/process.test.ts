// The MDA as an operator runs it: `node services/mda/src/main.ts`, configured by environment
// variables, serving /readyz and /metrics, and stopping on SIGTERM without losing work.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import net from "node:net";
import { fileURLToPath } from "node:url";
import { freePort, createTestEnv, waitFor, type TestEnv } from "@mailstack/testkit";
import { LineClient, account, message, send } from "./helpers.ts";

const mainPath = fileURLToPath(new URL("../src/main.ts", import.meta.url));
let env: TestEnv;
const children: ChildProcess[] = [];

async function startProcess(extra: Record<string, string> = {}): Promise<{ child: ChildProcess; opsPort: number; lmtpPort: number; log: string[] }> {
  const opsPort = await freePort();
  const lmtpPort = await freePort();
  const log: string[] = [];
  const child = spawn(process.execPath, [mainPath], {
    env: { ...process.env, ...env.env, LOG_LEVEL: "info", OPS_PORT: String(opsPort), LMTP_PORT: String(lmtpPort), LMTP_HOST: "127.0.0.1", ...extra },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.push(child);
  child.stdout!.on("data", (chunk) => log.push(String(chunk)));
  child.stderr!.on("data", (chunk) => log.push(String(chunk)));
  await waitFor(async () => {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`exited: ${log.join("")}`);
    return (await fetch(`http://127.0.0.1:${opsPort}/readyz`).catch(() => null))?.status === 200;
  }, 30_000, 100);
  return { child, opsPort, lmtpPort, log };
}

function exitOf(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once("exit", (code) => resolve(code)));
}

before(async () => {
  env = await createTestEnv();
});

after(async () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  await env.close();
});

test("the process delivers jobs and LMTP, reports metrics, and on SIGTERM finishes in-flight work and exits 0", { timeout: 90_000 }, async () => {
  const id = await account(env.pool, "proc@example.test");
  const first = await startProcess();

  // LMTP in the real process.
  const client = await LineClient.open(first.lmtpPort);
  assert.match(await client.reply(), /^220 /);
  assert.match(await client.command("LHLO test.example"), /^250 /);
  assert.match(await client.command("MAIL FROM:<a@remote.example>"), /^250 /);
  assert.match(await client.command("RCPT TO:<proc@example.test>"), /^250 /);
  assert.match(await client.command("DATA"), /^354 /);
  client.write(`${message("via lmtp")}.\r\n`);
  assert.match(await client.reply(), /^250 2\.0\.0 Delivered/);
  client.close();

  // A burst of jobs, then SIGTERM while they are being filed.
  const burst = [];
  for (let i = 0; i < 300; i++) burst.push(send(env.pool, env.bus, message(`burst ${i}`), [{ address: "proc@example.test", accountId: id }]));
  const accepted = await Promise.all(burst);
  await waitFor(async () => (await env.pool.query("SELECT count(*)::int AS n FROM mailbox_entries")).rows[0].n > 20, 20_000, 20);

  const metrics = await (await fetch(`http://127.0.0.1:${first.opsPort}/metrics`)).text();
  assert.match(metrics, /mail_mda_outcomes_total\{outcome="delivered"\} \d+/);
  assert.match(metrics, /mail_mda_accept_to_mailbox_seconds_bucket/);

  first.child.kill("SIGTERM");
  assert.equal(await exitOf(first.child), 0, first.log.join("").slice(-2000));
  assert.match(first.log.join(""), /"msg":"stopped"/);

  // Nothing half-done: every delivery is either filed with its entry, or still queued for the next process.
  const states = (await env.pool.query(
    `SELECT d.state, count(*)::int AS n, count(e.id)::int AS entries FROM deliveries d
       LEFT JOIN mailbox_entries e ON e.delivery_id = d.id GROUP BY d.state ORDER BY d.state`,
  )).rows;
  for (const row of states) assert.equal(row.entries, row.state === "delivered" ? row.n : 0, JSON.stringify(states));

  // Jobs the first process had pulled but not started come back after ack_wait (60 s); the
  // sweeper republishes deliveries dispatched but still queued sooner (10 min by default, 3 s here).
  const second = await startProcess({ MDA_SWEEP_STUCK_AFTER: "3s", MDA_SWEEP_INTERVAL: "1s" });
  await waitFor(async () => (await env.pool.query("SELECT count(*)::int AS n FROM deliveries WHERE state = 'queued'")).rows[0].n === 0, 60_000, 100);
  const filed = (await env.pool.query("SELECT count(*)::int AS n, count(DISTINCT delivery_id)::int AS d FROM mailbox_entries")).rows[0];
  assert.equal(filed.n, accepted.length + 1);
  assert.equal(filed.d, accepted.length + 1);
  second.child.kill("SIGTERM");
  assert.equal(await exitOf(second.child), 0);

  // At the default level each filed copy is one "delivered" line, whichever process filed it.
  const lines = [...first.log, ...second.log].join("").split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as Record<string, unknown>);
  const delivered = lines.filter((l) => l.msg === "delivered" && l.to === "proc@example.test");
  assert.equal(delivered.length, accepted.length + 1);
  assert.equal(new Set(delivered.map((l) => l.deliveryId)).size, accepted.length + 1);
  for (const line of delivered) {
    assert.equal(line.level, "info");
    assert.equal(line.status, "delivered");
    assert.equal(line.relay, "INBOX");
    assert.match(String(line.trace_id), /^[0-9a-f]{32}$/);
  }
});

test("a bad setting stops the process at start with every bad variable named", async () => {
  const child = spawn(process.execPath, [mainPath], {
    env: { ...process.env, ...env.env, LMTP_PORT: "99999", LMTP_ALLOWED_NETWORKS: "10.0.0.0/40", MDA_CONCURRENCY: "zero" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.push(child);
  let output = "";
  child.stdout!.on("data", (chunk) => (output += chunk));
  child.stderr!.on("data", (chunk) => (output += chunk));
  assert.equal(await exitOf(child), 78);
  for (const name of ["LMTP_PORT", "LMTP_ALLOWED_NETWORKS", "MDA_CONCURRENCY"]) assert.match(output, new RegExp(name));
});

test("a service that cannot start (its LMTP port is taken) exits 1 and says why, instead of staying up and never ready", async () => {
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(0, "127.0.0.1", resolve));
  const port = (blocker.address() as net.AddressInfo).port;
  try {
    const child = spawn(process.execPath, [mainPath], {
      env: { ...process.env, ...env.env, LOG_LEVEL: "info", OPS_PORT: String(await freePort()), LMTP_PORT: String(port), LMTP_HOST: "127.0.0.1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    children.push(child);
    let output = "";
    child.stdout!.on("data", (chunk) => (output += chunk));
    child.stderr!.on("data", (chunk) => (output += chunk));
    const code = await Promise.race([exitOf(child), new Promise<string>((resolve) => setTimeout(() => resolve("still running after 20 s"), 20_000))]);
    assert.equal(code, 1, output);
    const fatal = output.split("\n").find((line) => line.includes("could not start"));
    assert.ok(fatal, output);
    assert.equal(JSON.parse(fatal).level, "fatal");
    assert.match(fatal, /EADDRINUSE/);
  } finally {
    blocker.close();
  }
});

