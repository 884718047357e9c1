import { SpanKind, SpanStatusCode, context, trace } from "@opentelemetry/api";
import type { JsMsg, ConsumerMessages } from "@nats-io/jetstream";
import { tracer, type Logger } from "@mailstack/telemetry";
import type { Bus } from "./bus.ts";
import { extractTraceContext } from "./publish.ts";

/** Thrown by a handler for a message that can never succeed: it is terminated, not retried. */
export class PermanentError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "PermanentError";
  }
}

export interface Delivery<T> {
  data: T;
  subject: string;
  /** 1 on first delivery; higher when JetStream redelivers. */
  deliveryCount: number;
  msg: JsMsg;
}

export interface ConsumeOptions<T> {
  stream: string;
  durable: string;
  /** Contract subject, for span names and attributes. */
  subject: string;
  handler: (delivery: Delivery<T>) => Promise<void>;
  /** Messages handled at once. */
  concurrency?: number;
  logger?: Logger;
  /** Delay before a failed message is offered again, by delivery count. */
  retryDelayMs?: (deliveryCount: number) => number;
}

export interface Consumer {
  /** Stops pulling, waits for in-flight handlers to finish (and ack), then resolves. */
  stop(): Promise<void>;
  /** Resolves when the loop ended (after stop, or when the connection closed). */
  done: Promise<void>;
}

const defaultRetryDelay = (count: number) => Math.min(30_000, 250 * 2 ** Math.min(count, 7));

/**
 * A durable pull consumer loop. Each message runs in a CONSUMER span continuing the
 * publisher's trace; it is acked only after its handler resolved (the handler commits
 * its transaction before resolving), nak'ed with a delay when it threw, and terminated
 * when it threw a PermanentError or its payload is not JSON. The loop reattaches after
 * NATS restarts.
 */
export function consume<T>(bus: Bus, options: ConsumeOptions<T>): Consumer {
  const concurrency = options.concurrency ?? 16;
  const retryDelay = options.retryDelayMs ?? defaultRetryDelay;
  const inFlight = new Set<Promise<void>>();
  let stopping = false;
  let messages: ConsumerMessages | undefined;

  const handleOne = async (msg: JsMsg) => {
    const parent = extractTraceContext(msg.headers, context.active());
    const span = tracer.startSpan(
      `${options.subject} process`,
      {
        kind: SpanKind.CONSUMER,
        attributes: {
          "messaging.system": "nats",
          "messaging.operation.type": "process",
          "messaging.operation.name": "process",
          "messaging.destination.name": msg.subject,
          "messaging.consumer.group.name": options.durable,
          "messaging.message.delivery_count": msg.info.deliveryCount,
        },
      },
      parent,
    );
    await context.with(trace.setSpan(parent, span), async () => {
      let data: T;
      try {
        data = msg.json<T>();
      } catch {
        options.logger?.error({ subject: msg.subject, seq: msg.seq }, "message is not JSON; terminating it");
        msg.term();
        span.end();
        return;
      }
      try {
        await options.handler({ data, subject: msg.subject, deliveryCount: msg.info.deliveryCount, msg });
        // A plain ack, not one the server confirms: an ack lost on the way (NATS restarting)
        // only means the message comes back after ack_wait, and every handler is idempotent
        // (DESIGN.md rule 3). Waiting for a confirmation cost a round trip per message.
        msg.ack();
      } catch (error) {
        span.recordException(error as Error);
        span.setStatus({ code: SpanStatusCode.ERROR, message: (error as Error).message });
        if (error instanceof PermanentError) {
          options.logger?.error({ err: error, seq: msg.seq }, "message failed permanently; terminating it");
          msg.term();
        } else {
          options.logger?.warn({ err: error, seq: msg.seq, deliveryCount: msg.info.deliveryCount }, "handler failed; will retry");
          msg.nak(retryDelay(msg.info.deliveryCount));
        }
      } finally {
        span.end();
      }
    });
  };

  const loop = async () => {
    while (!stopping && !bus.nc.isClosed()) {
      try {
        const consumer = await bus.js.consumers.get(bus.stream(options.stream), options.durable);
        if (stopping) break;
        messages = await consumer.consume({ max_messages: concurrency });
        // stop() may have come while consume() was pending: it found nothing to close then.
        if (stopping) {
          await messages.close().catch(() => undefined);
          break;
        }
        for await (const msg of messages) {
          const job = handleOne(msg).catch((error) => options.logger?.error({ err: error }, "consumer handler crashed"));
          inFlight.add(job);
          job.finally(() => inFlight.delete(job));
          while (inFlight.size >= concurrency) await Promise.race(inFlight);
          if (stopping) break;
        }
      } catch (error) {
        if (stopping || bus.nc.isClosed()) break;
        options.logger?.warn({ err: error, stream: options.stream }, "consumer interrupted; reattaching");
        await new Promise((resolve) => setTimeout(resolve, 1_000));
      }
    }
    await Promise.allSettled(inFlight);
  };

  const done = loop();
  return {
    done,
    async stop() {
      stopping = true;
      await messages?.close().catch(() => undefined);
      await done;
      // The acks of the last handlers leave before stop resolves.
      if (!bus.nc.isClosed()) await bus.nc.flush().catch(() => undefined);
    },
  };
}
