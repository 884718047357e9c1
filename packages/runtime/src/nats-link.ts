import type { Bus } from "@mailstack/bus";
import type { Logger } from "@mailstack/telemetry";

/**
 * Follows the NATS connection's status events. The client reconnects forever, so it is never
 * closed while the server is down: only the disconnect and reconnect events tell that it is
 * unreachable (for /readyz and the log).
 */
export function watchNatsLink(nc: Bus["nc"], logger: Logger): { connected: () => boolean } {
  let connected = true;
  void (async () => {
    for await (const status of nc.status()) {
      if (status.type === "disconnect" && connected) {
        connected = false;
        logger.warn({ server: status.server }, "NATS connection lost; reconnecting");
      } else if (status.type === "reconnect" && !connected) {
        connected = true;
        logger.info({ server: status.server }, "NATS connection restored");
      }
    }
  })().catch((error: unknown) => logger.error({ err: error }, "NATS status watch ended"));
  return { connected: () => connected && !nc.isClosed() };
}
