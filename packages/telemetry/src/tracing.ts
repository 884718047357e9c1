import { SpanKind, SpanStatusCode, TraceFlags, context, trace, type Attributes, type Context, type Link, type Span } from "@opentelemetry/api";

export { SpanKind, SpanStatusCode, context, trace };
export type { Attributes, Context, Link, Span };

export const tracer = trace.getTracer("mailstack");

/** Runs fn inside a new active span, recording an exception and error status if it throws. */
export async function withSpan<T>(
  name: string,
  options: { kind?: SpanKind; attributes?: Attributes },
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  return tracer.startActiveSpan(name, { kind: options.kind ?? SpanKind.INTERNAL, attributes: options.attributes ?? {} }, async (span) => {
    try {
      return await fn(span);
    } catch (error) {
      span.recordException(error as Error);
      span.setStatus({ code: SpanStatusCode.ERROR, message: (error as Error).message });
      throw error;
    } finally {
      span.end();
    }
  });
}

/** The active trace id, or undefined outside a sampled span. */
export function currentTraceId(): string | undefined {
  const id = trace.getActiveSpan()?.spanContext().traceId;
  return id && id !== "00000000000000000000000000000000" ? id : undefined;
}

/** The active span's id, stored on a message row so later traces (POP3 retrieval) can link to it. */
export function currentSpanId(): string | undefined {
  const spanContext = trace.getActiveSpan()?.spanContext();
  return spanContext && trace.isSpanContextValid(spanContext) ? spanContext.spanId : undefined;
}

/**
 * The context of a stored message journey (messages.trace_id and trace_span_id), so work done
 * later for the message (a retry the scheduler republishes, a bounce) continues its trace as a
 * child of the accepting session's span. The stored row does not keep the sampling decision, so
 * the parent counts as sampled: a parentbased_* sampler records the continuation. Without valid
 * ids, base is returned unchanged.
 */
export function journeyContext(traceId: string | null | undefined, spanId: string | null | undefined, base: Context = context.active()): Context {
  if (!traceId || !spanId) return base;
  const spanContext = { traceId, spanId, traceFlags: TraceFlags.SAMPLED, isRemote: true };
  return trace.isSpanContextValid(spanContext) ? trace.setSpanContext(base, spanContext) : base;
}
