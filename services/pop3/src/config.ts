import { bool, duration, integer, port, size, z, type CommonConfig } from "@mailstack/config";
import { tlsShape } from "@mailstack/runtime";

const TEN_MINUTES = 10 * 60_000;

export const pop3Shape = {
  ...tlsShape,
  /** Address both listeners bind to. */
  /** Listen address; empty: every address of the host, IPv6 and IPv4. */
  POP3_HOST: z.string().default(""),
  /** Cleartext POP3 with STLS (0: an ephemeral port, for tests). */
  POP3_PORT: port(110),
  /** Implicit TLS (RFC 8314). */
  POP3S_PORT: port(995),
  /** Plaintext USER/PASS and AUTH PLAIN before TLS: `never`, `loopback` (default) or `always`. */
  POP3_ALLOW_PLAINTEXT: z.enum(["never", "loopback", "always"]).default("loopback"),
  /** Idle time before the server closes a session; RFC 1939 requires at least 10 minutes. */
  POP3_AUTOLOGOUT: duration("10m").refine((ms) => ms >= TEN_MINUTES, "must be at least 10m (RFC 1939)"),
  /** Longest accepted command line, CRLF included. */
  POP3_MAX_LINE: integer(2048, 64),
  /** Open connections per process, those still in their TLS handshake on 995 included. */
  POP3_MAX_CONNECTIONS: integer(1000, 1),
  /** Open connections per client IP address (counted as POP3_MAX_CONNECTIONS). */
  POP3_MAX_CONNECTIONS_PER_IP: integer(50, 1),
  /** Authenticated sessions per process; each holds one PostgreSQL connection (the maildrop lock). */
  POP3_MAX_SESSIONS: integer(50, 1),
  /** Delay before answering a failed authentication. */
  POP3_FAILED_LOGIN_DELAY: duration("2s"),
  /** Failed authentications allowed per client IP and per account within POP3_FAILURE_WINDOW. */
  POP3_MAX_FAILURES_PER_IP: integer(20, 1),
  POP3_MAX_FAILURES_PER_ACCOUNT: integer(10, 1),
  POP3_FAILURE_WINDOW: duration("15m"),
  /** Bytes read from PostgreSQL per query when streaming RETR/TOP. */
  POP3_CHUNK_SIZE: size("256K"),
  /** Record successful logins per IP for the MSA's POP-before-SMTP (off by default). */
  POP_BEFORE_SMTP: bool(false),
  /**
   * V8's own heap growth (0) here, unlike the SMTP services: the pop3 heap stays small and its
   * garbage is mostly message buffers outside it, so a 50% cap only buys a full collection every
   * thousand or so RETRs (22 instead of 5-7 per 30,000 in bench/pop3, about 10% of its CPU).
   */
  HEAP_GROWING_PERCENT: integer(0, 0),
};

export type Pop3Config = CommonConfig & z.infer<z.ZodObject<typeof pop3Shape>>;
