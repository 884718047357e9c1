import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { addDomain } from "@mailstack/db";
import { createTestDatabase, type TestDatabase } from "@mailstack/testkit";

const mailctlPath = fileURLToPath(new URL("../src/cli/mailctl.ts", import.meta.url));

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  for (let i = 0; i < 5; i++) await addDomain(db.pool, `d${i}.example.test`);
});
after(async () => db.drop());

test("a reader closing the pipe early (mailctl domain list | head -1) ends mailctl quietly with 141", async () => {
  const child = spawn(process.execPath, [mailctlPath, "domain", "list"], {
    env: { ...process.env, DATABASE_URL: db.url },
    stdio: ["ignore", "pipe", "pipe"],
  });
  // Closed before mailctl has connected to the database, so its first line meets a closed pipe.
  child.stdout.destroy();
  let stderr = "";
  child.stderr.on("data", (chunk) => (stderr += chunk));
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
    child.on("close", (exitCode, exitSignal) => resolve([exitCode, exitSignal])),
  );
  assert.equal(stderr, "");
  assert.equal(signal, null);
  assert.equal(code, 141);
});
