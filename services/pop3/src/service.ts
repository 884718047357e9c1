import { runService } from "@mailstack/runtime";

export async function main(): Promise<void> {
  await runService({
    name: "pop3",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9110,
    shape: {},
    async start() {
      return { stop: async () => {} };
    },
  });
}
