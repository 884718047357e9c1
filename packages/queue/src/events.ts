import type { Queryable } from "@mailstack/db";

export type EventKind =
  | "accepted" | "dispatched" | "attempt" | "delivered" | "deferred" | "bounced" | "delayed"
  | "retrieved" | "filtered" | "discarded" | "forwarded" | "retry" | "cancelled" | "expired";

export interface JourneyEvent {
  messageId: number;
  deliveryId?: number | null;
  event: EventKind;
  service: string;
  reply?: string | null;
  detail?: Record<string, unknown> | null;
}

/** Records journey events; call it inside the transaction that makes the change it reports. */
export async function recordEvents(db: Queryable, events: JourneyEvent[]): Promise<void> {
  if (events.length === 0) return;
  await db.query(
    `INSERT INTO delivery_events (message_id, delivery_id, event, service, reply, detail)
     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::jsonb[])`,
    [
      events.map((e) => e.messageId),
      events.map((e) => e.deliveryId ?? null),
      events.map((e) => e.event),
      events.map((e) => e.service),
      events.map((e) => e.reply ?? null),
      events.map((e) => (e.detail ? JSON.stringify(e.detail) : null)),
    ],
  );
}
