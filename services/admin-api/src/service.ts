import { runService } from "@mailstack/runtime";

export async function main(): Promise<void> {
  await runService({
    name: "admin-api",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9080,
    shape: {},
    async start() {
      return { stop: async () => {} };
    },
  });
}
