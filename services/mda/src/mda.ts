import { bool, duration, integer, list, port, size, z } from "@mailstack/config";
import { Consumers, PermanentError, Streams, Subjects, consume, type Bus, type Consumer } from "@mailstack/bus";
import type { Pool } from "@mailstack/db";
import { startSweeper, type LocalJob } from "@mailstack/queue";
import type { Logger } from "@mailstack/telemetry";
import { DeliveryBatcher } from "./batch.ts";
import type { DeliverContext } from "./deliver.ts";
import type { LmtpServer } from "./lmtp.ts";
import { networkList } from "./networks.ts";

/** The MDA's own settings (environment variables), on top of the common ones. */
export const mdaShape = {
  LMTP_ENABLED: bool(true),
  LMTP_PORT: port(24),
  /** Listen address; empty: every address of the host, IPv6 and IPv4. */
  LMTP_HOST: z.string().default(""),
  LMTP_MAX_SIZE: size("50M"),
  LMTP_MAX_CLIENTS: integer(200, 1),
  /** RCPTs accepted per transaction (a repeated one counts again: it gets a reply of its own); the next gets 452 4.5.3. */
  LMTP_MAX_RECIPIENTS: integer(1000, 1),
  LMTP_IDLE_TIMEOUT: duration("60s"),
  /** LMTP has no authentication: only these client networks may connect (loopback and private ranges by default). */
  LMTP_ALLOWED_NETWORKS: list("127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7").superRefine((entries, ctx) => {
    try {
      networkList(entries);
    } catch (error) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: (error as Error).message });
    }
  }),
  /** Bare CR or LF in an LMTP message: reject (550 5.6.11 per recipient) or normalize to CRLF. */
  LMTP_BARE_LINE_ENDINGS: z.enum(["reject", "normalize"]).default("reject"),
  /** A full mailbox answers LMTP clients 452 4.2.2 (they retry) instead of 552 5.2.2, as Dovecot's quota_full_tempfail. */
  LMTP_QUOTA_FULL_TEMPFAIL: bool(false),
  /** A message an LMTP client sends again (same Message-ID, sender and bytes) within this time is not filed twice; 0 turns it off. */
  LMTP_DUPLICATE_WINDOW: duration("5d"),
  /** Jobs handled at once by this process. */
  MDA_CONCURRENCY: integer(64, 1),
  /**
   * Most deliveries filed in one transaction, and batch transactions running at once. One at a
   * time gathers what arrives meanwhile into the next batch: fewer statements per delivery than
   * two smaller batches (bench/smtp-inbound: less MDA CPU per message in the first alternating
   * runs, no difference in throughput or p99 in later ones).
   */
  MDA_BATCH_MAX: integer(64, 1),
  MDA_BATCH_PARALLEL: integer(1, 1),
  /** How often queued local deliveries that were never dispatched are republished. */
  MDA_SWEEP_INTERVAL: duration("10s"),
  MDA_SWEEP_UNDISPATCHED_AFTER: duration("15s"),
  MDA_SWEEP_STUCK_AFTER: duration("10m"),
};

export interface MdaConfig {
  MAIL_HOSTNAME: string;
  LMTP_ENABLED: boolean;
  LMTP_PORT: number;
  LMTP_HOST: string;
  LMTP_MAX_SIZE: number;
  LMTP_MAX_CLIENTS: number;
  LMTP_MAX_RECIPIENTS: number;
  LMTP_IDLE_TIMEOUT: number;
  LMTP_ALLOWED_NETWORKS: string[];
  LMTP_BARE_LINE_ENDINGS: "reject" | "normalize";
  LMTP_QUOTA_FULL_TEMPFAIL: boolean;
  LMTP_DUPLICATE_WINDOW: number;
  MDA_CONCURRENCY: number;
  MDA_BATCH_MAX: number;
  MDA_BATCH_PARALLEL: number;
  MDA_SWEEP_INTERVAL: number;
  MDA_SWEEP_UNDISPATCHED_AFTER: number;
  MDA_SWEEP_STUCK_AFTER: number;
}

export const defaultMdaConfig: MdaConfig = {
  MAIL_HOSTNAME: "localhost",
  LMTP_ENABLED: true,
  LMTP_PORT: 24,
  LMTP_HOST: "",
  LMTP_MAX_SIZE: 50 * 1024 * 1024,
  LMTP_MAX_CLIENTS: 200,
  LMTP_MAX_RECIPIENTS: 1000,
  LMTP_IDLE_TIMEOUT: 60_000,
  LMTP_ALLOWED_NETWORKS: ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
  LMTP_BARE_LINE_ENDINGS: "reject",
  LMTP_QUOTA_FULL_TEMPFAIL: false,
  LMTP_DUPLICATE_WINDOW: 5 * 24 * 3600_000,
  MDA_CONCURRENCY: 64,
  MDA_BATCH_MAX: 64,
  MDA_BATCH_PARALLEL: 1,
  MDA_SWEEP_INTERVAL: 10_000,
  MDA_SWEEP_UNDISPATCHED_AFTER: 15_000,
  MDA_SWEEP_STUCK_AFTER: 600_000,
};

export interface Mda {
  /** The LMTP port actually listened on (useful with LMTP_PORT=0), or null when disabled. */
  lmtpPort: number | null;
  ready(): boolean;
  stop(): Promise<void>;
}

/**
 * Starts the MDA: the mail.deliver.local consumer (durable "mda"), the sweeper for local
 * deliveries left undispatched, and the LMTP listener.
 */
export async function startMda(options: { pool: Pool; bus: Bus; logger: Logger; config?: Partial<MdaConfig> }): Promise<Mda> {
  const config = { ...defaultMdaConfig, ...options.config };
  const ctx: DeliverContext = { pool: options.pool, bus: options.bus, logger: options.logger };
  const batcher = new DeliveryBatcher(ctx, { maxBatch: config.MDA_BATCH_MAX, maxParallel: config.MDA_BATCH_PARALLEL });

  const consumer: Consumer = consume<LocalJob>(options.bus, {
    stream: Streams.deliver,
    durable: Consumers.mda,
    subject: Subjects.deliverLocal,
    concurrency: config.MDA_CONCURRENCY,
    logger: options.logger,
    async handler({ data }) {
      if (!data || !Number.isSafeInteger(data.deliveryId)) throw new PermanentError("job without a deliveryId");
      await batcher.deliver(data.deliveryId);
    },
  });
  const sweeper = startSweeper(options.bus, options.pool, options.logger, config.MDA_SWEEP_INTERVAL, {
    kind: "local",
    undispatchedAfterMs: config.MDA_SWEEP_UNDISPATCHED_AFTER,
    stuckAfterMs: config.MDA_SWEEP_STUCK_AFTER,
  });
  let lmtp: LmtpServer | null = null;
  try {
    if (config.LMTP_ENABLED) {
      // Loaded only when enabled: smtp-server is a good part of the process's memory.
      const { startLmtp } = await import("./lmtp.ts");
      lmtp = await startLmtp(ctx, {
        port: config.LMTP_PORT,
        host: config.LMTP_HOST,
        maxSize: config.LMTP_MAX_SIZE,
        maxClients: config.LMTP_MAX_CLIENTS,
        maxRecipients: config.LMTP_MAX_RECIPIENTS,
        socketTimeout: config.LMTP_IDLE_TIMEOUT,
        hostname: config.MAIL_HOSTNAME,
        allowedNetworks: config.LMTP_ALLOWED_NETWORKS,
        bareLineEndings: config.LMTP_BARE_LINE_ENDINGS,
        quotaFullTempfail: config.LMTP_QUOTA_FULL_TEMPFAIL,
        duplicateWindow: config.LMTP_DUPLICATE_WINDOW,
      });
    }
  } catch (error) {
    await consumer.stop();
    await sweeper.stop();
    throw error;
  }
  let stopping = false;
  return {
    lmtpPort: lmtp?.port ?? null,
    ready: () => !stopping,
    async stop() {
      stopping = true;
      // Stop taking new work everywhere, then let what is in flight finish and ack.
      await Promise.all([lmtp?.stop(), consumer.stop(), sweeper.stop()]);
    },
  };
}
