import { pino, type Logger } from "pino";
import { trace } from "@opentelemetry/api";

export type { Logger };

/**
 * A JSON logger that names the service on every line and adds the active span's
 * trace id, so a log line leads to its trace in Jaeger.
 */
export function createLogger(service: string, level: string = process.env.LOG_LEVEL ?? "info"): Logger {
  return pino({
    level,
    base: { service },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
    redact: { paths: ["password", "*.password", "pass", "*.pass", "authorization", "*.authorization"], censor: "[redacted]" },
    mixin() {
      const context = trace.getActiveSpan()?.spanContext();
      if (!context || context.traceId === "00000000000000000000000000000000") return {};
      return { trace_id: context.traceId, span_id: context.spanId };
    },
  });
}
