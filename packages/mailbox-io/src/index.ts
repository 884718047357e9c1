export * from "./mbox.ts";
export * from "./tar.ts";
export * from "./store.ts";
export * from "./layout.ts";
