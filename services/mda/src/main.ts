import { startTelemetry } from "@mailstack/telemetry/sdk";

// Telemetry starts before anything it instruments (pg, net, dns) is imported.
startTelemetry("mda");
const { main } = await import("./service.ts");
await main();
