import { transaction, type Pool } from "@mailstack/db";
import type { Logger } from "@mailstack/telemetry";
import { runEvery } from "./periodic.ts";

export interface PurgeOptions {
  /** A finished message is kept this long after it was received (for its journey), then deleted. */
  retentionMs: number;
  /** Messages deleted per statement; a round repeats until nothing is left. */
  batchSize?: number;
}

/**
 * Deletes messages that nobody needs any more, with their deliveries and journey: received
 * longer ago than the retention, in no mailbox (every copy was deleted by its owner, for
 * example by POP3 DELE and QUIT, which flags the entry, or none was filed), with every delivery
 * final and no DSN still to send, and every journey event already published. The flagged
 * entries go with them. Without this the messages table (raw bodies included) only grows.
 * Rows are claimed with SKIP LOCKED, so several replicas may run it at once.
 */
export async function purgeFinishedMessages(pool: Pool, options: PurgeOptions): Promise<number> {
  const batchSize = options.batchSize ?? 1000;
  let total = 0;
  for (;;) {
    const deleted = await transaction(pool, async (client) => {
      const doomed = await client.query<{ id: number }>(
        `SELECT m.id FROM messages m
          WHERE m.received_at < now() - make_interval(secs => $1::float8 / 1000)
            AND NOT EXISTS (SELECT 1 FROM mailbox_entries e WHERE e.message_id = m.id AND NOT e.deleted)
            AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id
                             AND (d.state IN ('queued', 'deferred') OR d.dsn_state = 'pending'))
            AND NOT EXISTS (SELECT 1 FROM delivery_events v WHERE v.message_id = m.id
                             AND v.id > coalesce((SELECT position FROM event_outbox WHERE name = 'nats'), 0))
          ORDER BY m.id LIMIT $2
          FOR UPDATE SKIP LOCKED`,
        [options.retentionMs, batchSize],
      );
      const ids = doomed.rows.map((row) => row.id);
      if (ids.length === 0) return 0;
      await client.query("DELETE FROM mailbox_entries WHERE message_id = ANY($1) AND deleted", [ids]);
      return (await client.query("DELETE FROM messages WHERE id = ANY($1)", [ids])).rowCount ?? 0;
    });
    total += deleted;
    if (deleted < batchSize) return total;
  }
}

/** Runs purgeFinishedMessages every intervalMs until stopped. */
export function startRetention(pool: Pool, logger: Logger, intervalMs: number, options: PurgeOptions): { stop(): Promise<void> } {
  return runEvery(intervalMs, () =>
    purgeFinishedMessages(pool, options)
      .then((count) => count > 0 && logger.info({ count }, "purged finished messages past their retention"))
      .catch((error) => logger.warn({ err: error }, "message purge failed; will try again")),
  );
}
