// docs/deploy.md stays in step with the files it sends operators to.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { overlays, root } from "./lib.ts";

const doc = readFileSync(join(root, "docs/deploy.md"), "utf8");

test("every repository path docs/deploy.md names exists", () => {
  const paths = new Set(
    [...doc.matchAll(/`((?:deploy|test\/deploy|packages|services|docs)\/[A-Za-z0-9_./*-]+|Dockerfile|docker-compose\.yml|\.dockerignore)`/g)]
      .map((match) => match[1]!.replace(/\/$/, ""))
      .filter((path) => !path.includes("*")),
  );
  assert.ok(paths.size > 10, `found only ${paths.size} paths`);
  const missing = [...paths].filter((path) => !existsSync(join(root, path)));
  assert.deepEqual(missing, []);
});

test("docs/deploy.md describes every overlay", () => {
  for (const overlay of overlays()) {
    assert.ok(doc.includes(overlay.replace("deploy/", "")), `${overlay} is not mentioned`);
  }
});

test("the migrate CLI the Job and compose run exists", () => {
  assert.ok(existsSync(join(root, "packages/db/src/migrate-cli.ts")));
});
