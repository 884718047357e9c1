import type { FastifyInstance } from "fastify";
import { Histogram, registry } from "@mailstack/telemetry";

// Labelled by the route pattern (/accounts/:address), never the concrete URL, so that the
// number of series stays bounded and no address ends up in a metric.
const requestDuration = new Histogram({
  name: "admin_api_request_duration_seconds",
  help: "Admin API requests by method, route pattern and status code",
  labelNames: ["method", "route", "status"] as const,
  buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60],
  registers: [registry],
});

export function installMetrics(app: FastifyInstance): void {
  app.addHook("onResponse", async (request, reply) => {
    const route = request.routeOptions.url ?? "unknown";
    requestDuration.observe({ method: request.method, route, status: String(reply.statusCode) }, reply.elapsedTime / 1000);
  });
}
