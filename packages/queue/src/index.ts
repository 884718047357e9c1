export * from "./accept.ts";
export * from "./dispatch.ts";
export * from "./events.ts";
export * from "./sweeper.ts";
export * from "./metrics.ts";
export * from "./admin.ts";
export * from "./event-publisher.ts";
export * from "./retention.ts";
