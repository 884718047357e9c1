import { bool, duration, list, port, z } from "@mailstack/config";
import type { Bus } from "@mailstack/bus";
import type { Pool } from "@mailstack/db";
import { startSweeper } from "@mailstack/queue";
import { createIntakeServer, defaultLimits, intakeShape, type IntakeLimits, type IntakeServer } from "@mailstack/smtp-intake";
import type { Logger } from "@mailstack/telemetry";
import { createAuthCheck, createResolver } from "./auth.ts";

/** mta-inbound's settings, on top of the common ones and the SMTP bounds (SMTP_*). */
export const inboundShape = {
  ...intakeShape,
  SMTP_PORT: port(25),
  /** Listen address; empty: every address of the host, IPv6 and IPv4 (an MX with an AAAA record must answer on both). */
  SMTP_HOST: z.string().default(""),
  /** DNS servers for SPF/DKIM/DMARC lookups ("ip" or "ip:port", comma-separated); the system's when empty. */
  DNS_SERVERS: list(""),
  /** How long DNS answers for SPF/DKIM/DMARC are reused in-process (0: no cache). */
  DNS_CACHE_TTL: duration("60s"),
  /** SPF, DKIM and DMARC checks with an Authentication-Results: header. */
  INBOUND_AUTH_CHECKS: bool(true),
  INBOUND_AUTH_TIMEOUT: duration("15s"),
  /** The sweeper republishing deliveries committed but never dispatched. */
  INBOUND_SWEEP_INTERVAL: duration("10s"),
  INBOUND_SWEEP_UNDISPATCHED_AFTER: duration("15s"),
};

export interface InboundConfig {
  MAIL_HOSTNAME: string;
  SMTP_PORT: number;
  SMTP_HOST: string;
  SMTP_BANNER?: string;
  /** Where mail to postmaster goes; postmaster@MAIL_HOSTNAME when empty. */
  SMTP_POSTMASTER?: string;
  DNS_SERVERS: string[];
  DNS_CACHE_TTL: number;
  INBOUND_AUTH_CHECKS: boolean;
  INBOUND_AUTH_TIMEOUT: number;
  INBOUND_SWEEP_INTERVAL: number;
  INBOUND_SWEEP_UNDISPATCHED_AFTER: number;
  limits: Partial<IntakeLimits>;
  tls?: { key: string | Buffer; cert: string | Buffer };
}

export const defaultInboundConfig: InboundConfig = {
  MAIL_HOSTNAME: "localhost",
  SMTP_PORT: 25,
  SMTP_HOST: "",
  DNS_SERVERS: [],
  DNS_CACHE_TTL: 60_000,
  INBOUND_AUTH_CHECKS: true,
  INBOUND_AUTH_TIMEOUT: 15_000,
  INBOUND_SWEEP_INTERVAL: 10_000,
  INBOUND_SWEEP_UNDISPATCHED_AFTER: 15_000,
  limits: defaultLimits,
};

export interface Inbound {
  port: number;
  intake: IntakeServer;
  stop(): Promise<void>;
}

/**
 * Starts the inbound MTA: SMTP on SMTP_PORT for the domains we serve (no relay, no AUTH),
 * SPF/DKIM/DMARC checks, and the sweeper for deliveries committed but never dispatched.
 */
export async function startInbound(options: { pool: Pool; bus: Bus; logger: Logger; config?: Partial<InboundConfig> }): Promise<Inbound> {
  const config = { ...defaultInboundConfig, ...options.config };
  const { pool, bus, logger } = options;
  const authCheck = config.INBOUND_AUTH_CHECKS
    ? createAuthCheck({ pool, logger, hostname: config.MAIL_HOSTNAME, resolver: createResolver(config.DNS_SERVERS, { cacheTtlMs: config.DNS_CACHE_TTL }), timeoutMs: config.INBOUND_AUTH_TIMEOUT, spfVerdictTtlMs: config.DNS_CACHE_TTL })
    : undefined;
  const intake = createIntakeServer({
    service: "mta-inbound",
    source: "inbound",
    pool,
    bus,
    logger,
    hostname: config.MAIL_HOSTNAME,
    ...(config.SMTP_BANNER ? { banner: config.SMTP_BANNER } : {}),
    ...(config.SMTP_POSTMASTER ? { postmaster: config.SMTP_POSTMASTER } : {}),
    port: config.SMTP_PORT,
    host: config.SMTP_HOST,
    tlsMode: "starttls",
    ...(config.tls ? { tls: config.tls } : {}),
    limits: config.limits,
    allowRemote: false,
    ...(authCheck ? { transformMessage: authCheck } : {}),
  });
  const port = await intake.listen();
  const sweeper = startSweeper(bus, pool, logger, config.INBOUND_SWEEP_INTERVAL, { undispatchedAfterMs: config.INBOUND_SWEEP_UNDISPATCHED_AFTER });
  logger.info({ port }, "inbound SMTP listening");
  return {
    port,
    intake,
    async stop() {
      await intake.stop();
      await sweeper.stop();
    },
  };
}
