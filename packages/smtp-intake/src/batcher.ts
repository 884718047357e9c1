import type { Pool } from "@mailstack/db";
import { insertMessages, type AcceptedMessage, type NewDelivery, type NewMessage } from "@mailstack/queue";
import { mailMetrics } from "@mailstack/telemetry";

interface Pending {
  message: NewMessage;
  deliveries: NewDelivery[];
  resolve: (accepted: AcceptedMessage) => void;
  reject: (error: unknown) => void;
}

export interface AcceptBatcherOptions {
  /** Accept transactions in flight at once; accepts arriving meanwhile wait and go together in the next one. */
  concurrency?: number;
  /** Most messages committed by one transaction. */
  maxBatch?: number;
  /** A message larger than this is committed in a transaction of its own, beside the batches, so it never holds them up. */
  soloAboveBytes?: number;
}

/**
 * Group commit for the accept transaction. A message is committed alone when nothing else
 * is in flight; under load, messages that arrive while earlier commits run are written in
 * one transaction, so one WAL flush covers many messages. Each caller's promise resolves
 * only after the commit that contains its message, so the 250 still follows the commit.
 * If a shared transaction fails, its messages are retried one by one, so one bad message
 * cannot make its neighbours fail. Each transaction is a single statement (insertMessages).
 */
export class AcceptBatcher {
  private readonly pool: Pool;
  private readonly service: string;
  private readonly concurrency: number;
  private readonly maxBatch: number;
  private readonly soloAboveBytes: number;
  private queue: Pending[] = [];
  private inFlight = 0;
  /** Large messages committed alone, beside the batches. */
  private soloInFlight = 0;
  private idleWaiters: Array<() => void> = [];
  /** How many transactions were committed and the most messages one of them held. */
  readonly stats = { transactions: 0, largestBatch: 0 };

  constructor(pool: Pool, service: string, options: AcceptBatcherOptions = {}) {
    this.pool = pool;
    this.service = service;
    this.concurrency = options.concurrency ?? 1;
    this.maxBatch = options.maxBatch ?? 64;
    this.soloAboveBytes = options.soloAboveBytes ?? 1024 * 1024;
  }

  accept(message: NewMessage, deliveries: NewDelivery[]): Promise<AcceptedMessage> {
    if (deliveries.length === 0) return Promise.reject(new Error("a message needs at least one delivery"));
    if (message.raw.length > this.soloAboveBytes) return this.acceptAlone(message, deliveries);
    return new Promise((resolve, reject) => {
      this.queue.push({ message, deliveries, resolve, reject });
      this.pump();
    });
  }

  private async acceptAlone(message: NewMessage, deliveries: NewDelivery[]): Promise<AcceptedMessage> {
    this.soloInFlight++;
    try {
      this.stats.transactions++;
      return (await insertMessages(this.pool, [{ message, deliveries }], this.service))[0]!;
    } finally {
      this.soloInFlight--;
      this.wakeIfIdle();
    }
  }

  /** Resolves when no accept is queued or in flight. */
  idle(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private isIdle(): boolean {
    return this.inFlight === 0 && this.soloInFlight === 0 && this.queue.length === 0;
  }

  private wakeIfIdle(): void {
    if (this.isIdle()) for (const wake of this.idleWaiters.splice(0)) wake();
  }

  private pump(): void {
    while (this.inFlight < this.concurrency && this.queue.length > 0) {
      const batch = this.queue.splice(0, this.maxBatch);
      this.inFlight++;
      void this.commit(batch).finally(() => {
        this.inFlight--;
        this.pump();
        this.wakeIfIdle();
      });
    }
  }

  private async commit(batch: Pending[]): Promise<void> {
    this.stats.transactions++;
    this.stats.largestBatch = Math.max(this.stats.largestBatch, batch.length);
    mailMetrics.acceptBatchSize.observe({ service: this.service }, batch.length);
    // One statement on the pool: its own transaction, one round trip with the commit.
    try {
      const results = await insertMessages(this.pool, batch, this.service);
      batch.forEach((item, i) => item.resolve(results[i]!));
    } catch (error) {
      if (batch.length === 1) return batch[0]!.reject(error);
      for (const item of batch) {
        await insertMessages(this.pool, [item], this.service).then((r) => item.resolve(r[0]!), item.reject);
      }
    }
  }
}
