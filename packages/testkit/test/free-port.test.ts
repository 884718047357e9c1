import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import net from "node:net";
import { test } from "node:test";
import { freePort } from "../src/index.ts";

test("freePort hands out distinct ports below the kernel's ephemeral range, free on every address", async () => {
  const ephemeralStart = Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
  const ports = await Promise.all(Array.from({ length: 40 }, () => freePort()));
  assert.equal(new Set(ports).size, ports.length, "never the same port twice");
  for (const port of ports) assert.ok(port >= 1024 && port < ephemeralStart, `${port} is below ${ephemeralStart}`);
  // Each can be listened on dual-stack, as the services do.
  for (const port of ports.slice(0, 5)) {
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, "::", resolve);
    });
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});
