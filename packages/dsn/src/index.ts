export * from "./compose.ts";
export * from "./generator.ts";
