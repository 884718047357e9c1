import type { Server } from "node:http";
import v8 from "node:v8";
import { ConfigError, commonShape, isFullyQualified, loadConfig, port, type CommonConfig, type z } from "@mailstack/config";
import { createPool, migrate, type Pool } from "@mailstack/db";
import { connectBus, provisionBus, type Bus } from "@mailstack/bus";
import { createLogger, startOpsServer, stopTelemetry, type Logger } from "@mailstack/telemetry";
import { watchNatsLink } from "./nats-link.ts";
import { databaseReadiness } from "./database-ready.ts";
export * from "./tls.ts";
export * from "./tls-reload.ts";
export * from "./connection-slots.ts";

export interface ServiceContext<C> {
  name: string;
  config: C;
  logger: Logger;
  pool: Pool;
  bus: Bus;
}

export interface RunningService {
  /** Extra readiness condition beyond PostgreSQL and NATS being reachable. */
  ready?: () => boolean | Promise<boolean>;
  /** Stop accepting new work, finish in-flight work, release resources. */
  stop: () => Promise<void>;
}

export interface ServiceDefinition<S extends z.ZodRawShape> {
  name: string;
  /** Environment variable naming this service's health/metrics port, and its default. */
  opsPortVariable: string;
  opsPortDefault: number;
  shape: S;
  start: (context: ServiceContext<CommonConfig & z.infer<z.ZodObject<S>>>) => Promise<RunningService>;
}

/**
 * Wires a service: validated config, JSON logger, the PostgreSQL pool (with migrations),
 * the JetStream connection (with streams and consumers), /healthz /readyz /metrics,
 * and graceful shutdown on SIGTERM or SIGINT: stop accepting, finish in-flight work, exit.
 */
export async function runService<S extends z.ZodRawShape>(definition: ServiceDefinition<S>): Promise<void> {
  const shape = { ...commonShape, ...definition.shape, [definition.opsPortVariable]: port(definition.opsPortDefault) };
  let config: CommonConfig & z.infer<z.ZodObject<S>> & Record<string, unknown>;
  try {
    config = loadConfig(shape) as typeof config;
  } catch (error) {
    if (error instanceof ConfigError) {
      console.error(JSON.stringify({ level: "fatal", service: definition.name, msg: error.message }));
      process.exit(78);
    }
    throw error;
  }
  const logger = createLogger(definition.name, config.LOG_LEVEL);
  if (!isFullyQualified(config.MAIL_HOSTNAME)) {
    // Many MTAs refuse or score down an EHLO that is not a fully qualified name (Postfix's reject_non_fqdn_helo_hostname).
    logger.warn({ mailHostname: config.MAIL_HOSTNAME }, "MAIL_HOSTNAME is not a fully qualified domain name; set it to this host's public name (its MX target) before exchanging mail with other servers");
  }
  // Not allowed in NODE_OPTIONS, and read by V8 at every full collection, so set here.
  if (config.HEAP_GROWING_PERCENT > 0) v8.setFlagsFromString(`--heap-growing-percent=${config.HEAP_GROWING_PERCENT}`);
  let shuttingDown = false;
  let service: RunningService | undefined;
  let bus: Bus | undefined;
  let ops: Server | undefined;

  const pool = createPool({ url: config.DATABASE_URL, max: config.DATABASE_POOL_SIZE, applicationName: definition.name });
  // A service that cannot start (PostgreSQL or NATS out of reach for good, a port in use, a bad
  // certificate) says why at level fatal and exits 1, so that its supervisor sees it and restarts
  // it, instead of staying up and never ready (or dying with a bare stack trace).
  const cannotStart = async (error: unknown, step?: string): Promise<never> => {
    logger.fatal({ err: error }, step ? `${definition.name} could not start: ${step}` : `${definition.name} could not start`);
    ops?.close();
    await Promise.race([Promise.allSettled([bus?.close(), pool.end()]), new Promise((resolve) => setTimeout(resolve, 2_000))]);
    process.exit(1);
  };

  try {
    await retry(() => migrate(pool), logger, "PostgreSQL");
  } catch (error) {
    return cannotStart(error, `PostgreSQL (DATABASE_URL) not reachable or not usable`);
  }
  logger.info("PostgreSQL reachable, migrations applied");
  try {
    bus = await retry(() => connectBus({ url: config.NATS_URL, name: definition.name, prefix: config.BUS_PREFIX }), logger, "NATS");
    await provisionBus(bus);
  } catch (error) {
    return cannotStart(error, `NATS (NATS_URL) not reachable or without JetStream`);
  }
  logger.info("NATS reachable, streams and consumers in place");
  const natsLink = watchNatsLink(bus.nc, logger);
  const databaseReady = databaseReadiness(pool);
  const readyBus = bus;

  try {
    ops = await startOpsServer({
      port: config[definition.opsPortVariable] as number,
      ready: async () => {
        if (shuttingDown || !service || !natsLink.connected()) return false;
        if (!(await databaseReady())) return false;
        return service.ready ? service.ready() : true;
      },
    });
  } catch (error) {
    return cannotStart(error, `ops port ${definition.opsPortVariable}=${config[definition.opsPortVariable]}`);
  }
  const opsServer = ops;

  try {
    service = await definition.start({ name: definition.name, config, logger, pool, bus: readyBus });
  } catch (error) {
    return cannotStart(error);
  }
  logger.info({ opsPort: config[definition.opsPortVariable] }, `${definition.name} ready`);

  const shutdown = async (signal: string) => {
    if (shuttingDown) return;
    shuttingDown = true;
    logger.info({ signal }, "shutting down: finishing in-flight work");
    const deadline = setTimeout(() => {
      logger.error("shutdown took too long; exiting");
      process.exit(1);
    }, config.SHUTDOWN_TIMEOUT);
    deadline.unref();
    try {
      await service?.stop();
      await readyBus.close();
      await pool.end();
      opsServer.close();
      await stopTelemetry();
      logger.info("stopped");
      process.exit(0);
    } catch (error) {
      logger.error({ err: error }, "error during shutdown");
      process.exit(1);
    }
  };
  process.once("SIGTERM", () => void shutdown("SIGTERM"));
  process.once("SIGINT", () => void shutdown("SIGINT"));
}

async function retry<T>(fn: () => Promise<T>, logger: Logger, what: string): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (error) {
      if (attempt >= 30) throw error;
      logger.warn({ err: error, attempt }, `${what} not ready yet (${(error as Error).message}); retrying`);
      await new Promise((resolve) => setTimeout(resolve, Math.min(5_000, 200 * attempt)));
    }
  }
}
