import { randomBytes } from "node:crypto";
import { transaction, type Pool, type PoolClient, type Queryable, type Route } from "@mailstack/db";

export type MessageSource = "inbound" | "submission" | "lmtp" | "bounce" | "import" | "forward";

export interface NewMessage {
  raw: Buffer;
  /** '' for the null sender <>. */
  envelopeFrom: string;
  source: MessageSource;
  clientIp?: string | null;
  clientHelo?: string | null;
  authUser?: string | null;
  messageIdHeader?: string | null;
  authResults?: Record<string, unknown> | null;
  dsnEnvid?: string | null;
  dsnRet?: "FULL" | "HDRS" | null;
  traceId?: string | null;
  /** The accepting session's span id, for span links from later traces (POP3 retrieval). */
  traceSpanId?: string | null;
  /** A queue id chosen earlier (for example one already written into a Received: header). */
  queueId?: string;
}

export interface NewDelivery {
  /** The RCPT TO address as given. */
  recipient: string;
  route: Route;
  folder?: string;
  dsnNotify?: string[] | null;
  dsnOrcpt?: string | null;
}

export interface AcceptedDelivery {
  id: number;
  kind: "local" | "remote";
  finalRecipient: string;
  remoteDomain: string | null;
}

export interface AcceptedMessage {
  messageId: number;
  queueId: string;
  traceId: string | null;
  deliveries: AcceptedDelivery[];
}

const QUEUE_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZ";

const QUEUE_ID_LENGTH = 12;
// Random bytes drawn in bulk: one call to the CSPRNG per 341 queue ids instead of one per id.
let randomPool = Buffer.alloc(0);
let randomOffset = 0;

/** A short, unique-enough public id for a message (the database enforces uniqueness). */
export function newQueueId(): string {
  if (randomOffset + QUEUE_ID_LENGTH > randomPool.length) {
    randomPool = randomBytes(4096);
    randomOffset = 0;
  }
  let id = "";
  for (let i = 0; i < QUEUE_ID_LENGTH; i++) id += QUEUE_ID_ALPHABET[randomPool[randomOffset + i]! % QUEUE_ID_ALPHABET.length];
  randomOffset += QUEUE_ID_LENGTH;
  return id;
}

/**
 * Stores a message and one delivery row per distinct final recipient, with their
 * `accepted` events, inside the caller's transaction. Rows start `queued` and undispatched.
 */
export async function insertMessage(
  client: PoolClient,
  message: NewMessage,
  deliveries: NewDelivery[],
  service: string,
): Promise<AcceptedMessage> {
  return (await insertMessages(client, [{ message, deliveries }], service))[0]!;
}

/** Stores a message and its deliveries in one transaction (DESIGN.md rule 2: commit before 250). */
export async function acceptMessage(pool: Pool, message: NewMessage, deliveries: NewDelivery[], service: string): Promise<AcceptedMessage> {
  if (deliveries.length === 0) throw new Error("a message needs at least one delivery");
  return transaction(pool, (client) => insertMessage(client, message, deliveries, service));
}

/**
 * insertMessage for many messages at once, as ONE statement whatever their number (messages,
 * deliveries and their `accepted` events in data-modifying CTEs): called on a pool it is its
 * own transaction and costs a single round trip, commit included, which is what a caller
 * group-committing concurrent SMTP transactions wants. Results are in the input's order.
 */
export async function insertMessages(
  db: Queryable,
  batch: Array<{ message: NewMessage; deliveries: NewDelivery[] }>,
  service: string,
): Promise<AcceptedMessage[]> {
  if (batch.length === 0) return [];
  const queueIds = batch.map((b) => b.message.queueId ?? newQueueId());
  // Messages as a multi-row VALUES rather than unnest: a Buffer parameter travels in binary,
  // while a bytea[] array would be hex text twice the size of the messages.
  const values: unknown[] = [];
  const tuples = batch.map(({ message: m }, i) => {
    const row = [
      queueIds[i], m.raw, m.raw.length, m.envelopeFrom, m.source, m.clientIp ?? null, m.clientHelo ?? null, m.authUser ?? null,
      m.messageIdHeader ?? null, m.authResults ? JSON.stringify(m.authResults) : null, m.dsnEnvid ?? null, m.dsnRet ?? null, m.traceId ?? null, m.traceSpanId ?? null,
    ];
    const first = values.length + 1;
    values.push(...row);
    return `(${row.map((_, j) => `$${first + j}${j === 2 ? "::bigint" : j === 9 ? "::jsonb" : ""}`).join(", ")})`;
  });
  const rows: Array<NewDelivery & { queueId: string }> = [];
  batch.forEach((b, i) => {
    const unique = new Map<string, NewDelivery>();
    for (const delivery of b.deliveries) if (!unique.has(delivery.route.address)) unique.set(delivery.route.address, delivery);
    for (const delivery of unique.values()) rows.push({ ...delivery, queueId: queueIds[i]! });
  });
  const p = values.length;
  values.push(
    rows.map((d) => d.queueId),
    rows.map((d) => d.recipient),
    rows.map((d) => d.route.address),
    rows.map((d) => d.route.kind),
    rows.map((d) => (d.route.kind === "local" ? d.route.accountId : null)),
    rows.map((d) => (d.route.kind === "remote" ? d.route.domain : null)),
    rows.map((d) => d.folder ?? "INBOX"),
    rows.map((d) => (d.dsnNotify?.length ? d.dsnNotify.join(",") : null)),
    rows.map((d) => d.dsnOrcpt ?? null),
    service,
  );
  const result = await db.query<{ id: number | null; message_id: number; queue_id: string; kind: "local" | "remote"; final_recipient: string; remote_domain: string | null }>(
    `WITH m AS (
       INSERT INTO messages (queue_id, raw, size, envelope_from, source, client_ip, client_helo, auth_user,
                             message_id_header, auth_results, dsn_envid, dsn_ret, trace_id, trace_span_id)
       VALUES ${tuples.join(", ")} RETURNING id, queue_id
     ), d AS (
       INSERT INTO deliveries (message_id, recipient, final_recipient, kind, account_id, remote_domain, folder, dsn_notify, dsn_orcpt)
       SELECT m.id, r.recipient, r.final_recipient, r.kind, r.account_id, r.remote_domain, r.folder,
              CASE WHEN r.dsn_notify IS NULL THEN NULL ELSE string_to_array(r.dsn_notify, ',') END, r.dsn_orcpt
       FROM unnest($${p + 1}::text[], $${p + 2}::text[], $${p + 3}::text[], $${p + 4}::text[], $${p + 5}::bigint[], $${p + 6}::text[],
                   $${p + 7}::text[], $${p + 8}::text[], $${p + 9}::text[])
            AS r(queue_id, recipient, final_recipient, kind, account_id, remote_domain, folder, dsn_notify, dsn_orcpt)
       JOIN m ON m.queue_id = r.queue_id
       RETURNING id, message_id, kind, final_recipient, remote_domain
     ), e AS (
       INSERT INTO delivery_events (message_id, delivery_id, event, service, detail)
       SELECT d.message_id, d.id, 'accepted', $${p + 10}::text, jsonb_build_object('recipient', d.final_recipient) FROM d
     )
     SELECT d.id, m.id AS message_id, m.queue_id, d.kind, d.final_recipient, d.remote_domain
       FROM m LEFT JOIN d ON d.message_id = m.id ORDER BY m.id, d.id`,
    values,
  );
  const byQueueId = new Map<string, { messageId: number; deliveries: AcceptedDelivery[] }>();
  for (const row of result.rows) {
    const entry = byQueueId.get(row.queue_id) ?? { messageId: row.message_id, deliveries: [] };
    if (row.id !== null) entry.deliveries.push({ id: row.id, kind: row.kind, finalRecipient: row.final_recipient, remoteDomain: row.remote_domain });
    byQueueId.set(row.queue_id, entry);
  }
  return batch.map((b, i) => {
    const entry = byQueueId.get(queueIds[i]!);
    if (!entry) throw new Error(`message ${queueIds[i]} was not stored`);
    return { messageId: entry.messageId, queueId: queueIds[i]!, traceId: b.message.traceId ?? null, deliveries: entry.deliveries };
  });
}
