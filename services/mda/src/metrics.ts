import { Counter, Histogram, registry } from "@mailstack/telemetry";

export const mdaMetrics = {
  outcomes: new Counter({
    name: "mail_mda_outcomes_total",
    help: "Local deliveries handled by the MDA, by outcome (delivered, discarded, forwarded, bounced, duplicate, missing)",
    labelNames: ["outcome"] as const,
    registers: [registry],
  }),
  handleSeconds: new Histogram({
    name: "mail_mda_delivery_duration_seconds",
    help: "Time to handle one local delivery (parse when needed, rules, filing transaction)",
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [registry],
  }),
  batchSize: new Histogram({
    name: "mail_mda_batch_size",
    help: "Deliveries filed per batch transaction",
    buckets: [1, 2, 4, 8, 16, 32, 64, 128],
    registers: [registry],
  }),
  acceptToMailbox: new Histogram({
    name: "mail_mda_accept_to_mailbox_seconds",
    help: "From the message's commit at accept time to its copy being filed in a mailbox",
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120],
    registers: [registry],
  }),
};
