export * from "./pool.ts";
export * from "./migrate.ts";
export * from "./ensure-database.ts";
export * from "./directory.ts";
export * from "./routing.ts";
export * from "./directory-cache.ts";
export * from "./filters.ts";
export * from "./login-failures.ts";
