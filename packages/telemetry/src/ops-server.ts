import { createServer, type Server } from "node:http";
import { registry } from "./metrics.ts";

export interface OpsServerOptions {
  port: number;
  host?: string;
  /** Resolves true when the service can do its work (dependencies reachable, listeners up). */
  ready: () => Promise<boolean> | boolean;
}

/** Serves /healthz (the process is alive), /readyz (it can do its work) and /metrics (Prometheus). */
export async function startOpsServer(options: OpsServerOptions): Promise<Server> {
  const server = createServer((request, response) => {
    const path = (request.url ?? "/").split("?")[0];
    const send = (status: number, body: string, type = "text/plain; charset=utf-8") => {
      response.writeHead(status, { "content-type": type });
      response.end(body);
    };
    if (request.method !== "GET" && request.method !== "HEAD") return send(405, "method not allowed\n");
    if (path === "/healthz") return send(200, "ok\n");
    if (path === "/readyz") {
      Promise.resolve()
        .then(options.ready)
        .then(
          (ready) => send(ready ? 200 : 503, ready ? "ready\n" : "not ready\n"),
          () => send(503, "not ready\n"),
        );
      return;
    }
    if (path === "/metrics") {
      registry.metrics().then(
        (text) => send(200, text, registry.contentType),
        (error: Error) => send(500, `${error.message}\n`),
      );
      return;
    }
    send(404, "not found\n");
  });
  server.keepAliveTimeout = 5_000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    // No host: every address, IPv6 and IPv4, so probes work in IPv6-only clusters too.
    server.listen(options.port, options.host, () => resolve());
  });
  return server;
}
