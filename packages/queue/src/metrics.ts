import { Gauge, registry } from "@mailstack/telemetry";
import type { Pool } from "@mailstack/db";

let registered = false;

/**
 * Exposes the queue depth (deliveries not yet final, by state and kind) on /metrics, read
 * from PostgreSQL at scrape time. Register it in one service per process.
 */
export function registerQueueDepthMetric(pool: Pool): void {
  if (registered) return;
  registered = true;
  new Gauge({
    name: "mail_queue_depth",
    help: "Deliveries waiting (queued or deferred), by state and kind",
    labelNames: ["state", "kind"] as const,
    registers: [registry],
    async collect() {
      const result = await pool.query<{ state: string; kind: string; n: number }>(
        `SELECT state, kind, count(*)::int AS n FROM deliveries
          WHERE state IN ('queued', 'deferred') GROUP BY state, kind`,
      );
      this.reset();
      for (const state of ["queued", "deferred"]) for (const kind of ["local", "remote"]) this.set({ state, kind }, 0);
      for (const row of result.rows) this.set({ state: row.state, kind: row.kind }, row.n);
    },
  });
}
