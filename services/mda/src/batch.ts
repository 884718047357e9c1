import { FINAL_STATES } from "@mailstack/queue";
import { mailMetrics } from "@mailstack/telemetry";
import {
  ROW_COLUMNS, SERVICE, decideFor, deliverLocal, headerPrefix, logOutcome, observeFiled, wantsSuccessNotice,
  type DeliverContext, type Outcome, type Row,
} from "./deliver.ts";
import { mdaMetrics } from "./metrics.ts";
import { parseMessage } from "./parse.ts";

/** Messages up to this size are fetched for parsing together with the rest of a batch. */
const BULK_PARSE_LIMIT = 256 * 1024;

interface Waiting {
  deliveryId: number;
  resolve: (outcome: Outcome) => void;
  reject: (error: unknown) => void;
}

interface Planned {
  row: Row;
  folder: string;
  prefix: Buffer;
  size: number;
}

/**
 * Files many deliveries per transaction, so that one commit (one WAL flush) and one hold of
 * a busy account's row serve a whole batch. Batching is natural: while a batch is being
 * filed, new jobs queue up and form the next one; nobody waits for a timer. Each job's
 * promise resolves only after the transaction holding its copy committed, so the consumer
 * still acks after commit. Anything but the plain case (rules that act, spam, a full
 * mailbox, a missing account) goes through deliverLocal's per-delivery transaction, and so
 * does a whole batch whose transaction failed, so one bad row never blocks the others.
 */
export class DeliveryBatcher {
  private readonly ctx: DeliverContext;
  private readonly maxBatch: number;
  private readonly maxParallel: number;
  private queue: Waiting[] = [];
  private running = 0;

  constructor(ctx: DeliverContext, options: { maxBatch?: number; maxParallel?: number } = {}) {
    this.ctx = ctx;
    this.maxBatch = options.maxBatch ?? 64;
    this.maxParallel = options.maxParallel ?? 2;
  }

  deliver(deliveryId: number): Promise<Outcome> {
    return new Promise<Outcome>((resolve, reject) => {
      this.queue.push({ deliveryId, resolve, reject });
      this.pump();
    });
  }

  private pump(): void {
    while (this.running < this.maxParallel && this.queue.length > 0) {
      const batch = this.queue.splice(0, this.maxBatch);
      this.running++;
      void this.flush(batch).finally(() => {
        this.running--;
        this.pump();
      });
    }
  }

  private async flush(batch: Waiting[]): Promise<void> {
    let outcomes: Map<number, Outcome>;
    let slow: number[];
    // Each delivery filed by the batch took as long as the batch's transaction.
    const started = performance.now();
    try {
      ({ outcomes, slow } = await this.fileBatch(batch.map((w) => w.deliveryId)));
    } catch (error) {
      this.ctx.logger.warn({ err: error, size: batch.length }, "batch filing failed; filing one by one");
      outcomes = new Map();
      slow = batch.map((w) => w.deliveryId);
    }
    const seconds = (performance.now() - started) / 1000;
    mdaMetrics.batchSize.observe(batch.length);
    for (const waiting of batch) {
      const outcome = outcomes.get(waiting.deliveryId);
      if (outcome) {
        mdaMetrics.handleSeconds.observe(seconds);
        mdaMetrics.outcomes.inc({ outcome: outcome.status });
        waiting.resolve(outcome);
      }
    }
    const slowSet = new Set(slow);
    await Promise.all(
      batch
        .filter((w) => slowSet.has(w.deliveryId) && !outcomes.has(w.deliveryId))
        .map((w) => deliverLocal(this.ctx, w.deliveryId).then(w.resolve, w.reject)),
    );
  }

  /** Files the plain cases of a batch in one transaction; returns their outcomes and the ids left for the general path. */
  private async fileBatch(ids: number[]): Promise<{ outcomes: Map<number, Outcome>; slow: number[] }> {
    const outcomes = new Map<number, Outcome>();
    const slow: number[] = [];
    const unique = [...new Set(ids)];
    // The rows, with the raw bytes of small unparsed messages, in one query; a large one is fetched
    // alone, so a batch never holds many large messages in memory at once.
    const rows = (await this.ctx.pool.query<Row & { raw: Buffer | null }>(
      `SELECT ${ROW_COLUMNS}, CASE WHEN p.parsed IS NULL AND m.size <= $2 THEN m.raw END AS raw
         FROM deliveries d JOIN messages m ON m.id = d.message_id LEFT JOIN message_parsed p ON p.message_id = m.id
              LEFT JOIN accounts a ON a.id = d.account_id
        WHERE d.id = ANY($1)`,
      [unique, BULK_PARSE_LIMIT],
    )).rows;
    const byId = new Map(rows.map((r) => [r.id, r]));

    // Parse once per message; what is parsed here is stored with the filing transaction.
    const parsedByMessage = new Map<number, NonNullable<Row["parsed"]>>();
    for (const row of rows) {
      if (row.parsed || parsedByMessage.has(row.message_id)) continue;
      let raw = row.raw;
      if (!raw) {
        const one = await this.ctx.pool.query<{ raw: Buffer }>("SELECT raw FROM messages WHERE id = $1", [row.message_id]);
        raw = one.rows[0]?.raw ?? null;
      }
      if (raw) parsedByMessage.set(row.message_id, await parseMessage(raw));
    }

    const planned: Planned[] = [];
    for (const id of unique) {
      const row = byId.get(id);
      if (!row) {
        outcomes.set(id, { status: "missing" });
        continue;
      }
      if (FINAL_STATES.has(row.state) || row.kind !== "local") {
        outcomes.set(id, { status: "duplicate", state: row.state });
        continue;
      }
      row.parsed ??= parsedByMessage.get(row.message_id) ?? null;
      if (row.account_id === null || row.address === null || row.disabled || wantsSuccessNotice(row)) {
        slow.push(id);
        continue;
      }
      const decision = decideFor(row);
      if (decision.kind !== "file" || decision.ruleId !== null || decision.reason !== "default") {
        slow.push(id);
        continue;
      }
      const prefix = headerPrefix(row.envelope_from, row.final_recipient);
      planned.push({ row, folder: decision.folder, prefix, size: prefix.length + row.message_size });
    }
    if (planned.length === 0) return { outcomes, slow };

    // One call files the batch in its own transaction (migration 076 has the steps and the lock order).
    planned.sort((a, b) => a.row.id - b.row.id);
    // In message id order, as the function inserts them: two batches storing the parse of the same
    // two messages (replicas, MDA_BATCH_PARALLEL > 1) wait for each other in one order, never deadlock.
    const parsedIds = [...new Set(planned.map((p) => p.row.message_id))].filter((id) => parsedByMessage.has(id)).sort((a, b) => a - b);
    const result = await this.ctx.pool.query<{ delivery_id: number; outcome: "filed" | "not_pending" | "unfitted"; folder: string | null; uid: number | null }>(
      "SELECT delivery_id, outcome, folder, uid FROM mda_file_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
      [
        planned.map((p) => p.row.id), planned.map((p) => p.row.account_id), planned.map((p) => p.folder), planned.map((p) => p.size),
        planned.map((p) => p.row.message_id), planned.map((p) => p.prefix),
        parsedIds, parsedIds.map((id) => JSON.stringify(parsedByMessage.get(id))),
        SERVICE,
      ],
    );
    const plannedById = new Map(planned.map((p) => [p.row.id, p]));
    const filed: Array<Planned & { uid: number }> = [];
    for (const r of result.rows) {
      const p = plannedById.get(r.delivery_id)!;
      if (r.outcome === "filed") filed.push({ ...p, uid: r.uid! });
      else if (r.outcome === "not_pending") outcomes.set(r.delivery_id, { status: "duplicate", state: "delivered" });
      else slow.push(r.delivery_id);
    }
    for (const p of filed) {
      const outcome: Outcome = { status: "delivered", folder: p.folder, uid: p.uid };
      outcomes.set(p.row.id, outcome);
      mailMetrics.deliveriesFinal.inc({ kind: "local", state: "delivered" });
      observeFiled(p.row);
      logOutcome(this.ctx.logger, p.row, outcome);
    }
    return { outcomes, slow };
  }
}
