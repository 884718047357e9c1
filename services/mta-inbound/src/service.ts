import { readFile } from "node:fs/promises";
import { z } from "@mailstack/config";
import { runService } from "@mailstack/runtime";
import { limitsFromConfig } from "@mailstack/smtp-intake";
import { inboundShape, startInbound } from "./inbound.ts";

export async function main(): Promise<void> {
  await runService({
    name: "mta-inbound",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9025,
    shape: {
      ...inboundShape,
      /** PEM certificate and key for STARTTLS. */
      TLS_CERT_FILE: z.string().optional(),
      TLS_KEY_FILE: z.string().optional(),
    },
    async start({ config, pool, bus, logger }) {
      let tls: { key: string; cert: string } | undefined;
      if (config.TLS_CERT_FILE && config.TLS_KEY_FILE) {
        tls = { cert: await readFile(config.TLS_CERT_FILE, "utf8"), key: await readFile(config.TLS_KEY_FILE, "utf8") };
      }
      const inbound = await startInbound({
        pool,
        bus,
        logger,
        config: {
          MAIL_HOSTNAME: config.MAIL_HOSTNAME,
          SMTP_PORT: config.SMTP_PORT,
          SMTP_HOST: config.SMTP_HOST,
          SMTP_BANNER: config.SMTP_BANNER,
          DNS_SERVERS: config.DNS_SERVERS,
          INBOUND_AUTH_CHECKS: config.INBOUND_AUTH_CHECKS,
          INBOUND_AUTH_TIMEOUT: config.INBOUND_AUTH_TIMEOUT,
          INBOUND_SWEEP_INTERVAL: config.INBOUND_SWEEP_INTERVAL,
          INBOUND_SWEEP_UNDISPATCHED_AFTER: config.INBOUND_SWEEP_UNDISPATCHED_AFTER,
          limits: limitsFromConfig(config),
          ...(tls ? { tls } : {}),
        },
      });
      return { stop: () => inbound.stop() };
    },
  });
}
