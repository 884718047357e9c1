import { runService } from "@mailstack/runtime";

export async function main(): Promise<void> {
  await runService({
    name: "mta-inbound",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9025,
    shape: {},
    async start() {
      return { stop: async () => {} };
    },
  });
}
