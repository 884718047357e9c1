import { Ajv } from "ajv";
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from "fastify";
import swagger from "@fastify/swagger";
import swaggerUi from "@fastify/swagger-ui";
import { FastifyOtelInstrumentation } from "@fastify/otel";
import type { Pool } from "@mailstack/db";
import type { Logger } from "@mailstack/telemetry";
import { installAuth } from "./auth.ts";
import type { ApiConfig } from "./config.ts";
import { frameworkError, installErrorHandler, installNulGuard } from "./errors.ts";
import { installMetrics } from "./metrics.ts";
import { directoryRoutes, documentOptionalBodies } from "./routes/directory.ts";
import { filterRoutes } from "./routes/filters.ts";
import { journeyRoutes } from "./routes/journey.ts";
import { documentMailboxBodies, mailboxRoutes } from "./routes/mailbox.ts";
import { queueRoutes } from "./routes/queue.ts";

export interface AdminApiOptions {
  pool: Pool;
  logger: Logger;
  config: ApiConfig;
}

// One instrumentation per process: it reads the global tracer provider that main.ts started.
let otel: FastifyOtelInstrumentation | undefined;

/** The Fastify application with every route; not listening yet (tests may `inject`). */
export async function buildAdminApi({ pool, logger, config }: AdminApiOptions): Promise<FastifyInstance> {
  const app = Fastify({
    loggerInstance: logger.child({ component: "http" }) as FastifyBaseLogger,
    bodyLimit: config.API_BODY_LIMIT,
    return503OnClosing: true,
    // A path segment is an address (up to 320 characters, each non-ASCII byte of it sent as %XX);
    // Fastify's default of 100 answered 414 for a longer one the API itself had created.
    routerOptions: { maxParamLength: 4096 },
    frameworkErrors: (error, _request, reply) => frameworkError(error, reply),
    forceCloseConnections: "idle",
    // Fastify turns Node's timeouts off (0); without one a client that sent its headers and then
    // nothing, or a byte now and then, held its connection (a file descriptor) for ever.
    connectionTimeout: config.API_IDLE_TIMEOUT,
  });
  otel ??= new FastifyOtelInstrumentation();
  await app.register(otel.plugin());

  await app.register(swagger, {
    openapi: {
      openapi: "3.0.3",
      info: {
        title: "mailstack admin API",
        version: "1",
        description: "Every route needs `Authorization: Bearer <token>` (create one with `mailctl token create NAME`). "
          + "Refusals are `{ statusCode, error, message, field? }`; validation errors are 400 and name the field.",
      },
      components: { securitySchemes: { bearer: { type: "http", scheme: "bearer" } } },
      security: [{ bearer: [] }],
    },
    transformObject: (document) => ("openapiObject" in document ? documentOptionalBodies(documentMailboxBodies(document.openapiObject)) : document.swaggerObject),
  });
  await app.register(swaggerUi, { routePrefix: "/docs" });

  // Query strings and path segments are text, so their numbers and booleans are converted; a JSON
  // body has types of its own, and converting them turned {"disabled": null} into false (enabling
  // the account), {"quotaBytes": ""} into null (unlimited) and {"password": false} into "false".
  // Unknown fields are refused (400 naming them) rather than silently dropped.
  const ajvOptions = { removeAdditional: false, useDefaults: true, allErrors: false, addUsedSchema: false } as const;
  const textAjv = new Ajv({ ...ajvOptions, coerceTypes: "array" });
  const jsonAjv = new Ajv({ ...ajvOptions, coerceTypes: false });
  app.setValidatorCompiler(({ schema, httpPart }) => (httpPart === "body" ? jsonAjv : textAjv).compile(schema));

  installErrorHandler(app);
  installMetrics(app);
  installAuth(app, pool, config.API_DOCS_PUBLIC ? ["/docs"] : []);
  installNulGuard(app);
  directoryRoutes(app, pool, config);
  filterRoutes(app, pool);
  journeyRoutes(app, pool, config);
  mailboxRoutes(app, pool, config);
  await app.register(async (scope) => queueRoutes(scope, pool));
  return app;
}

export interface RunningAdminApi {
  app: FastifyInstance;
  port: number;
  url: string;
  /** Stops accepting connections, lets in-flight requests finish, then resolves. */
  stop(): Promise<void>;
}

export async function startAdminApi(options: AdminApiOptions): Promise<RunningAdminApi> {
  const app = await buildAdminApi(options);
  await app.listen({ port: options.config.API_PORT, host: options.config.API_HOST });
  const address = app.server.address();
  const port = typeof address === "object" && address ? address.port : options.config.API_PORT;
  const host = options.config.API_HOST === "0.0.0.0" ? "127.0.0.1" : options.config.API_HOST;
  return {
    app,
    port,
    url: `http://${host.includes(":") ? `[${host}]` : host}:${port}`,
    async stop() {
      const closing = app.close();
      // close() ends the connections idle at that moment; a keep-alive connection whose request
      // (a long export, say) finishes later would otherwise hold the server open.
      const sweep = setInterval(() => app.server.closeIdleConnections(), 100);
      try {
        await closing;
      } finally {
        clearInterval(sweep);
      }
    },
  };
}
