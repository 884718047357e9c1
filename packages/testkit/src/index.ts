import { createHash, randomBytes } from "node:crypto";
import pg from "pg";
import { DEFAULT_DATABASE_URL, DEFAULT_NATS_URL } from "@mailstack/config";
import { createPool, ensureDatabase, loadMigrations, migrate, type Pool } from "@mailstack/db";
import { connectBus, deleteStreams, provisionBus, type Bus, type ProvisionOptions } from "@mailstack/bus";

const baseUrl = process.env.TEST_DATABASE_URL ?? process.env.DATABASE_URL ?? DEFAULT_DATABASE_URL;
const natsUrl = process.env.TEST_NATS_URL ?? process.env.NATS_URL ?? DEFAULT_NATS_URL;

function urlFor(database: string): string {
  const url = new URL(baseUrl);
  url.pathname = `/${database}`;
  return url.toString();
}

async function withAdmin<T>(fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: urlFor("postgres") });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

/** A migrated template database named after the migrations' content, built once and reused by every test file. */
async function templateDatabase(): Promise<string> {
  const migrations = await loadMigrations();
  const hash = createHash("sha256");
  for (const m of migrations) hash.update(m.name).update(m.sql);
  const name = `mailstack_tpl_${hash.digest("hex").slice(0, 12)}`;
  await withAdmin(async (admin) => {
    await admin.query("SELECT pg_advisory_lock(4207002)");
    try {
      const exists = await admin.query("SELECT 1 FROM pg_database WHERE datname = $1", [name]);
      if (exists.rowCount) return;
      const building = `${name}_building`;
      await admin.query(`DROP DATABASE IF EXISTS ${building}`);
      await admin.query(`CREATE DATABASE ${building}`);
      const pool = createPool({ url: urlFor(building), max: 1 });
      try {
        await migrate(pool);
      } finally {
        await pool.end();
      }
      await admin.query(`ALTER DATABASE ${building} RENAME TO ${name}`);
    } finally {
      await admin.query("SELECT pg_advisory_unlock(4207002)");
    }
  });
  return name;
}

export interface TestDatabase {
  name: string;
  url: string;
  pool: Pool;
  drop(): Promise<void>;
}

/** A fresh, migrated database of this test file's own, so files run in parallel and re-run without cleanup. */
export async function createTestDatabase(): Promise<TestDatabase> {
  await ensureDatabase(urlFor("postgres"));
  const template = await templateDatabase();
  const name = `mailstack_test_${randomBytes(6).toString("hex")}`;
  for (let attempt = 0; ; attempt++) {
    try {
      await withAdmin((admin) => admin.query(`CREATE DATABASE ${name} TEMPLATE ${template}`));
      break;
    } catch (error) {
      // Two CREATE DATABASE from one template at the same instant: the second sees the first as a user.
      if ((error as { code?: string }).code !== "55006" || attempt > 50) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50 + Math.random() * 100));
    }
  }
  const url = urlFor(name);
  // Small pools: several test files (and the services they start) share PostgreSQL's 100 connections.
  const pool = createPool({ url, max: 10, applicationName: "test" });
  return {
    name,
    url,
    pool,
    async drop() {
      await pool.end().catch(() => undefined);
      await withAdmin((admin) => admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)).catch(() => undefined);
    },
  };
}

export interface TestBus {
  prefix: string;
  url: string;
  bus: Bus;
  cleanup(): Promise<void>;
}

/** Streams and subjects under a prefix of this test file's own, provisioned and removed afterwards. */
export async function createTestBus(options: ProvisionOptions = {}): Promise<TestBus> {
  const prefix = `t${randomBytes(5).toString("hex")}`;
  const bus = await connectBus({ url: natsUrl, name: `test-${prefix}`, prefix });
  await provisionBus(bus, { ackWaitMs: 5_000, ...options });
  return {
    prefix,
    url: natsUrl,
    bus,
    async cleanup() {
      await deleteStreams(bus);
      await bus.close();
    },
  };
}

export interface TestEnv {
  db: TestDatabase;
  testBus: TestBus;
  pool: Pool;
  bus: Bus;
  /** Environment variables that point a service at this test's database and bus. */
  env: Record<string, string>;
  close(): Promise<void>;
}

export async function createTestEnv(options: ProvisionOptions = {}): Promise<TestEnv> {
  const [db, testBus] = await Promise.all([createTestDatabase(), createTestBus(options)]);
  return {
    db,
    testBus,
    pool: db.pool,
    bus: testBus.bus,
    env: {
      DATABASE_URL: db.url,
      DATABASE_POOL_SIZE: "4",
      NATS_URL: testBus.url,
      BUS_PREFIX: testBus.prefix,
      LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? "silent",
    },
    async close() {
      await testBus.cleanup();
      await db.drop();
    },
  };
}

/** Polls until fn returns a truthy value or the timeout passes. */
export async function waitFor<T>(fn: () => Promise<T> | T, timeoutMs = 10_000, intervalMs = 50): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await fn();
      if (value) return value as NonNullable<T>;
    } catch (error) {
      last = error;
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
  throw new Error(`waitFor timed out after ${timeoutMs} ms${last ? `: ${(last as Error).message}` : ""}`);
}

export { startOtlpReceiver, type OtlpReceiver, type ReceivedSpan } from "./otlp.ts";
export { assertNoLoginTimingOracle } from "./timing.ts";
export { analyzeTableScans, type TableScans } from "./plan.ts";
export { freePort, runMailctl, startServiceProcess, type CommandResult, type ServiceProcess } from "./process.ts";
export { postfixAvailable, startPostfix, type Postfix, type PostfixOptions } from "./postfix.ts";
export { tcpProxy, type TcpProxy } from "./proxy.ts";
