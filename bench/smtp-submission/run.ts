/**
 * Authenticated submissions per second over 20 TLS sessions (port 465, AUTH PLAIN, DKIM
 * signing on), against the msa running as its own process, compared in the same run with
 * the inbound rate (plain SMTP, no AUTH) measured by the same load generator against
 * mta-inbound when it listens, else against bench/smtp-inbound if present.
 *
 *   node bench/smtp-submission/run.ts [--count 2000] [--sessions 20] [--size 4096] [--rounds 3]
 *                                     [--no-dkim | --ed25519] [--sign-threads N] [--plain] [--no-inbound]
 *                                     [--inbound-checks]
 *
 * Rounds alternate between the two targets; the median and best round of each are reported.
 *
 * Uses a fresh database and bus prefix of its own (testkit) and removes them afterwards.
 */
import net from "node:net";
import { mkdtemp, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { addAccount, addDomain } from "../../packages/db/src/index.ts";
import { createDomainDkimKey } from "../../packages/dkim/src/index.ts";
import { createTestEnv, freePort, type ServiceProcess } from "../../packages/testkit/src/index.ts";
import { startDnsServer } from "../../services/mta-inbound/test/dns-server.ts";
import { runLoad, type LoadResult } from "./load.ts";
import { startBenchMsa, benchLogDir, benchLogLevel, startBenchService } from "../lib.ts";

const { values } = parseArgs({
  options: {
    count: { type: "string", default: "2000" },
    sessions: { type: "string", default: "20" },
    size: { type: "string", default: "4096" },
    "no-dkim": { type: "boolean", default: false },
    ed25519: { type: "boolean", default: false },
    "no-inbound": { type: "boolean", default: false },
    // mta-inbound as deployed and as issue 3's benchmark runs it: SPF/DKIM/DMARC on, against a
    // DNS server on loopback. Without it, the checks are off (the shared accept path alone).
    "inbound-checks": { type: "boolean", default: false },
    rounds: { type: "string", default: "3" },
    // DKIM_SIGN_THREADS for the msa (its default when not given).
    "sign-threads": { type: "string" },
    // Diagnostic: submission on 587 without TLS (AUTH allowed before TLS), to see what TLS costs.
    plain: { type: "boolean", default: false },
  },
});
const count = Number(values.count);
const sessions = Number(values.sessions);
const size = Number(values.size);

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** CPU seconds (user + system) a process has used so far, from /proc (clock ticks of 1/100 s). */
async function cpuSeconds(pid: number): Promise<number> {
  const fields = (await readFile(`/proc/${pid}/stat`, "utf8")).split(") ")[1]!.split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

function report(name: string, result: LoadResult): void {
  console.log(
    `${name.padEnd(34)} ${String(result.sent).padStart(6)} sent ${String(result.failed).padStart(4)} failed ` +
      `${result.seconds.toFixed(2).padStart(7)} s ${result.perSecond.toFixed(1).padStart(8)} msgs/s (steady ${result.steadyPerSecond.toFixed(1)}, first after ${(result.firstSeconds * 1000).toFixed(0)} ms)${result.firstError ? `  first error: ${result.firstError}` : ""}`,
  );
}

const env = await createTestEnv();
const processes: ServiceProcess[] = [];
let dns: Awaited<ReturnType<typeof startDnsServer>> | undefined;
try {
  await addDomain(env.pool, "bench.test");
  await addAccount(env.pool, { address: "user1@bench.test", password: "bench-user1" });
  await addAccount(env.pool, { address: "sender@bench.test", password: "bench-sender" });
  const algorithm = values.ed25519 ? "ed25519-sha256" : "rsa-sha256";
  if (!values["no-dkim"]) await createDomainDkimKey(env.pool, "bench.test", { selector: "bench", algorithm });
  const tlsDir = await mkdtemp(join(tmpdir(), "bench-msa-tls-"));

  const { msa, submission, submissions } = await startBenchMsa(env.env, {
    SUBMISSION_AUTH_BEFORE_TLS: values.plain ? "true" : "false",
    ...(values["sign-threads"] !== undefined ? { DKIM_SIGN_THREADS: values["sign-threads"] } : {}),
    // For profiling: MSA_NODE_OPTIONS="--cpu-prof --cpu-prof-dir=/tmp/prof".
    ...(process.env.MSA_NODE_OPTIONS ? { NODE_OPTIONS: process.env.MSA_NODE_OPTIONS } : {}),
  });
  processes.push(msa);

  let inbound: { port: number; pid: number } | null = null;
  if (!values["no-inbound"]) {
    const smtpPort = await freePort();
    try {
      // By default SPF/DKIM/DMARC checks are off: the inbound figure is the shared SMTP accept path alone.
      const checks: Record<string, string> = values["inbound-checks"]
        ? { INBOUND_AUTH_CHECKS: "true", DNS_SERVERS: (dns = await startDnsServer({ "remote.example": { TXT: ["v=spf1 ip4:127.0.0.1 -all"] } })).address }
        : { INBOUND_AUTH_CHECKS: "false" };
      const mta = await startBenchService("mta-inbound", {
        ...env.env, MAIL_HOSTNAME: "mx.bench.test", SMTP_PORT: String(smtpPort), SMTP_HOST: "127.0.0.1",
        ...checks, TLS_DIR: tlsDir,
      });
      processes.push(mta);
      if (await listening(smtpPort)) inbound = { port: smtpPort, pid: mta.child.pid! };
      else console.log("mta-inbound is ready but does not listen on SMTP_PORT yet: no inbound comparison in this run");
    } catch (error) {
      console.log(`mta-inbound did not start: ${(error as Error).message.split("\n")[0]}`);
    }
  }

  console.log(
    `${count} messages of ${size} bytes over ${sessions} sessions, DKIM ${values["no-dkim"] ? "off" : algorithm}, submission ${values.plain ? "on 587 without TLS" : "on 465 (TLS)"}, ` +
      `inbound checks ${values["inbound-checks"] ? "on (SPF/DKIM/DMARC, loopback DNS)" : "off"}`,
  );
  // A short warm-up so JIT and pools are comparable between the two targets.
  const warm = { count: 100, sessions, size, from: "sender@bench.test", to: "user1@bench.test" };
  const auth = { user: "sender@bench.test", pass: "bench-sender" };
  const target = values.plain ? { port: submission, tls: "none" as const } : { port: submissions, tls: "implicit" as const };
  await runLoad({ ...warm, ...target, auth });
  if (inbound) await runLoad({ ...warm, port: inbound.port, tls: "none", from: "someone@remote.example" });

  const results: Record<string, LoadResult[]> = { inbound: [], submission: [] };
  const cpu: Record<string, number[]> = { inbound: [], submission: [] };
  const rounds = Number(values.rounds);
  const order = Array.from({ length: rounds }, () => (inbound ? ["inbound", "submission"] : ["submission"])).flat();
  for (const [i, round] of order.entries()) {
    const pid = round === "submission" ? msa.child.pid! : inbound!.pid;
    const cpuBefore = await cpuSeconds(pid);
    const result =
      round === "submission"
        ? await runLoad({ count, sessions, size, ...target, auth, from: "sender@bench.test", to: "user1@bench.test" })
        : await runLoad({ count, sessions, size, port: inbound!.port, tls: "none", from: "someone@remote.example", to: "user1@bench.test" });
    const cpuMs = ((await cpuSeconds(pid)) - cpuBefore) * 1000 / result.sent;
    report(`${round} (round ${i + 1})`, result);
    console.log(`${"".padEnd(34)} service CPU ${cpuMs.toFixed(2)} ms per message`);
    if (result.failed === 0) {
      results[round]!.push(result);
      cpu[round]!.push(cpuMs);
    }
  }
  const stored = (await env.pool.query("SELECT count(*)::int AS n FROM messages")).rows[0].n;
  console.log(`messages committed in PostgreSQL: ${stored}; service log level ${benchLogLevel} (BENCH_LOG_LEVEL), logs in ${benchLogDir()}`);
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)] ?? NaN;
  const whole = (name: string) => median(results[name]!.map((r) => r.perSecond));
  const steady = (name: string) => median(results[name]!.map((r) => r.steadyPerSecond));
  for (const name of Object.keys(results)) {
    if (results[name]!.length) {
      console.log(
        `${name.padEnd(10)} median ${whole(name).toFixed(1)} msgs/s whole round, ${steady(name).toFixed(1)} msgs/s steady, ` +
          `${median(cpu[name]!).toFixed(2)} ms service CPU per message, over ${results[name]!.length} clean rounds`,
      );
    }
  }
  if (results.inbound!.length && results.submission!.length) {
    console.log(
      `submission / inbound: ${((100 * whole("submission")) / whole("inbound")).toFixed(0)}% whole round (with 20 TLS handshakes and AUTHs), ` +
        `${((100 * steady("submission")) / steady("inbound")).toFixed(0)}% steady; ` +
        `service CPU per message ${(median(cpu.submission!) / median(cpu.inbound!)).toFixed(2)}x the inbound's`,
    );
  }
} finally {
  for (const process of processes.reverse()) await process.stop();
  await dns?.close();
  await env.close();
}
