import type { Bus } from "@mailstack/bus";
import type { Pool } from "@mailstack/db";
import { dispatchDeliveries, runEvery, type DispatchItem } from "@mailstack/queue";
import type { Logger } from "@mailstack/telemetry";

/**
 * One pass of the retry scheduler (DESIGN.md rule 4): deferred remote deliveries that are
 * due, and pending ones whose worker's lease ran out (the worker died), go back to
 * `queued` and are published again as relay jobs. Rows are taken FOR UPDATE SKIP LOCKED,
 * so every worker runs it. Returns the number of deliveries republished.
 */
export async function scheduleDue(bus: Bus, pool: Pool, batchSize = 500): Promise<number> {
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    const due = await client.query<{ id: number; message_id: number; remote_domain: string; attempts: number; trace_id: string | null; trace_span_id: string | null }>(
      `SELECT d.id, d.message_id, d.remote_domain, d.attempts, m.trace_id, m.trace_span_id
         FROM deliveries d JOIN messages m ON m.id = d.message_id
        WHERE d.kind = 'remote'
          AND ((d.state = 'deferred' AND d.next_attempt_at <= now() AND (d.lease_until IS NULL OR d.lease_until < now()))
            OR (d.state IN ('queued', 'deferred') AND d.lease_until < now()))
        ORDER BY d.next_attempt_at NULLS FIRST, d.id LIMIT $1 FOR UPDATE OF d SKIP LOCKED`,
      [batchSize],
    );
    if (due.rows.length === 0) {
      await client.query("COMMIT");
      return 0;
    }
    const ids = due.rows.map((r) => r.id);
    await client.query(
      `UPDATE deliveries SET state = 'queued', next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL,
              dispatched_at = NULL, updated_at = now() WHERE id = ANY($1)`,
      [ids],
    );
    // The msg id must differ from every earlier publish of these rows, or JetStream drops it as a duplicate.
    const stamp = Date.now();
    // Each retry continues the message's trace, so one trace shows every attempt of its journey.
    const items: DispatchItem[] = due.rows.map((r) => ({
      id: r.id, messageId: r.message_id, kind: "remote", remoteDomain: r.remote_domain, attempts: stamp,
      traceId: r.trace_id, traceSpanId: r.trace_span_id,
    }));
    await dispatchDeliveries(bus, client, items);
    await client.query("COMMIT");
    return ids.length;
  } catch (error) {
    await client.query("ROLLBACK").catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
}

/** Runs the scheduler every intervalMs until stopped. */
export function startScheduler(bus: Bus, pool: Pool, logger: Logger, intervalMs: number): { stop(): Promise<void> } {
  return runEvery(intervalMs, () =>
    scheduleDue(bus, pool)
      .then((count) => count > 0 && logger.info({ count }, "republished due deliveries"))
      .catch((error) => logger.warn({ err: error }, "scheduler failed; will try again")),
  );
}
