import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { freePort, waitFor } from "@mailstack/testkit";
import { connectBus } from "../src/index.ts";

// A NATS server of its own, started without JetStream (-js left out), with its monitoring port.
let server: ChildProcess;
let port: number;
let monitor: number;

before(async () => {
  port = await freePort();
  monitor = await freePort();
  server = spawn("nats-server", ["-a", "127.0.0.1", "-p", String(port), "-m", String(monitor)], { stdio: "ignore" });
  await waitFor(async () => (await fetch(`http://127.0.0.1:${monitor}/varz`).catch(() => null))?.ok ?? false, 10_000, 100);
});
after(() => {
  server?.kill("SIGTERM");
});

async function openConnections(): Promise<number> {
  return ((await (await fetch(`http://127.0.0.1:${monitor}/connz`)).json()) as { num_connections: number }).num_connections;
}

test("NATS without JetStream: connectBus says so and leaves no connection behind for each try", async () => {
  for (let attempt = 0; attempt < 3; attempt++) {
    await assert.rejects(connectBus({ url: `nats://127.0.0.1:${port}`, name: "no-js-test" }), /JetStream is not available there/);
  }
  await waitFor(async () => (await openConnections()) === 0, 5_000, 100);
  assert.equal(await openConnections(), 0);
});
