import { createApiToken } from "@mailstack/admin-ops";
import type { Pool } from "@mailstack/db";
import { createLogger } from "@mailstack/telemetry";
import { createTestDatabase, runMailctl, type TestDatabase } from "@mailstack/testkit";
import { apiConfig, type ApiConfig } from "../src/api/config.ts";
import { startAdminApi, type RunningAdminApi } from "../src/api/server.ts";

export interface ApiHarness {
  db: TestDatabase;
  api: RunningAdminApi;
  /** An operator token. */
  token: string;
  /** fetch against the listening server with the operator token (or `token: null` for none). */
  call(method: string, path: string, options?: { body?: unknown; token?: string | null; raw?: Buffer; contentType?: string; signal?: AbortSignal }): Promise<Response>;
  close(): Promise<void>;
}

/** A real admin API listening on an ephemeral loopback port, on a database of the test file's own. */
export async function startHarness(overrides: Partial<ApiConfig> = {}): Promise<ApiHarness> {
  const db = await createTestDatabase();
  let api: RunningAdminApi | undefined;
  let token: string;
  try {
    api = await startAdminApi({
      pool: db.pool,
      logger: createLogger("admin-api", process.env.TEST_LOG_LEVEL ?? "silent"),
      config: apiConfig(overrides),
    });
    token = (await createApiToken(db.pool, "operator")).token;
  } catch (error) {
    // Leave nothing open that would keep the test process alive.
    await api?.stop();
    await db.drop();
    throw error;
  }
  const running = api;
  return {
    db,
    api: running,
    token,
    async call(method, path, options = {}) {
      const headers: Record<string, string> = {};
      const bearer = options.token === undefined ? token : options.token;
      if (bearer !== null) headers.authorization = `Bearer ${bearer}`;
      let body: Buffer | string | undefined;
      if (options.raw) {
        body = options.raw;
        headers["content-type"] = options.contentType ?? "application/octet-stream";
      } else if (options.body !== undefined) {
        body = JSON.stringify(options.body);
        headers["content-type"] = "application/json";
      }
      return fetch(`${running.url}${path}`, { method, headers, body, signal: options.signal ?? null });
    },
    async close() {
      await running.stop();
      await db.drop();
    },
  };
}


/** Runs the real mailctl as a process, as an operator would. */
export const mailctl = runMailctl;

export interface WatchedQuery {
  text: string;
  values: unknown[];
  /** Rows PostgreSQL sent back. */
  rows: number;
}

/**
 * Runs fn while noting every query the (real) pool runs and how many rows each returned: what
 * the API read from PostgreSQL to answer, and the SQL text to EXPLAIN.
 */
export async function watchQueries(pool: Pool, fn: () => Promise<void>): Promise<WatchedQuery[]> {
  const seen: WatchedQuery[] = [];
  const original = pool.query;
  const watched = async (...args: unknown[]) => {
    const result = await (original as (...a: unknown[]) => Promise<{ rows: unknown[] }>).apply(pool, args);
    const query = typeof args[0] === "string" ? { text: args[0], values: args[1] } : (args[0] as { text: string; values?: unknown[] });
    seen.push({ text: query.text, values: (query.values as unknown[] | undefined) ?? [], rows: result.rows.length });
    return result;
  };
  pool.query = watched as typeof pool.query;
  try {
    await fn();
  } finally {
    pool.query = original;
  }
  return seen;
}
