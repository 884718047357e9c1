import { Subjects, publish, type Bus } from "@mailstack/bus";
import type { Pool, Queryable } from "@mailstack/db";

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
}

/** Groups remote deliveries into relay jobs by (message, domain). */
export function relayJobs(items: DispatchItem[]): Array<RelayJob & { attempts: number }> {
  const jobs = new Map<string, RelayJob & { attempts: number }>();
  for (const item of items) {
    if (item.kind !== "remote") continue;
    const key = `${item.messageId}:${item.remoteDomain}`;
    const job = jobs.get(key) ?? { messageId: item.messageId, domain: item.remoteDomain!, deliveryIds: [], attempts: 0 };
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

export async function dispatchDeliveries(bus: Bus, db: Queryable, items: DispatchItem[], options: DispatchOptions = {}): Promise<void> {
  if (items.length === 0) return;
  const published: number[] = [];
  const work: Array<Promise<unknown>> = [];
  for (const item of items) {
    if (item.kind !== "local") continue;
    const job: LocalJob = { deliveryId: item.id, messageId: item.messageId };
    work.push(publish(bus, Subjects.deliverLocal, job, { msgId: `local-${item.id}-${item.attempts}` }).then(() => published.push(item.id)));
  }
  for (const job of relayJobs(items)) {
    const { attempts, ...payload } = job;
    const msgId = `relay-${job.messageId}-${job.domain}-${job.deliveryIds[0]}-${attempts}`;
    work.push(publish(bus, Subjects.relayOutbound, payload, { msgId }).then(() => published.push(...job.deliveryIds)));
  }
  const results = await Promise.allSettled(work);
  if (published.length > 0) {
    if (options.markDispatched) await options.markDispatched(published);
    else {
      // Locked in id order, as every other writer of deliveries locks them.
      await db.query(
        `WITH locked AS (SELECT id FROM deliveries WHERE id = ANY($1) AND dispatched_at IS NULL ORDER BY id FOR NO KEY UPDATE)
         UPDATE deliveries d SET dispatched_at = now() FROM locked WHERE d.id = locked.id`,
        [published],
      );
    }
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
