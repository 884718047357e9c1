/**
 * Gathers items into batches with one flush in flight at a time: items added while a flush runs
 * go together in the next one, so a busy worker sends few, large statements and an idle one
 * sends each item at once (after the current event-loop turn).
 */
export class SerialBatches<T> {
  private readonly flush: (items: T[]) => Promise<void>;
  private items: T[] = [];
  private running = false;

  /** `flush` must not throw: it settles each item's own promise. */
  constructor(flush: (items: T[]) => Promise<void>) {
    this.flush = flush;
  }

  add(item: T): void {
    this.items.push(item);
    if (this.running) return;
    this.running = true;
    setImmediate(() => void this.drain());
  }

  private async drain(): Promise<void> {
    while (this.items.length > 0) {
      const batch = this.items;
      this.items = [];
      await this.flush(batch);
    }
    this.running = false;
  }
}
