export * from "./keys.ts";
export * from "./store.ts";
export * from "./sign.ts";
export * from "./sign-pool.ts";
