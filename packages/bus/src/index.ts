export * from "./bus.ts";
export * from "./publish.ts";
export * from "./consume.ts";
