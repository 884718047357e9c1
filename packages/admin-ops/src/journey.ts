import type { Queryable } from "@mailstack/db";

export interface JourneyEventView {
  event: string;
  service: string;
  reply: string | null;
  detail: Record<string, unknown> | null;
  at: string;
}

export interface JourneyRecipient {
  deliveryId: number;
  recipient: string;
  finalRecipient: string;
  kind: "local" | "remote";
  state: string;
  /** The folder a local delivery was filed into; null until then, and for remote deliveries. */
  folder: string | null;
  attempts: number;
  lastReply: string | null;
  lastStatus: string | null;
  remoteMta: string | null;
  nextAttemptAt: string | null;
  events: JourneyEventView[];
}

export interface JourneyMessage {
  queueId: string;
  messageId: string | null;
  envelopeFrom: string;
  source: string;
  size: number;
  receivedAt: string;
  traceId: string | null;
  traceUrl: string | null;
  /** Events that concern the whole message rather than one recipient. */
  events: JourneyEventView[];
  recipients: JourneyRecipient[];
}

export interface JourneyQuery {
  queueId?: string;
  /** The Message-ID header, with or without angle brackets. */
  messageId?: string;
}

export interface JourneyOptions {
  /** Confines the answer to one tenant domain (see `visible` below). */
  domain?: string | null;
  /** Jaeger's UI base URL; the trace link is `${jaegerUrl}/trace/${traceId}`. */
  jaegerUrl?: string;
  /** At most this many messages (a Message-ID may be shared by several). */
  limit?: number;
}

function domainOf(address: string): string {
  return address.slice(address.lastIndexOf("@") + 1).toLowerCase();
}

function iso(value: Date | null): string | null {
  return value ? value.toISOString() : null;
}

/**
 * Whether the tenant sent the message. Only a sender the system vouches for counts: the
 * submission service checked the login and that the envelope sender belongs to it, and a
 * forward is made by the MDA for one of the tenant's accounts. The envelope sender of mail
 * from outside (port 25, LMTP) is whatever the other side wrote: anybody can put a tenant's
 * domain there, and must not see the recipients of other tenants that way.
 */
function sentBy(message: { source: string; envelope_from: string; auth_user: string | null }, tenant: string): boolean {
  const fromTenant = message.envelope_from !== "" && domainOf(message.envelope_from) === tenant;
  if (message.source === "submission") return fromTenant || (message.auth_user !== null && domainOf(message.auth_user) === tenant);
  if (message.source === "forward") return fromTenant;
  return false;
}

/**
 * The journey of a message: each recipient's state and event history, and the trace id with
 * a Jaeger link. A tenant sees a message it sent in full (see `sentBy`); a message it only
 * received shows just its own recipients; anything else does not exist for it.
 */
export async function messageJourney(db: Queryable, query: JourneyQuery, options: JourneyOptions = {}): Promise<JourneyMessage[]> {
  const limit = Math.min(Math.max(options.limit ?? 20, 1), 100);
  let where: string;
  let value: string;
  if (query.queueId) {
    where = "queue_id = $1";
    value = query.queueId;
  } else if (query.messageId) {
    where = "message_id_header IN ($1, $2)";
    value = query.messageId.replace(/^<|>$/g, "");
  } else {
    return [];
  }
  const params: unknown[] = query.queueId ? [value] : [value, `<${value}>`];
  // A tenant's limit applies to its own messages: filter in SQL before LIMIT, not after.
  const tenantDomain = options.domain ?? null;
  if (tenantDomain !== null) {
    params.push(tenantDomain);
    const n = params.length;
    where += ` AND ((source = 'submission' AND (lower(substring(envelope_from from '[^@]*$')) = $${n}
                                                OR lower(substring(coalesce(auth_user, '') from '[^@]*$')) = $${n}))
                    OR (source = 'forward' AND lower(substring(envelope_from from '[^@]*$')) = $${n})
                    OR EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = messages.id
                               AND (lower(substring(d.final_recipient from '[^@]*$')) = $${n}
                                    OR lower(substring(d.recipient from '[^@]*$')) = $${n})))`;
  }
  const messages = await db.query<{
    id: number; queue_id: string; message_id_header: string | null; envelope_from: string; auth_user: string | null;
    source: string; size: number; received_at: Date; trace_id: string | null;
  }>(
    `SELECT id, queue_id, message_id_header, envelope_from, auth_user, source, size, received_at, trace_id
     FROM messages WHERE ${where} ORDER BY received_at, id LIMIT ${limit}`,
    params,
  );
  const out: JourneyMessage[] = [];
  for (const message of messages.rows) {
    const deliveries = await db.query<{
      id: number; recipient: string; final_recipient: string; kind: "local" | "remote"; state: string; folder: string;
      attempts: number; last_reply: string | null; last_status: string | null; remote_mta: string | null; next_attempt_at: Date | null;
      dispatched_at: Date | null;
    }>(
      `SELECT id, recipient, final_recipient, kind, state, folder, attempts, last_reply, last_status, remote_mta, next_attempt_at,
              dispatched_at
       FROM deliveries WHERE message_id = $1 ORDER BY id`,
      [message.id],
    );
    const tenant = options.domain ?? null;
    const sentByTenant = tenant === null || sentBy(message, tenant);
    const visible = sentByTenant
      ? deliveries.rows
      : deliveries.rows.filter((d) => domainOf(d.final_recipient) === tenant || domainOf(d.recipient) === tenant);
    if (!sentByTenant && visible.length === 0) continue;

    const events = await db.query<{ delivery_id: number | null; event: string; service: string; reply: string | null; detail: Record<string, unknown> | null; created_at: Date }>(
      "SELECT delivery_id, event, service, reply, detail, created_at FROM delivery_events WHERE message_id = $1 ORDER BY id",
      [message.id],
    );
    const byDelivery = new Map<number | null, JourneyEventView[]>();
    for (const e of events.rows) {
      const list = byDelivery.get(e.delivery_id) ?? [];
      list.push({ event: e.event, service: e.service, reply: e.reply, detail: e.detail, at: e.created_at.toISOString() });
      byDelivery.set(e.delivery_id, list);
    }
    const jaeger = (options.jaegerUrl ?? "http://localhost:16686").replace(/\/+$/, "");
    out.push({
      queueId: message.queue_id,
      messageId: message.message_id_header,
      envelopeFrom: message.envelope_from,
      source: message.source,
      size: message.size,
      receivedAt: message.received_at.toISOString(),
      traceId: message.trace_id,
      traceUrl: message.trace_id ? `${jaeger}/trace/${message.trace_id}` : null,
      events: sentByTenant ? (byDelivery.get(null) ?? []) : [],
      recipients: visible.map((d) => ({
        deliveryId: d.id,
        recipient: d.recipient,
        finalRecipient: d.final_recipient,
        kind: d.kind,
        state: d.state,
        folder: d.kind === "local" && d.state === "delivered" ? d.folder : null,
        attempts: d.attempts,
        lastReply: d.last_reply,
        lastStatus: d.last_status,
        remoteMta: d.remote_mta,
        nextAttemptAt: iso(d.next_attempt_at),
        events: withDispatch(byDelivery.get(d.id) ?? [], d.dispatched_at, d.kind),
      })),
    });
  }
  return out;
}

/**
 * The hand-over to NATS is kept as a column (deliveries.dispatched_at, stamped in batches off the
 * hot path) rather than an event row; the journey shows it in its place among the events.
 */
function withDispatch(events: JourneyEventView[], dispatchedAt: Date | null, kind: "local" | "remote"): JourneyEventView[] {
  if (!dispatchedAt) return events;
  const dispatched: JourneyEventView = {
    event: "dispatched",
    service: "queue",
    reply: null,
    detail: { subject: kind === "local" ? "mail.deliver.local" : "mail.relay.outbound" },
    at: dispatchedAt.toISOString(),
  };
  // Right after acceptance: the stamp itself may be written after the delivery already happened.
  const afterAccepted = events.findIndex((e) => e.event !== "accepted");
  const at = afterAccepted === -1 ? events.length : afterAccepted;
  return [...events.slice(0, at), dispatched, ...events.slice(at)];
}
