// Runs every test file of the workspace in one node --test run, so the output ends with
// one summary (tests, pass, fail, skipped) that CI reads.
import { spawn } from "node:child_process";
import { globSync } from "node:fs";

const patterns = ["packages/*/test/**/*.test.ts", "services/*/test/**/*.test.ts", "test/**/*.test.ts"];
const files = patterns.flatMap((pattern) => globSync(pattern)).sort();
const filter = process.argv.slice(2);
const selected = filter.length ? files.filter((file) => filter.some((f) => file.includes(f))) : files;
if (selected.length === 0) {
  console.error("no test files found");
  console.log("0 passed, 1 failed");
  process.exit(1);
}
const child = spawn(
  process.execPath,
  ["--test", "--test-reporter=spec", `--test-concurrency=${process.env.TEST_CONCURRENCY ?? 3}`, "--test-timeout=300000", ...selected],
  { stdio: "inherit", env: { ...process.env, NODE_ENV: "test" } },
);
child.on("exit", (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
