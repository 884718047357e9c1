import type { Bus } from "@mailstack/bus";
import type { Pool } from "@mailstack/db";
import type { Logger } from "@mailstack/telemetry";
import { dispatchDeliveries, type DispatchItem } from "./dispatch.ts";
import { runEvery } from "./periodic.ts";

export interface SweepOptions {
  /** A queued delivery never dispatched for this long is republished (the accepting process died between commit and publish). */
  undispatchedAfterMs?: number;
  /** A queued delivery dispatched this long ago but still queued is republished (its job was lost). */
  stuckAfterMs?: number;
  batchSize?: number;
  kind?: "local" | "remote";
}

/**
 * Republishes queued deliveries that were never dispatched, or whose job seems lost.
 * Rows are claimed with FOR UPDATE SKIP LOCKED so every replica can run it.
 */
export async function sweepUndispatched(bus: Bus, pool: Pool, options: SweepOptions = {}): Promise<number> {
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    const result = await client.query<{ id: number; message_id: number; kind: "local" | "remote"; remote_domain: string | null; attempts: number; trace_id: string | null; trace_span_id: string | null }>(
      `SELECT d.id, d.message_id, d.kind, d.remote_domain, d.attempts, m.trace_id, m.trace_span_id
         FROM deliveries d JOIN messages m ON m.id = d.message_id
        WHERE d.state = 'queued'
          AND ((d.dispatched_at IS NULL AND d.created_at < now() - make_interval(secs => $1::float8 / 1000))
            OR (d.dispatched_at < now() - make_interval(secs => $2::float8 / 1000)))
          AND ($4::text IS NULL OR d.kind = $4)
        ORDER BY d.id LIMIT $3 FOR UPDATE OF d SKIP LOCKED`,
      [options.undispatchedAfterMs ?? 15_000, options.stuckAfterMs ?? 600_000, options.batchSize ?? 500, options.kind ?? null],
    );
    const items: DispatchItem[] = result.rows.map((r) => ({
      id: r.id,
      messageId: r.message_id,
      kind: r.kind,
      remoteDomain: r.remote_domain,
      // A republish after the duplicate window must not be dropped as a duplicate: vary the id.
      attempts: r.attempts + Math.floor(Date.now() / 1000),
      traceId: r.trace_id,
      traceSpanId: r.trace_span_id,
    }));
    if (items.length > 0) {
      await client.query("UPDATE deliveries SET dispatched_at = NULL WHERE id = ANY($1)", [items.map((i) => i.id)]);
      await dispatchDeliveries(bus, client, items);
    }
    await client.query("COMMIT");
    return items.length;
  } catch (error) {
    await client.query("ROLLBACK").catch(() => undefined);
    throw error;
  } finally {
    client.release();
  }
}

/** Runs the sweeper every intervalMs until stopped. */
export function startSweeper(bus: Bus, pool: Pool, logger: Logger, intervalMs = 10_000, options: SweepOptions = {}): { stop(): Promise<void> } {
  return runEvery(intervalMs, () =>
    sweepUndispatched(bus, pool, options)
      .then((count) => count > 0 && logger.info({ count }, "republished undispatched deliveries"))
      .catch((error) => logger.warn({ err: error }, "sweeper failed; will try again")),
  );
}
