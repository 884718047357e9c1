import type { FastifyInstance } from "fastify";
import type { Pool } from "@mailstack/db";
import { QueueError, deleteDelivery, deliveriesOfQueueId, listQueue, retryDeliveries, showDelivery, type QueueEntry } from "@mailstack/queue";
import { requireOperator } from "../auth.ts";
import { ApiError } from "../errors.ts";
import { idPageQuery, nextId } from "../pagination.ts";
import { dateTime, domainString, errorResponses, noContent, nullableString, rowId } from "../schemas.ts";

const STATES = ["queued", "deferred", "delivered", "bounced", "cancelled"];

const entryView = {
  type: "object",
  properties: {
    id: { type: "integer" },
    queueId: { type: "string" },
    sender: { type: "string" },
    recipient: { type: "string" },
    kind: { type: "string" },
    remoteDomain: nullableString,
    state: { type: "string" },
    attempts: { type: "integer" },
    nextAttemptAt: { type: ["string", "null"], format: "date-time" },
    lastReply: nullableString,
    createdAt: dateTime,
  },
} as const;

const detailView = {
  type: "object",
  properties: {
    ...entryView.properties,
    lastStatus: nullableString,
    remoteMta: nullableString,
    dsnState: nullableString,
    size: { type: "integer" },
    events: {
      type: "array",
      items: {
        type: "object",
        properties: {
          at: dateTime, event: { type: "string" }, service: { type: "string" }, reply: nullableString,
          detail: { type: ["object", "null"], additionalProperties: true },
        },
      },
    },
  },
} as const;

const idsView = { type: "object", properties: { deliveryIds: { type: "array", items: { type: "integer" } } } } as const;
const deliveryParams = { type: "object", properties: { id: rowId }, required: ["id"] } as const;
const messageParams = { type: "object", properties: { queueId: { type: "string", pattern: "^[0-9A-Z]{1,64}$" } }, required: ["queueId"] } as const;

function showEntry(e: QueueEntry) {
  return { ...e, nextAttemptAt: e.nextAttemptAt?.toISOString() ?? null, createdAt: e.createdAt.toISOString() };
}

/** The whole queue spans tenants, so these routes are for operator tokens only. */
export async function queueRoutes(app: FastifyInstance, pool: Pool): Promise<void> {
  // An encapsulated hook: it runs after authentication, for these routes only.
  app.addHook("onRequest", async (request) => requireOperator(request));

  app.get<{ Querystring: { state?: string; domain?: string; limit?: number; after?: number } }>("/queue", {
    schema: {
      tags: ["queue"], summary: "Deliveries by state (default: queued and deferred) and destination domain, oldest (lowest id) first, a page at a time",
      querystring: {
        type: "object", additionalProperties: false,
        properties: { state: { type: "string", enum: STATES }, domain: domainString, ...idPageQuery },
      },
      response: { 200: { type: "object", properties: { entries: { type: "array", items: entryView }, next: nextId } }, ...errorResponses },
    },
  }, async (request) => {
    const page = await listQueue(pool, request.query);
    return { entries: page.entries.map(showEntry), next: page.next };
  });

  app.get<{ Params: { id: number } }>("/queue/deliveries/:id", {
    schema: {
      tags: ["queue"], summary: "One delivery with every attempt and its remote reply",
      params: deliveryParams,
      response: { 200: detailView, ...errorResponses },
    },
  }, async (request) => {
    const d = await showDelivery(pool, request.params.id);
    return { ...showEntry(d), lastStatus: d.lastStatus, remoteMta: d.remoteMta, dsnState: d.dsnState, size: d.size, events: d.events.map((e) => ({ ...e, at: e.at.toISOString() })) };
  });

  app.post<{ Params: { id: number } }>("/queue/deliveries/:id/retry", {
    schema: {
      tags: ["queue"], summary: "Make a deferred delivery due now (409 when it is not deferred)",
      params: deliveryParams,
      response: { 200: idsView, ...errorResponses },
    },
  }, async (request) => ({ deliveryIds: await retryDeliveries(pool, { id: request.params.id }, "admin-api") }));

  app.post<{ Params: { queueId: string } }>("/queue/messages/:queueId/retry", {
    schema: {
      tags: ["queue"], summary: "Make every deferred delivery of a message due now",
      params: messageParams,
      response: { 200: idsView, ...errorResponses },
    },
  }, async (request) => {
    const retried: number[] = [];
    for (const id of await deliveriesOfQueueId(pool, request.params.queueId)) {
      retried.push(...(await skipConflicts(() => retryDeliveries(pool, { id }, "admin-api"), [])));
    }
    return { deliveryIds: retried };
  });

  app.post<{ Params: { domain: string } }>("/queue/domains/:domain/retry", {
    schema: {
      tags: ["queue"], summary: "Make every deferred delivery to a destination domain due now",
      params: { type: "object", properties: { domain: domainString }, required: ["domain"] },
      response: { 200: idsView, ...errorResponses },
    },
  }, async (request) => ({ deliveryIds: await retryDeliveries(pool, { domain: request.params.domain }, "admin-api") }));

  app.delete<{ Params: { id: number } }>("/queue/deliveries/:id", {
    schema: {
      tags: ["queue"], summary: "Cancel a waiting delivery, without a bounce (409 when it is already final)",
      params: deliveryParams,
      response: { ...noContent, ...errorResponses },
    },
  }, async (request, reply) => {
    await deleteDelivery(pool, request.params.id, "admin-api");
    reply.status(204);
  });

  app.delete<{ Params: { queueId: string } }>("/queue/messages/:queueId", {
    schema: {
      tags: ["queue"], summary: "Cancel every waiting delivery of a message; answers with the ids cancelled",
      params: messageParams,
      response: { 200: idsView, ...errorResponses },
    },
  }, async (request) => {
    const cancelled: number[] = [];
    for (const id of await deliveriesOfQueueId(pool, request.params.queueId)) {
      if (await skipConflicts(async () => (await deleteDelivery(pool, id, "admin-api"), true), false)) cancelled.push(id);
    }
    if (cancelled.length === 0) throw new ApiError(409, `message ${request.params.queueId} has no waiting deliveries`);
    return { deliveryIds: cancelled };
  });
}

/** Per-delivery conflicts (already final, not deferred) are expected when acting on a whole message. */
async function skipConflicts<T>(fn: () => Promise<T>, fallback: T): Promise<T> {
  try {
    return await fn();
  } catch (error) {
    if (error instanceof QueueError && error.kind === "conflict") return fallback;
    throw error;
  }
}
