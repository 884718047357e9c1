// Each service started as its container starts it (`node src/main.ts`), with the environment its
// Kubernetes Deployment gives it (ConfigMap + container env), against the real PostgreSQL and
// NATS. Only what cannot be the same on a shared test machine is replaced: the database and bus
// prefix (this file's own), the listening ports (free ones, so files run in parallel), the TLS
// certificate (self-signed) and the OTLP endpoint (none). Proves that the variables the manifests
// set are enough to start (no required variable missing), that every port variable they set
// really opens a listener, that the image's health check sees /readyz, and that SIGTERM ends the
// process cleanly within SHUTDOWN_TIMEOUT.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestEnv, freePort, startServiceProcess, type TestEnv } from "../../packages/testkit/src/index.ts";
import { durationSeconds, find, render, root, serviceFacts, serviceNames } from "./lib.ts";

let testEnv: TestEnv;
const tlsDir = mkdtempSync(join(tmpdir(), "mailstack-boot-tls-"));
before(async () => {
  testEnv = await createTestEnv();
});
after(async () => {
  await testEnv?.close();
  rmSync(tlsDir, { recursive: true, force: true });
});

function manifestEnv(name: string): Record<string, string> {
  const objects = render("deploy/base");
  const container = find(objects, "Deployment", name)!.spec.template.spec.containers[0];
  const env: Record<string, string> = {};
  for (const source of container.envFrom ?? []) {
    if (source.configMapRef) Object.assign(env, find(objects, "ConfigMap", source.configMapRef.name)!.data);
  }
  for (const variable of container.env ?? []) env[variable.name] = variable.value;
  return env;
}

function healthcheck(opsPort: number): number | null {
  const result = spawnSync(process.execPath, [join(root, "deploy/docker/healthcheck.mjs"), "/readyz"], {
    env: { PATH: process.env.PATH, OPS_PORT: String(opsPort) },
    encoding: "utf8",
    timeout: 10_000,
  });
  return result.status;
}

function connects(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

for (const name of serviceNames()) {
  test(`${name} starts with its Deployment's environment, opens its ports, and stops cleanly on SIGTERM`, { timeout: 120_000 }, async () => {
    const facts = serviceFacts(name);
    const env = manifestEnv(name);
    const listeners: Array<[string, number]> = [];
    for (const variable of Object.keys(env)) {
      if (facts.ports.has(variable)) {
        const port = await freePort();
        env[variable] = String(port);
        if (variable !== facts.opsVariable) listeners.push([variable, port]);
      }
    }
    Object.assign(env, testEnv.env, { TLS_CERT_FILE: "", TLS_KEY_FILE: "", TLS_DIR: tlsDir, OTEL_EXPORTER_OTLP_ENDPOINT: "" });
    env.OPS_PORT ??= String(await freePort());

    const service = await startServiceProcess(name, env, 60_000);
    let stopped = false;
    try {
      assert.equal(healthcheck(service.opsPort), 0, `the image's health check sees ${name} ready`);
      for (const [variable, port] of listeners) {
        assert.ok(await connects(port), `${name}: nothing listens on ${variable}=${port}\n${service.output()}`);
      }
      const started = Date.now();
      const limit = durationSeconds(env.SHUTDOWN_TIMEOUT ?? "25s");
      let timer: NodeJS.Timeout | undefined;
      const code = await Promise.race([
        service.stop(),
        new Promise<"hung">((resolve) => (timer = setTimeout(() => resolve("hung"), (limit + 10) * 1000))),
      ]);
      clearTimeout(timer);
      assert.notEqual(code, "hung", `${name} still running ${limit + 10}s after SIGTERM\n${service.output()}`);
      stopped = true;
      const seconds = (Date.now() - started) / 1000;
      assert.equal(code, 0, `${name} exit after SIGTERM: code ${code}, signal ${service.child.signalCode}\n${service.output()}`);
      assert.ok(seconds < limit, `${name} took ${seconds}s to stop`);
      assert.equal(healthcheck(service.opsPort), 1, "the health check fails once the service is gone");
    } finally {
      if (!stopped) await service.kill();
    }
  });
}
