import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);
const sdk = fileURLToPath(new URL("../src/sdk.ts", import.meta.url));
const tracing = fileURLToPath(new URL("../src/tracing.ts", import.meta.url));

interface Outcome {
  traceId: string;
  rootRecorded: boolean;
  continuationRecorded: boolean;
}

/**
 * In a fresh process with the real SDK and this sampler: starts root spans (the accepting
 * sessions), then a span under journeyContext(root) for each (the retry or bounce later).
 */
async function sample(otel: Record<string, string>): Promise<Outcome[]> {
  const script = `import { startTelemetry } from ${JSON.stringify(sdk)};
startTelemetry("journey-context-test");
const { context, journeyContext, tracer } = await import(${JSON.stringify(tracing)});
const out = [];
for (let i = 0; i < 400; i++) {
  const root = tracer.startSpan("smtp transaction");
  const { traceId, spanId } = root.spanContext();
  const rootRecorded = root.isRecording();
  root.end();
  const later = tracer.startSpan("mail.relay.outbound publish", {}, journeyContext(traceId, spanId, context.active()));
  out.push({ traceId, rootRecorded, continuationRecorded: later.isRecording() && later.spanContext().traceId === traceId });
  later.end();
}
console.log(JSON.stringify(out));
process.exit(0);`;
  const env: NodeJS.ProcessEnv = { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:9", ...otel };
  if (!otel.OTEL_TRACES_SAMPLER_ARG) delete env.OTEL_TRACES_SAMPLER_ARG;
  const { stdout } = await run(process.execPath, ["--input-type=module", "-e", script], { env });
  return JSON.parse(stdout.trim().split("\n").at(-1)!) as Outcome[];
}

test("with a ratio sampler, a journey's continuation is recorded exactly when its root was", async () => {
  const outcomes = await sample({ OTEL_TRACES_SAMPLER: "parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG: "0.5" });
  const recorded = outcomes.filter((o) => o.rootRecorded).length;
  assert.ok(recorded > 100 && recorded < 300, `about half sampled: ${recorded}`);
  for (const o of outcomes) assert.equal(o.continuationRecorded, o.rootRecorded, o.traceId);
});

test("with parentbased_always_on every continuation is recorded, with always_off none", async () => {
  assert.ok((await sample({ OTEL_TRACES_SAMPLER: "parentbased_always_on" })).every((o) => o.rootRecorded && o.continuationRecorded));
  assert.ok((await sample({ OTEL_TRACES_SAMPLER: "always_off" })).every((o) => !o.rootRecorded && !o.continuationRecorded));
});
