import type { Bus } from "@mailstack/bus";
import { resolveRecipient, transaction, type Pool, type PoolClient } from "@mailstack/db";
import { dispatchAccepted, insertMessage, recordEvents, type AcceptedMessage, type NewDelivery } from "@mailstack/queue";
import { Counter, context, currentSpanId, currentTraceId, journeyContext, logText, registry, withSpan, type Logger } from "@mailstack/telemetry";
import { composeDsn, type DsnAction, type DsnRecipient } from "./compose.ts";

export interface GeneratorOptions {
  /** Reporting-MTA and the DSN's From: domain. */
  reportingMta: string;
  /** The service name written on journey events. */
  service: string;
  /** Send a delay notice when the sender gave no NOTIFY (policy); NOTIFY=DELAY always does. */
  delayByDefault?: boolean;
  /** The queue lifetime counted from arrival; a delay notice gives its end as Will-Retry-Until (RFC 3464 2.3.9). */
  maxQueueLifetimeMs?: number;
  /** A failure report returns the whole message up to this size, its header beyond, with RET=FULL too (as Postfix's bounce_size_limit). */
  fullReturnLimit?: number;
  /** Messages handled per batch. */
  batchSize?: number;
  logger?: Logger;
}

interface PendingRow {
  id: number;
  message_id: number;
  recipient: string;
  final_recipient: string;
  kind: "local" | "remote";
  state: "queued" | "deferred" | "delivered" | "bounced" | "cancelled";
  last_reply: string | null;
  last_status: string | null;
  remote_mta: string | null;
  dsn_notify: string[] | null;
  dsn_orcpt: string | null;
  last_attempt_at: Date | null;
}

interface MessageRow {
  id: number;
  queue_id: string;
  envelope_from: string;
  dsn_envid: string | null;
  dsn_ret: "FULL" | "HDRS" | null;
  received_at: Date;
  size: number;
}

function actionOf(row: PendingRow): DsnAction | null {
  switch (row.state) {
    case "bounced":
      return "failed";
    case "queued":
    case "deferred":
      return "delayed";
    case "delivered":
      // A remote server that did not take over DSN duty: we report "relayed" (RFC 3461 5.2.2).
      return row.kind === "remote" ? "relayed" : "delivered";
    default:
      return null;
  }
}

/** Whether the sender asked (or policy says) to be told about this outcome (RFC 3461 4.1). */
export function wantsNotice(notify: string[] | null, action: DsnAction, delayByDefault: boolean): boolean {
  const asked = (notify ?? []).map((n) => n.toUpperCase());
  if (asked.includes("NEVER")) return false;
  if (asked.length === 0) return action === "failed" || (action === "delayed" && delayByDefault);
  if (action === "failed") return asked.includes("FAILURE");
  if (action === "delayed") return asked.includes("DELAY");
  return asked.includes("SUCCESS");
}

function statusOf(row: PendingRow, action: DsnAction): string {
  if (row.last_status && /^[245]\.\d{1,3}\.\d{1,3}$/.test(row.last_status)) return row.last_status;
  if (action === "failed") return "5.0.0";
  if (action === "delayed") return "4.0.0";
  return "2.0.0";
}

const dsnFailures = new Counter({
  name: "mail_dsn_failures_total",
  help: "Messages whose DSN could not be generated in a pass (left pending, retried after a backoff)",
  registers: [registry],
});

/**
 * Messages whose DSN generation threw, by message id: each is left pending and kept out of the
 * passes until retryAt (ms), so one that always fails neither blocks nor precedes the others.
 * Kept in memory per worker: a restart retries at once, which is harmless.
 */
export type DsnFailures = Map<number, { failures: number; retryAt: number }>;

const FIRST_RETRY_MS = 30_000;
const MAX_RETRY_MS = 3_600_000;

function backoffMs(failures: number): number {
  return Math.min(FIRST_RETRY_MS * 2 ** Math.min(failures - 1, 20), MAX_RETRY_MS);
}

/** A generated DSN, for the log line written after its commit. */
interface Generated {
  accepted: AcceptedMessage;
  message: MessageRow;
  notices: Array<{ row: PendingRow; action: DsnAction; status: string }>;
}

/** Recipients a DSN's log line names; a report on more says how many it left out. */
const LOGGED_RECIPIENTS = 20;

function logGenerated(logger: Logger, generated: Generated): void {
  const { accepted, message, notices } = generated;
  logger.info(
    {
      messageId: message.id,
      queueId: message.queue_id,
      to: message.envelope_from,
      dsnMessageId: accepted.messageId,
      dsnQueueId: accepted.queueId,
      actions: [...new Set(notices.map((n) => n.action))],
      recipients: notices.slice(0, LOGGED_RECIPIENTS).map((n) => ({ to: logText(n.row.final_recipient), action: n.action, dsn: n.status })),
      recipientCount: notices.length,
    },
    "DSN generated",
  );
}

/**
 * Generates the DSNs for one message inside the caller's transaction: decides per delivery
 * whether a notice is due (null sender, NOTIFY), builds ONE report for all of them, stores
 * it as a new message from <> to the original sender, and marks the rows sent or suppressed.
 */
async function handleMessage(
  client: PoolClient,
  message: MessageRow,
  rows: PendingRow[],
  options: GeneratorOptions,
): Promise<Generated | null> {
  const notices: Array<{ row: PendingRow; action: DsnAction }> = [];
  const suppressed: number[] = [];
  for (const row of rows) {
    const action = actionOf(row);
    if (!action || message.envelope_from === "" || !wantsNotice(row.dsn_notify, action, options.delayByDefault ?? true)) {
      suppressed.push(row.id);
    } else {
      notices.push({ row, action });
    }
  }
  let generated: Generated | null = null;
  if (notices.length > 0) {
    const route = await resolveRecipient(client, message.envelope_from, { allowRemote: true });
    if (!route.ok) {
      options.logger?.warn({ messageId: message.id, sender: message.envelope_from, reason: route.reason }, "DSN recipient cannot be routed; suppressing");
      suppressed.push(...notices.map((n) => n.row.id));
      notices.length = 0;
    } else {
      const raw = await client.query<{ raw: Buffer }>("SELECT raw FROM messages WHERE id = $1", [message.id]);
      // RET asks for the content of a "failed" report (RFC 3461 4.3); a delay or success notice
      // returns the header whatever RET says, as Postfix's do.
      // The whole message only up to the size limit, even with RET=FULL: a report the sender's
      // server refuses for its size tells the sender nothing (RFC 3461 4.3 allows the header only).
      const failure = notices.some((n) => n.action === "failed");
      const limit = options.fullReturnLimit ?? 262_144;
      const wantsFull = failure && message.dsn_ret !== "HDRS";
      const ret = wantsFull && message.size <= limit ? "FULL" : "HDRS";
      const returnLimit = wantsFull && ret === "HDRS" ? limit : null;
      const recipients: DsnRecipient[] = notices.map(({ row, action }) => ({
        finalRecipient: row.final_recipient,
        originalRecipient: row.dsn_orcpt,
        expandedFrom: row.recipient,
        action,
        status: statusOf(row, action),
        remoteMta: row.remote_mta,
        // Our own "250 ... Delivered to <folder> as UID n" is for the journey: which folder (Junk,
        // a filter's) and the mailbox's UID count are the recipient's business, not the sender's.
        diagnostic: action === "delivered" && row.kind === "local" ? null : row.last_reply,
        lastAttemptDate: row.last_attempt_at,
        willRetryUntil:
          action === "delayed" && options.maxQueueLifetimeMs ? new Date(message.received_at.getTime() + options.maxQueueLifetimeMs) : null,
      }));
      const dsn = composeDsn({
        reportingMta: options.reportingMta,
        to: message.envelope_from,
        originalEnvelopeId: message.dsn_envid,
        arrivalDate: message.received_at,
        ret,
        returnLimit,
        original: raw.rows[0]!.raw,
        recipients,
      });
      const deliveries: NewDelivery[] = route.routes.map((r) => ({ recipient: message.envelope_from, route: r, dsnNotify: ["NEVER"] }));
      const accepted = await insertMessage(
        client,
        { raw: dsn.raw, envelopeFrom: "", source: "bounce", messageIdHeader: dsn.messageId, traceId: currentTraceId() ?? null, traceSpanId: currentSpanId() ?? null },
        deliveries,
        options.service,
      );
      await client.query(
        `UPDATE deliveries SET dsn_state = 'sent', updated_at = now(),
                delay_notified_at = CASE WHEN state IN ('queued', 'deferred') THEN now() ELSE delay_notified_at END
          WHERE id = ANY($1)`,
        [notices.map((n) => n.row.id)],
      );
      await recordEvents(
        client,
        notices
          .filter((n) => n.action === "delayed")
          .map((n) => ({ messageId: message.id, deliveryId: n.row.id, event: "delayed" as const, service: options.service, detail: { dsn: accepted.queueId } })),
      );
      generated = { accepted, message, notices: recipients.map((r, i) => ({ row: notices[i]!.row, action: r.action, status: r.status })) };
    }
  }
  if (suppressed.length > 0) {
    await client.query("UPDATE deliveries SET dsn_state = 'suppressed', updated_at = now() WHERE id = ANY($1)", [suppressed]);
  }
  return generated;
}

/**
 * One pass of the bounce generator: takes messages with deliveries in dsn_state 'pending'
 * (rows locked FOR UPDATE SKIP LOCKED, so every worker can run it), generates one DSN per
 * message in the same transaction that marks the rows, then dispatches the DSNs.
 * Returns the number of DSNs generated.
 *
 * A message whose report throws (a corrupt row, a composition error) is rolled back, so its rows
 * stay pending and nothing was stored: it is logged, counted in mail_dsn_failures_total and
 * left out of the passes for a backoff (in `failures`), and the pass goes on with the others.
 */
export async function generateDsns(bus: Bus, pool: Pool, options: GeneratorOptions, failures: DsnFailures = new Map()): Promise<number> {
  const now = Date.now();
  // An entry long past its retry time is of a message no longer pending (sent by another worker, deleted).
  for (const [id, f] of failures) if (f.retryAt < now - MAX_RETRY_MS) failures.delete(id);
  const waiting = [...failures].filter(([, f]) => f.retryAt > now).map(([id]) => id);
  const candidates = await pool.query<{ message_id: number; trace_id: string | null; trace_span_id: string | null }>(
    `SELECT p.message_id, m.trace_id, m.trace_span_id
       FROM (SELECT DISTINCT message_id FROM deliveries
              WHERE dsn_state = 'pending' AND message_id <> ALL($2::bigint[]) ORDER BY message_id LIMIT $1) p
       JOIN messages m ON m.id = p.message_id ORDER BY p.message_id`,
    [options.batchSize ?? 50, waiting],
  );
  let generated = 0;
  for (const { message_id: messageId, trace_id: traceId, trace_span_id: traceSpanId } of candidates.rows) {
    // The report continues the original message's trace (DESIGN.md rule 6): generating it, its
    // row (which keeps this trace id) and the publish of its delivery all sit in that journey.
    const journey = journeyContext(traceId, traceSpanId);
    const done = await context.with(journey, () => withSpan("dsn generate", { attributes: { "mail.message.id": messageId } }, async () => {
      let report: Generated | null;
      try {
        report = await transaction(pool, async (client) => {
          const rows = await client.query<PendingRow>(
            `SELECT id, message_id, recipient, final_recipient, kind, state, last_reply, last_status, remote_mta,
                    dsn_notify, dsn_orcpt, last_attempt_at
               FROM deliveries WHERE message_id = $1 AND dsn_state = 'pending' ORDER BY id FOR UPDATE SKIP LOCKED`,
            [messageId],
          );
          if (rows.rows.length === 0) return null;
          const message = await client.query<MessageRow>(
            "SELECT id, queue_id, envelope_from, dsn_envid, dsn_ret, received_at, size FROM messages WHERE id = $1",
            [messageId],
          );
          return handleMessage(client, message.rows[0]!, rows.rows, options);
        });
      } catch (error) {
        // Rolled back: the rows are still pending and no report was stored, so the retry can
        // neither send a second DSN nor lose this one.
        const count = (failures.get(messageId)?.failures ?? 0) + 1;
        const retryInMs = backoffMs(count);
        failures.set(messageId, { failures: count, retryAt: Date.now() + retryInMs });
        dsnFailures.inc();
        options.logger?.error(
          { messageId, reason: logText((error as Error)?.message ?? String(error)), failures: count, retryInS: Math.round(retryInMs / 1000), err: error },
          "DSN generation failed; the message stays pending",
        );
        return false;
      }
      failures.delete(messageId);
      // After the commit: a rolled-back DSN is never logged as generated.
      if (report && options.logger) logGenerated(options.logger, report);
      // A failed publish is repaired by the sweeper (the rows are queued and undispatched).
      if (report) await dispatchAccepted(bus, pool, report.accepted).catch((error) => options.logger?.warn({ err: error }, "DSN dispatch failed; the sweeper will retry"));
      return report !== null;
    }));
    if (done) generated++;
  }
  return generated;
}

/** Runs the generator every intervalMs until stopped. */
export function startDsnGenerator(bus: Bus, pool: Pool, options: GeneratorOptions & { intervalMs?: number }): { stop(): Promise<void> } {
  let stopped = false;
  let running: Promise<unknown> = Promise.resolve();
  const failures: DsnFailures = new Map();
  const tick = () => {
    if (stopped) return;
    running = generateDsns(bus, pool, options, failures)
      .then((count) => count > 0 && options.logger?.info({ count }, "generated delivery status notifications"))
      .catch((error) => options.logger?.warn({ err: error }, "DSN generator failed; will try again"))
      .finally(() => {
        if (!stopped) timer = setTimeout(tick, options.intervalMs ?? 2_000);
      });
  };
  let timer = setTimeout(tick, options.intervalMs ?? 2_000);
  return {
    async stop() {
      stopped = true;
      clearTimeout(timer);
      await running;
    },
  };
}
