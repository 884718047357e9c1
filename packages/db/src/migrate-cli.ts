import { commonShape, loadConfig } from "@mailstack/config";
import { createPool } from "./pool.ts";
import { databaseFailure, ensureDatabase } from "./ensure-database.ts";
import { migrate } from "./migrate.ts";

const config = loadConfig({ DATABASE_URL: commonShape.DATABASE_URL });
const pool = createPool({ url: config.DATABASE_URL, max: 1, applicationName: "migrate" });
try {
  await ensureDatabase(config.DATABASE_URL);
  const applied = await migrate(pool);
  console.log(applied.length ? `applied: ${applied.join(", ")}` : "schema is up to date");
} catch (error) {
  // One line in the Job's log rather than a stack trace; exit 1 fails the Job.
  console.error(`migrate: ${databaseFailure(error, config.DATABASE_URL)}`);
  process.exitCode = 1;
} finally {
  await pool.end();
}
