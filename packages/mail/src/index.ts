export * from "./address.ts";
export * from "./reply.ts";
export * from "./password.ts";
export * from "./message.ts";
export * from "./utf8-addr.ts";
export * from "./srs.ts";
export * from "./mailbox-list.ts";
