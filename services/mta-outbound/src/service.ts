import { bool, duration, integer, list, parseDuration, port, srsShape, z } from "@mailstack/config";
import { Consumers, Streams, Subjects, consume, type Bus } from "@mailstack/bus";
import type { Pool } from "@mailstack/db";
import { startDsnGenerator } from "@mailstack/dsn";
import { srsFromConfig } from "@mailstack/mail";
import { registerQueueDepthMetric, startSweeper, type RelayJob } from "@mailstack/queue";
import { runService } from "@mailstack/runtime";
import type { Logger } from "@mailstack/telemetry";
import { parseHostPort, type SmartHost } from "./destination.ts";
import { createRelay, SERVICE, type RelayConfig } from "./relay.ts";
import { startScheduler } from "./scheduler.ts";
import type { TlsMode } from "./smtp-client.ts";

const tlsMode = (fallback: TlsMode) => z.enum(["opportunistic", "required", "none"]).default(fallback);

/** Every setting of the relay worker, from the environment. */
export const shape = {
  /** DNS servers (host[:port], comma-separated); empty: the system resolver. */
  DNS_SERVERS: list(""),
  DNS_TIMEOUT: duration("5s"),
  /** The SMTP port of remote MX hosts. */
  RELAY_DEST_PORT: port(25),
  /** Relay jobs handled at once by this worker. */
  RELAY_CONCURRENCY: integer(50, 1),
  RELAY_MAX_CONNECTIONS_PER_HOST: integer(10, 1),
  RELAY_MAX_PER_DESTINATION: integer(20, 1),
  RELAY_IDLE_CONNECTION: duration("5s"),
  RELAY_MAX_MESSAGES_PER_CONNECTION: integer(100, 1),
  /** Backoff after the 1st, 2nd... failed attempt; the last repeats. */
  RELAY_BACKOFF: list("1m,5m,15m,30m,1h").transform((items, ctx) => {
    const delays = items.map(parseDuration);
    if (delays.length === 0 || delays.some((ms) => ms === null)) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: "expected durations such as 1m,5m,15m,30m,1h" });
      return z.NEVER;
    }
    return delays as number[];
  }),
  RELAY_MAX_QUEUE_LIFETIME: duration("5d"),
  /** Delay notice (DSN action delayed) after this long deferred; 0 disables. */
  RELAY_DELAY_NOTICE_AFTER: duration("4h"),
  /** Send delay notices when the sender gave no NOTIFY (NOTIFY=DELAY always gets one). */
  RELAY_DELAY_NOTICE_BY_DEFAULT: bool(true),
  RELAY_LEASE: duration("30m"),
  RELAY_SCHEDULER_INTERVAL: duration("5s"),
  RELAY_DSN_INTERVAL: duration("2s"),
  /** Without RET, bounces return the whole message up to this size. */
  RELAY_DSN_FULL_LIMIT: integer(262_144, 0),
  /** Domains whose MX hosts must offer STARTTLS (deferred otherwise). */
  RELAY_REQUIRE_TLS_DOMAINS: list(""),
  /** A smart host (host[:port]) for all mail, replacing MX lookup. */
  RELAY_SMARTHOST: z.string().default(""),
  /** Per-domain smart hosts: domain=host[:port],... */
  RELAY_SMARTHOST_DOMAINS: list(""),
  RELAY_SMARTHOST_USER: z.string().default(""),
  RELAY_SMARTHOST_PASSWORD: z.string().default(""),
  RELAY_SMARTHOST_TLS: tlsMode("opportunistic"),
  RELAY_SMARTHOST_TLS_VERIFY: bool(true),
  RELAY_CONNECT_TIMEOUT: duration("30s"),
  RELAY_GREETING_TIMEOUT: duration("5m"),
  RELAY_COMMAND_TIMEOUT: duration("5m"),
  RELAY_DATA_INIT_TIMEOUT: duration("2m"),
  RELAY_DATA_BLOCK_TIMEOUT: duration("3m"),
  RELAY_DATA_END_TIMEOUT: duration("10m"),
  /** The sweeper republishes remote deliveries never dispatched (accepting process died). */
  RELAY_SWEEP_INTERVAL: duration("10s"),
  /** SRS_DOMAIN, SRS_SECRETS, SRS_MAX_AGE: the sender of forwarded mail in its SRS form (off by default). */
  ...srsShape,
};

export type OutboundConfig = z.infer<z.ZodObject<typeof shape>> & { MAIL_HOSTNAME: string };

/** The relay's settings from the validated environment. */
export function relayConfig(config: OutboundConfig): RelayConfig {
  const auth = config.RELAY_SMARTHOST_USER ? { user: config.RELAY_SMARTHOST_USER, pass: config.RELAY_SMARTHOST_PASSWORD } : null;
  // Credentials never go out in clear: a smart host with AUTH requires TLS.
  const smartTls: TlsMode = auth ? "required" : config.RELAY_SMARTHOST_TLS;
  const smart = (text: string): SmartHost => {
    const { host, port: p } = parseHostPort(text, config.RELAY_DEST_PORT);
    return { host, port: p, tls: smartTls, tlsVerify: config.RELAY_SMARTHOST_TLS_VERIFY, auth };
  };
  const domainSmartHosts = new Map<string, SmartHost>();
  for (const item of config.RELAY_SMARTHOST_DOMAINS) {
    const [domain, target] = item.split("=");
    if (domain && target) domainSmartHosts.set(domain.trim().toLowerCase(), smart(target.trim()));
  }
  return {
    hostname: config.MAIL_HOSTNAME,
    destination: {
      dnsServers: config.DNS_SERVERS,
      dnsTimeoutMs: config.DNS_TIMEOUT,
      destPort: config.RELAY_DEST_PORT,
      requireTlsDomains: config.RELAY_REQUIRE_TLS_DOMAINS.map((d) => d.toLowerCase()),
      smartHost: config.RELAY_SMARTHOST ? smart(config.RELAY_SMARTHOST) : null,
      domainSmartHosts,
    },
    timeouts: {
      connect: config.RELAY_CONNECT_TIMEOUT,
      greeting: config.RELAY_GREETING_TIMEOUT,
      command: config.RELAY_COMMAND_TIMEOUT,
      dataInit: config.RELAY_DATA_INIT_TIMEOUT,
      dataBlock: config.RELAY_DATA_BLOCK_TIMEOUT,
      dataEnd: config.RELAY_DATA_END_TIMEOUT,
    },
    leaseMs: config.RELAY_LEASE,
    backoffMs: config.RELAY_BACKOFF,
    maxQueueLifetimeMs: config.RELAY_MAX_QUEUE_LIFETIME,
    delayNoticeAfterMs: config.RELAY_DELAY_NOTICE_AFTER,
    maxConnectionsPerHost: config.RELAY_MAX_CONNECTIONS_PER_HOST,
    maxPerDestination: config.RELAY_MAX_PER_DESTINATION,
    idleConnectionMs: config.RELAY_IDLE_CONNECTION,
    maxMessagesPerConnection: config.RELAY_MAX_MESSAGES_PER_CONNECTION,
    srs: srsFromConfig(config),
  };
}

export interface OutboundService {
  stop(): Promise<void>;
  workerId: string;
}

/**
 * Starts a relay worker: the consumer of mail.relay.outbound, the retry scheduler, the
 * sweeper for undispatched remote deliveries and the bounce (DSN) generator.
 * stop() stops pulling jobs, lets in-flight attempts finish and record, then resolves.
 */
export function startOutbound(deps: { pool: Pool; bus: Bus; logger: Logger; config: OutboundConfig }): OutboundService {
  const { pool, bus, logger, config } = deps;
  const relay = createRelay({ pool, logger, config: relayConfig(config) });
  const consumer = consume<RelayJob>(bus, {
    stream: Streams.relay,
    durable: Consumers.relay,
    subject: Subjects.relayOutbound,
    concurrency: config.RELAY_CONCURRENCY,
    logger,
    handler: ({ data }) => relay.handle(data),
  });
  const scheduler = startScheduler(bus, pool, logger, config.RELAY_SCHEDULER_INTERVAL);
  const sweeper = startSweeper(bus, pool, logger, config.RELAY_SWEEP_INTERVAL, { kind: "remote" });
  const generator = startDsnGenerator(bus, pool, {
    reportingMta: config.MAIL_HOSTNAME,
    service: SERVICE,
    delayByDefault: config.RELAY_DELAY_NOTICE_BY_DEFAULT,
    maxQueueLifetimeMs: config.RELAY_MAX_QUEUE_LIFETIME,
    fullReturnLimit: config.RELAY_DSN_FULL_LIMIT,
    intervalMs: config.RELAY_DSN_INTERVAL,
    logger,
  });
  return {
    workerId: relay.workerId,
    async stop() {
      await consumer.stop();
      await Promise.all([scheduler.stop(), sweeper.stop(), generator.stop()]);
      await relay.close();
    },
  };
}

export async function main(): Promise<void> {
  await runService({
    name: SERVICE,
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9026,
    shape,
    async start({ pool, bus, logger, config }) {
      // mail_queue_depth: what operators scale relay workers on.
      registerQueueDepthMetric(pool);
      return startOutbound({ pool, bus, logger, config });
    },
  });
}
