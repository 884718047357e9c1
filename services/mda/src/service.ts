import { runService } from "@mailstack/runtime";

export async function main(): Promise<void> {
  await runService({
    name: "mda",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9024,
    shape: {},
    async start() {
      return { stop: async () => {} };
    },
  });
}
