import type { SmtpConnection } from "./smtp-client.ts";

/** A counting semaphore per key (per-destination concurrency). */
export class KeyedLimiter {
  private readonly limit: number;
  private readonly active = new Map<string, number>();
  private readonly waiting = new Map<string, Array<() => void>>();

  constructor(limit: number) {
    this.limit = limit;
  }

  async acquire(key: string): Promise<() => void> {
    while ((this.active.get(key) ?? 0) >= this.limit) {
      await new Promise<void>((resolve) => {
        const list = this.waiting.get(key) ?? [];
        list.push(resolve);
        this.waiting.set(key, list);
      });
    }
    this.active.set(key, (this.active.get(key) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const count = (this.active.get(key) ?? 1) - 1;
      if (count === 0) this.active.delete(key);
      else this.active.set(key, count);
      const list = this.waiting.get(key);
      const next = list?.shift();
      if (list && list.length === 0) this.waiting.delete(key);
      next?.();
    };
  }
}

export interface PoolOptions {
  /** Connections open at once to one host address (active and idle). */
  maxPerHost: number;
  /** How long an idle connection is kept for the next job. */
  idleMs: number;
  /** Transactions on one connection before it is closed. */
  maxTransactions: number;
}

interface Idle {
  connection: SmtpConnection;
  hostKey: string;
  timer: NodeJS.Timeout;
}

/**
 * Reuses SMTP connections for several jobs to the same host (keyed by address, port and
 * TLS/auth settings) and caps the connections per host address, counting idle ones too.
 */
export class ConnectionPool {
  private readonly options: PoolOptions;
  private readonly idle = new Map<string, Idle[]>();
  private readonly open = new Map<string, number>();
  private readonly waiting = new Map<string, Array<() => void>>();
  private closing = false;

  constructor(options: PoolOptions) {
    this.options = options;
  }

  /**
   * An idle connection for key, or a new one from open() when the host has room; waits otherwise.
   * fresh: never an idle one (the retry after a pooled connection turned out stale, when the others may be too).
   */
  async acquire(key: string, hostKey: string, open: () => Promise<SmtpConnection>, fresh = false): Promise<{ connection: SmtpConnection; reused: boolean }> {
    for (;;) {
      const idle = fresh ? null : this.takeIdle(key);
      if (idle) return { connection: idle, reused: true };
      if ((this.open.get(hostKey) ?? 0) < this.options.maxPerHost) {
        this.open.set(hostKey, (this.open.get(hostKey) ?? 0) + 1);
        try {
          return { connection: await open(), reused: false };
        } catch (error) {
          this.closed(hostKey);
          throw error;
        }
      }
      // At the limit: an idle connection of another key to this host may be closed to make room.
      if (this.evictOther(hostKey)) continue;
      await new Promise<void>((resolve) => {
        const list = this.waiting.get(hostKey) ?? [];
        list.push(resolve);
        this.waiting.set(hostKey, list);
      });
    }
  }

  /** Returns a connection after its transaction: kept idle for reuse, or closed. */
  release(key: string, hostKey: string, connection: SmtpConnection): void {
    if (this.closing || !connection.reusable || connection.transactions >= this.options.maxTransactions) {
      void connection.quit().catch(() => undefined);
      this.closed(hostKey);
      return;
    }
    const timer = setTimeout(() => {
      const list = this.idle.get(key);
      const index = list?.findIndex((i) => i.connection === connection) ?? -1;
      if (list && index >= 0) {
        list.splice(index, 1);
        if (list.length === 0) this.idle.delete(key);
        void connection.quit().catch(() => undefined);
        this.closed(hostKey);
      }
    }, this.options.idleMs);
    timer.unref();
    const list = this.idle.get(key) ?? [];
    list.push({ connection, hostKey, timer });
    this.idle.set(key, list);
    this.wake(hostKey);
  }

  private takeIdle(key: string): SmtpConnection | null {
    const list = this.idle.get(key);
    while (list && list.length > 0) {
      const item = list.pop()!;
      clearTimeout(item.timer);
      if (list.length === 0) this.idle.delete(key);
      if (item.connection.reusable) return item.connection;
      void item.connection.quit().catch(() => undefined);
      this.closed(item.hostKey);
    }
    return null;
  }

  private evictOther(hostKey: string): boolean {
    for (const [key, list] of this.idle) {
      const index = list.findIndex((i) => i.hostKey === hostKey);
      if (index < 0) continue;
      const [item] = list.splice(index, 1);
      if (list.length === 0) this.idle.delete(key);
      clearTimeout(item!.timer);
      void item!.connection.quit().catch(() => undefined);
      this.closed(hostKey);
      return true;
    }
    return false;
  }

  private closed(hostKey: string): void {
    const count = (this.open.get(hostKey) ?? 1) - 1;
    if (count <= 0) this.open.delete(hostKey);
    else this.open.set(hostKey, count);
    this.wake(hostKey);
  }

  private wake(hostKey: string): void {
    const list = this.waiting.get(hostKey);
    const next = list?.shift();
    if (list && list.length === 0) this.waiting.delete(hostKey);
    next?.();
  }

  /** Closes idle connections (QUIT) and refuses to keep more. */
  async close(): Promise<void> {
    this.closing = true;
    const quits: Array<Promise<void>> = [];
    for (const list of this.idle.values()) {
      for (const item of list) {
        clearTimeout(item.timer);
        quits.push(item.connection.quit().catch(() => undefined));
      }
    }
    this.idle.clear();
    await Promise.all(quits);
  }
}
