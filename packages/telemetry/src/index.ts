export * from "./logger.ts";
export * from "./tracing.ts";
export * from "./metrics.ts";
export * from "./ops-server.ts";
export { startTelemetry, stopTelemetry } from "./sdk.ts";
