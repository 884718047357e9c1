import type { Pool } from "@mailstack/db";

/** SQL for the start of the current fixed window of $1 seconds. */
const WINDOW_START = "to_timestamp(floor(extract(epoch FROM now()) / $1::float8) * $1::float8)";

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

/**
 * Per-account sending limits over fixed windows, counted in PostgreSQL so every replica
 * shares them. Checked at MAIL (messages) and RCPT (recipients), counted after a commit.
 */
export function createSubmissionLimiter(pool: Pool, limits: SubmissionLimits) {
  const windowSeconds = Math.max(1, Math.round(limits.windowMs / 1000));
  const unlimited = limits.maxMessages === 0 && limits.maxRecipients === 0;
  return {
    limits,
    async usage(accountId: number): Promise<Usage> {
      if (unlimited) return { messages: 0, recipients: 0 };
      const result = await pool.query<Usage>(
        `SELECT messages, recipients FROM submission_counters WHERE account_id = $2 AND window_start = ${WINDOW_START}`,
        [windowSeconds, accountId],
      );
      return result.rows[0] ?? { messages: 0, recipients: 0 };
    },
    /** True when one more message is allowed. */
    messageAllowed(usage: Usage): boolean {
      return limits.maxMessages === 0 || usage.messages < limits.maxMessages;
    },
    /** True when one more recipient is allowed, given the ones already accepted in this transaction. */
    recipientAllowed(usage: Usage, inTransaction: number): boolean {
      return limits.maxRecipients === 0 || usage.recipients + inTransaction < limits.maxRecipients;
    },
    async record(accountId: number, recipients: number): Promise<void> {
      if (unlimited) return;
      await pool.query(
        `INSERT INTO submission_counters (account_id, window_start, messages, recipients)
         VALUES ($2, ${WINDOW_START}, 1, $3)
         ON CONFLICT (account_id, window_start)
         DO UPDATE SET messages = submission_counters.messages + 1, recipients = submission_counters.recipients + $3`,
        [windowSeconds, accountId, recipients],
      );
    },
  };
}

export type SubmissionLimiter = ReturnType<typeof createSubmissionLimiter>;
