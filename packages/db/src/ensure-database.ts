import pg from "pg";

/** SQLSTATE invalid_catalog_name: the database named at connection does not exist. */
const NO_SUCH_DATABASE = "3D000";

/** The database named in DATABASE_URL does not exist (and was not to be created). */
export class MissingDatabaseError extends Error {
  readonly database: string;
  constructor(database: string) {
    super(`database "${database}" does not exist`);
    this.name = "MissingDatabaseError";
    this.database = database;
  }
}

/** The URL with its password replaced, for messages and logs. */
export function redactDatabaseUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return "(not a URL)";
  }
}

/** One line for an operator: why the database at the URL cannot be used, naming DATABASE_URL without its password. */
export function databaseFailure(error: unknown, url: string): string {
  const failure = error as { code?: string; message?: string; errors?: Error[] };
  // A connection refused on every address of a name is an AggregateError with an empty message.
  const reason = failure.message || failure.errors?.[0]?.message || failure.code || String(error);
  return `cannot use the database at DATABASE_URL=${redactDatabaseUrl(url)}: ${reason}`;
}

/**
 * Checks that the database named in the URL exists by connecting to it; throws MissingDatabaseError
 * when PostgreSQL answers that it does not, and the connection error otherwise.
 */
export async function checkDatabase(url: string): Promise<void> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5_000 });
  try {
    await client.connect();
  } catch (error) {
    if ((error as { code?: string }).code === NO_SUCH_DATABASE) throw new MissingDatabaseError(databaseName(url));
    throw error;
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * Creates the database named in the URL when it does not exist. The target database is tried
 * first, so a role allowed to connect only to its own database (pg_hba.conf, a managed
 * PostgreSQL's per-database user, PgBouncer) works once the database exists; only a missing one
 * takes a connection to the `postgres` maintenance database and a role allowed to create databases.
 */
export async function ensureDatabase(url: string): Promise<void> {
  const name = databaseName(url);
  if (!name) return;
  try {
    await checkDatabase(url);
    return;
  } catch (error) {
    if (!(error instanceof MissingDatabaseError)) throw error;
  }
  const admin = new URL(url);
  admin.pathname = "/postgres";
  const client = new pg.Client({ connectionString: admin.toString(), connectionTimeoutMillis: 5_000 });
  try {
    await client.connect();
    await client.query(`CREATE DATABASE "${name.replace(/"/g, '""')}"`).catch((error: { code?: string }) => {
      if (error.code !== "42P04") throw error; // created meanwhile by another process
    });
  } catch (error) {
    throw new Error(`database "${name}" does not exist and could not be created through the postgres database: ${(error as Error).message}`, { cause: error });
  } finally {
    await client.end().catch(() => undefined);
  }
}

function databaseName(url: string): string {
  return decodeURIComponent(new URL(url).pathname.slice(1));
}
