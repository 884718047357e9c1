import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";

const repoRoot = fileURLToPath(new URL("../../../", import.meta.url));

/**
 * The ports the kernel hands out on its own (listen on port 0, and the source port of every
 * outgoing connection) come from ip_local_port_range; a port picked there and released could be
 * taken by any other test's connection before the service that was given it binds it. So test
 * ports come from below that range, at random, checked free on every address (the services
 * listen dual-stack), and never handed out twice by one process.
 */
function ephemeralRangeStart(): number {
  try {
    return Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
}

const handedOut = new Set<number>();

function canListen(port: number, host: string): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once("error", (error: NodeJS.ErrnoException) => resolve(host === "::" && error.code === "EAFNOSUPPORT"));
    server.listen(port, host, () => server.close(() => resolve(true)));
  });
}

/** A TCP port free on every address, for a test's server (see above for why not port 0). */
export async function freePort(): Promise<number> {
  const high = Math.min(ephemeralRangeStart(), 65536);
  const low = Math.max(1024, Math.min(20000, high - 4096));
  for (let attempt = 0; attempt < 200; attempt++) {
    const port = low + Math.floor(Math.random() * (high - low));
    if (handedOut.has(port)) continue;
    // Reserved before the checks, so that concurrent calls never pick the same port.
    handedOut.add(port);
    if ((await canListen(port, "::")) && (await canListen(port, "127.0.0.1"))) return port;
    handedOut.delete(port);
  }
  throw new Error(`no free port found between ${low} and ${high}`);
}

export interface ServiceProcess {
  child: ChildProcess;
  opsPort: number;
  /** Everything the process wrote, for assertions and failure messages. */
  output(): string;
  /** SIGTERM and wait for exit; resolves the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait for exit. */
  kill(): Promise<void>;
}

/**
 * Starts a service as its own process (node services/NAME/src/main.ts), the way the stack and
 * the containers run it, and waits until its /readyz answers 200.
 */
export async function startServiceProcess(
  name: string,
  env: Record<string, string>,
  timeoutMs = 30_000,
  options: { logFile?: string } = {},
): Promise<ServiceProcess> {
  const opsPort = Number(env.OPS_PORT ?? (await freePort()));
  const logFd = options.logFile ? openSync(options.logFile, "a") : null;
  const child = spawn(process.execPath, [`${repoRoot}services/${name}/src/main.ts`], {
    cwd: repoRoot,
    // The same memory settings as the stack and the images.
    env: { ...process.env, LOG_LEVEL: "warn", NODE_OPTIONS: "--max-semi-space-size=4", MALLOC_ARENA_MAX: "2", ...env, OPS_PORT: String(opsPort) },
    // With logFile the log goes straight to a file, as under a supervisor, and costs this process nothing.
    stdio: options.logFile ? ["ignore", logFd!, logFd!] : ["ignore", "pipe", "pipe"],
  });
  if (logFd !== null) closeSync(logFd);
  let collected = "";
  child.stdout?.on("data", (chunk) => (collected += chunk));
  child.stderr?.on("data", (chunk) => (collected += chunk));
  const readOutput = () => (options.logFile ? readFileSync(options.logFile, "utf8") : collected);
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`${name} exited with ${child.exitCode ?? child.signalCode} before it was ready:\n${readOutput()}`);
    }
    try {
      const response = await fetch(`http://127.0.0.1:${opsPort}/readyz`);
      if (response.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`${name} was not ready within ${timeoutMs} ms:\n${readOutput()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return {
    child,
    opsPort,
    output: readOutput,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      return exited;
    },
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
    },
  };
}

export interface CommandResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the real `mailctl` as its own process against a database, as an operator would. */
export function runMailctl(databaseUrl: string, args: string[], stdin = ""): Promise<CommandResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [`${repoRoot}services/admin-api/src/cli/mailctl.ts`, ...args], {
      env: { ...process.env, DATABASE_URL: databaseUrl },
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk) => (stdout += chunk));
    child.stderr.on("data", (chunk) => (stderr += chunk));
    child.on("close", (code) => resolve({ code: code ?? -1, stdout, stderr }));
    child.stdin.end(stdin);
  });
}
