import { runService } from "@mailstack/runtime";
import { mdaShape, startMda } from "./mda.ts";

export async function main(): Promise<void> {
  await runService({
    name: "mda",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9024,
    shape: mdaShape,
    async start({ pool, bus, logger, config }) {
      return startMda({ pool, bus, logger, config });
    },
  });
}
