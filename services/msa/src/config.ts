import { bool, duration, integer, port, z } from "@mailstack/config";
import { tlsShape } from "@mailstack/runtime";
import { intakeShape, limitsFromConfig } from "@mailstack/smtp-intake";
import type { MsaSettings } from "./server.ts";

/** The msa's environment variables (besides commonShape): ports, TLS, SMTP bounds, login and sending limits. */
export const msaShape = {
  ...intakeShape,
  ...tlsShape,
  /** Port 587: plain, STARTTLS offered, AUTH after TLS (RFC 6409). */
  SUBMISSION_PORT: port(587),
  /** Port 465: TLS from the first byte (RFC 8314). */
  SUBMISSIONS_PORT: port(465),
  /** Address both listeners bind to. */
  /** Listen address; empty: every address of the host, IPv6 and IPv4. */
  SUBMISSION_LISTEN: z.string().default(""),
  /** Offer and accept AUTH on 587 before STARTTLS (passwords in clear: for trusted networks only). */
  SUBMISSION_AUTH_BEFORE_TLS: bool(false),
  /** A failed login is answered after this delay times the failures so far on the connection. */
  AUTH_FAILURE_DELAY: duration("1s"),
  /** Failed logins on one connection before it is closed with 421 4.7.0. */
  AUTH_MAX_FAILURES_PER_CONNECTION: integer(3, 1),
  /** Failed logins per client IP, and per account, within AUTH_FAILURE_WINDOW before logins are refused (454 4.7.0). */
  AUTH_MAX_FAILURES_PER_IP: integer(20, 1),
  AUTH_MAX_FAILURES_PER_ACCOUNT: integer(10, 1),
  AUTH_FAILURE_WINDOW: duration("15m"),
  /** Successful logins remembered in memory (keyed hash, dropped when the password changes); 0 turns it off. */
  AUTH_CACHE_TTL: duration("5m"),
  /** Messages and recipients per account within SUBMISSION_RATE_WINDOW (451 4.7.1 beyond); 0 is unlimited. */
  SUBMISSION_MAX_MESSAGES: integer(1000, 0),
  SUBMISSION_MAX_RECIPIENTS: integer(5000, 0),
  SUBMISSION_RATE_WINDOW: duration("1h"),
  /** POP-before-SMTP: a POP3 login lets its IP address submit without AUTH for POP_BEFORE_SMTP_WINDOW. */
  POP_BEFORE_SMTP: bool(false),
  POP_BEFORE_SMTP_WINDOW: duration("10m"),
  /** How long a domain's DKIM key is cached; a key made with `mailctl domain dkim` is used after at most this long. */
  DKIM_KEY_CACHE: duration("30s"),
  /** Worker threads that compute DKIM signatures off the SMTP event loop; 0 signs inline. */
  DKIM_SIGN_THREADS: integer(1, 0),
  /** The sweeper republishing deliveries committed but never dispatched (safe in every replica). */
  SUBMISSION_SWEEP_INTERVAL: duration("10s"),
  SUBMISSION_SWEEP_UNDISPATCHED_AFTER: duration("15s"),
};

export type MsaConfig = z.infer<z.ZodObject<typeof msaShape>> & { MAIL_HOSTNAME: string };

export function settingsFromConfig(config: MsaConfig): MsaSettings {
  return {
    hostname: config.MAIL_HOSTNAME,
    listen: config.SUBMISSION_LISTEN,
    submissionPort: config.SUBMISSION_PORT,
    submissionsPort: config.SUBMISSIONS_PORT,
    authBeforeTls: config.SUBMISSION_AUTH_BEFORE_TLS,
    banner: config.SMTP_BANNER,
    postmaster: config.SMTP_POSTMASTER,
    intake: limitsFromConfig(config),
    auth: {
      failureDelayMs: config.AUTH_FAILURE_DELAY,
      maxFailuresPerConnection: config.AUTH_MAX_FAILURES_PER_CONNECTION,
      maxFailuresPerIp: config.AUTH_MAX_FAILURES_PER_IP,
      maxFailuresPerAccount: config.AUTH_MAX_FAILURES_PER_ACCOUNT,
      windowMs: config.AUTH_FAILURE_WINDOW,
      cacheTtlMs: config.AUTH_CACHE_TTL,
    },
    submission: {
      maxMessages: config.SUBMISSION_MAX_MESSAGES,
      maxRecipients: config.SUBMISSION_MAX_RECIPIENTS,
      windowMs: config.SUBMISSION_RATE_WINDOW,
    },
    popBeforeSmtp: { enabled: config.POP_BEFORE_SMTP, windowMs: config.POP_BEFORE_SMTP_WINDOW },
    dkimKeyCacheMs: config.DKIM_KEY_CACHE,
    dkimSignThreads: config.DKIM_SIGN_THREADS,
    sweep: { intervalMs: config.SUBMISSION_SWEEP_INTERVAL, undispatchedAfterMs: config.SUBMISSION_SWEEP_UNDISPATCHED_AFTER },
  };
}
