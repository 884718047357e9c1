import { runService, startTlsSource, tlsShape, tlsSourceOptions } from "@mailstack/runtime";
import { srsFromConfig } from "@mailstack/mail";
import { limitsFromConfig } from "@mailstack/smtp-intake";
import { inboundShape, startInbound } from "./inbound.ts";

export async function main(): Promise<void> {
  await runService({
    name: "mta-inbound",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9025,
    shape: { ...inboundShape, ...tlsShape },
    async start({ config, pool, bus, logger }) {
      // STARTTLS certificate: TLS_CERT_FILE/TLS_KEY_FILE, else a cached self-signed pair.
      const tlsSource = await startTlsSource(tlsSourceOptions(config, logger));
      const tls = tlsSource.current();
      logger.info({ source: tls.source, selfSigned: tls.selfSigned, validTo: tls.validTo }, "TLS certificate loaded");
      const inbound = await startInbound({
        pool,
        bus,
        logger,
        config: {
          MAIL_HOSTNAME: config.MAIL_HOSTNAME,
          SMTP_PORT: config.SMTP_PORT,
          SMTP_HOST: config.SMTP_HOST,
          SMTP_BANNER: config.SMTP_BANNER,
          SMTP_POSTMASTER: config.SMTP_POSTMASTER,
          DNS_SERVERS: config.DNS_SERVERS,
          DNS_CACHE_TTL: config.DNS_CACHE_TTL,
          INBOUND_AUTH_CHECKS: config.INBOUND_AUTH_CHECKS,
          INBOUND_AUTH_TIMEOUT: config.INBOUND_AUTH_TIMEOUT,
          INBOUND_SWEEP_INTERVAL: config.INBOUND_SWEEP_INTERVAL,
          INBOUND_SWEEP_UNDISPATCHED_AFTER: config.INBOUND_SWEEP_UNDISPATCHED_AFTER,
          limits: limitsFromConfig(config),
          tls: { key: tls.key, cert: tls.cert },
          srs: srsFromConfig(config),
        },
      });
      tlsSource.onChange((next) => inbound.intake.updateTls({ key: next.key, cert: next.cert }));
      return {
        async stop() {
          tlsSource.stop();
          await inbound.stop();
        },
      };
    },
  });
}
