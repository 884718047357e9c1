import type { Pool } from "@mailstack/db";

export interface DatabaseReadinessOptions {
  /** A pooled client returned healthy this recently shows PostgreSQL answering. */
  recentMs?: number;
  /** How long `SELECT 1` may take before the database counts as not ready. */
  timeoutMs?: number;
}

/**
 * The database half of /readyz. A busy pool answers for itself: a client returned without error
 * in the last `recentMs` shows PostgreSQL answering, so the probe does not queue `SELECT 1` behind
 * the work. Queued, it could time out on a saturated pool and take a healthy pod out of its load
 * balancer exactly under load. An idle pool, or one whose clients fail, is asked `SELECT 1`,
 * bounded by `timeoutMs`.
 */
export function databaseReadiness(pool: Pool, options: DatabaseReadinessOptions = {}): () => Promise<boolean> {
  const recentMs = options.recentMs ?? 5_000;
  const timeoutMs = options.timeoutMs ?? 2_000;
  let lastHealthyAt = 0;
  pool.on("release", (error: Error | undefined) => {
    if (!error) lastHealthyAt = Date.now();
  });
  return async () => {
    if (Date.now() - lastHealthyAt < recentMs) return true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    try {
      return await Promise.race([pool.query("SELECT 1").then(() => true, () => false), timedOut]);
    } finally {
      clearTimeout(timer);
    }
  };
}
