import { startTelemetry } from "@mailstack/telemetry/sdk";

// Telemetry starts before anything it instruments (pg, net, dns) is imported.
startTelemetry("pop3");
const { main } = await import("./service.ts");
await main();
