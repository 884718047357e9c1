import type { FastifyInstance } from "fastify";
import { messageJourney } from "@mailstack/admin-ops";
import type { Pool } from "@mailstack/db";
import type { ApiConfig } from "../config.ts";
import { ApiError, notFound } from "../errors.ts";
import { dateTime, errorResponses, nullableString } from "../schemas.ts";

const eventView = {
  type: "object",
  properties: {
    event: { type: "string" },
    service: { type: "string" },
    reply: nullableString,
    detail: { type: ["object", "null"], additionalProperties: true },
    at: dateTime,
  },
} as const;

const journeyView = {
  type: "object",
  properties: {
    queueId: { type: "string" },
    messageId: nullableString,
    envelopeFrom: { type: "string" },
    source: { type: "string" },
    size: { type: "integer" },
    receivedAt: dateTime,
    traceId: nullableString,
    traceUrl: nullableString,
    events: { type: "array", items: eventView },
    recipients: {
      type: "array",
      items: {
        type: "object",
        properties: {
          deliveryId: { type: "integer" },
          recipient: { type: "string" },
          finalRecipient: { type: "string" },
          kind: { type: "string" },
          state: { type: "string" },
          folder: nullableString,
          attempts: { type: "integer" },
          lastReply: nullableString,
          lastStatus: nullableString,
          remoteMta: nullableString,
          nextAttemptAt: { type: ["string", "null"], format: "date-time" },
          events: { type: "array", items: eventView },
        },
      },
    },
  },
} as const;

export function journeyRoutes(app: FastifyInstance, pool: Pool, config: ApiConfig): void {
  app.get<{ Querystring: { queueId?: string; messageId?: string } }>("/journey", {
    schema: {
      tags: ["journey"],
      summary: "A message's journey by queue id or Message-ID: each recipient's state and event history, and the trace in Jaeger",
      querystring: {
        type: "object", additionalProperties: false,
        properties: {
          queueId: { type: "string", minLength: 1, maxLength: 64, pattern: "^[A-Za-z0-9]+$" },
          messageId: { type: "string", minLength: 1, maxLength: 998 },
        },
      },
      response: { 200: { type: "object", properties: { messages: { type: "array", items: journeyView } } }, ...errorResponses },
    },
  }, async (request) => {
    const { queueId, messageId } = request.query;
    if (!queueId && !messageId) throw new ApiError(400, "querystring: give queueId or messageId", "queueId");
    if (queueId && messageId) throw new ApiError(400, "querystring: give queueId or messageId, not both", "messageId");
    const messages = await messageJourney(
      pool,
      queueId ? { queueId } : { messageId: messageId! },
      { domain: request.principal.domain, jaegerUrl: config.JAEGER_UI_URL },
    );
    if (messages.length === 0) throw notFound(`message: ${queueId ?? messageId}`);
    return { messages };
  });
}
