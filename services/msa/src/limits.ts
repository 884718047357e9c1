import type { Pool } from "@mailstack/db";

export interface SubmissionLimits {
  /** Messages per account per window; 0 means no limit. */
  maxMessages: number;
  /** Recipients (RCPT commands accepted) per account per window; 0 means no limit. */
  maxRecipients: number;
  windowMs: number;
}

export interface Usage {
  messages: number;
  recipients: number;
}

export interface LimiterTiming {
  /** How long counts recorded here wait to be written, together, to PostgreSQL. */
  flushMs?: number;
  /** How long a count read from PostgreSQL (every replica's) is reused before it is read again. */
  refreshMs?: number;
  /** Told when a timed write failed (the counts are kept and written with the next one). */
  onFlushError?: (error: unknown) => void;
}

interface AccountCount {
  /** Start of the window (epoch ms) the counts belong to. */
  window: number;
  /** Every replica's count as last read, plus what this process wrote since. */
  shared: Usage;
  readAt: number;
  /** Recorded here, not written yet. */
  pending: Usage;
}

const MAX_ACCOUNTS = 100_000;

/**
 * Per-account sending limits over fixed windows, counted in PostgreSQL so every replica shares
 * them. Checked at MAIL (messages) and RCPT (recipients), counted after a commit.
 *
 * A message costs no query of its own: an account's count is read at most once per refreshMs,
 * and what this process counts is added at once to what it answers and written every flushMs,
 * all accounts in one statement. Within one process the limit is exact; across replicas it
 * lags by up to refreshMs + flushMs, as a rate limit may.
 */
export function createSubmissionLimiter(pool: Pool, limits: SubmissionLimits, timing: LimiterTiming = {}) {
  const windowMs = Math.max(1000, Math.round(limits.windowMs / 1000) * 1000);
  const flushMs = timing.flushMs ?? 200;
  const refreshMs = timing.refreshMs ?? 1000;
  const unlimited = limits.maxMessages === 0 && limits.maxRecipients === 0;
  const counts = new Map<number, AccountCount>();
  let flushTimer: NodeJS.Timeout | null = null;
  let flushing: Promise<void> | null = null;

  /** Counts of a window that ended before they were written. */
  const leftovers: Array<{ accountId: number; window: number; usage: Usage }> = [];
  const windowOf = (now: number) => Math.floor(now / windowMs) * windowMs;

  function entry(accountId: number, now: number): AccountCount {
    const window = windowOf(now);
    let count = counts.get(accountId);
    if (!count || count.window !== window) {
      // A new window: what was pending for the old one still gets written by the next flush.
      if (count && (count.pending.messages > 0 || count.pending.recipients > 0)) leftovers.push({ accountId, window: count.window, usage: count.pending });
      count = { window, shared: { messages: 0, recipients: 0 }, readAt: 0, pending: { messages: 0, recipients: 0 } };
      if (counts.size >= MAX_ACCOUNTS) counts.clear();
      counts.set(accountId, count);
    }
    return count;
  }

  async function flush(): Promise<void> {
    flushTimer = null;
    const earlier = leftovers.splice(0);
    const rows = [...earlier];
    const taken: Array<{ accountId: number; count: AccountCount; usage: Usage }> = [];
    for (const [accountId, count] of counts) {
      if (count.pending.messages === 0 && count.pending.recipients === 0) continue;
      rows.push({ accountId, window: count.window, usage: count.pending });
      taken.push({ accountId, count, usage: count.pending });
      count.pending = { messages: 0, recipients: 0 };
    }
    if (rows.length === 0) return;
    try {
      await pool.query(
        `INSERT INTO submission_counters (account_id, window_start, messages, recipients)
         SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::int[], $4::int[])
         ON CONFLICT (account_id, window_start)
         DO UPDATE SET messages = submission_counters.messages + EXCLUDED.messages,
                       recipients = submission_counters.recipients + EXCLUDED.recipients`,
        [rows.map((r) => r.accountId), rows.map((r) => new Date(r.window)), rows.map((r) => r.usage.messages), rows.map((r) => r.usage.recipients)],
      );
      for (const { count, usage } of taken) {
        count.shared.messages += usage.messages;
        count.shared.recipients += usage.recipients;
      }
    } catch (error) {
      // Written with the next flush; nothing is lost. A count whose window ended meanwhile
      // (its entry replaced) waits with the other leftovers.
      leftovers.push(...earlier);
      for (const { accountId, count, usage } of taken) {
        if (counts.get(accountId) === count) {
          count.pending.messages += usage.messages;
          count.pending.recipients += usage.recipients;
        } else {
          leftovers.push({ accountId, window: count.window, usage });
        }
      }
      schedule();
      throw error;
    }
  }

  function schedule(): void {
    if (flushTimer || unlimited) return;
    flushTimer = setTimeout(() => {
      flushing = flush().catch((error) => timing.onFlushError?.(error)).finally(() => (flushing = null));
    }, flushMs);
    flushTimer.unref();
  }

  return {
    limits,
    async usage(accountId: number): Promise<Usage> {
      if (unlimited) return { messages: 0, recipients: 0 };
      const now = Date.now();
      const count = entry(accountId, now);
      if (now - count.readAt >= refreshMs) {
        const result = await pool.query<Usage>(
          "SELECT messages, recipients FROM submission_counters WHERE account_id = $1 AND window_start = $2",
          [accountId, new Date(count.window)],
        );
        const row = result.rows[0];
        count.shared = { messages: row?.messages ?? 0, recipients: row?.recipients ?? 0 };
        count.readAt = now;
      }
      return { messages: count.shared.messages + count.pending.messages, recipients: count.shared.recipients + count.pending.recipients };
    },
    /** True when one more message is allowed. */
    messageAllowed(usage: Usage): boolean {
      return limits.maxMessages === 0 || usage.messages < limits.maxMessages;
    },
    /** True when one more recipient is allowed, given the ones already accepted in this transaction. */
    recipientAllowed(usage: Usage, inTransaction: number): boolean {
      return limits.maxRecipients === 0 || usage.recipients + inTransaction < limits.maxRecipients;
    },
    /** Counts a committed submission; written to PostgreSQL with the next flush. */
    record(accountId: number, recipients: number): void {
      if (unlimited) return;
      const count = entry(accountId, Date.now());
      count.pending.messages += 1;
      count.pending.recipients += recipients;
      schedule();
    },
    /** Writes what is counted but not written yet (graceful shutdown). */
    async flush(): Promise<void> {
      if (flushTimer) clearTimeout(flushTimer);
      flushTimer = null;
      await flushing;
      await flush();
    },
  };
}

export type SubmissionLimiter = ReturnType<typeof createSubmissionLimiter>;
