import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";

export { Counter, Gauge, Histogram, Registry };

/** One registry per process, with the process defaults; services add their own metrics to it. */
export const registry = new Registry();
collectDefaultMetrics({ register: registry });

export const mailMetrics = {
  smtpReplies: new Counter({
    name: "mail_smtp_transactions_total",
    help: "SMTP transactions answered after DATA (or refused earlier), by service and reply class",
    labelNames: ["service", "class"] as const,
    registers: [registry],
  }),
  messagesAccepted: new Counter({
    name: "mail_messages_accepted_total",
    help: "Messages accepted and committed, by service",
    labelNames: ["service"] as const,
    registers: [registry],
  }),
  acceptBatchSize: new Histogram({
    name: "mail_accept_batch_size",
    help: "Messages committed per accept transaction (group commit), by service",
    labelNames: ["service"] as const,
    buckets: [1, 2, 4, 8, 16, 32, 64],
    registers: [registry],
  }),
  deliveriesFinal: new Counter({
    name: "mail_deliveries_total",
    help: "Deliveries that reached a final state, by kind (local/remote) and state",
    labelNames: ["kind", "state"] as const,
    registers: [registry],
  }),
};
