import { headers as createHeaders, type MsgHdrs } from "@nats-io/nats-core";
import { SpanKind, context, propagation, trace, type Context } from "@opentelemetry/api";
import { tracer } from "@mailstack/telemetry";
import type { Bus } from "./bus.ts";

export interface PublishOptions {
  /** JetStream drops a second publish with the same id inside the stream's duplicate window. */
  msgId?: string;
  /** Trace context to continue; the active one by default. */
  context?: Context;
}

/** Writes the W3C trace context (traceparent, tracestate) of ctx into NATS headers. */
export function injectTraceContext(ctx: Context, headers: MsgHdrs): void {
  propagation.inject(ctx, headers, {
    set: (carrier, key, value) => carrier.set(key, value),
  });
}

/**
 * Reads the trace context from NATS headers. nats.js header lookups are case-sensitive
 * and return "" for a missing key, so both spellings are tried and "" means absent.
 */
export function extractTraceContext(headers: MsgHdrs | undefined, base: Context = context.active()): Context {
  if (!headers) return base;
  return propagation.extract(base, headers, {
    keys: (carrier) => carrier.keys(),
    get: (carrier, key) => {
      const value = carrier.get(key) || carrier.get(key.toLowerCase()) || carrier.get(key.toUpperCase());
      return value === "" ? undefined : value;
    },
  });
}

/**
 * Publishes a JSON payload (ids and small facts only, never a message body) to
 * JetStream with a PRODUCER span, the trace context and an optional Nats-Msg-Id.
 * Resolves when the stream has stored it.
 */
export async function publish(bus: Bus, subject: string, payload: unknown, options: PublishOptions = {}): Promise<{ duplicate: boolean; seq: number }> {
  const realSubject = bus.subject(subject);
  const parent = options.context ?? context.active();
  const span = tracer.startSpan(
    `${subject} publish`,
    {
      kind: SpanKind.PRODUCER,
      attributes: {
        "messaging.system": "nats",
        "messaging.operation.type": "publish",
        "messaging.operation.name": "publish",
        "messaging.destination.name": realSubject,
        ...(options.msgId ? { "messaging.message.id": options.msgId } : {}),
      },
    },
    parent,
  );
  try {
    const headers = createHeaders();
    injectTraceContext(trace.setSpan(parent, span), headers);
    const ack = await bus.js.publish(realSubject, JSON.stringify(payload), {
      headers,
      ...(options.msgId ? { msgID: options.msgId } : {}),
    });
    return { duplicate: ack.duplicate, seq: ack.seq };
  } catch (error) {
    span.recordException(error as Error);
    span.setStatus({ code: 2, message: (error as Error).message });
    throw error;
  } finally {
    span.end();
  }
}
