import { runService } from "@mailstack/runtime";
import { startEventPublisher, startRetention } from "@mailstack/queue";
import { apiShape } from "./api/config.ts";
import { startAdminApi } from "./api/server.ts";

export async function main(): Promise<void> {
  await runService({
    name: "admin-api",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9080,
    shape: apiShape,
    async start({ pool, bus, logger, config }) {
      const api = await startAdminApi({ pool, logger, config });
      logger.info({ port: api.port }, "admin API listening");
      // The journey's events, committed in PostgreSQL, go out on mail.event.* (one replica at a time).
      const events = startEventPublisher(bus, pool, logger);
      const retention = startRetention(pool, logger, config.RETENTION_INTERVAL, { retentionMs: config.MESSAGE_RETENTION });
      return {
        stop: async () => {
          await api.stop();
          await events.stop();
          await retention.stop();
        },
      };
    },
  });
}
