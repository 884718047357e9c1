import { transaction, type Pool, type Queryable } from "@mailstack/db";
import { normalizeDomain } from "@mailstack/mail";
import { recordEvents } from "./events.ts";

/** Queue operations shared by mailctl and the admin API. */

export type DeliveryState = "queued" | "deferred" | "delivered" | "bounced" | "cancelled";
const STATES: DeliveryState[] = ["queued", "deferred", "delivered", "bounced", "cancelled"];

/**
 * A destination domain as deliveries store it (lower case, IDN as A-labels, no final dot), so
 * that "Bücher.example." finds the deliveries to xn--bcher-kva.example.
 */
function destinationDomain(domain: string): string {
  const normal = normalizeDomain(domain);
  if (normal === null) throw new QueueError("invalid", `invalid domain: ${domain}`);
  return normal;
}

export class QueueError extends Error {
  readonly kind: "not-found" | "invalid" | "conflict";
  constructor(kind: "not-found" | "invalid" | "conflict", message: string) {
    super(message);
    this.name = "QueueError";
    this.kind = kind;
  }
}

export interface QueueEntry {
  id: number;
  queueId: string;
  sender: string;
  recipient: string;
  kind: "local" | "remote";
  remoteDomain: string | null;
  state: DeliveryState;
  attempts: number;
  nextAttemptAt: Date | null;
  lastReply: string | null;
  createdAt: Date;
}

export interface QueueFilter {
  /** One state; by default the waiting ones (queued and deferred). */
  state?: string;
  domain?: string;
  /** At most this many entries (default 1000, at most 100000). */
  limit?: number;
  /** Only the deliveries whose id is greater: the `next` of the previous page. */
  after?: number;
}

export interface QueuePage {
  entries: QueueEntry[];
  /** The id to pass as `after` for the page after this one; null on the last page. */
  next: number | null;
}

interface EntryRow {
  id: number;
  queue_id: string;
  envelope_from: string;
  final_recipient: string;
  kind: "local" | "remote";
  remote_domain: string | null;
  state: DeliveryState;
  attempts: number;
  next_attempt_at: Date | null;
  last_reply: string | null;
  created_at: Date;
}

const ENTRY_COLUMNS = `d.id, m.queue_id, m.envelope_from, d.final_recipient, d.kind, d.remote_domain, d.state, d.attempts,
  d.next_attempt_at, d.last_reply, d.created_at`;

function toEntry(row: EntryRow): QueueEntry {
  return {
    id: row.id,
    queueId: row.queue_id,
    sender: row.envelope_from,
    recipient: row.final_recipient,
    kind: row.kind,
    remoteDomain: row.remote_domain,
    state: row.state,
    attempts: row.attempts,
    nextAttemptAt: row.next_attempt_at,
    lastReply: row.last_reply,
    createdAt: row.created_at,
  };
}

function checkState(state: string | undefined): DeliveryState[] {
  if (state === undefined) return ["queued", "deferred"];
  if (!STATES.includes(state as DeliveryState)) throw new QueueError("invalid", `unknown state ${state} (one of ${STATES.join(", ")})`);
  return [state as DeliveryState];
}

const DELIVERY_COLUMNS = "id, message_id, final_recipient, kind, remote_domain, state, attempts, next_attempt_at, last_reply, created_at";

/**
 * Deliveries in the queue, oldest (lowest id) first, a page at a time. Each state is its own
 * range in id order, merged by id: of deliveries_pending, deliveries_bounced_cancelled or, with
 * a domain, deliveries_domain (migration 075); delivered rows, most of the table, through the
 * primary key. One scan over several states would walk the primary key past every other
 * delivery, or sort every matching one.
 */
export async function listQueue(db: Queryable, filter: QueueFilter = {}): Promise<QueuePage> {
  const states = checkState(filter.state);
  const limit = filter.limit ?? 1000;
  if (!Number.isSafeInteger(limit) || limit < 1 || limit > 100_000) throw new QueueError("invalid", `invalid limit ${limit} (1 to 100000)`);
  const after = filter.after ?? 0;
  if (!Number.isSafeInteger(after) || after < 0) throw new QueueError("invalid", `invalid cursor ${after} (a delivery id)`);
  const values: unknown[] = [after, limit + 1];
  let byDomain = "";
  if (filter.domain !== undefined) {
    values.push(destinationDomain(filter.domain));
    byDomain = ` AND remote_domain = lower($${values.length})`;
  }
  const ranges = states.map((state) => {
    values.push(state);
    return `(SELECT ${DELIVERY_COLUMNS} FROM deliveries WHERE state = $${values.length} AND id > $1${byDomain} ORDER BY id LIMIT $2)`;
  });
  const result = await db.query<EntryRow>(
    `SELECT ${ENTRY_COLUMNS} FROM (${ranges.join(" UNION ALL ")}) d JOIN messages m ON m.id = d.message_id
      ORDER BY d.id LIMIT $2`,
    values,
  );
  const entries = result.rows.slice(0, limit).map(toEntry);
  return { entries, next: result.rows.length > limit ? entries[entries.length - 1]!.id : null };
}

export interface DeliveryDetail extends QueueEntry {
  lastStatus: string | null;
  remoteMta: string | null;
  dsnState: string | null;
  size: number;
  events: Array<{ at: Date; event: string; service: string; reply: string | null; detail: Record<string, unknown> | null }>;
}

/** One delivery with its journey: every attempt with the remote reply. */
export async function showDelivery(db: Queryable, id: number): Promise<DeliveryDetail> {
  const result = await db.query<EntryRow & { last_status: string | null; remote_mta: string | null; dsn_state: string | null; size: number }>(
    `SELECT ${ENTRY_COLUMNS}, d.last_status, d.remote_mta, d.dsn_state, m.size
       FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE d.id = $1`,
    [id],
  );
  const row = result.rows[0];
  if (!row) throw new QueueError("not-found", `no delivery ${id}`);
  const events = await db.query<{ created_at: Date; event: string; service: string; reply: string | null; detail: Record<string, unknown> | null }>(
    "SELECT created_at, event, service, reply, detail FROM delivery_events WHERE delivery_id = $1 ORDER BY id",
    [id],
  );
  return {
    ...toEntry(row),
    lastStatus: row.last_status,
    remoteMta: row.remote_mta,
    dsnState: row.dsn_state,
    size: row.size,
    events: events.rows.map((e) => ({ at: e.created_at, event: e.event, service: e.service, reply: e.reply, detail: e.detail })),
  };
}

/** The delivery ids of a message by its queue id (operators see queue ids in logs and headers). */
export async function deliveriesOfQueueId(db: Queryable, queueId: string): Promise<number[]> {
  const result = await db.query<{ id: number }>(
    "SELECT d.id FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE m.queue_id = $1 ORDER BY d.id",
    [queueId],
  );
  if (result.rows.length === 0) throw new QueueError("not-found", `no message with queue id ${queueId}`);
  return result.rows.map((r) => r.id);
}

/**
 * Makes deferred deliveries due now (one, or all of a domain); the relay scheduler picks
 * them up on its next pass. Returns the ids made due.
 */
export async function retryDeliveries(pool: Pool, target: { id: number } | { domain: string }, service = "mailctl"): Promise<number[]> {
  return transaction(pool, async (client) => {
    const result = "id" in target
      ? await client.query<{ id: number; message_id: number }>(
          "UPDATE deliveries SET next_attempt_at = now(), updated_at = now() WHERE id = $1 AND state = 'deferred' RETURNING id, message_id",
          [target.id],
        )
      : await client.query<{ id: number; message_id: number }>(
          "UPDATE deliveries SET next_attempt_at = now(), updated_at = now() WHERE remote_domain = lower($1) AND state = 'deferred' RETURNING id, message_id",
          [destinationDomain(target.domain)],
        );
    if ("id" in target && result.rows.length === 0) {
      const exists = await client.query<{ state: string }>("SELECT state FROM deliveries WHERE id = $1", [target.id]);
      if (!exists.rows[0]) throw new QueueError("not-found", `no delivery ${target.id}`);
      throw new QueueError("conflict", `delivery ${target.id} is ${exists.rows[0].state}, not deferred`);
    }
    await recordEvents(client, result.rows.map((r) => ({ messageId: r.message_id, deliveryId: r.id, event: "retry" as const, service })));
    return result.rows.map((r) => r.id);
  });
}

/**
 * Removes a waiting delivery from the queue: state cancelled, no bounce. A worker sending
 * it at this moment may still complete that one attempt; its result is then not recorded.
 */
export async function deleteDelivery(pool: Pool, id: number, service = "mailctl"): Promise<void> {
  await transaction(pool, async (client) => {
    const result = await client.query<{ message_id: number }>(
      `UPDATE deliveries SET state = 'cancelled', next_attempt_at = NULL, dsn_state = NULL, updated_at = now()
        WHERE id = $1 AND state IN ('queued', 'deferred') RETURNING message_id`,
      [id],
    );
    if (result.rows.length === 0) {
      const exists = await client.query<{ state: string }>("SELECT state FROM deliveries WHERE id = $1", [id]);
      if (!exists.rows[0]) throw new QueueError("not-found", `no delivery ${id}`);
      throw new QueueError("conflict", `delivery ${id} is already ${exists.rows[0].state}`);
    }
    await recordEvents(client, [{ messageId: result.rows[0]!.message_id, deliveryId: id, event: "cancelled", service }]);
  });
}
