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
 * Whether the configured root sampler (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG) sampled a
 * trace with this id. The ratio samplers decide on the trace id alone; this is the SDK's
 * TraceIdRatioBasedSampler computation (the low 32 bits of each quarter of the id, XORed,
 * under ratio * 2^32), so a journey the accepting service dropped stays dropped.
 */
export function rootSampled(traceId: string, env: NodeJS.ProcessEnv = process.env): boolean {
  const sampler = env.OTEL_TRACES_SAMPLER ?? "parentbased_always_on";
  if (sampler.endsWith("always_off")) return false;
  if (!sampler.endsWith("traceidratio")) return true;
  const arg = Number(env.OTEL_TRACES_SAMPLER_ARG ?? "1");
  const ratio = Number.isNaN(arg) ? 1 : Math.min(1, Math.max(0, arg));
  const upperBound = ratio === 1 ? 2 ** 32 : Math.floor(ratio * 0xffffffff);
  let accumulation = 0;
  for (let i = 0; i < 32; i += 8) accumulation = (accumulation ^ Number.parseInt(traceId.slice(i, i + 8), 16)) >>> 0;
  return accumulation < upperBound;
}

/**
 * The context of a stored message journey (messages.trace_id and trace_span_id), so work done
 * later for the message (a retry the scheduler republishes, a bounce) continues its trace as a
 * child of the accepting session's span. The row keeps no sampling decision: it is made again
 * from the trace id (rootSampled). Without valid ids, base is returned unchanged.
 */
export function journeyContext(traceId: string | null | undefined, spanId: string | null | undefined, base: Context = context.active()): Context {
  if (!traceId || !spanId) return base;
  const traceFlags = rootSampled(traceId) ? TraceFlags.SAMPLED : TraceFlags.NONE;
  const spanContext = { traceId, spanId, traceFlags, isRemote: true };
  return trace.isSpanContextValid(spanContext) ? trace.setSpanContext(base, spanContext) : base;
}
