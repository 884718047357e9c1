/** Delivery states after which nothing more happens to a delivery. */
export const FINAL_STATES: ReadonlySet<string> = new Set(["delivered", "bounced", "cancelled"]);

/**
 * SQL: the delivery in `column` is still pending (queued or deferred), for statements that find
 * their rows by id. Written as "not final" on purpose: `state IN ('queued', 'deferred')` would let
 * the planner read the rows through the partial index deliveries_pending, which it believes tiny
 * while the table's statistics are young, and scan every pending row instead of looking a few up
 * by primary key. The queue's own scans (sweeper, scheduler, queue views) use the IN form.
 */
export function stillPending(column = "state"): string {
  return `${column} NOT IN (${[...FINAL_STATES].map((s) => `'${s}'`).join(", ")})`;
}
