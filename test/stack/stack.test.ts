import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";
import { createTestEnv, freePort, waitFor, type TestEnv } from "@mailstack/testkit";

const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
const services = ["mta-inbound", "msa", "mda", "mta-outbound", "pop3", "admin-api"];

let env: TestEnv;
before(async () => {
  env = await createTestEnv();
});
after(async () => env.close());

test("the start command brings all six services to ready and Ctrl-C stops them cleanly", async () => {
  const portVariables = ["SMTP_PORT", "SUBMISSION_PORT", "SUBMISSIONS_PORT", "LMTP_PORT", "POP3_PORT", "POP3S_PORT", "API_PORT"];
  const ports: Record<string, string> = {};
  for (const name of portVariables) ports[name] = String(await freePort());
  const opsPorts: Record<string, number> = {};
  for (const service of services) opsPorts[service] = await freePort();
  const opsEnv = Object.fromEntries(services.map((s) => [`${s.toUpperCase().replace(/-/g, "_")}_OPS_PORT`, String(opsPorts[s])]));

  const stack: ChildProcess = spawn(process.execPath, ["scripts/stack.ts"], {
    cwd: repoRoot,
    env: { ...process.env, ...env.env, ...ports, ...opsEnv, LOG_LEVEL: "warn", TLS_DIR: `${repoRoot}.data/tls-test` },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  stack.stdout!.on("data", (chunk) => (output += chunk));
  stack.stderr!.on("data", (chunk) => (output += chunk));
  const exited = new Promise<number | null>((resolve) => stack.once("exit", (code) => resolve(code)));
  try {
    await waitFor(() => output.includes("Every service is ready") || stack.exitCode !== null, 90_000, 200);
    assert.match(output, /Every service is ready/, output);
    for (const service of services) {
      const ready = await fetch(`http://127.0.0.1:${opsPorts[service]}/readyz`);
      assert.equal(ready.status, 200, `${service} ready`);
      const metrics = await (await fetch(`http://127.0.0.1:${opsPorts[service]}/metrics`)).text();
      assert.match(metrics, /process_cpu_user_seconds_total/, `${service} metrics`);
    }
    // The banner names every port and the first commands.
    assert.ok(output.includes(`127.0.0.1:${ports.SMTP_PORT}`));
    assert.ok(output.includes(`127.0.0.1:${ports.POP3_PORT}`));
    assert.match(output, /pnpm mailctl account add alice@example\.test --password s3cret/);
  } finally {
    stack.kill("SIGINT");
  }
  assert.equal(await exited, 0, output);
  assert.match(output, /\[stack\] stopped/);
  for (const service of services) {
    await assert.rejects(fetch(`http://127.0.0.1:${opsPorts[service]}/healthz`), `${service} is gone`);
  }
});
