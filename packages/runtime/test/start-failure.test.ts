// A service that cannot start says why in one JSON line at level fatal and exits 1 (README,
// Configuration), whichever step fails: here its ops port is taken by another program.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createTestEnv, freePort, type TestEnv } from "../../testkit/src/index.ts";

const repoRoot = fileURLToPath(new URL("../../../", import.meta.url));
let testEnv: TestEnv;
const tlsDir = mkdtempSync(join(tmpdir(), "mailstack-start-failure-tls-"));
before(async () => {
  testEnv = await createTestEnv();
});
after(async () => {
  await testEnv?.close();
  rmSync(tlsDir, { recursive: true, force: true });
});

test("an ops port in use: one fatal JSON line naming OPS_PORT, exit 1, no bare stack trace", { timeout: 60_000 }, async () => {
  const blocker = net.createServer();
  await new Promise<void>((resolve) => blocker.listen(0, resolve));
  const opsPort = (blocker.address() as net.AddressInfo).port;
  try {
    const child = spawn(process.execPath, [join(repoRoot, "services/pop3/src/main.ts")], {
      cwd: repoRoot,
      env: {
        ...process.env,
        ...testEnv.env,
        LOG_LEVEL: "info",
        OPS_PORT: String(opsPort),
        POP3_PORT: String(await freePort()),
        POP3S_PORT: String(await freePort()),
        TLS_DIR: tlsDir,
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout!.on("data", (chunk) => (output += chunk));
    child.stderr!.on("data", (chunk) => (output += chunk));
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    const [code] = await once(child, "exit");
    clearTimeout(timer);
    assert.equal(code, 1, output);
    const lines = output.split("\n").filter(Boolean);
    const notJson = lines.filter((line) => {
      try {
        JSON.parse(line);
        return false;
      } catch {
        return true;
      }
    });
    assert.deepEqual(notJson, [], `every line is JSON\n${output}`);
    const fatal = lines.map((line) => JSON.parse(line)).find((entry) => entry.level === "fatal");
    assert.ok(fatal, output);
    assert.equal(fatal.msg, `pop3 could not start: ops port OPS_PORT=${opsPort}`);
    assert.match(fatal.err.message, /EADDRINUSE/);
  } finally {
    blocker.close();
  }
});
