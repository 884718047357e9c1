// Small helpers the benchmarks share.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, readdir } from "node:fs/promises";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import { freePort, startServiceProcess, type ServiceProcess } from "../packages/testkit/src/index.ts";

/** Runs a command to its end; resolves its exit code and everything it printed. */
export function sh(command: string, args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (d) => (output += d));
    child.stderr.on("data", (d) => (output += d));
    child.on("error", (error) => resolve({ code: -1, output: String(error) }));
    child.on("exit", (code) => resolve({ code, output }));
  });
}

/** The fields of a /proc/PID/stat line after the command name: [0] state, [1] ppid, [11] utime, [12] stime, [13] cutime, [14] cstime. */
function statFields(stat: string): string[] {
  return stat.split(") ")[1]!.split(" ");
}

/** CPU time (user + system) a process has used, in ms, from /proc; with children, that of its reaped children. */
export async function cpuMs(pid: number, children = false): Promise<number> {
  const fields = statFields(await readFile(`/proc/${pid}/stat`, "utf8"));
  const ticks = children ? Number(fields[13]) + Number(fields[14]) : Number(fields[11]) + Number(fields[12]);
  return (ticks * 1000) / 100;
}

/**
 * CPU time (user + system) of PostgreSQL, in ms: every running postgres process (server,
 * backends, writers) plus what the server has collected from its children that exited (a pool
 * closing an idle connection ends its backend), so the figure never goes back.
 */
export async function postgresCpuMs(): Promise<number> {
  const processes = new Map<string, string[]>();
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readFile(`/proc/${entry}/stat`, "utf8").catch(() => "");
    if (stat.includes(" (postgres) ")) processes.set(entry, statFields(stat));
  }
  let ticks = 0;
  for (const fields of processes.values()) {
    ticks += Number(fields[11]) + Number(fields[12]);
    // The server itself (its parent is not a postgres process): add its reaped children.
    if (!processes.has(fields[1]!)) ticks += Number(fields[13]) + Number(fields[14]);
  }
  return (ticks * 1000) / 100;
}

/**
 * Waits until the whole machine has been nearly idle (under `maxBusyShare` of its cores busy)
 * for one `windowMs`, at most `timeoutMs`; resolves the ms it waited. Called before each
 * measured round, so that one system's deferred work (PostgreSQL's autovacuum and
 * checkpoint writes after mailstack's round, Postfix's queue manager after its own) is not
 * counted in the other's round. Returns -1 when the machine never got quiet.
 */
export async function quiesce(windowMs = 500, maxBusyShare = 0.1, timeoutMs = 30_000): Promise<number> {
  const cores = availableParallelism();
  const started = performance.now();
  while (performance.now() - started < timeoutMs) {
    const before = await machineBusyMs();
    await new Promise((resolve) => setTimeout(resolve, windowMs));
    const busy = (await machineBusyMs()) - before;
    if (busy < windowMs * cores * maxBusyShare) return Math.round(performance.now() - started);
  }
  return -1;
}

/** CPU time the whole machine spent busy (every core; all but idle and iowait), in ms. */
export async function machineBusyMs(): Promise<number> {
  const cpu = (await readFile("/proc/stat", "utf8")).split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user, nice, system, , , irq, softirq, steal] = cpu;
  return ((user! + nice! + system! + irq! + softirq! + steal!) * 1000) / 100;
}

/**
 * The msa as the benchmarks run it: its own process on loopback, submission limits off (the
 * benchmarks measure the path, not the limiter), a TLS directory of its own.
 * Returns the process and its two ports (587-style STARTTLS and 465-style TLS).
 */
/**
 * The services' log level in the benchmarks: by default the production default, info, which
 * writes a line per delivery outcome as Postfix does (its log goes to a file in the reference
 * setups); BENCH_LOG_LEVEL=warn leaves those lines out.
 */
export const benchLogLevel = process.env.BENCH_LOG_LEVEL ?? "info";
let logDir: string | null = null;

/** A service process for a benchmark: the bench log level, its log written to a file as a supervisor would (printed at the end). */
export async function startBenchService(name: string, env: Record<string, string>): Promise<ServiceProcess> {
  logDir ??= await mkdtemp(join(tmpdir(), "bench-logs-"));
  const logFile = join(logDir, `${name}-${randomBytes(3).toString("hex")}.log`);
  return startServiceProcess(name, { ...env, LOG_LEVEL: benchLogLevel }, 30_000, { logFile });
}

/** Where this run's service logs are, if any service was started. */
export function benchLogDir(): string | null {
  return logDir;
}

export async function startBenchMsa(testEnv: Record<string, string>, extra: Record<string, string> = {}): Promise<{ msa: ServiceProcess; submission: number; submissions: number }> {
  const [submission, submissions] = [await freePort(), await freePort()];
  const msa = await startBenchService("msa", {
    ...testEnv,
    MAIL_HOSTNAME: "msa.bench.test",
    SUBMISSION_LISTEN: "127.0.0.1",
    SUBMISSION_PORT: String(submission),
    SUBMISSIONS_PORT: String(submissions),
    SUBMISSION_MAX_MESSAGES: "0",
    SUBMISSION_MAX_RECIPIENTS: "0",
    TLS_DIR: await mkdtemp(join(tmpdir(), "bench-msa-tls-")),
    ...extra,
  });
  return { msa, submission, submissions };
}
