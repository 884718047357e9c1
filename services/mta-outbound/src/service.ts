import { runService } from "@mailstack/runtime";

export async function main(): Promise<void> {
  await runService({
    name: "mta-outbound",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9026,
    shape: {},
    async start() {
      return { stop: async () => {} };
    },
  });
}
