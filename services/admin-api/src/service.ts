import { runService } from "@mailstack/runtime";
import { apiShape } from "./api/config.ts";
import { startAdminApi } from "./api/server.ts";

export async function main(): Promise<void> {
  await runService({
    name: "admin-api",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9080,
    shape: apiShape,
    async start({ pool, logger, config }) {
      const api = await startAdminApi({ pool, logger, config });
      logger.info({ port: api.port }, "admin API listening");
      return { stop: () => api.stop() };
    },
  });
}
