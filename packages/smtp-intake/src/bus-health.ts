import type { Bus } from "@mailstack/bus";

/**
 * Follows the NATS connection's status so the SMTP side can answer 451 before it commits
 * anything when the bus is down (a committed message would still be dispatched by the
 * sweeper, but a client told 451 would send it again).
 */
export function watchBus(bus: Bus): { connected(): boolean; stop(): void } {
  let up = !bus.nc.isClosed();
  let stopped = false;
  void (async () => {
    try {
      for await (const status of bus.nc.status()) {
        if (stopped) break;
        if (status.type === "disconnect" || status.type === "close") up = false;
        else if (status.type === "reconnect") up = true;
      }
    } catch {
      up = false;
    }
  })();
  return {
    connected: () => up && !bus.nc.isClosed(),
    stop: () => {
      stopped = true;
    },
  };
}
