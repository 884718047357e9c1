import { pino, type DestinationStream, type Logger, type LoggerOptions } from "pino";
import { trace } from "@opentelemetry/api";

export type { Logger };

/**
 * A JSON logger that names the service on every line and adds the active span's
 * trace id, so a log line leads to its trace in Jaeger.
 */
export function createLogger(service: string, level: string = process.env.LOG_LEVEL ?? "info", destination?: DestinationStream): Logger {
  const options: LoggerOptions = {
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
  };
  // A destination (a test capturing the lines) instead of stdout.
  return destination ? pino(options, destination) : pino(options);
}

/** Longest remote reply or reason a log line carries: one line per recipient stays bounded. */
export const LOG_TEXT_MAX = 300;

/** Text for a log field, cut to LOG_TEXT_MAX characters (with a marker) and on one line. */
export function logText(text: string, max: number = LOG_TEXT_MAX): string {
  const line = text.replace(/[\r\n]+/g, " ");
  return line.length <= max ? line : `${line.slice(0, max)}...[${line.length - max} more]`;
}
