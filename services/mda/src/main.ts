import { setFlagsFromString } from "node:v8";
import { startTelemetry } from "@mailstack/telemetry/sdk";

// A small young generation keeps the resident size well under 200 MB under load, for a little
// more garbage-collection CPU; NODE_OPTIONS=--max-semi-space-size=N still decides if given.
if (!/--max-semi-space-size/.test(process.env.NODE_OPTIONS ?? "")) setFlagsFromString("--max-semi-space-size=2");

// Telemetry starts before anything it instruments (pg, net, dns) is imported.
startTelemetry("mda");
const { main } = await import("./service.ts");
await main();
