import { bool, duration, integer, list, size, z } from "@mailstack/config";
import { normalizeAddress } from "@mailstack/mail";
import type { IntakeLimits } from "./server.ts";

/**
 * Environment variables for the SMTP bounds, shared by mta-inbound and msa. A service
 * spreads this into its runService shape and passes limitsFromConfig(config) on.
 */
export const intakeShape = {
  /** Largest message accepted (advertised in EHLO SIZE and enforced on the bytes received). */
  SMTP_MAX_MESSAGE_SIZE: size("50M"),
  /** Distinct recipients per message (one named again counts once); the next one gets 452 4.5.3. */
  SMTP_MAX_RECIPIENTS: integer(100, 1),
  /** Final recipients per message after alias expansion. */
  SMTP_MAX_FINAL_RECIPIENTS: integer(1000, 1),
  /** Longest command line in octets, CRLF included (RFC 5321 4.5.3.1.4 says 512; 1000 leaves room for extensions). */
  SMTP_MAX_LINE_LENGTH: integer(1000, 64),
  /**
   * Commands per session before 421: a bound against sessions that never end, high enough for
   * MTAs that reuse one connection for thousands of messages (4 commands each).
   */
  SMTP_MAX_COMMANDS: integer(20_000, 10),
  /** Idle time allowed while the server waits for the client. */
  SMTP_IDLE_TIMEOUT: duration("5m"),
  /** Absolute deadline for the whole DATA phase (from 354 to the final dot). */
  SMTP_DATA_TIMEOUT: duration("10m"),
  /** Concurrent sessions overall, and per client IP address. */
  SMTP_MAX_CLIENTS: integer(1000, 1),
  SMTP_MAX_CLIENTS_PER_IP: integer(50, 1),
  /** Early-talker window before the greeting; a client that talks first gets 421. 0 turns it off. */
  SMTP_GREETING_DELAY: duration("0ms"),
  /** Resolve the client's IP address to a name (PTR) for the Received: header. */
  SMTP_REVERSE_DNS: bool(false),
  /** What to do with bare CR or LF in a message: reject (550 5.6.11) or normalize to CRLF. */
  SMTP_BARE_LINE_ENDINGS: z.enum(["reject", "normalize"]).default("reject"),
  /** Group commit: accepts waiting while this many accept transactions are in flight join the next one. */
  SMTP_ACCEPT_CONCURRENCY: integer(1, 1),
  SMTP_ACCEPT_BATCH_MAX: integer(64, 1),
  /** Message bytes all sessions together may hold in memory; past it a message is answered 452 4.3.1. */
  SMTP_MAX_BUFFERED: size("512M"),
  /** Banner text after the host name in the greeting. */
  SMTP_BANNER: z.string().default(""),
  /**
   * Where mail to postmaster goes (RFC 5321 4.5.1 requires accepting it): the bare `<postmaster>`
   * and postmaster at any served domain without such an account or alias. Empty: postmaster@MAIL_HOSTNAME,
   * which then has to be an address served here.
   */
  SMTP_POSTMASTER: z
    .string()
    .default("")
    .refine((value) => value === "" || normalizeAddress(value) !== null, "must be an email address"),
  /** Hosts whose connections skip the per-IP limit (for example a local load balancer). */
  SMTP_PER_IP_EXEMPT: list(""),
};

export type IntakeConfig = z.infer<z.ZodObject<typeof intakeShape>>;

export function limitsFromConfig(config: IntakeConfig): IntakeLimits {
  return {
    maxMessageSize: config.SMTP_MAX_MESSAGE_SIZE,
    maxRecipients: config.SMTP_MAX_RECIPIENTS,
    maxFinalRecipients: config.SMTP_MAX_FINAL_RECIPIENTS,
    maxLineLength: config.SMTP_MAX_LINE_LENGTH,
    maxCommands: config.SMTP_MAX_COMMANDS,
    idleTimeoutMs: config.SMTP_IDLE_TIMEOUT,
    dataTimeoutMs: config.SMTP_DATA_TIMEOUT,
    maxClients: config.SMTP_MAX_CLIENTS,
    maxClientsPerIp: config.SMTP_MAX_CLIENTS_PER_IP,
    perIpExempt: config.SMTP_PER_IP_EXEMPT,
    greetingDelayMs: config.SMTP_GREETING_DELAY,
    reverseDns: config.SMTP_REVERSE_DNS,
    bareLineEndings: config.SMTP_BARE_LINE_ENDINGS,
    acceptConcurrency: config.SMTP_ACCEPT_CONCURRENCY,
    acceptBatchMax: config.SMTP_ACCEPT_BATCH_MAX,
    maxBufferedBytes: config.SMTP_MAX_BUFFERED,
  };
}
