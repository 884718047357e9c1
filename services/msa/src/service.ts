import { runService } from "@mailstack/runtime";

export async function main(): Promise<void> {
  await runService({
    name: "msa",
    opsPortVariable: "OPS_PORT",
    opsPortDefault: 9587,
    shape: {},
    async start() {
      return { stop: async () => {} };
    },
  });
}
