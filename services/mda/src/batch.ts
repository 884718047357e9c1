import { transaction } from "@mailstack/db";
import { FINAL_STATES, stillPending } from "@mailstack/queue";
import { mailMetrics } from "@mailstack/telemetry";
import {
  ROW_COLUMNS, SERVICE, decideFor, deliverLocal, headerPrefix, observeFiled,
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
      if (row.account_id === null || row.address === null || row.disabled) {
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

    const filed = await transaction(this.ctx.pool, async (client) => {
      // Locks in a fixed order (deliveries by id, then accounts by id, then folders) so batches never deadlock.
      const pending = await client.query<{ id: number }>(
        `SELECT id FROM deliveries WHERE id = ANY($1) AND ${stillPending()} ORDER BY id FOR NO KEY UPDATE`,
        [planned.map((p) => p.row.id).sort((a, b) => a - b)],
      );
      const pendingIds = new Set(pending.rows.map((r) => r.id));
      const live = planned.filter((p) => pendingIds.has(p.row.id)).sort((a, b) => a.row.id - b.row.id);
      for (const p of planned) if (!pendingIds.has(p.row.id)) outcomes.set(p.row.id, { status: "duplicate", state: "delivered" });
      if (live.length === 0) return [] as Array<Planned & { uid: number }>;

      const accountIds = [...new Set(live.map((p) => p.row.account_id!))].sort((a, b) => a - b);
      const accounts = await client.query<{ id: number; used_bytes: number; quota_bytes: number | null }>(
        "SELECT id, used_bytes, quota_bytes FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        [accountIds],
      );
      const used = new Map(accounts.rows.map((a) => [a.id, { used: Number(a.used_bytes), quota: a.quota_bytes === null ? null : Number(a.quota_bytes) }]));
      const fits: Planned[] = [];
      for (const p of live) {
        const account = used.get(p.row.account_id!);
        if (!account || (account.quota !== null && account.used + p.size > account.quota)) {
          // Over quota (or gone): bounced by the general path, after this commit.
          slow.push(p.row.id);
          continue;
        }
        account.used += p.size;
        fits.push(p);
      }
      if (fits.length === 0) return [] as Array<Planned & { uid: number }>;

      const byFolder = new Map<string, { accountId: number; folder: string; items: Planned[] }>();
      for (const p of fits) {
        const key = `${p.row.account_id}\u0000${p.folder}`;
        const group = byFolder.get(key) ?? { accountId: p.row.account_id!, folder: p.folder, items: [] };
        group.items.push(p);
        byFolder.set(key, group);
      }
      const groups = [...byFolder.values()].sort((a, b) => a.accountId - b.accountId || (a.folder < b.folder ? -1 : a.folder > b.folder ? 1 : 0));
      // One UID range per folder: uid_next moves by the number of copies.
      const ranges = await client.query<{ account_id: number; name: string; uid_next: number }>(
        `INSERT INTO folders (account_id, name, uid_next)
         SELECT a, n, 1 + k FROM unnest($1::bigint[], $2::text[], $3::int[]) WITH ORDINALITY AS t(a, n, k, o) ORDER BY o
         ON CONFLICT (account_id, name) DO UPDATE SET uid_next = folders.uid_next + EXCLUDED.uid_next - 1
         RETURNING account_id, name, uid_next`,
        [groups.map((g) => g.accountId), groups.map((g) => g.folder), groups.map((g) => g.items.length)],
      );
      const nextOf = new Map(ranges.rows.map((r) => [`${r.account_id}\u0000${r.name}`, r.uid_next]));
      const withUid: Array<Planned & { uid: number }> = [];
      for (const group of groups) {
        const first = nextOf.get(`${group.accountId}\u0000${group.folder}`)! - group.items.length;
        group.items.forEach((p, i) => withUid.push({ ...p, uid: first + i }));
      }

      const charge = new Map<number, number>();
      for (const p of fits) charge.set(p.row.account_id!, (charge.get(p.row.account_id!) ?? 0) + p.size);
      const parsedIds = [...new Set(withUid.map((p) => p.row.message_id))].filter((id) => parsedByMessage.has(id));
      // Everything else in one statement: the parsed summaries, the quota charge, the mailbox
      // entries, the deliveries' final state and their journey events.
      await client.query(
        `WITH parsed AS (
           INSERT INTO message_parsed (message_id, parsed) SELECT * FROM unnest($1::bigint[], $2::jsonb[])
           ON CONFLICT (message_id) DO NOTHING
         ), charged AS (
           UPDATE accounts a SET used_bytes = a.used_bytes + t.bytes FROM unnest($3::bigint[], $4::bigint[]) AS t(id, bytes) WHERE a.id = t.id
         ), entries AS (
           INSERT INTO mailbox_entries (account_id, folder, uid, message_id, delivery_id, header_prefix, size)
           SELECT * FROM unnest($5::bigint[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bytea[], $11::bigint[])
         ), delivered AS (
           UPDATE deliveries d SET state = 'delivered', folder = t.folder, attempts = d.attempts + 1, last_attempt_at = now(),
                  next_attempt_at = NULL, last_status = '2.0.0', last_reply = t.reply, updated_at = now()
             FROM unnest($9::bigint[], $6::text[], $12::text[]) AS t(id, folder, reply) WHERE d.id = t.id
         )
         INSERT INTO delivery_events (message_id, delivery_id, event, service, reply, detail)
         SELECT t.message_id, t.delivery_id, 'delivered', $13::text, '250 2.0.0 Delivered', t.detail
           FROM unnest($8::bigint[], $9::bigint[], $14::jsonb[]) AS t(message_id, delivery_id, detail)`,
        [
          parsedIds, parsedIds.map((id) => JSON.stringify(parsedByMessage.get(id))),
          [...charge.keys()], [...charge.values()],
          withUid.map((p) => p.row.account_id), withUid.map((p) => p.folder), withUid.map((p) => p.uid),
          withUid.map((p) => p.row.message_id), withUid.map((p) => p.row.id), withUid.map((p) => p.prefix), withUid.map((p) => p.size),
          withUid.map((p) => `250 2.0.0 Delivered to ${p.folder} as UID ${p.uid}`),
          SERVICE,
          withUid.map((p) => JSON.stringify({ folder: p.folder, uid: p.uid })),
        ],
      );
      return withUid;
    });
    for (const p of filed) {
      outcomes.set(p.row.id, { status: "delivered", folder: p.folder, uid: p.uid });
      mailMetrics.deliveriesFinal.inc({ kind: "local", state: "delivered" });
      observeFiled(p.row);
    }
    return { outcomes, slow };
  }
}
