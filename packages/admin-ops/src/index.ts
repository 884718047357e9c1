export * from "./tokens.ts";
export * from "./journey.ts";
export * from "./dns.ts";
