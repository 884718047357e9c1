import { runService } from "@mailstack/runtime";
import { pop3Shape } from "./config.ts";
import { startPop3 } from "./server.ts";

export async function main(): Promise<void> {
  await runService({
    name: "pop3",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9110,
    shape: pop3Shape,
    async start({ config, logger, pool }) {
      const server = await startPop3({ config, logger, pool });
      return { ready: () => server.listening(), stop: () => server.stop() };
    },
  });
}
