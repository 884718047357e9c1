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

/**
 * Records journey events; call it inside the transaction that makes the change it reports.
 * The events travel as one JSON document (serialised natively), not as six parallel arrays
 * that pg would escape element by element.
 */
export async function recordEvents(db: Queryable, events: JourneyEvent[]): Promise<void> {
  if (events.length === 0) return;
  await db.query(
    `INSERT INTO delivery_events (message_id, delivery_id, event, service, reply, detail)
     SELECT message_id, delivery_id, event, service, reply, detail
       FROM jsonb_to_recordset($1::jsonb)
         AS e(message_id bigint, delivery_id bigint, event text, service text, reply text, detail jsonb)`,
    [
      JSON.stringify(
        events.map((e) => ({
          message_id: e.messageId,
          delivery_id: e.deliveryId ?? null,
          event: e.event,
          service: e.service,
          reply: e.reply ?? null,
          detail: e.detail ?? null,
        })),
      ),
    ],
  );
}
