export * from "./keys.ts";
export * from "./store.ts";
export * from "./sign.ts";
