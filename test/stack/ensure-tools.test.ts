// The bootstrap of `./mailstack start|test`: when Node 22 cannot be fetched (no registry access,
// a proxy's certificate npm does not trust), the user is told why instead of left at a prompt.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

test("a failed Node 22 download ends with npm's error and what to do, not silently", () => {
  const dir = mkdtempSync(join(tmpdir(), "ensure-tools-"));
  try {
    // A clone without .tools, on a machine whose node is too old and whose npm cannot reach the registry.
    mkdirSync(join(dir, "scripts"));
    copyFileSync(join(import.meta.dirname, "../../scripts/ensure-tools.sh"), join(dir, "scripts/ensure-tools.sh"));
    const bin = join(dir, "bin");
    mkdirSync(bin);
    const tool = (name: string, body: string) => {
      writeFileSync(join(bin, name), `#!/bin/sh\n${body}\n`);
      chmodSync(join(bin, name), 0o755);
    };
    tool("node", 'echo 18');
    tool("pnpm", 'echo 10.0.0');
    tool("npm", 'echo "npm error code SELF_SIGNED_CERT_IN_CHAIN" >&2; exit 1');
    const result = spawnSync("bash", ["-c", `source ${join(dir, "scripts/ensure-tools.sh")}`], {
      encoding: "utf8",
      env: { PATH: `${bin}:/usr/bin:/bin`, HOME: dir },
    });
    assert.equal(result.status, 1);
    assert.match(result.stderr, /SELF_SIGNED_CERT_IN_CHAIN/, "npm's error is shown");
    assert.match(result.stderr, /could not install Node 22/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
