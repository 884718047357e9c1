import { Counter, Gauge, registry } from "@mailstack/telemetry";

export const pop3Metrics = {
  connections: new Counter({ name: "pop3_connections_total", help: "POP3 connections accepted, by listener", labelNames: ["listener"] as const, registers: [registry] }),
  open: new Gauge({ name: "pop3_connections_open", help: "POP3 connections open", registers: [registry] }),
  refused: new Counter({ name: "pop3_connections_refused_total", help: "POP3 connections refused (limit or shutdown)", registers: [registry] }),
  logins: new Counter({ name: "pop3_logins_total", help: "POP3 authentication attempts, by result (ok, failed, throttled, in_use)", labelNames: ["result"] as const, registers: [registry] }),
  retrieved: new Counter({ name: "pop3_retrieved_messages_total", help: "Messages sent in full by RETR", registers: [registry] }),
  retrievedBytes: new Counter({ name: "pop3_retrieved_bytes_total", help: "Octets of messages sent by RETR (before byte-stuffing)", registers: [registry] }),
  deleted: new Counter({ name: "pop3_deleted_messages_total", help: "Messages deleted at QUIT", registers: [registry] }),
};
