import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";
import { createTestEnv, freePort, waitFor, type TestEnv } from "@mailstack/testkit";

const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
const services = ["mta-inbound", "msa", "mda", "mta-outbound", "pop3", "admin-api"];

let env: TestEnv;
before(async () => {
  env = await createTestEnv();
});
after(async () => env.close());

const PORT_VARIABLES = ["SMTP_PORT", "SUBMISSION_PORT", "SUBMISSIONS_PORT", "LMTP_PORT", "POP3_PORT", "POP3S_PORT", "API_PORT"];

/** A free port for each listener and each ops port of the stack, by the variables that move them. */
async function freeStackPorts(): Promise<{ ports: Record<string, string>; opsEnv: Record<string, string> }> {
  const ports: Record<string, string> = {};
  for (const name of PORT_VARIABLES) ports[name] = String(await freePort());
  const opsEnv: Record<string, string> = {};
  for (const service of services) opsEnv[`${service.toUpperCase().replace(/-/g, "_")}_OPS_PORT`] = String(await freePort());
  return { ports, opsEnv };
}

/** The stack as its own process (run as `command`), on the test database, with everything it prints in output(). */
function spawnStack(extraEnv: Record<string, string>, command = [process.execPath, "scripts/stack.ts"]): { child: ChildProcess; output: () => string } {
  const child = spawn(command[0]!, command.slice(1), { cwd: repoRoot, env: { ...process.env, ...env.env, ...extraEnv }, stdio: ["ignore", "pipe", "pipe"] });
  let printed = "";
  child.stdout!.on("data", (chunk) => (printed += chunk));
  child.stderr!.on("data", (chunk) => (printed += chunk));
  return { child, output: () => printed };
}

test("the start command brings all six services to ready and Ctrl-C stops them cleanly", async () => {
  const ports: Record<string, string> = {};
  for (const name of PORT_VARIABLES) ports[name] = String(await freePort());
  const opsPorts: Record<string, number> = {};
  for (const service of services) opsPorts[service] = await freePort();
  const opsEnv = Object.fromEntries(services.map((s) => [`${s.toUpperCase().replace(/-/g, "_")}_OPS_PORT`, String(opsPorts[s])]));

  const { child: stack, output } = spawnStack({ ...ports, ...opsEnv, LOG_LEVEL: "warn", TLS_DIR: `${repoRoot}.data/tls-test` });
  const exited = new Promise<number | null>((resolve) => stack.once("exit", (code) => resolve(code)));
  try {
    await waitFor(() => output().includes("Every service is ready") || stack.exitCode !== null, 90_000, 200);
    assert.match(output(), /Every service is ready/, output());
    for (const service of services) {
      const ready = await fetch(`http://127.0.0.1:${opsPorts[service]}/readyz`);
      assert.equal(ready.status, 200, `${service} ready`);
      const metrics = await (await fetch(`http://127.0.0.1:${opsPorts[service]}/metrics`)).text();
      assert.match(metrics, /process_cpu_user_seconds_total/, `${service} metrics`);
    }
    // The banner names every port and the first commands.
    assert.ok(output().includes(`127.0.0.1:${ports.SMTP_PORT}`));
    assert.ok(output().includes(`127.0.0.1:${ports.POP3_PORT}`));
    assert.match(output(), /pnpm mailctl account add alice@example\.test --password s3cret/);
    // The admin API listens on loopback only (API_HOST unset): no wildcard or other address.
    assert.equal((await fetch(`http://127.0.0.1:${ports.API_PORT}/domains`)).status, 401, "reachable on loopback (and asks for a token)");
    assert.deepEqual(listeningAddresses(Number(ports.API_PORT)), ["0100007F"], "the admin API is bound to 127.0.0.1 alone");

    // SIGHUP (a certificate reload, or a closed terminal) leaves the stack and its services up.
    stack.kill("SIGHUP");
    await waitFor(() => output().includes("SIGHUP:"), 10_000, 100);
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(stack.exitCode, null, `the stack still runs after SIGHUP\n${output()}`);
    for (const service of services) {
      const ready = await fetch(`http://127.0.0.1:${opsPorts[service]}/readyz`);
      assert.equal(ready.status, 200, `${service} still ready after SIGHUP`);
    }
  } finally {
    stack.kill("SIGINT");
  }
  assert.equal(await exited, 0, output());
  assert.match(output(), /\[stack\] stopped/);
  for (const service of services) {
    await assert.rejects(fetch(`http://127.0.0.1:${opsPorts[service]}/healthz`), `${service} is gone`);
  }
});

/** The local addresses (as /proc/net/tcp{,6} write them) of the sockets listening on a TCP port. */
function listeningAddresses(port: number): string[] {
  const hexPort = port.toString(16).toUpperCase().padStart(4, "0");
  return ["/proc/net/tcp", "/proc/net/tcp6"].flatMap((file) =>
    readFileSync(file, "utf8").split("\n").slice(1)
      .map((line) => line.trim().split(/\s+/))
      .filter((fields) => fields[1]?.endsWith(`:${hexPort}`) && fields[3] === "0A")
      .map((fields) => fields[1]!.split(":")[0]!),
  );
}

/** The pid of the stack's child running services/<name>/src/main.ts, once it is spawned. */
function childPid(parent: number, name: string): number | undefined {
  let children: string;
  try {
    children = readFileSync(`/proc/${parent}/task/${parent}/children`, "utf8");
  } catch {
    return undefined;
  }
  for (const pid of children.trim().split(/\s+/).filter(Boolean).map(Number)) {
    const command = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    if (command.includes(`services/${name}/src/main.ts`)) return pid;
  }
  return undefined;
}

test("a service that cannot start (a bad setting) stops the stack once, with exit 1, without calling the others never ready", async () => {
  const { ports, opsEnv } = await freeStackPorts();

  const { child: stack, output } = spawnStack({ ...ports, ...opsEnv, LOG_LEVEL: "warn", TLS_DIR: `${repoRoot}.data/tls-test`, INBOUND_AUTH_TIMEOUT: "soon" });
  const exited = once(stack, "exit");
  // The msa is frozen before it is ready, so the stack is still waiting for it (and still
  // stopping it) when mta-inbound fails; it resumes once the failure has been handled.
  const msa = await waitFor(() => childPid(stack.pid!, "msa"), 30_000, 5);
  process.kill(msa, "SIGSTOP");
  try {
    await waitFor(() => output().includes("mta-inbound exited"), 30_000, 50);
    await new Promise((resolve) => setTimeout(resolve, 1_500));
    process.kill(msa, "SIGCONT");
    const [code] = await exited;
    assert.equal(code, 1, output());
    assert.match(output(), /INBOUND_AUTH_TIMEOUT: expected a duration/, "the service's own reason is shown");
    assert.match(output(), /\[stack\] mta-inbound exited \(78\); stopping the stack/);
    assert.equal(output().match(/\[stack\] stopping services/g)?.length, 1, `stopped once\n${output()}`);
    assert.doesNotMatch(output(), /not ready/, `the services the stack stopped are not reported as never ready\n${output()}`);
    assert.doesNotMatch(output(), /Every service is ready/);
  } finally {
    try {
      process.kill(msa, "SIGCONT");
    } catch {
      // already gone
    }
    if (stack.exitCode === null) stack.kill("SIGKILL");
  }
});

test("ports already in use (a system MTA on 25, say) are all named before anything starts", async () => {
  const smtp = net.createServer();
  const ops = net.createServer();
  await Promise.all([new Promise<void>((resolve) => smtp.listen(0, resolve)), new Promise<void>((resolve) => ops.listen(0, resolve))]);
  const portVariables = ["SUBMISSION_PORT", "SUBMISSIONS_PORT", "LMTP_PORT", "POP3_PORT", "POP3S_PORT", "API_PORT"];
  const smtpPort = (smtp.address() as net.AddressInfo).port;
  const opsPort = (ops.address() as net.AddressInfo).port;
  const ports: Record<string, string> = { SMTP_PORT: String(smtpPort) };
  for (const name of portVariables) ports[name] = String(await freePort());
  const opsEnv: Record<string, string> = {};
  for (const service of services) opsEnv[`${service.toUpperCase().replace(/-/g, "_")}_OPS_PORT`] = String(await freePort());
  opsEnv.POP3_OPS_PORT = String(opsPort);

  const { child: stack, output } = spawnStack({ ...ports, ...opsEnv, LOG_LEVEL: "warn", TLS_DIR: `${repoRoot}.data/tls-test` });
  try {
    const [code] = await once(stack, "exit");
    assert.equal(code, 1, output());
    assert.match(output(), new RegExp(`port ${smtpPort} \\(mta-inbound, SMTP_PORT\\) is in use by another program`), output());
    assert.match(output(), new RegExp(`port ${opsPort} \\(pop3, POP3_OPS_PORT\\) is in use by another program`), output());
    assert.doesNotMatch(output(), /exited|"service":/, `no service was started\n${output()}`);
  } finally {
    if (stack.exitCode === null) stack.kill("SIGKILL");
    smtp.close();
    ops.close();
  }
});

test("an expired TLS_CERT_FILE is named as expired before the services start, and in the banner", async () => {
  const dir = mkdtempSync(join(tmpdir(), "stack-tls-"));
  // selfsigned is a dependency of packages/runtime (it makes the self-signed pair), not of the root.
  const { generate } = (await import(createRequire(join(repoRoot, "packages/runtime/package.json")).resolve("selfsigned"))) as {
    generate: (attributes: Array<{ name: string; value: string }>, options: object) => Promise<{ cert: string; private: string }>;
  };
  const expired = await generate([{ name: "commonName", value: "mail.example.test" }], {
    keyType: "rsa",
    keySize: 2048,
    algorithm: "sha256",
    notBeforeDate: new Date("2020-01-01T00:00:00Z"),
    notAfterDate: new Date("2020-04-01T00:00:00Z"),
  });
  writeFileSync(join(dir, "fullchain.pem"), expired.cert);
  writeFileSync(join(dir, "privkey.pem"), expired.private);
  const { ports, opsEnv } = await freeStackPorts();
  const { child: stack, output } = spawnStack({
    ...ports, ...opsEnv, LOG_LEVEL: "error",
    TLS_CERT_FILE: join(dir, "fullchain.pem"), TLS_KEY_FILE: join(dir, "privkey.pem"),
  });
  const exited = once(stack, "exit");
  try {
    await waitFor(() => output().includes("Every service is ready") || stack.exitCode !== null, 90_000, 200);
    assert.match(output(), /\[stack\] TLS certificate \S+fullchain\.pem: expired on 2020-04-01T00:00:00\.000Z; served all the same/, output());
    assert.match(output(), /TLS certificate +\S+fullchain\.pem \(EXPIRED ON 2020-04-01/, output());
  } finally {
    stack.kill("SIGINT");
    await exited;
    rmSync(dir, { recursive: true, force: true });
  }
});

test("run by a user who may not write the checkout (root's clone), the failure says whose it is and what to do", { skip: process.getuid?.() !== 0 && "needs root, to run the stack as nobody" }, async () => {
  const { ports, opsEnv } = await freeStackPorts();
  // The self-signed pair is written under the checkout's .data, which nobody may not write.
  const { child: stack, output } = spawnStack({ ...ports, ...opsEnv, LOG_LEVEL: "error", TLS_DIR: "", TLS_CERT_FILE: "", TLS_KEY_FILE: "" }, ["runuser", "-u", "nobody", "--", process.execPath, "scripts/stack.ts"]);
  try {
    const [code] = await once(stack, "exit");
    assert.equal(code, 1, output());
    assert.match(output(), /\[stack\] failed: EACCES: permission denied, \w+ '[^']*\.data[^']*'; this checkout belongs to uid 0, not to uid \d+: run \.\/mailstack as its owner, or from a clone of your own/, output());
    assert.doesNotMatch(output(), /"service":/, `no service was started\n${output()}`);
  } finally {
    if (stack.exitCode === null) stack.kill("SIGKILL");
  }
});

test("the banner's export DATABASE_URL line gives the shell back the URL the stack uses, query string and all", async () => {
  const databaseUrl = `${env.env.DATABASE_URL}?connect_timeout=10&application_name=stack-banner`;
  const { ports, opsEnv } = await freeStackPorts();
  const { child: stack, output } = spawnStack({ ...ports, ...opsEnv, DATABASE_URL: databaseUrl, LOG_LEVEL: "error", TLS_DIR: `${repoRoot}.data/tls-test` });
  const exited = once(stack, "exit");
  try {
    await waitFor(() => output().includes("Every service is ready") || stack.exitCode !== null, 90_000, 200);
    const line = /^ {2}(export DATABASE_URL=.*)$/m.exec(output())?.[1];
    assert.ok(line, output());
    const result = spawnSync("sh", ["-c", `${line}; printf %s "$DATABASE_URL"`], { encoding: "utf8", env: {} });
    assert.equal(result.stdout, databaseUrl, `as printed: ${line}`);
  } finally {
    stack.kill("SIGINT");
    await exited;
  }
});

test("with pnpm installed into .tools (no right to install it globally), the banner puts it on the PATH of the next terminal", async () => {
  // A pnpm where scripts/ensure-tools.sh puts it for a user other than root, found first on PATH.
  mkdirSync(join(repoRoot, ".tools"), { recursive: true });
  const toolsBin = mkdtempSync(join(repoRoot, ".tools/test-pnpm-"));
  writeFileSync(join(toolsBin, "pnpm"), "#!/bin/sh\necho 10.0.0\n", { mode: 0o755 });
  const { ports, opsEnv } = await freeStackPorts();
  const { child: stack, output } = spawnStack({ ...ports, ...opsEnv, PATH: `${toolsBin}:${process.env.PATH}`, LOG_LEVEL: "error", TLS_DIR: `${repoRoot}.data/tls-test` });
  const exited = once(stack, "exit");
  try {
    await waitFor(() => output().includes("Every service is ready") || stack.exitCode !== null, 90_000, 200);
    const line = /^ {2}(export PATH=.*)$/m.exec(output())?.[1];
    assert.ok(line, output());
    const commands = output().slice(output().indexOf(line));
    assert.ok(commands.indexOf(line) < commands.indexOf("pnpm mailctl domain add"), "before the first pnpm command");
    const result = spawnSync("sh", ["-c", `${line}; command -v pnpm`], { encoding: "utf8", env: { PATH: "/usr/local/bin:/usr/bin:/bin" } });
    assert.equal(result.stdout.trim(), join(toolsBin, "pnpm"), `as printed: ${line}`);
  } finally {
    stack.kill("SIGINT");
    await exited;
    rmSync(toolsBin, { recursive: true, force: true });
  }
});
