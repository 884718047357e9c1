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

export const INSERT_MESSAGES_SQL = `WITH m AS (
   INSERT INTO messages (queue_id, raw, size, envelope_from, source, client_ip, client_helo, auth_user,
                         message_id_header, auth_results, dsn_envid, dsn_ret, trace_id, trace_span_id)
   SELECT t.queue_id, substring($1::bytea FROM t.start + 1 FOR t.size), t.size, t.envelope_from, t.source, t.client_ip,
          t.client_helo, t.auth_user, t.message_id_header, t.auth_results::jsonb, t.dsn_envid, t.dsn_ret, t.trace_id, t.trace_span_id
     FROM unnest($2::text[], $3::int[], $4::int[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                 $11::text[], $12::text[], $13::text[], $14::text[], $15::text[])
          WITH ORDINALITY AS t(queue_id, start, size, envelope_from, source, client_ip, client_helo, auth_user, message_id_header,
                               auth_results, dsn_envid, dsn_ret, trace_id, trace_span_id, position)
    ORDER BY t.position
   RETURNING id, queue_id
 ), d AS (
   INSERT INTO deliveries (message_id, recipient, final_recipient, kind, account_id, remote_domain, folder, dsn_notify, dsn_orcpt)
   SELECT m.id, r.recipient, r.final_recipient, r.kind, r.account_id, r.remote_domain, r.folder,
          CASE WHEN r.dsn_notify IS NULL THEN NULL ELSE string_to_array(r.dsn_notify, ',') END, r.dsn_orcpt
     FROM unnest($16::text[], $17::text[], $18::text[], $19::text[], $20::bigint[], $21::text[], $22::text[], $23::text[], $24::text[])
          WITH ORDINALITY AS r(queue_id, recipient, final_recipient, kind, account_id, remote_domain, folder, dsn_notify, dsn_orcpt, position)
     JOIN m ON m.queue_id = r.queue_id
    ORDER BY r.position
   RETURNING id, message_id, kind, final_recipient, remote_domain
 ), e AS (
   INSERT INTO delivery_events (message_id, delivery_id, event, service, detail)
   SELECT d.message_id, d.id, 'accepted', $25::text, jsonb_build_object('recipient', d.final_recipient) FROM d
 )
 SELECT d.id, m.id AS message_id, m.queue_id, d.kind, d.final_recipient, d.remote_domain
   FROM m LEFT JOIN d ON d.message_id = m.id ORDER BY m.id, d.id`;

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
  // Rows are inserted in the order given, so ids follow the RCPT order whatever the join's plan.
  // The message bodies travel as ONE binary parameter (a bytea[] array would be hex text twice
  // their size) cut apart by offset in SQL, so the statement's text is the same for every batch:
  // a prepared statement, parsed and planned once per connection instead of once per batch.
  const offsets: number[] = [];
  let offset = 0;
  for (const { message } of batch) {
    offsets.push(offset);
    offset += message.raw.length;
  }
  const bodies = batch.length === 1 ? batch[0]!.message.raw : Buffer.concat(batch.map((b) => b.message.raw), offset);
  const messages = batch.map((b) => b.message);
  const rows: Array<NewDelivery & { queueId: string }> = [];
  batch.forEach((b, i) => {
    const unique = new Map<string, NewDelivery>();
    for (const delivery of b.deliveries) if (!unique.has(delivery.route.address)) unique.set(delivery.route.address, delivery);
    for (const delivery of unique.values()) rows.push({ ...delivery, queueId: queueIds[i]! });
  });
  const result = await db.query<{ id: number | null; message_id: number; queue_id: string; kind: "local" | "remote"; final_recipient: string; remote_domain: string | null }>({
    name: "accept-messages",
    text: INSERT_MESSAGES_SQL,
    values: [
      bodies,
      queueIds,
      offsets,
      messages.map((m) => m.raw.length),
      messages.map((m) => m.envelopeFrom),
      messages.map((m) => m.source),
      messages.map((m) => m.clientIp ?? null),
      messages.map((m) => m.clientHelo ?? null),
      messages.map((m) => m.authUser ?? null),
      messages.map((m) => m.messageIdHeader ?? null),
      messages.map((m) => (m.authResults ? JSON.stringify(m.authResults) : null)),
      messages.map((m) => m.dsnEnvid ?? null),
      messages.map((m) => m.dsnRet ?? null),
      messages.map((m) => m.traceId ?? null),
      messages.map((m) => m.traceSpanId ?? null),
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
    ],
  });
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
