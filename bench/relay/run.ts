/**
 * Relay throughput, end to end: messages/s from SMTP accept to a local `smtp-sink`.
 *
 *   mailstack: load generator --AUTH, TLS, port 465--> msa (commit, publish)
 *              --> mta-outbound worker process(es) --smart host--> smtp-sink
 *   reference: smtp-source -d --port PF_PORT--> Postfix 3.7 (own instance, bench/relay/postfix.sh)
 *              --relayhost--> smtp-sink
 *
 * The time runs from the first message offered until the sink has counted them all.
 *
 * The same end-to-end measure from port 25 (mode e2e25), with the same load generator as
 * Postfix: smtp-source to mta-inbound for a local alias whose target is remote (forwarding), so
 * neither system does TLS, AUTH, DKIM or SPF checks and both relay what arrives on port 25.
 *
 * A second measure isolates the relay: the messages are first accepted and held
 * (mailstack: committed by acceptMessage but not published; Postfix: defer_transports=smtp),
 * then released at once (mailstack: dispatchAccepted for all, with the accepting services'
 * batched dispatch stamps; Postfix: postqueue -f), and the
 * time runs from the release until the sink has them all.
 *
 * Rounds alternate (mailstack, Postfix, mailstack, Postfix); the best round of each is reported.
 *
 * A third measure is the queue drain rate: the jobs are all in the queue before the relay
 * starts (mailstack: published with the workers stopped, then the workers start; Postfix:
 * postqueue -f after defer_transports), and the time runs from the first message at the sink
 * to the last.
 *
 *   node bench/relay/run.ts [--count 3000] [--sessions 20] [--size 4096] [--workers 2] [--rounds 2] [--warmup 3000] [--no-postfix] [--mode both|e2e|e2e25|relay|drain]
 *
 * Uses a fresh database and bus prefix (testkit) and removes them afterwards.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { addAccount, addAlias, addDomain } from "../../packages/db/src/index.ts";
import { acceptMessage, dispatchAccepted, type AcceptedMessage } from "../../packages/queue/src/index.ts";
import { createTestEnv, freePort, type ServiceProcess } from "../../packages/testkit/src/index.ts";
import { runLoad } from "../smtp-submission/load.ts";
import { DispatchStamper } from "../../packages/smtp-intake/src/stamper.ts";
import { createLogger } from "../../packages/telemetry/src/index.ts";
import { cpuMs, machineBusyMs, postgresCpuMs, quiesce, startBenchMsa, benchLogDir, benchLogLevel, startBenchService } from "../lib.ts";

const { values } = parseArgs({
  options: {
    count: { type: "string", default: "3000" },
    sessions: { type: "string", default: "20" },
    size: { type: "string", default: "4096" },
    workers: { type: "string", default: "2" },
    rounds: { type: "string", default: "2" },
    "no-postfix": { type: "boolean", default: false },
    mode: { type: "string", default: "both" },
    // Messages through each system, port 25 path included, before the measured rounds.
    warmup: { type: "string", default: "3000" },
  },
});
const count = Number(values.count);
const sessions = Number(values.sessions);
const size = Number(values.size);
const workerCount = Number(values.workers);
const rounds = Number(values.rounds);
const here = new URL(".", import.meta.url).pathname;

/** Postfix's smtp-sink with its running counter (-c) read from stdout. */
interface Sink {
  child: ChildProcess;
  count: () => number;
  waitFor: (n: number, timeoutMs: number) => Promise<void>;
  /** performance.now() when the counter first went above n. */
  firstAbove: (n: number) => number | null;
}

function startSink(port: number): Sink {
  const child = spawn("smtp-sink", ["-u", "postfix", "-c", `127.0.0.1:${port}`, "500"], { stdio: ["ignore", "pipe", "inherit"] });
  let counted = 0;
  let tail = "";
  const updates: Array<[number, number]> = [];
  child.stdout!.on("data", (chunk: Buffer) => {
    tail = (tail + chunk.toString()).slice(-200);
    const all = [...tail.matchAll(/mesg=(\d+)/g)];
    if (all.length) {
      counted = Number(all[all.length - 1]![1]);
      updates.push([performance.now(), counted]);
      if (updates.length > 100_000) updates.splice(0, 50_000);
    }
  });
  return {
    child,
    count: () => counted,
    firstAbove: (n) => updates.find(([, c]) => c > n)?.[0] ?? null,
    async waitFor(n, timeoutMs) {
      const deadline = Date.now() + timeoutMs;
      while (counted < n) {
        if (Date.now() > deadline) throw new Error(`sink counted ${counted} of ${n}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    },
  };
}

const PF_DIR = "/tmp/mailstack-relay-bench-postfix";

function postfixCmd(...args: string[]): string {
  const result = spawnSync(args[0]!, args.slice(1), { encoding: "utf8" });
  if (result.status !== 0) throw new Error(`${args.join(" ")}: ${result.stderr}`);
  return result.stdout;
}

/**
 * Messages Postfix holds in its deferred queue because of defer_transports (each listed with the
 * reason "deferred transport"). Counting every queued message instead let a message still in
 * the active queue be deferred after the release's flush, to wait out the backoff (300 s).
 */
function postfixHeld(): number {
  const out = postfixCmd("postqueue", "-c", PF_DIR, "-p");
  return out.split("(deferred transport)").length - 1;
}

function smtpSource(port: number, n: number, to = "user@far.example"): Promise<void> {
  return new Promise((resolve, reject) => {
    // -d: each session reuses its connection ("with connection reuse", as the target says).
    const child = spawn("smtp-source", ["-d", "-s", String(sessions), "-m", String(n), "-l", String(size), "-f", "sender@remote.example", "-t", to, `127.0.0.1:${port}`], { stdio: "inherit" });
    child.once("exit", (code) => (code === 0 ? resolve() : reject(new Error(`smtp-source exited ${code}`))));
  });
}

interface Round {
  name: string;
  acceptSeconds: number;
  /** How long publishing the held jobs took (mailstack relay only). */
  releaseSeconds?: number;
  /** How the clock started, when not at the first message offered. */
  clock?: string;
  seconds: number;
  perSecond: number;
  /** Machine CPU (every process and the kernel) per message over the whole round, holding phase included. */
  machineCpuMs?: number;
  /** mailstack: CPU ms per message of the accepting service, of all relay workers, of PostgreSQL. */
  parts?: { accepting: number; relay: number; postgres: number };
}

function report(round: Round): void {
  const accepted = round.acceptSeconds
    ? `accepted in ${round.acceptSeconds.toFixed(2)} s  `
    : round.releaseSeconds !== undefined ? `published in ${round.releaseSeconds.toFixed(2)} s  ` : `${round.clock ?? ""}  `;
  const parts = round.parts ? ` (accepting ${round.parts.accepting.toFixed(2)}, relay workers ${round.parts.relay.toFixed(2)}, postgres ${round.parts.postgres.toFixed(2)})` : "";
  const cpu = round.machineCpuMs === undefined ? "" : `  machine CPU/msg ${round.machineCpuMs.toFixed(2)} ms${parts}`;
  console.log(`${round.name.padEnd(28)} ${count} msgs  ${accepted}at the sink in ${round.seconds.toFixed(2)} s  ${round.perSecond.toFixed(1)} msgs/s${cpu}`);
}

const env = await createTestEnv();
const processes: ServiceProcess[] = [];
const children: ChildProcess[] = [];
let postfixStarted = false;
let workers: ServiceProcess[] = [];
try {
  await addDomain(env.pool, "bench.test");
  await addAccount(env.pool, { address: "sender@bench.test", password: "bench-sender" });
  const tlsDir = await mkdtemp(join(tmpdir(), "bench-relay-tls-"));

  const oursSinkPort = await freePort();
  const oursSink = startSink(oursSinkPort);
  children.push(oursSink.child);

  const { msa, submissions } = await startBenchMsa(env.env);
  processes.push(msa);
  // Port 25: mail for forward@bench.test goes to the remote user@far.example (an alias).
  await addAlias(env.pool, "forward@bench.test", ["user@far.example"]);
  const inboundPort = await freePort();
  const inbound = await startBenchService("mta-inbound", {
    ...env.env,
    MAIL_HOSTNAME: "mx.bench.test",
    SMTP_HOST: "127.0.0.1",
    SMTP_PORT: String(inboundPort),
    SMTP_MAX_CLIENTS_PER_IP: "200",
    INBOUND_AUTH_CHECKS: "false",
    TLS_DIR: tlsDir,
  });
  processes.push(inbound);
  const startWorkers = async () => {
    workers = await Promise.all(Array.from({ length: workerCount }, () => startBenchService("mta-outbound", {
        ...env.env,
        MAIL_HOSTNAME: "relay.bench.test",
        DATABASE_POOL_SIZE: "20",
        RELAY_SMARTHOST: `127.0.0.1:${oursSinkPort}`,
        RELAY_CONCURRENCY: "64",
        RELAY_MAX_CONNECTIONS_PER_HOST: process.env.RELAY_BENCH_PER_HOST ?? "32",
        RELAY_MAX_PER_DESTINATION: "64",
        ...(process.env.RELAY_BENCH_NODE_OPTIONS ? { NODE_OPTIONS: process.env.RELAY_BENCH_NODE_OPTIONS } : {}),
      })));
  };
  const stopWorkers = async () => {
    await Promise.all(workers.map((w) => w.stop()));
    workers = [];
  };
  await startWorkers();

  let pf: { port: number; sink: Sink } | null = null;
  if (!values["no-postfix"]) {
    const pfPort = await freePort();
    const pfSinkPort = await freePort();
    const sink = startSink(pfSinkPort);
    children.push(sink.child);
    const started = spawnSync(join(here, "postfix.sh"), ["start", String(pfPort), String(pfSinkPort)], { stdio: "inherit" });
    if (started.status !== 0) throw new Error("postfix did not start");
    postfixStarted = true;
    pf = { port: pfPort, sink };
    await new Promise((resolve) => setTimeout(resolve, 1_000));
  }

  const auth = { user: "sender@bench.test", pass: "bench-sender" };
  const ours = async (n: number): Promise<Round> => {
    const base = oursSink.count();
    const cpu0 = await cpuNow(msa);
    const t0 = performance.now();
    const load = await runLoad({ count: n, sessions, size, port: submissions, tls: "implicit", auth, from: "sender@bench.test", to: "user@far.example" });
    // The msa may refuse some under load (its own limits); those are reported, not counted.
    if (load.failed) console.log(`  ${load.failed} submissions refused by the msa: ${load.firstError}`);
    const accepted = performance.now();
    await oursSink.waitFor(base + load.sent, 300_000);
    const seconds = (performance.now() - t0) / 1000;
    return { name: "mailstack (msa -> relay)", acceptSeconds: (accepted - t0) / 1000, seconds, perSecond: load.sent / seconds, parts: perMessage(cpu0, await cpuNow(msa), load.sent) };
  };
  /** CPU ms so far of the accepting service, the relay workers and PostgreSQL. */
  const cpuNow = async (accepting: ServiceProcess) => ({
    accepting: await cpuMs(accepting.child.pid!),
    relay: (await Promise.all(workers.map((w) => cpuMs(w.child.pid!)))).reduce((a, b) => a + b, 0),
    postgres: await postgresCpuMs(),
  });
  const perMessage = (before: Awaited<ReturnType<typeof cpuNow>>, after: typeof before, n: number) => ({
    accepting: (after.accepting - before.accepting) / n,
    relay: (after.relay - before.relay) / n,
    postgres: (after.postgres - before.postgres) / n,
  });
  const ours25 = async (n: number): Promise<Round> => {
    const base = oursSink.count();
    const cpu0 = await cpuNow(inbound);
    const t0 = performance.now();
    await smtpSource(inboundPort, n, "forward@bench.test");
    const accepted = performance.now();
    await oursSink.waitFor(base + n, 300_000);
    const seconds = (performance.now() - t0) / 1000;
    return { name: "mailstack (port 25 -> relay)", acceptSeconds: (accepted - t0) / 1000, seconds, perSecond: n / seconds, parts: perMessage(cpu0, await cpuNow(inbound), n) };
  };
  const postfix = async (n: number): Promise<Round> => {
    const base = pf!.sink.count();
    const t0 = performance.now();
    await smtpSource(pf!.port, n);
    const accepted = performance.now();
    await pf!.sink.waitFor(base + n, 300_000);
    const seconds = (performance.now() - t0) / 1000;
    return { name: "Postfix 3.7 (relayhost)", acceptSeconds: (accepted - t0) / 1000, seconds, perSecond: n / seconds };
  };

  const raw = Buffer.from(
    `From: <sender@bench.test>\r\nTo: <user@far.example>\r\nSubject: relay bench\r\n\r\n` +
      "The quick brown fox jumps over the lazy dog, again and again and again.\r\n".repeat(Math.max(1, Math.floor((size - 80) / 74))),
  );
  /** Commits n messages to the remote recipient straight into the queue (20 at a time), calling then() on each. */
  const acceptRemote = async (n: number, then: (accepted: AcceptedMessage) => Promise<void> | void): Promise<void> => {
    const route = { kind: "remote" as const, address: "user@far.example", domain: "far.example" };
    let next = 0;
    await Promise.all(
      Array.from({ length: 20 }, async () => {
        while (next < n) {
          next++;
          await then(await acceptMessage(env.pool, { raw, envelopeFrom: "sender@bench.test", source: "submission" }, [{ recipient: route.address, route }], "bench"));
        }
      }),
    );
  };
  const oursRelayOnly = async (n: number): Promise<Round> => {
    const held: AcceptedMessage[] = [];
    await acceptRemote(n, (accepted) => void held.push(accepted));
    const base = oursSink.count();
    // Released the way the accepting services publish: the dispatched_at stamps batched by the
    // same DispatchStamper (one UPDATE per 500 ms), not one UPDATE per message.
    const stamper = new DispatchStamper(env.pool, createLogger("bench", "warn"));
    const markDispatched = (ids: number[]) => {
      stamper.mark(ids).catch(() => undefined);
      return Promise.resolve();
    };
    const t0 = performance.now();
    let i = 0;
    await Promise.all(
      Array.from({ length: 20 }, async () => {
        while (i < held.length) await dispatchAccepted(env.bus, env.pool, held[i++]!, { markDispatched });
      }),
    );
    const released = (performance.now() - t0) / 1000;
    await oursSink.waitFor(base + n, 300_000);
    const seconds = (performance.now() - t0) / 1000;
    await stamper.idle();
    return { name: "mailstack relay only", acceptSeconds: 0, releaseSeconds: released, seconds, perSecond: n / seconds };
  };
  /** Fills Postfix's queue with n messages held back (defer_transports=smtp), then lets the smtp transport run again. */
  const postfixFillHeldQueue = async (n: number): Promise<void> => {
    postfixCmd("postconf", "-c", PF_DIR, "-e", "defer_transports=smtp");
    postfixCmd("postfix", "-c", PF_DIR, "reload");
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    await smtpSource(pf!.port, n);
    const deadline = Date.now() + 120_000;
    while (postfixHeld() < n && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 200));
    if (postfixHeld() !== n) throw new Error(`Postfix holds ${postfixHeld()} messages, not ${n}`);
    postfixCmd("postconf", "-c", PF_DIR, "-e", "defer_transports=");
    postfixCmd("postfix", "-c", PF_DIR, "reload");
    await new Promise((resolve) => setTimeout(resolve, 1_000));
  };
  const postfixRelayOnly = async (n: number): Promise<Round> => {
    await postfixFillHeldQueue(n);
    const base = pf!.sink.count();
    const t0 = performance.now();
    postfixCmd("postqueue", "-c", PF_DIR, "-f");
    await pf!.sink.waitFor(base + n, 300_000);
    const seconds = (performance.now() - t0) / 1000;
    return { name: "Postfix relay only", acceptSeconds: 0, clock: "released by postqueue -f", seconds, perSecond: n / seconds };
  };

  /** Jobs already in the stream, workers started afterwards: the sink's first-to-last message rate. */
  const oursDrain = async (n: number): Promise<Round> => {
    await stopWorkers();
    await acceptRemote(n, (accepted) => dispatchAccepted(env.bus, env.pool, accepted));
    const base = oursSink.count();
    await startWorkers();
    await oursSink.waitFor(base + n, 300_000);
    const seconds = (performance.now() - oursSink.firstAbove(base)!) / 1000;
    return { name: "mailstack queue drain", acceptSeconds: 0, clock: "queued before, first to last", seconds, perSecond: n / seconds };
  };
  const postfixDrain = async (n: number): Promise<Round> => {
    await postfixFillHeldQueue(n);
    const base = pf!.sink.count();
    postfixCmd("postqueue", "-c", PF_DIR, "-f");
    await pf!.sink.waitFor(base + n, 300_000);
    const seconds = (performance.now() - pf!.sink.firstAbove(base)!) / 1000;
    return { name: "Postfix queue drain", acceptSeconds: 0, clock: "queued before, first to last", seconds, perSecond: n / seconds };
  };

  console.log(`${count} messages of ${size} bytes over ${sessions} sessions; ${workerCount} relay worker process(es); service log level ${benchLogLevel}, logs in ${benchLogDir()}`);
  // Warm-up, unmeasured and the same for both: mailstack's first few thousand messages run at
  // about three quarters of its later rate (port 25 path, 2026-11-27 23:00: 870, 1,025, 1,179,
  // 1,188 msgs/s in four rounds of 3,000; docs/BENCHMARKS.md on what the warm-up is), and Postfix
  // starts its smtpd, cleanup and smtp processes on demand.
  const warmup = Number(values.warmup);
  await ours(200);
  if (warmup > 0) await ours25(warmup);
  if (pf) await postfix(Math.max(200, warmup));
  const best: Record<string, Round> = {};
  const runs: Array<(n: number) => Promise<Round>> = [];
  if (values.mode === "both" || values.mode === "e2e") runs.push(ours, ...(pf ? [postfix] : []));
  if (values.mode === "both" || values.mode === "e2e25") runs.push(ours25, ...(pf ? [postfix] : []));
  if (values.mode === "both" || values.mode === "relay") runs.push(oursRelayOnly, ...(pf ? [postfixRelayOnly] : []));
  if (values.mode === "both" || values.mode === "drain") runs.push(oursDrain, ...(pf ? [postfixDrain] : []));
  // Each round starts on a quiet machine, and its CPU figure includes the work it left behind
  // (PostgreSQL's autovacuum and checkpoint writes, Postfix's queue manager), not the next round.
  await quiesce();
  for (let i = 0; i < rounds; i++) {
    for (const run of runs) {
      const busy0 = await machineBusyMs();
      const round = await run(count);
      await quiesce();
      round.machineCpuMs = ((await machineBusyMs()) - busy0) / count;
      report(round);
      if (!best[round.name] || round.perSecond > best[round.name]!.perSecond) best[round.name] = round;
    }
  }
  const delivered = (await env.pool.query("SELECT count(*)::int AS n FROM deliveries WHERE state = 'delivered'")).rows[0].n;
  console.log(`deliveries recorded as delivered in PostgreSQL: ${delivered}`);
  const pairs = [["mailstack (msa -> relay)", "Postfix 3.7 (relayhost)"], ["mailstack (port 25 -> relay)", "Postfix 3.7 (relayhost)"], ["mailstack relay only", "Postfix relay only"], ["mailstack queue drain", "Postfix queue drain"]];
  for (const [a, b] of pairs) {
    if (best[a!] && best[b!]) console.log(`best ${a} ${best[a!]!.perSecond.toFixed(1)} msgs/s vs ${b} ${best[b!]!.perSecond.toFixed(1)} msgs/s: ${(best[a!]!.perSecond / best[b!]!.perSecond).toFixed(2)}x`);
  }
} finally {
  for (const process of [...workers, ...processes.reverse()]) await process.stop();
  for (const child of children) child.kill("SIGTERM");
  if (postfixStarted) spawnSync(join(here, "postfix.sh"), ["stop"], { stdio: "inherit" });
  await env.close();
}
