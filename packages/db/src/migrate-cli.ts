import { commonShape, loadConfig } from "@mailstack/config";
import { createPool } from "./pool.ts";
import { ensureDatabase } from "./ensure-database.ts";
import { migrate } from "./migrate.ts";

const config = loadConfig({ DATABASE_URL: commonShape.DATABASE_URL });
await ensureDatabase(config.DATABASE_URL);
const pool = createPool({ url: config.DATABASE_URL, max: 1, applicationName: "migrate" });
try {
  const applied = await migrate(pool);
  console.log(applied.length ? `applied: ${applied.join(", ")}` : "schema is up to date");
} finally {
  await pool.end();
}
