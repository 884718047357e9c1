import pg from "pg";
import type { Pool } from "./pool.ts";
import { lookupAddress, type AddressLookup } from "./routing.ts";

/** The channel migration 071's triggers notify when domains, accounts (routing columns) or aliases change. */
export const DIRECTORY_CHANNEL = "directory_changed";

export interface DirectoryCacheOptions {
  /** Most addresses kept; the oldest is dropped first. */
  maxEntries?: number;
  /** How long an entry is trusted at most, in case a notification was lost. */
  ttlMs?: number;
  /** Wait before listening again after the listening connection failed. */
  reconnectMs?: number;
}

interface Entry {
  lookup: AddressLookup;
  expiresAt: number;
}

/**
 * Recipient lookups (one query per RCPT, one more per alias hop) served from memory. Every
 * change to the directory commits a NOTIFY (migration 071); the cache listens on its own
 * connection and empties itself on each one. It only serves from memory while that connection
 * listens, so a lost connection means plain queries, never stale answers for long.
 *
 * The race between a query and a change: a lookup whose query ran while a notification arrived
 * is not stored (the generation moved), and an answer stored just before a notification is
 * dropped by it. An address in a served domain that is unknown is never stored: a user created
 * a moment ago must be found at once, and a guesser must not fill the memory.
 */
export class DirectoryCache {
  private readonly pool: Pool;
  private readonly maxEntries: number;
  private readonly ttlMs: number;
  private readonly reconnectMs: number;
  private readonly entries = new Map<string, Entry>();
  private generation = 0;
  private listening = false;
  private stopped = false;
  private client: pg.Client | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  readonly stats = { hits: 0, misses: 0, invalidations: 0 };

  constructor(pool: Pool, options: DirectoryCacheOptions = {}) {
    this.pool = pool;
    this.maxEntries = options.maxEntries ?? 10_000;
    this.ttlMs = options.ttlMs ?? 60_000;
    this.reconnectMs = options.reconnectMs ?? 1_000;
  }

  /** Starts listening; lookups before it succeeds (or while it is down) go to the database. */
  async start(): Promise<void> {
    this.stopped = false;
    await this.listen().catch(() => this.scheduleReconnect());
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.forget();
    const client = this.client;
    this.client = null;
    await client?.end().catch(() => undefined);
  }

  /** True while changes reach this process, so answers may come from memory. */
  isListening(): boolean {
    return this.listening;
  }

  /** What the directory holds under a lookup key (addressKey in @mailstack/mail), as lookupAddress. */
  async lookup(key: string): Promise<AddressLookup> {
    const now = Date.now();
    const cached = this.listening ? this.entries.get(key) : undefined;
    if (cached && cached.expiresAt > now) {
      this.stats.hits++;
      return cached.lookup;
    }
    this.stats.misses++;
    const generation = this.generation;
    const found = await lookupAddress(this.pool, key);
    const unknownLocal = found.localDomain && !found.account && !found.alias && !found.catchAll;
    if (this.listening && generation === this.generation && !unknownLocal) {
      if (this.entries.size >= this.maxEntries) this.entries.delete(this.entries.keys().next().value!);
      this.entries.set(key, { lookup: found, expiresAt: now + this.ttlMs });
    }
    return found;
  }

  private forget(): void {
    this.generation++;
    this.entries.clear();
  }

  private async listen(): Promise<void> {
    const client = new pg.Client({ ...this.pool.options, application_name: "mailstack-directory-cache" } as pg.ClientConfig);
    client.on("notification", () => {
      this.stats.invalidations++;
      this.forget();
    });
    const lost = () => {
      if (this.client !== client) return;
      this.client = null;
      this.listening = false;
      this.forget();
      client.end().catch(() => undefined);
      this.scheduleReconnect();
    };
    client.on("error", lost);
    client.on("end", lost);
    await client.connect();
    await client.query(`LISTEN ${DIRECTORY_CHANNEL}`);
    if (this.stopped) {
      await client.end().catch(() => undefined);
      return;
    }
    this.client = client;
    // Anything stored before this point may predate a change nobody told us about.
    this.forget();
    this.listening = true;
  }

  private scheduleReconnect(): void {
    if (this.stopped || this.retryTimer) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.listen().catch(() => this.scheduleReconnect());
    }, this.reconnectMs);
    this.retryTimer.unref();
  }
}
