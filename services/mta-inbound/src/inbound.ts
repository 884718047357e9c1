import { bool, duration, list, port, srsShape, z } from "@mailstack/config";
import type { Bus } from "@mailstack/bus";
import { DirectoryCache, resolveRecipient, type Pool, type Resolution } from "@mailstack/db";
import { reply, srsReverse, isSrsAddress, type SrsSettings } from "@mailstack/mail";
import { startSweeper } from "@mailstack/queue";
import { SmtpError, createIntakeServer, defaultLimits, intakeShape, withoutOurResults, type IntakeLimits, type IntakeServer } from "@mailstack/smtp-intake";
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
  /** SRS_DOMAIN, SRS_SECRETS, SRS_MAX_AGE: mail to an SRS address of ours goes back to its sender (off by default). */
  ...srsShape,
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
  /** Sender Rewriting Scheme (docs/srs.md): RCPT TO an SRS address in its domain is routed back; null or absent: off. */
  srs?: SrsSettings | null;
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

const invalidSrs = reply(550, "5.1.1", "Invalid or expired SRS address");

/**
 * RCPT routing with SRS on: an SRS0/SRS1 address in the SRS domain whose hash checks out with
 * one of the secrets (and, for SRS0, whose stamp is at most maxAgeDays old) is routed to the
 * address it stands for, wherever that is, for any sender, <> or not; the hash is what stops
 * anyone from making one up (docs/srs.md). Every other address is routed as without SRS.
 */
export function srsRouting(pool: Pool, directory: DirectoryCache, srs: SrsSettings, logger: Logger): (address: string) => Promise<Resolution> {
  const lookup = (key: string) => directory.lookup(key);
  return async (address) => {
    if (!isSrsAddress(srs, address)) return resolveRecipient(pool, address, { allowRemote: false, lookup });
    const reversed = srsReverse(srs, address, new Date());
    if (!reversed.ok) {
      logger.info({ rcpt: address, problem: reversed.problem }, "SRS address refused");
      throw new SmtpError(invalidSrs);
    }
    return resolveRecipient(pool, reversed.address, { allowRemote: true, lookup });
  };
}

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
  // Only with SRS on does the intake get a routing hook (and then this directory to answer it).
  const srs = config.srs ?? null;
  const directory = srs ? new DirectoryCache(pool) : null;
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
    ...(srs && directory ? { directory, resolveRecipient: srsRouting(pool, directory, srs, logger) } : {}),
    // Without the checks no result is ours, so none that claims to be may pass (RFC 8601 5).
    transformMessage: authCheck ?? (async (message) => ({ raw: withoutOurResults(message.raw, config.MAIL_HOSTNAME) })),
  });
  await directory?.start();
  const port = await intake.listen();
  const sweeper = startSweeper(bus, pool, logger, config.INBOUND_SWEEP_INTERVAL, { undispatchedAfterMs: config.INBOUND_SWEEP_UNDISPATCHED_AFTER });
  logger.info({ port, srsDomain: srs?.domain ?? null }, "inbound SMTP listening");
  return {
    port,
    intake,
    async stop() {
      await intake.stop();
      await sweeper.stop();
      await directory?.stop();
    },
  };
}
