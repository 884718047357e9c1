import { SpanKind, SpanStatusCode, context, trace, type Attributes, type Link, type Span } from "@opentelemetry/api";

export { SpanKind, SpanStatusCode, context, trace };
export type { Attributes, Link, Span };

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
