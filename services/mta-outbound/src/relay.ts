import { randomBytes } from "node:crypto";
import type { Pool } from "@mailstack/db";
import type { SrsSettings } from "@mailstack/mail";
import { stillPending, type JourneyEvent, type RelayJob } from "@mailstack/queue";
import { Counter, Histogram, SpanKind, SpanStatusCode, logText, mailMetrics, registry, withSpan, type Logger } from "@mailstack/telemetry";
import { ConnectionPool, KeyedLimiter } from "./connection-pool.ts";
import { DestinationError, DestinationResolver, type Destination, type DestinationConfig } from "./destination.ts";
import { hasEightBit } from "./dot-stuff.ts";
import { hasUtf8HeaderFields, sevenBitReport } from "./mime-utf8.ts";
import { SerialBatches } from "./serial-batches.ts";
import { createSenderRewriter } from "./srs-sender.ts";
import {
  SmtpConnection,
  SmtpError,
  formatRemoteReply,
  isAscii,
  type Envelope,
  type EnvelopeRecipient,
  type MessageContent,
  type Timeouts,
  type TransactionResult,
} from "./smtp-client.ts";

export const SERVICE = "mta-outbound";

const relayMetrics = {
  results: new Counter({
    name: "mail_relay_recipient_results_total",
    help: "Recipient results of relay attempts, by outcome (delivered, deferred, bounced)",
    labelNames: ["outcome"] as const,
    registers: [registry],
  }),
  attemptSeconds: new Histogram({
    name: "mail_relay_attempt_seconds",
    help: "Duration of one relay job: claim, DNS, SMTP transaction and recording",
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
    registers: [registry],
  }),
  // RFC 1047's window: a worker killed between a remote 250 and this commit leaves the delivery
  // pending, and it is sent again after its lease runs out (the one permitted duplicate).
  unrecordedSeconds: new Histogram({
    name: "mail_relay_unrecorded_seconds",
    help: "Time from a remote server's acceptance to the commit of the delivered result: the window in which a killed worker causes a duplicate",
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
    registers: [registry],
  }),
};

export interface RelayConfig {
  /** Our name in EHLO and Reporting-MTA. */
  hostname: string;
  destination: DestinationConfig;
  timeouts: Timeouts;
  /** How long a worker owns the deliveries of a job it is sending (longer than one attempt can take). */
  leaseMs: number;
  /** Delay before attempt n+1 after n failures; the last entry repeats. */
  backoffMs: number[];
  /** A delivery still failing this long after it was accepted bounces. */
  maxQueueLifetimeMs: number;
  /** A delay notice is due when a delivery is still deferred this long after it was accepted; 0 disables. */
  delayNoticeAfterMs: number;
  maxConnectionsPerHost: number;
  maxPerDestination: number;
  idleConnectionMs: number;
  maxMessagesPerConnection: number;
  /** Sender Rewriting Scheme for forwarded mail (srs-sender.ts); null or absent: off. */
  srs?: SrsSettings | null;
}

interface ClaimedRow {
  id: number;
  recipient: string;
  final_recipient: string;
  dsn_notify: string[] | null;
  dsn_orcpt: string | null;
  attempts: number;
  created_at: Date;
  delay_notified_at: Date | null;
}

interface MessageRow {
  queue_id: string;
  envelope_from: string;
  /** 'bounce': a DSN this system composed (see attempt: it may be re-encoded for the next hop). */
  source: string;
  raw: Buffer;
  dsn_envid: string | null;
  dsn_ret: "FULL" | "HDRS" | null;
  received_at: Date;
}

/** What one attempt decided for one delivery. */
export interface Outcome {
  state: "delivered" | "deferred" | "bounced";
  reply: string;
  status: string;
  remoteMta: string | null;
  /** For the log: the host, address and port answering, as Postfix writes relay= ("host[address]:port"). */
  relay?: string;
  /** The remote offered DSN, so it carries NOTIFY=SUCCESS duty on. */
  remoteDsn?: boolean;
}

export interface Relay {
  handle(job: RelayJob): Promise<void>;
  close(): Promise<void>;
  /** Worker id written as lease owner. */
  readonly workerId: string;
}

/** The enhanced status of a recipient's outcome: the server's own code when it gave one, in the class of what we do. */
function statusFor(state: Outcome["state"], code: number, enhanced: string | null): string {
  const status = enhanced && enhanced[0] === String(code)[0] ? enhanced : "X.0.0";
  return `${state === "delivered" ? 2 : state === "deferred" ? 4 : 5}${status.slice(1)}`;
}

/** A reused connection that failed before the server took anything of the transaction: it had gone stale while idle. */
function staleConnection(error: unknown): boolean {
  return error instanceof SmtpError && error.temporary && error.stage === "mail" && (!error.reply || error.reply.code === 421);
}

/** Backoff for the attempt after `attempts` failed ones. */
export function backoffFor(attempts: number, schedule: number[]): number {
  if (schedule.length === 0) return 3_600_000;
  return schedule[Math.min(Math.max(attempts, 1), schedule.length) - 1]!;
}

/**
 * The relay worker's job handler. One job is one message to one domain: the worker leases
 * the job's pending deliveries (so two workers never send the same delivery at once),
 * looks up the destination, sends ONE transaction with all recipients, and records every
 * recipient's result right after the remote reply, in one transaction that also clears
 * the lease. The job is acked only after that commit.
 */
export function createRelay(deps: { pool: Pool; logger: Logger; config: RelayConfig; workerId?: string }): Relay {
  const { pool, logger, config } = deps;
  const workerId = deps.workerId ?? `${process.pid}-${randomBytes(4).toString("hex")}`;
  const resolver = new DestinationResolver(config.destination, config.hostname);
  const connections = new ConnectionPool({
    maxPerHost: config.maxConnectionsPerHost,
    idleMs: config.idleConnectionMs,
    maxTransactions: config.maxMessagesPerConnection,
  });
  const perDestination = new KeyedLimiter(config.maxPerDestination);
  const senderFor = createSenderRewriter(pool, config.srs ?? null);

  type Claimed = { rows: ClaimedRow[]; message: MessageRow } | null;
  type JsonClaimed = Omit<ClaimedRow, "created_at" | "delay_notified_at"> & { created_at: string; delay_notified_at: string | null };
  type PendingClaim = { job: RelayJob; resolve: (claimed: Claimed) => void; reject: (error: unknown) => void };
  // One claim statement in flight at a time: jobs arriving meanwhile go together in the next.
  const claims = new SerialBatches<PendingClaim>((items) => flushClaims(items));

  /**
   * Leases the job's pending deliveries and loads the message; null when nothing is
   * claimable (already final, not due, or held by another worker). Jobs arriving in the same
   * event-loop turn are claimed with one statement (one round trip, one commit).
   */
  function claim(job: RelayJob): Promise<Claimed> {
    return new Promise((resolve, reject) => {
      claims.add({ job, resolve, reject });
    });
  }

  async function flushClaims(items: PendingClaim[]): Promise<void> {
    const ids = [...new Set(items.flatMap((i) => i.job.deliveryIds))];
    const messageIds = [...new Set(items.map((i) => i.job.messageId))];
    try {
      const result = await pool.query<MessageRow & { id: number; claimed: JsonClaimed[] }>(
        // The claim commits without waiting for the WAL flush: the result, committed durably after
        // the SMTP transaction, flushes it too; a claim lost in a PostgreSQL crash before that
        // only reopens the delivery, the duplicate window every MTA has (docs/mta-outbound.md).
        // Rows are locked in id order (as the MDA and the dispatch stamps lock them): no deadlocks.
        `WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)),
         locked AS (
           SELECT id FROM deliveries
            WHERE id = ANY($3) AND message_id = ANY($4) AND kind = 'remote'
              AND ${stillPending()} AND (state <> 'deferred' OR next_attempt_at <= now())
              AND (lease_until IS NULL OR lease_until < now())
            ORDER BY id FOR NO KEY UPDATE),
         claimed AS (
           UPDATE deliveries d SET lease_owner = $1, lease_until = now() + make_interval(secs => $2::float8 / 1000), updated_at = now()
             FROM async_commit, locked
            WHERE d.id = locked.id
            RETURNING d.id, d.message_id, d.recipient, d.final_recipient, d.dsn_notify, d.dsn_orcpt, d.attempts, d.created_at, d.delay_notified_at)
         SELECT m.id, m.queue_id, m.envelope_from, m.source, m.raw, m.dsn_envid, m.dsn_ret, m.received_at, json_agg(c ORDER BY c.id) AS claimed
           FROM claimed c JOIN messages m ON m.id = c.message_id GROUP BY m.id`,
        [workerId, config.leaseMs, ids, messageIds],
      );
      const byMessage = new Map(result.rows.map((row) => [row.id, row]));
      // Each row goes to the first job listing it: a job and its redelivery in one batch do not both send.
      const assigned = new Set<number>();
      for (const item of items) {
        const message = byMessage.get(item.job.messageId);
        const mine = (message?.claimed ?? []).filter((c) => item.job.deliveryIds.includes(c.id) && !assigned.has(c.id));
        for (const c of mine) assigned.add(c.id);
        item.resolve(
          mine.length === 0
            ? null
            : { rows: mine.map((c) => ({ ...c, created_at: new Date(c.created_at), delay_notified_at: c.delay_notified_at ? new Date(c.delay_notified_at) : null })), message: message! },
        );
      }
      const stray = result.rows.flatMap((r) => r.claimed.map((c) => c.id)).filter((id) => !assigned.has(id));
      if (stray.length > 0) {
        await pool.query("UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE id = ANY($1) AND lease_owner = $2", [stray, workerId]).catch(() => undefined);
      }
    } catch (error) {
      for (const item of items) item.reject(error);
    }
  }

  /** Turns a failure that reached no recipient-level answer into the same outcome for all. */
  function failureOutcome(error: unknown, remoteMta: string | null, relay?: string): Outcome {
    if (error instanceof SmtpError) {
      const reply = error.reply ? formatRemoteReply(error.reply) : error.message;
      return { state: error.temporary ? "deferred" : "bounced", reply, status: error.status, remoteMta, relay };
    }
    if (error instanceof DestinationError) {
      return { state: error.temporary ? "deferred" : "bounced", reply: error.message, status: error.status, remoteMta: null };
    }
    return { state: "deferred", reply: (error as Error).message, status: "4.0.0", remoteMta, relay };
  }

  /** Tries every host (and each of its addresses) in order until one gives recipient-level answers. */
  async function attempt(destination: Destination, envelope: Envelope, message: MessageRow, domain: string): Promise<Map<string, Outcome>> {
    const raw = message.raw;
    // UTF-8 header fields anywhere in the MIME structure, not only at the top: a DSN returning an
    // internationalized message carries them in its message/global or message/global-headers part.
    const eightBit = hasEightBit(raw);
    // A 7-bit message (the usual case) is scanned once; only an 8-bit one has its MIME structure walked.
    const content: MessageContent = { eightBit, utf8Header: eightBit && hasUtf8HeaderFields(raw) };
    // A DSN of ours that the server cannot take as it is (a returned message/global without
    // SMTPUTF8, 8-bit parts without 8BITMIME) goes with its parts base64-encoded, as RFC 6533
    // has it for a return path without SMTPUTF8. Decided per server, not when the DSN is composed,
    // so that one offering SMTPUTF8 still gets the 8-bit form RFC 6532 recommends and every parser
    // reads. Only our own DSNs: they carry no DKIM signature (only the msa signs, at submission),
    // whereas re-encoding a message someone signed would break its DKIM body hash and ARC seal.
    const ours = message.source === "bounce" && message.envelope_from === "";
    let sevenBit: { raw: Buffer; content: MessageContent } | null | undefined;
    const payloadFor = (extensions: Map<string, string>) => {
      const blocked = (content.utf8Header && !extensions.has("SMTPUTF8")) || (content.eightBit && !extensions.has("8BITMIME"));
      if (!blocked || !ours) return { raw, content };
      if (sevenBit === undefined) {
        const encoded = sevenBitReport(raw);
        sevenBit = encoded && { raw: encoded, content: { eightBit: false, utf8Header: false } };
      }
      return sevenBit ?? { raw, content };
    };
    let lastFailure: Outcome | null = null;
    let anyTemporary = false;
    for (const host of destination.hosts) {
      for (const address of host.addresses) {
        const key = `${address}|${destination.port}|${destination.tls}|${destination.auth?.user ?? ""}|${host.hostname}`;
        const hostKey = `${address}|${destination.port}`;
        const relay = `${host.hostname}[${address}]:${destination.port}`;
        const options = {
          hostname: host.hostname,
          address,
          port: destination.port,
          heloName: config.hostname,
          tls: destination.tls,
          tlsVerify: destination.tlsVerify,
          auth: destination.auth,
          timeouts: config.timeouts,
        };
        const open = async () => {
          try {
            return await SmtpConnection.open(options);
          } catch (error) {
            // Opportunistic TLS (RFC 7435): a failed STARTTLS handshake is retried in clear on a new connection.
            if (destination.tls !== "opportunistic" || !(error instanceof SmtpError) || error.stage !== "starttls") throw error;
            logger.info({ host: host.hostname, address, err: error.message }, "STARTTLS failed; retrying without TLS");
            return SmtpConnection.open({ ...options, tls: "none" });
          }
        };
        let result: TransactionResult | null = null;
        let connection: SmtpConnection | null = null;
        let payload = { raw, content };
        let refused: EnvelopeRecipient[] = [];
        try {
          // A reused connection the server has meanwhile closed (or given up with a 421) gets one fresh retry.
          for (let round = 0; round < 2 && !result; round++) {
            const got = await connections.acquire(key, hostKey, open, round > 0);
            connection = got.connection;
            // RFC 6531 3.2: a non-ASCII address never goes to a server without SMTPUTF8. Only those
            // recipients are refused; the others go in the transaction, unless the message itself
            // needs SMTPUTF8 (send() refuses it for all). When no recipient is ASCII, send() refuses them all.
            const nonAscii = connection.extensions.has("SMTPUTF8") ? [] : envelope.recipients.filter((r) => !isAscii(r.address));
            refused = nonAscii.length < envelope.recipients.length ? nonAscii : [];
            const sendable = refused.length === 0 ? envelope : { ...envelope, recipients: envelope.recipients.filter((r) => isAscii(r.address)) };
            payload = payloadFor(connection.extensions);
            try {
              result = await connection.send(sendable, payload.raw, payload.content);
            } catch (error) {
              if (round === 0 && got.reused && staleConnection(error)) {
                connection.destroy();
                connections.release(key, hostKey, connection);
                connection = null;
                continue;
              }
              throw error;
            }
          }
        } catch (error) {
          if (connection) {
            connections.release(key, hostKey, connection);
            connection = null;
          }
          lastFailure = failureOutcome(error, host.hostname, relay);
          if (lastFailure.state === "deferred") anyTemporary = true;
          logger.info({ domain, host: host.hostname, address, err: (error as Error).message }, "relay attempt to host failed");
          // A permanent refusal of the message itself (MAIL 5xx, SIZE, 8BITMIME, SMTPUTF8) is final; anything else tries the next host.
          if (error instanceof SmtpError && !error.temporary && (error.stage === "mail" || error.stage === "message")) {
            return new Map(envelope.recipients.map((r) => [r.address, lastFailure!]));
          }
          continue;
        }
        const outcomes = new Map<string, Outcome>();
        const remoteDsn = connection!.extensions.has("DSN");
        const note = (done: TransactionResult) => {
          for (const r of done.recipients) {
            const state = r.accepted ? "delivered" : r.permanent ? "bounced" : "deferred";
            outcomes.set(r.address, { state, reply: formatRemoteReply(r.reply), status: statusFor(state, r.reply.code, r.reply.enhanced), remoteMta: host.hostname, relay, remoteDsn });
          }
        };
        note(result!);
        for (const r of refused) {
          outcomes.set(r.address, { state: "bounced", reply: `the recipient address is not ASCII and ${host.hostname} does not offer SMTPUTF8 (RFC 6531 3.2)`, status: "5.6.7", remoteMta: host.hostname, relay });
        }
        // "452 too many recipients" (RFC 5321 4.5.3.1.10, or the old 552): the rest go in further
        // transactions on this connection, for as long as each one delivers to someone.
        for (let done = result!; done.recipients.some((r) => r.accepted) && connection!.reusable; ) {
          const rest = new Set(done.recipients.filter((r) => !r.accepted && !r.permanent && (r.reply.code === 452 || r.reply.code === 552)).map((r) => r.address));
          if (rest.size === 0) break;
          try {
            done = await connection!.send({ ...envelope, recipients: envelope.recipients.filter((r) => rest.has(r.address)) }, payload.raw, payload.content);
          } catch (error) {
            // Those recipients keep their deferral from the 452.
            logger.info({ domain, host: host.hostname, address, err: (error as Error).message }, "relay follow-up transaction failed");
            break;
          }
          note(done);
        }
        // The transaction is complete: the connection can carry the next job while this one records.
        connections.release(key, hostKey, connection!);
        return outcomes;
      }
    }
    let failure: Outcome = lastFailure ?? { state: "deferred", reply: `no host of ${domain} could be tried`, status: "4.4.1", remoteMta: null };
    // Every host refused the connection or the session: the attempt failed; permanent only if every answer was.
    if (anyTemporary && failure.state === "bounced") failure = { ...failure, state: "deferred", status: `4${failure.status.slice(1)}` };
    return new Map(envelope.recipients.map((r) => [r.address, failure]));
  }

  interface RecordItem {
    ids: number[];
    states: string[];
    replies: string[];
    statuses: string[];
    remoteMtas: Array<string | null>;
    delays: number[];
    dsns: Array<string | null>;
    events: JourneyEvent[];
  }
  type PendingRecord = { item: RecordItem; resolve: (kept: Set<number>) => void; reject: (error: unknown) => void };
  // One result statement in flight at a time (its commit waits for the WAL flush): results arriving meanwhile share the next.
  const records = new SerialBatches<PendingRecord>((items) => flushRecords(items));

  /**
   * Records results; the results of jobs finishing in the same event-loop turn share one
   * statement (one round trip, one commit). The statement is atomic: each row's state change
   * and its journey events, only for rows this worker still holds. Resolves the ids recorded.
   */
  function recordBatch(item: RecordItem): Promise<Set<number>> {
    return new Promise((resolve, reject) => {
      records.add({ item, resolve, reject });
    });
  }

  async function flushRecords(items: PendingRecord[]): Promise<void> {
    const all = items.map((i) => i.item);
    const events = all.flatMap((i) => i.events);
    try {
      const updated = await pool.query<{ id: number }>(
        `WITH locked AS (SELECT id FROM deliveries WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE),
         changed AS (
           UPDATE deliveries d SET state = r.state, attempts = d.attempts + 1, last_attempt_at = now(), last_reply = r.reply,
                  last_status = r.status, remote_mta = r.remote_mta, lease_owner = NULL, lease_until = NULL, updated_at = now(),
                  next_attempt_at = CASE WHEN r.state = 'deferred' THEN now() + make_interval(secs => r.delay_ms / 1000) ELSE NULL END,
                  dsn_state = CASE WHEN r.dsn = 'pending' OR (r.dsn = 'delay' AND d.dsn_state IS NULL) THEN 'pending' ELSE d.dsn_state END
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::text[])
                  AS r(id, state, reply, status, remote_mta, delay_ms, dsn)
             , locked
            WHERE d.id = r.id AND d.id = locked.id AND d.lease_owner = $8 AND ${stillPending("d.state")}
            RETURNING d.id),
         logged AS (
           INSERT INTO delivery_events (message_id, delivery_id, event, service, reply, detail)
           SELECT e.message_id, e.delivery_id, e.event, e.service, e.reply, e.detail
             FROM unnest($9::bigint[], $10::bigint[], $11::text[], $12::text[], $13::text[], $14::jsonb[])
                  AS e(message_id, delivery_id, event, service, reply, detail)
            WHERE e.delivery_id IN (SELECT id FROM changed))
         SELECT id FROM changed`,
        [
          all.flatMap((i) => i.ids),
          all.flatMap((i) => i.states),
          all.flatMap((i) => i.replies),
          all.flatMap((i) => i.statuses),
          all.flatMap((i) => i.remoteMtas),
          all.flatMap((i) => i.delays),
          all.flatMap((i) => i.dsns),
          workerId,
          events.map((e) => e.messageId),
          events.map((e) => e.deliveryId),
          events.map((e) => e.event),
          events.map((e) => e.service),
          events.map((e) => e.reply ?? null),
          events.map((e) => JSON.stringify(e.detail ?? null)),
        ],
      );
      const kept = new Set(updated.rows.map((r) => r.id));
      for (const i of items) i.resolve(kept);
    } catch (error) {
      for (const i of items) i.reject(error);
    }
  }

  async function record(job: RelayJob, rows: ClaimedRow[], message: MessageRow, outcomes: Map<string, Outcome>): Promise<number> {
    const now = Date.now();
    const updates = rows.map((row) => {
      let outcome = outcomes.get(row.final_recipient) ?? { state: "deferred" as const, reply: "no result", status: "4.0.0", remoteMta: null };
      let event: JourneyEvent["event"] = outcome.state;
      const attempts = row.attempts + 1;
      // "pending": a DSN is due (the generator decides whether to send it); "delay": only if none is in progress.
      let dsn: "pending" | "delay" | null = null;
      let delayMs = 0;
      if (outcome.state === "deferred") {
        if (now - message.received_at.getTime() >= config.maxQueueLifetimeMs) {
          outcome = { ...outcome, state: "bounced", status: "5.4.7", reply: `delivery time expired; last error: ${outcome.reply}` };
          event = "expired";
        } else {
          delayMs = backoffFor(attempts, config.backoffMs);
          if (config.delayNoticeAfterMs > 0 && !row.delay_notified_at && now - row.created_at.getTime() >= config.delayNoticeAfterMs) dsn = "delay";
        }
      }
      if (outcome.state === "bounced") dsn = "pending";
      if (outcome.state === "delivered" && !outcome.remoteDsn && (row.dsn_notify ?? []).includes("SUCCESS")) dsn = "pending";
      return { row, outcome, event, delayMs, dsn };
    });
    const events: JourneyEvent[] = [];
    for (const u of updates) {
      const detail = { remoteMta: u.outcome.remoteMta, status: u.outcome.status, attempt: u.row.attempts + 1 };
      events.push({ messageId: job.messageId, deliveryId: u.row.id, event: "attempt", service: SERVICE, reply: u.outcome.reply, detail });
      events.push({ messageId: job.messageId, deliveryId: u.row.id, event: u.event, service: SERVICE, reply: u.outcome.reply, detail: u.delayMs ? { ...detail, retryInMs: u.delayMs } : detail });
    }
    const kept = await recordBatch({
      ids: updates.map((u) => u.row.id),
      states: updates.map((u) => u.outcome.state),
      replies: updates.map((u) => u.outcome.reply),
      statuses: updates.map((u) => u.outcome.status),
      remoteMtas: updates.map((u) => u.outcome.remoteMta),
      delays: updates.map((u) => u.delayMs),
      dsns: updates.map((u) => u.dsn),
      events,
    });
    if (updates.some((u) => !kept.has(u.row.id))) logger.error({ messageId: job.messageId, lost: updates.filter((u) => !kept.has(u.row.id)).length }, "lease lost before the result was recorded");
    for (const u of updates) if (kept.has(u.row.id) && u.outcome.state !== "deferred") mailMetrics.deliveriesFinal.inc({ kind: "remote", state: u.outcome.state });
    // One line per committed recipient result, as Postfix's status= lines (docs/mta-outbound.md, Logs).
    for (const u of updates) {
      if (!kept.has(u.row.id)) continue;
      logger.info(
        {
          messageId: job.messageId,
          queueId: message.queue_id,
          deliveryId: u.row.id,
          to: u.row.final_recipient,
          from: message.envelope_from,
          status: u.event === "expired" ? "expired" : u.outcome.state,
          dsn: u.outcome.status,
          relay: u.outcome.relay ?? "none",
          delay: Math.round((now - message.received_at.getTime()) / 10) / 100,
          attempts: u.row.attempts + 1,
          reply: logText(u.outcome.reply),
          ...(u.delayMs ? { retryInS: Math.round(u.delayMs / 1000) } : {}),
        },
        u.outcome.state,
      );
    }
    return updates.filter((u) => kept.has(u.row.id)).length;
  }

  /**
   * Records with retries: after a remote 250 a transient database failure (restart, too many
   * clients) must not turn into a resend. Tries for up to half the lease.
   */
  async function recordWithRetry(job: RelayJob, rows: ClaimedRow[], message: MessageRow, outcomes: Map<string, Outcome>): Promise<void> {
    const deadline = Date.now() + config.leaseMs / 2;
    for (let attempt = 1; ; attempt++) {
      try {
        await record(job, rows, message, outcomes);
        return;
      } catch (error) {
        if (Date.now() >= deadline) throw error;
        logger.warn({ err: error, messageId: job.messageId, attempt }, "recording the relay result failed; retrying");
        await new Promise((resolve) => setTimeout(resolve, Math.min(2_000, 100 * 2 ** attempt)));
      }
    }
  }

  async function handle(job: RelayJob): Promise<void> {
    const started = performance.now();
    const claimed = await claim(job);
    if (!claimed) return; // already final, not due, or another worker holds them
    const { rows, message } = claimed;
    const lease = keepLease(rows.map((r) => r.id));
    try {
      await sendAndRecord(job, rows, message, started);
    } finally {
      lease.stop();
    }
  }

  /**
   * Renews the lease on a job's deliveries every third of the lease while the worker still works
   * on them (waiting for a per-destination slot, trying MX host after MX host with RFC 5321's
   * timeouts, recording the result). A lease that ran out would let the scheduler hand the
   * deliveries to another worker, which would send them a second time.
   */
  function keepLease(ids: number[]): { stop(): void } {
    const timer = setInterval(() => {
      pool
        .query(
          // Locked in id order, like every multi-row writer of deliveries.
          `WITH locked AS (SELECT id FROM deliveries WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE)
           UPDATE deliveries d SET lease_until = now() + make_interval(secs => $2::float8 / 1000)
             FROM locked WHERE d.id = locked.id AND d.lease_owner = $3 AND ${stillPending("d.state")}`,
          [ids, config.leaseMs, workerId],
        )
        .catch((error) => logger.warn({ err: error, deliveries: ids.length }, "could not renew a relay lease"));
    }, Math.max(50, Math.floor(config.leaseMs / 3)));
    timer.unref();
    return { stop: () => clearInterval(timer) };
  }

  async function sendAndRecord(job: RelayJob, rows: ClaimedRow[], message: MessageRow, started: number): Promise<void> {
    await withSpan(
      "relay attempt",
      { kind: SpanKind.INTERNAL, attributes: { "mail.message.id": job.messageId, "mail.destination.domain": job.domain, "mail.recipients.count": rows.length } },
      async (span) => {
        const envelope: Envelope = {
          from: message.envelope_from,
          recipients: rows.map((r) => ({ address: r.final_recipient, notify: r.dsn_notify, orcpt: r.dsn_orcpt })),
          envid: message.dsn_envid,
          ret: message.dsn_ret,
        };
        const release = await perDestination.acquire(job.domain);
        let outcomes: Map<string, Outcome>;
        try {
          try {
            // A failure to decide it (the database) defers the job like any other temporary failure.
            envelope.from = await senderFor({ envelopeFrom: message.envelope_from, receivedAt: message.received_at, deliveries: rows });
            const destination = await resolver.resolve(job.domain);
            outcomes = await attempt(destination, envelope, message, job.domain);
          } catch (error) {
            const failure = failureOutcome(error, null);
            outcomes = new Map(rows.map((r) => [r.final_recipient, failure]));
          }
        } finally {
          release();
        }
        const answered = performance.now();
        await recordWithRetry(job, rows, message, outcomes);
        if ([...outcomes.values()].some((o) => o.state === "delivered")) relayMetrics.unrecordedSeconds.observe((performance.now() - answered) / 1000);
        const states = [...outcomes.values()].map((o) => o.state);
        for (const state of states) relayMetrics.results.inc({ outcome: state });
        relayMetrics.attemptSeconds.observe((performance.now() - started) / 1000);
        span.setAttribute("mail.delivered.count", states.filter((s) => s === "delivered").length);
        // Recipients deferred or bounced make the attempt an error, so Jaeger's error filter finds it
        // (their causes were caught above and turned into outcomes; no exception reaches withSpan).
        const failed = ["deferred", "bounced"].map((state) => [state, states.filter((s) => s === state).length] as const).filter(([, n]) => n > 0);
        if (failed.length > 0) {
          const first = [...outcomes.values()].find((o) => o.state !== "delivered");
          span.setStatus({ code: SpanStatusCode.ERROR, message: `${failed.map(([state, n]) => `${n} ${state}`).join(", ")}${first?.status ? ` (${first.status})` : ""}` });
        }
        logger.debug(
          { messageId: job.messageId, domain: job.domain, results: rows.map((r) => ({ rcpt: r.final_recipient, ...outcomes.get(r.final_recipient) })) },
          "relay attempt done",
        );
      },
    );
  }

  return {
    workerId,
    handle,
    async close() {
      await connections.close();
    },
  };
}
