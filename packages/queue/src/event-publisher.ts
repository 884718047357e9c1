import { Subjects, publish, type Bus } from "@mailstack/bus";
import type { Pool } from "@mailstack/db";
import { journeyContext, type Logger } from "@mailstack/telemetry";

// Only one replica publishes at a time (transaction-scoped advisory lock).
const PUBLISHER_LOCK = 4_207_003;

/** What a mail.event.<kind> message carries. */
export interface PublishedEvent {
  id: number;
  messageId: number;
  deliveryId: number | null;
  event: string;
  service: string;
  reply: string | null;
  detail: Record<string, unknown> | null;
  at: string;
}

export interface EventPublisherOptions {
  batchSize?: number;
  /**
   * Events younger than this are left for the next round: ids are taken in one order and
   * committed in another, so a short lag keeps a slow transaction's event from being skipped.
   */
  lagMs?: number;
}

/**
 * Publishes committed journey events (delivery_events, the source of truth) to
 * mail.event.<kind>, in id order, from a position kept in PostgreSQL (an outbox). The
 * Nats-Msg-Id is the event id, so a republish after a crash is dropped as a duplicate.
 */
export async function publishEvents(bus: Bus, pool: Pool, options: EventPublisherOptions = {}): Promise<number> {
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    const locked = await client.query<{ ok: boolean }>("SELECT pg_try_advisory_xact_lock($1) AS ok", [PUBLISHER_LOCK]);
    if (!locked.rows[0]!.ok) {
      await client.query("ROLLBACK");
      return 0;
    }
    const position = Number((await client.query("SELECT position FROM event_outbox WHERE name = 'nats' FOR UPDATE")).rows[0]?.position ?? 0);
    const rows = await client.query<{
      id: number; message_id: number; delivery_id: number | null; event: string; service: string; reply: string | null;
      detail: Record<string, unknown> | null; created_at: Date; trace_id: string | null; trace_span_id: string | null;
    }>(
      `SELECT e.id, e.message_id, e.delivery_id, e.event, e.service, e.reply, e.detail, e.created_at, m.trace_id, m.trace_span_id
         FROM (SELECT * FROM delivery_events
                WHERE id > $1 AND created_at < now() - make_interval(secs => $3::float8 / 1000)
                ORDER BY id LIMIT $2) e
         LEFT JOIN messages m ON m.id = e.message_id
        ORDER BY e.id`,
      [position, options.batchSize ?? 500, options.lagMs ?? 5_000],
    );
    await Promise.all(
      rows.rows.map((row) => {
        const payload: PublishedEvent = {
          id: row.id, messageId: row.message_id, deliveryId: row.delivery_id, event: row.event, service: row.service,
          reply: row.reply, detail: row.detail, at: row.created_at.toISOString(),
        };
        // In the message's journey: a root trace per event would flood the tracing backend.
        const context = journeyContext(row.trace_id, row.trace_span_id);
        return publish(bus, Subjects.event(row.event), payload, { msgId: `event-${row.id}`, context });
      }),
    );
    const last = rows.rows.at(-1);
    if (last) await client.query("UPDATE event_outbox SET position = $1 WHERE name = 'nats'", [last.id]);
    await client.query("COMMIT");
    return rows.rows.length;
  } catch (error) {
    await client.query("ROLLBACK").catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
}

/** Runs publishEvents every intervalMs (and again at once while there is a backlog) until stopped. */
export function startEventPublisher(bus: Bus, pool: Pool, logger: Logger, intervalMs = 1_000, options: EventPublisherOptions = {}): { stop(): Promise<void> } {
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<void> = Promise.resolve();
  const round = () => {
    running = publishEvents(bus, pool, options)
      .then((count) => {
        if (!stopped) timer = setTimeout(round, count >= (options.batchSize ?? 500) ? 0 : intervalMs);
      })
      .catch((error) => {
        logger.warn({ err: error }, "event publisher failed; will try again");
        if (!stopped) timer = setTimeout(round, intervalMs);
      });
  };
  timer = setTimeout(round, intervalMs);
  return {
    async stop() {
      stopped = true;
      clearTimeout(timer);
      await running;
    },
  };
}
