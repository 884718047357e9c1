import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);
const sdk = fileURLToPath(new URL("../src/sdk.ts", import.meta.url));
// pg as the services load it (a dependency of @mailstack/db, not of this package).
const pgPath = createRequire(fileURLToPath(new URL("../../db/package.json", import.meta.url))).resolve("pg");

/** Starts telemetry in a fresh process with these OTEL_* variables; says whether pg's query got wrapped by its instrumentation. */
async function pgInstrumented(otel: Record<string, string>): Promise<boolean> {
  const script = `import { startTelemetry } from ${JSON.stringify(sdk)};
startTelemetry("sdk-test");
const { createRequire } = await import("node:module");
const pg = createRequire(import.meta.url)(${JSON.stringify(pgPath)});
console.log(JSON.stringify(Boolean(pg.Client.prototype.query.__wrapped)));
process.exit(0);`;
  const env: NodeJS.ProcessEnv = { ...process.env, ...otel };
  for (const name of ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER"]) if (!(name in otel)) delete env[name];
  const { stdout } = await run(process.execPath, ["--input-type=module", "-e", script], { env });
  return JSON.parse(stdout.trim()) as boolean;
}

test("with nothing to export to, the pg/net/dns instrumentations are not installed (spans would be unrecorded anyway)", async () => {
  assert.equal(await pgInstrumented({}), false);
});

test("with an OTLP endpoint, or a sampler that records, pg is instrumented", async () => {
  assert.equal(await pgInstrumented({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:4318" }), true);
  assert.equal(await pgInstrumented({ OTEL_TRACES_SAMPLER: "parentbased_always_on" }), true);
});

test("OTEL_TRACES_EXPORTER=none turns exporting off even with an endpoint set (as in deploy/base): nothing is recorded then", async () => {
  assert.equal(await pgInstrumented({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:4318", OTEL_TRACES_EXPORTER: "none" }), false);
});
