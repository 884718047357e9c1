/**
 * Inbound SMTP, accept to mailbox: 4 KiB messages to port 25, mailstack against Postfix.
 *
 *   mailstack: smtp-source --> mta-inbound process (SPF/DKIM/DMARC against a loopback DNS
 *              server, group commit, publish) --NATS--> mda process --> mailbox_entries
 *   reference: smtp-source --> Postfix 3.7 (own instance, bench/smtp-inbound/postfix.sh)
 *              --> virtual(8) --> maildir
 *
 * Two modes, as the issue asks: 20 sessions reusing their connection (smtp-source -s 20 -d)
 * and 100 sessions with a new connection per message (-s 100). For each round:
 *   accepted/s  = COUNT / time until smtp-source has all its 250s (it exits)
 *   visible/s   = COUNT / time until COUNT new mailbox entries (or maildir files) exist
 *   latency     = mailbox_entries.created_at - messages.received_at (both transaction
 *                 start times: accept commit to filing transaction), p50/p99
 * Then a paced run at half the best reused-connection visible rate for the latency target,
 * and the peak resident memory (VmHWM) of each service process.
 *
 *   node bench/smtp-inbound/run.ts [--count 3000] [--rounds 2] [--no-postfix] [--no-auth] [--paced-rate N]
 */
import { mkdtemp, readdir, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import net from "node:net";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { addAccount, addDomain, type Pool } from "../../packages/db/src/index.ts";
import { RawSmtp } from "../../packages/smtp-intake/src/testing.ts";
import { createTestEnv, freePort, type ServiceProcess } from "../../packages/testkit/src/index.ts";
import { startDnsServer } from "../../services/mta-inbound/test/dns-server.ts";
import { cpuMs, machineBusyMs, postgresCpuMs, quiesce, sh, benchLogDir, benchLogLevel, startBenchService } from "../lib.ts";

const { values } = parseArgs({
  options: {
    count: { type: "string", default: "3000" },
    rounds: { type: "string", default: "2" },
    "paced-seconds": { type: "string", default: "15" },
    // The paced run's rate in msgs/s instead of half the measured peak (to compare latency at one rate across runs).
    "paced-rate": { type: "string" },
    "no-postfix": { type: "boolean", default: false },
    "no-auth": { type: "boolean", default: false },
  },
});
const count = Number(values.count);
const pacedRate = values["paced-rate"] === undefined ? null : Number(values["paced-rate"]);
if (pacedRate !== null && !(pacedRate > 0)) throw new Error(`--paced-rate must be a positive number of msgs/s, not ${values["paced-rate"]}`);
const rounds = Number(values.rounds);
const here = new URL(".", import.meta.url).pathname;
const MAILDIR = "/var/mail/vhosts-inboundbench/bench.test/user1/new";

interface Round {
  system: "mailstack" | "postfix";
  mode: string;
  acceptedPerSecond: number;
  visiblePerSecond: number;
  p50?: number;
  p99?: number;
  /** CPU ms per message of mta-inbound and of the mda. */
  inboundCpu?: number;
  mdaCpu?: number;
  /** CPU ms per message of all PostgreSQL processes, and of the whole machine (every process and the kernel, so it includes whatever else runs). */
  postgresCpu?: number;
  machineCpu?: number;
}


function smtpSource(port: number, sessions: number, reuse: boolean, messages = count) {
  const args = [...(reuse ? ["-d"] : []), "-s", String(sessions), "-m", String(messages), "-l", "4096", "-f", "sender@remote.example", "-t", "user1@bench.test", `127.0.0.1:${port}`];
  return sh("smtp-source", args);
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1", () => {
      socket.destroy();
      resolve(true);
    });
    socket.on("error", () => resolve(false));
  });
}

async function entryCount(pool: Pool): Promise<number> {
  return (await pool.query<{ n: number }>("SELECT count(*)::int AS n FROM mailbox_entries")).rows[0]!.n;
}

async function maildirCount(): Promise<number> {
  try {
    return (await readdir(MAILDIR)).length;
  } catch {
    return 0;
  }
}

async function until(fn: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await fn())) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

async function latency(pool: Pool, afterMessageId: number): Promise<{ p50: number; p99: number }> {
  const result = await pool.query<{ p50: number; p99: number }>(
    `SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50, percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
       FROM (SELECT extract(epoch FROM e.created_at - m.received_at) * 1000 AS ms
               FROM mailbox_entries e JOIN messages m ON m.id = e.message_id WHERE m.id > $1) t`,
    [afterMessageId],
  );
  return { p50: Math.round(result.rows[0]!.p50), p99: Math.round(result.rows[0]!.p99) };
}

async function maxMessageId(pool: Pool): Promise<number> {
  return (await pool.query<{ id: number }>("SELECT coalesce(max(id), 0)::int AS id FROM messages")).rows[0]!.id;
}

/** CPU time (user + system) of a process so far, in ms. */

async function peakRss(pid: number): Promise<{ rssMb: number; hwmMb: number }> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const kb = (key: string) => Number(new RegExp(`${key}:\\s+(\\d+)`).exec(status)?.[1] ?? 0);
  return { rssMb: Math.round(kb("VmRSS") / 1024), hwmMb: Math.round(kb("VmHWM") / 1024) };
}

/** Sends at a fixed aggregate rate over `sessions` reused connections; returns the client-side 250 latencies. */
async function paced(port: number, ratePerSecond: number, seconds: number, sessions = 10): Promise<{ sent: number; acceptP50: number; acceptP99: number }> {
  const body = `From: <sender@remote.example>\r\nTo: <user1@bench.test>\r\nSubject: paced\r\n\r\n${"x".repeat(78)}\r\n`.padEnd(4096, "y") + "\r\n.\r\n";
  const interval = (1000 * sessions) / ratePerSecond;
  const end = Date.now() + seconds * 1000;
  const accepts: number[] = [];
  await Promise.all(
    Array.from({ length: sessions }, async (_, i) => {
      const client = await RawSmtp.connect(port);
      await client.reply();
      await client.command("EHLO paced.remote.example");
      let next = Date.now() + (interval * i) / sessions;
      while (Date.now() < end) {
        const wait = next - Date.now();
        if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
        next += interval;
        const started = performance.now();
        client.write("MAIL FROM:<sender@remote.example>\r\nRCPT TO:<user1@bench.test>\r\nDATA\r\n");
        await client.reply();
        await client.reply();
        await client.reply();
        client.write(body);
        const reply = await client.reply();
        if (reply.code !== 250) throw new Error(reply.text);
        accepts.push(performance.now() - started);
      }
      await client.command("QUIT");
      client.close();
    }),
  );
  accepts.sort((a, b) => a - b);
  const pick = (q: number) => Math.round(accepts[Math.min(accepts.length - 1, Math.floor(q * accepts.length))]!);
  return { sent: accepts.length, acceptP50: pick(0.5), acceptP99: pick(0.99) };
}

const env = await createTestEnv();
const dns = await startDnsServer({ "remote.example": { TXT: ["v=spf1 ip4:127.0.0.1 -all"] } });
const services: ServiceProcess[] = [];
let postfixUp = false;
try {
  await addDomain(env.pool, "bench.test");
  await addAccount(env.pool, { address: "user1@bench.test", password: "bench-password" });
  const smtpPort = await freePort();
  const common = { ...env.env, MAIL_HOSTNAME: "mx.bench.test", TLS_DIR: await mkdtemp(join(tmpdir(), "bench-tls-")) };
  // SERVICE_NODE_OPTIONS: V8 flags for both services, e.g. "--max-semi-space-size=4" (smaller young generation, less RSS).
  // SERVICE_MALLOC_ARENA_MAX: glibc malloc arenas for both services (fewer arenas, less fragmentation).
  const serviceNodeOptions: Record<string, string> = {
    ...(process.env.SERVICE_NODE_OPTIONS ? { NODE_OPTIONS: process.env.SERVICE_NODE_OPTIONS } : {}),
    ...(process.env.SERVICE_MALLOC_ARENA_MAX ? { MALLOC_ARENA_MAX: process.env.SERVICE_MALLOC_ARENA_MAX } : {}),
  };
  const mda = await startBenchService("mda", {
    ...common,
    LMTP_ENABLED: "false",
    ...serviceNodeOptions,
    ...(process.env.MDA_NODE_OPTIONS ? { NODE_OPTIONS: process.env.MDA_NODE_OPTIONS } : {}),
  });
  const inbound = await startBenchService("mta-inbound", {
    ...common,
    SMTP_PORT: String(smtpPort),
    SMTP_HOST: "127.0.0.1",
    DNS_SERVERS: dns.address,
    INBOUND_AUTH_CHECKS: values["no-auth"] ? "false" : "true",
    SMTP_MAX_CLIENTS_PER_IP: "200",
    ...serviceNodeOptions,
    // For profiling: INBOUND_NODE_OPTIONS="--cpu-prof --cpu-prof-dir=/tmp/prof".
    ...(process.env.INBOUND_NODE_OPTIONS ? { NODE_OPTIONS: process.env.INBOUND_NODE_OPTIONS } : {}),
  });
  services.push(mda, inbound);

  let pfPort = 0;
  if (!values["no-postfix"]) {
    pfPort = await freePort();
    await sh(join(here, "postfix.sh"), ["stop"]);
    const started = await sh(join(here, "postfix.sh"), ["start", String(pfPort)]);
    if (started.code !== 0) throw new Error(`postfix did not start:\n${started.output}`);
    postfixUp = true;
    await until(() => canConnect(pfPort), 10_000);
  }

  // Warm up both systems (JIT, connection pools, Postfix processes).
  const warm = await smtpSource(smtpPort, 10, true, 500);
  if (warm.code !== 0) throw new Error(`warm-up failed: ${warm.output}`);
  if (pfPort) await smtpSource(pfPort, 10, true, 500);
  await until(async () => (await entryCount(env.pool)) >= 500, 120_000);

  await quiesce();
  const results: Round[] = [];
  const modes = [
    { mode: "20 sessions, reused (-s 20 -d)", sessions: 20, reuse: true },
    { mode: "100 sessions, new connection per message (-s 100)", sessions: 100, reuse: false },
  ];
  for (let round = 0; round < rounds; round++) {
    for (const m of modes) {
      const before = await entryCount(env.pool);
      const fromId = await maxMessageId(env.pool);
      const cpu0 = [await cpuMs(inbound.child.pid!), await cpuMs(mda.child.pid!), await postgresCpuMs(), await machineBusyMs()];
      const t0 = performance.now();
      const source = await smtpSource(smtpPort, m.sessions, m.reuse);
      const accepted = (performance.now() - t0) / 1000;
      if (source.code !== 0) throw new Error(`smtp-source failed: ${source.output}`);
      await until(async () => (await entryCount(env.pool)) >= before + count, 300_000);
      const visible = (performance.now() - t0) / 1000;
      const lat = await latency(env.pool, fromId);
      // The CPU figures include the work the round left behind (autovacuum, checkpoint writes):
      // taken once the machine is quiet again, which is also how the next round starts.
      const waitedOurs = await quiesce();
      const inboundCpu = ((await cpuMs(inbound.child.pid!)) - cpu0[0]!) / count;
      const mdaCpu = ((await cpuMs(mda.child.pid!)) - cpu0[1]!) / count;
      const postgresCpu = ((await postgresCpuMs()) - cpu0[2]!) / count;
      const machineCpu = ((await machineBusyMs()) - cpu0[3]!) / count;
      results.push({ system: "mailstack", mode: m.mode, acceptedPerSecond: count / accepted, visiblePerSecond: count / visible, ...lat, inboundCpu, mdaCpu, postgresCpu, machineCpu });
      console.error(
        `mailstack ${m.mode}: accepted ${(count / accepted).toFixed(0)}/s, visible ${(count / visible).toFixed(0)}/s, p50 ${lat.p50} ms, p99 ${lat.p99} ms, CPU/msg inbound ${inboundCpu.toFixed(2)} ms mda ${mdaCpu.toFixed(2)} ms postgres ${postgresCpu.toFixed(2)} ms machine ${machineCpu.toFixed(2)} ms; quiet ${waitedOurs} ms after the round`,
      );

      if (pfPort) {
        await sh(join(here, "postfix.sh"), ["clean"]);
        await quiesce();
        const pg0 = await postgresCpuMs();
        const busy0 = await machineBusyMs();
        const t1 = performance.now();
        const pf = await smtpSource(pfPort, m.sessions, m.reuse);
        const pfAccepted = (performance.now() - t1) / 1000;
        if (pf.code !== 0) throw new Error(`smtp-source (postfix) failed: ${pf.output}`);
        await until(async () => (await maildirCount()) >= count, 300_000);
        const pfVisible = (performance.now() - t1) / 1000;
        const waitedPostfix = await quiesce();
        const pfMachineCpu = ((await machineBusyMs()) - busy0) / count;
        const pgDuringPostfix = ((await postgresCpuMs()) - pg0) / count;
        results.push({ system: "postfix", mode: m.mode, acceptedPerSecond: count / pfAccepted, visiblePerSecond: count / pfVisible, machineCpu: pfMachineCpu });
        console.error(
          `postfix   ${m.mode}: accepted ${(count / pfAccepted).toFixed(0)}/s, visible ${(count / pfVisible).toFixed(0)}/s, machine CPU/msg ${pfMachineCpu.toFixed(2)} ms (of it our PostgreSQL ${pgDuringPostfix.toFixed(2)} ms); quiet ${waitedPostfix} ms after the round`,
        );
      }
    }
  }

  const best = (system: string, mode: string) =>
    results.filter((r) => r.system === system && r.mode === mode).sort((a, b) => b.visiblePerSecond - a.visiblePerSecond)[0];
  const peak = best("mailstack", modes[0]!.mode)!.visiblePerSecond;
  const halfRate = pacedRate ?? Math.round(peak / 2);
  const fromId = await maxMessageId(env.pool);
  const pacedResult = await paced(smtpPort, halfRate, Number(values["paced-seconds"]));
  await new Promise((resolve) => setTimeout(resolve, 2_000));
  const pacedLatency = await latency(env.pool, fromId);
  const rss = { "mta-inbound": await peakRss(inbound.child.pid!), mda: await peakRss(mda.child.pid!) };
  const heap = async (opsPort: number) => {
    const text = await (await fetch(`http://127.0.0.1:${opsPort}/metrics`)).text();
    const mb = (re: RegExp) => Math.round(Number(re.exec(text)?.[1] ?? 0) / 1e6);
    const batches = Number(/^mail_accept_batch_size_count\{[^}]*\} (\S+)/m.exec(text)?.[1] ?? 0);
    const batched = Number(/^mail_accept_batch_size_sum\{[^}]*\} (\S+)/m.exec(text)?.[1] ?? 0);
    const group = batches > 0 ? `, ${(batched / batches).toFixed(1)} messages per accept transaction` : "";
    return `heap used ${mb(/^nodejs_heap_size_used_bytes (\S+)/m)} MB of ${mb(/^nodejs_heap_size_total_bytes (\S+)/m)} MB (new space ${mb(/^nodejs_heap_space_size_total_bytes\{space="new"\} (\S+)/m)} MB), external ${mb(/^nodejs_external_memory_bytes (\S+)/m)} MB${group}`;
  };
  const heaps = { "mta-inbound": await heap(inbound.opsPort), mda: await heap(mda.opsPort) };

  const median = (xs: number[]) => {
    const sorted = [...xs].sort((a, b) => a - b);
    const mid = Math.floor(sorted.length / 2);
    return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
  };
  const lines = [
    `${count} messages per round, ${rounds} round(s): median over the rounds (best in brackets); 4 KiB payload (smtp-source -l 4096); auth checks ${values["no-auth"] ? "off" : "on (SPF/DKIM/DMARC, loopback DNS)"}`,
    "",
    "| system | mode | accepted msgs/s | visible in mailbox msgs/s | accept→mailbox p50 / p99 (ms) | CPU ms/msg inbound + mda + postgres | machine CPU ms/msg |",
    "|---|---|---|---|---|---|---|",
  ];
  for (const m of modes) {
    for (const system of ["mailstack", "postfix"]) {
      const rs = results.filter((r) => r.system === system && r.mode === m.mode);
      if (rs.length === 0) continue;
      const b = best(system, m.mode)!;
      const lat = system === "mailstack" ? `${median(rs.map((r) => r.p50!))} / ${median(rs.map((r) => r.p99!))}` : "—";
      const cpu = system === "mailstack" ? [(r: Round) => r.inboundCpu!, (r: Round) => r.mdaCpu!, (r: Round) => r.postgresCpu!].map((f) => median(rs.map(f)).toFixed(2)).join(" + ") : "—";
      lines.push(
        `| ${system} | ${m.mode} | ${median(rs.map((r) => r.acceptedPerSecond)).toFixed(0)} | ${median(rs.map((r) => r.visiblePerSecond)).toFixed(0)} (${b.visiblePerSecond.toFixed(0)}) | ${lat} | ${cpu} | ${median(rs.map((r) => r.machineCpu!)).toFixed(2)} |`,
      );
    }
  }
  lines.push("");
  lines.push(`paced at ${halfRate} msgs/s (${pacedRate ? "as asked" : "half the reused-connection peak"}) for ${values["paced-seconds"]} s over 10 sessions: ${pacedResult.sent} messages, accept→mailbox p50 ${pacedLatency.p50} ms, p99 ${pacedLatency.p99} ms; client-side DATA→250 p50 ${pacedResult.acceptP50} ms, p99 ${pacedResult.acceptP99} ms`);
  lines.push(`resident memory (VmRSS now / VmHWM peak): mta-inbound ${rss["mta-inbound"].rssMb} / ${rss["mta-inbound"].hwmMb} MB, mda ${rss.mda.rssMb} / ${rss.mda.hwmMb} MB`);
  lines.push(`mta-inbound ${heaps["mta-inbound"]}; mda ${heaps.mda}`);
  lines.push(`service log level ${benchLogLevel} (BENCH_LOG_LEVEL); logs in ${benchLogDir()}`);
  console.log(lines.join("\n"));
} finally {
  if (process.env.BENCH_SHOW_OUTPUT) for (const s of services) console.error(s.output().slice(-3000));
  for (const s of services) await s.stop();
  if (postfixUp) {
    await sh(join(here, "postfix.sh"), ["stop"]);
    await sh(join(here, "postfix.sh"), ["clean"]);
  }
  await dns.close();
  await env.close();
}
