import { NodeSDK } from "@opentelemetry/sdk-node";
import { PgInstrumentation } from "@opentelemetry/instrumentation-pg";
import { NetInstrumentation } from "@opentelemetry/instrumentation-net";
import { DnsInstrumentation } from "@opentelemetry/instrumentation-dns";

let sdk: NodeSDK | undefined;

/** Accepts spans and drops them: used when no OTLP endpoint is configured, so trace ids still exist and propagate. */
const discardingExporter = {
  export(_spans: unknown[], done: (result: { code: number }) => void) {
    done({ code: 0 });
  },
  async shutdown() {},
  async forceFlush() {},
};

function exportConfigured(env: NodeJS.ProcessEnv): boolean {
  // "none" is the standard way to switch trace export off, whatever endpoint is set.
  if (env.OTEL_TRACES_EXPORTER === "none") return false;
  if (env.OTEL_TRACES_EXPORTER) return true;
  return Boolean(env.OTEL_EXPORTER_OTLP_ENDPOINT || env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT);
}

/**
 * Starts the OpenTelemetry SDK. Call it before importing anything that should be
 * instrumented (pg, net, dns): a service's main.ts starts it, then imports the rest.
 * The exporter, protocol, sampler and endpoint come from the standard OTEL_* variables;
 * with no endpoint configured, spans are not recorded: they exist only for their ids.
 */
export function startTelemetry(serviceName: string): void {
  if (sdk) return;
  const env = process.env;
  env.OTEL_SERVICE_NAME ??= serviceName;
  env.OTEL_METRICS_EXPORTER ??= "none";
  env.OTEL_LOGS_EXPORTER ??= "none";
  const exporting = exportConfigured(env);
  // Nothing to export to: spans are not recorded at all (no attributes kept, no span processor),
  // while every span still gets its trace and span ids, so logs, message rows and NATS headers
  // carry them as before. An operator's own OTEL_TRACES_SAMPLER wins.
  if (!exporting) env.OTEL_TRACES_SAMPLER ??= "always_off";
  // With every span unrecorded, the pg, net and dns instrumentations would only wrap each call
  // to make spans nobody keeps (2-4% of a busy service's CPU); our own spans still carry the ids.
  const recording = exporting || env.OTEL_TRACES_SAMPLER !== "always_off";
  sdk = new NodeSDK({
    serviceName: env.OTEL_SERVICE_NAME,
    ...(exporting ? {} : { traceExporter: discardingExporter as never }),
    instrumentations: recording
      ? [new PgInstrumentation({ requireParentSpan: true, enhancedDatabaseReporting: false }), new NetInstrumentation(), new DnsInstrumentation()]
      : [],
  });
  sdk.start();
}

/** Flushes pending spans and stops the SDK; part of graceful shutdown. */
export async function stopTelemetry(): Promise<void> {
  const running = sdk;
  sdk = undefined;
  await running?.shutdown().catch(() => undefined);
}
