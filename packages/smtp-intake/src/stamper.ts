import type { Pool } from "@mailstack/db";
import { stampDispatched } from "@mailstack/queue";
import type { Logger } from "@mailstack/telemetry";

/**
 * Batches the dispatched_at stamps of deliveries published after their commit: everything
 * published within lingerMs (well under the sweeper's undispatched threshold) is stamped, with
 * its publish time, by one UPDATE committed without waiting for the WAL flush (synchronous_commit
 * off). The stamp tells the sweeper a queued delivery was published and the journey when. A
 * stamp lost in a crash only makes the sweeper republish, and the consumers ignore a delivery
 * already final; the message itself was committed durably before its 250.
 */
export class DispatchStamper {
  private readonly pool: Pool;
  private readonly logger: Logger;
  private readonly lingerMs: number;
  /** Published deliveries not yet stamped, with their publish time. */
  private pending: Array<{ id: number; at: Date }> = [];
  private waiters: Array<{ resolve: () => void; reject: (error: unknown) => void }> = [];
  private running: Promise<void> | null = null;
  private wake: (() => void) | null = null;

  constructor(pool: Pool, logger: Logger, options: { lingerMs?: number } = {}) {
    this.pool = pool;
    this.logger = logger;
    this.lingerMs = options.lingerMs ?? 500;
  }

  mark(deliveryIds: number[]): Promise<void> {
    return new Promise((resolve, reject) => {
      const at = new Date();
      for (const id of deliveryIds) this.pending.push({ id, at });
      this.waiters.push({ resolve, reject });
      this.running ??= this.run();
    });
  }

  /** Stamps what is pending now, without lingering, and resolves when nothing is left. */
  async idle(): Promise<void> {
    while (this.running) {
      this.wake?.();
      await this.running;
    }
  }

  private linger(): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.wake = null;
        resolve();
      }, this.lingerMs);
      this.wake = () => {
        clearTimeout(timer);
        this.wake = null;
        resolve();
      };
    });
  }

  private async run(): Promise<void> {
    while (this.pending.length > 0) {
      await this.linger();
      const stamps = this.pending.splice(0);
      const waiters = this.waiters.splice(0);
      try {
        // On the pool, one statement is its own transaction, so its commit may be asynchronous.
        await stampDispatched(this.pool, stamps, { asyncCommit: true });
        for (const w of waiters) w.resolve();
      } catch (error) {
        this.logger.warn({ err: error, count: stamps.length }, "could not stamp dispatched deliveries; the sweeper will republish them");
        for (const w of waiters) w.reject(error);
      }
    }
    this.running = null;
  }
}
