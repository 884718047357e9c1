import { Subjects, publish, type Bus } from "@mailstack/bus";
import type { Pool, Queryable } from "@mailstack/db";
import { journeyContext } from "@mailstack/telemetry";

/** What a local delivery job on mail.deliver.local carries: ids only. */
export interface LocalJob {
  deliveryId: number;
  messageId: number;
}

/** One relay job on mail.relay.outbound: one message, one destination domain, its recipients there. */
export interface RelayJob {
  messageId: number;
  domain: string;
  deliveryIds: number[];
}

export interface DispatchItem {
  id: number;
  messageId: number;
  kind: "local" | "remote";
  remoteDomain: string | null;
  attempts: number;
  /**
   * The message's stored trace (messages.trace_id, trace_span_id), for a republish outside the
   * accepting session (scheduler, sweeper): the job then continues the message's journey instead
   * of starting a trace of its own. Without them the active context is used.
   */
  traceId?: string | null;
  traceSpanId?: string | null;
}

type GroupedRelayJob = RelayJob & { attempts: number; traceId?: string | null; traceSpanId?: string | null };

/** Groups remote deliveries into relay jobs by (message, domain). */
export function relayJobs(items: DispatchItem[]): GroupedRelayJob[] {
  const jobs = new Map<string, GroupedRelayJob>();
  for (const item of items) {
    if (item.kind !== "remote") continue;
    const key = `${item.messageId}:${item.remoteDomain}`;
    const job = jobs.get(key) ?? { messageId: item.messageId, domain: item.remoteDomain!, deliveryIds: [], attempts: 0, traceId: item.traceId, traceSpanId: item.traceSpanId };
    job.deliveryIds.push(item.id);
    job.attempts = Math.max(job.attempts, item.attempts);
    jobs.set(key, job);
  }
  return [...jobs.values()];
}

/**
 * Publishes jobs for deliveries that are committed, then marks them dispatched.
 * Msg ids are derived from the delivery ids (and the attempt count for relay jobs,
 * so a retry is not mistaken for a duplicate), so JetStream drops a repeated publish.
 */
export interface DispatchOptions {
  /**
   * Stamps dispatched_at for the published delivery ids instead of one UPDATE here (a caller
   * dispatching many messages can batch the stamps; a lost stamp only means the sweeper
   * republishes, and JetStream drops the duplicate).
   */
  markDispatched?: (deliveryIds: number[]) => Promise<void>;
}

/**
 * Records when deliveries were published (`dispatched_at`, which the sweeper reads). The rows are
 * locked in id order, as the MDA and the relay workers lock deliveries, so no two of them can
 * deadlock whatever plan the update gets. With asyncCommit the statement, which must then be its
 * own transaction, commits without waiting for the WAL flush: a lost stamp only means a republish.
 */
export async function stampDispatched(db: Queryable, stamps: Array<{ id: number; at: Date }>, options: { asyncCommit?: boolean } = {}): Promise<void> {
  if (stamps.length === 0) return;
  const sorted = [...stamps].sort((a, b) => a.id - b.id);
  const asyncCommit = options.asyncCommit ? "async_commit AS (SELECT set_config('synchronous_commit', 'off', true))," : "";
  await db.query(
    `WITH ${asyncCommit}
     locked AS (SELECT id FROM deliveries WHERE id = ANY($1) AND dispatched_at IS NULL ORDER BY id FOR NO KEY UPDATE)
     UPDATE deliveries d SET dispatched_at = t.at FROM ${options.asyncCommit ? "async_commit, " : ""}locked, unnest($1::bigint[], $2::timestamptz[]) AS t(id, at)
      WHERE d.id = locked.id AND d.id = t.id`,
    [sorted.map((s) => s.id), sorted.map((s) => s.at)],
  );
}

export async function dispatchDeliveries(bus: Bus, db: Queryable, items: DispatchItem[], options: DispatchOptions = {}): Promise<void> {
  if (items.length === 0) return;
  const published: number[] = [];
  const work: Array<Promise<unknown>> = [];
  for (const item of items) {
    if (item.kind !== "local") continue;
    const job: LocalJob = { deliveryId: item.id, messageId: item.messageId };
    const context = journeyContext(item.traceId, item.traceSpanId);
    work.push(publish(bus, Subjects.deliverLocal, job, { msgId: `local-${item.id}-${item.attempts}`, context }).then(() => published.push(item.id)));
  }
  for (const job of relayJobs(items)) {
    const { attempts, traceId, traceSpanId, ...payload } = job;
    const msgId = `relay-${job.messageId}-${job.domain}-${job.deliveryIds[0]}-${attempts}`;
    const context = journeyContext(traceId, traceSpanId);
    work.push(publish(bus, Subjects.relayOutbound, payload, { msgId, context }).then(() => published.push(...job.deliveryIds)));
  }
  const results = await Promise.allSettled(work);
  if (published.length > 0) {
    if (options.markDispatched) await options.markDispatched(published);
    else await stampDispatched(db, published.map((id) => ({ id, at: new Date() })));
  }
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
}

/** Publishes the jobs of a just-committed message. A failure here is repaired by the sweeper. */
export async function dispatchAccepted(
  bus: Bus,
  pool: Pool,
  accepted: { messageId: number; deliveries: Array<{ id: number; kind: "local" | "remote"; remoteDomain: string | null }> },
  options: DispatchOptions = {},
): Promise<void> {
  await dispatchDeliveries(
    bus,
    pool,
    accepted.deliveries.map((d) => ({ id: d.id, messageId: accepted.messageId, kind: d.kind, remoteDomain: d.remoteDomain, attempts: 0 })),
    options,
  );
}
