import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { addDomain } from "@mailstack/db";
import { createTestDatabase, freePort, runMailctl, type TestDatabase } from "@mailstack/testkit";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  for (let i = 0; i < 5; i++) await addDomain(db.pool, `d${i}.example.test`);
});
after(async () => {
  // The old mailctl created the mistyped database; never leave one behind.
  await db.pool.query(`DROP DATABASE IF EXISTS ${db.name}_typo WITH (FORCE)`).catch(() => undefined);
  await db.drop();
});

function withDatabase(name: string, password?: string): string {
  const url = new URL(db.url);
  url.pathname = `/${name}`;
  if (password) url.password = password;
  return url.toString();
}

test("an unreachable database is one line naming DATABASE_URL without its password, exit 1", async () => {
  const url = new URL(withDatabase("mailstack", "s3cret-pw"));
  url.port = String(await freePort()); // nothing listens there
  const result = await runMailctl(url.toString(), ["domain", "list"]);
  assert.equal(result.code, 1, result.stderr);
  assert.equal(result.stdout, "");
  const [line, ...more] = result.stderr.trimEnd().split("\n");
  assert.equal(more.length, 0, result.stderr);
  assert.match(line ?? "", /^mailctl: cannot use the database at DATABASE_URL=postgres:\/\/[^ ]*:\*\*\*@127\.0\.0\.1:\d+\/mailstack: \S/);
  assert.ok(!result.stderr.includes("s3cret-pw"));
});

test("a database that does not exist is refused and not created", async () => {
  const missing = `${db.name}_typo`;
  const result = await runMailctl(withDatabase(missing), ["domain", "list"]);
  assert.equal(result.code, 1, result.stderr);
  assert.equal(result.stdout, "");
  assert.equal(result.stderr, `mailctl: database ${missing} does not exist (run the migrate command or ./mailstack start to create it)\n`);
  const created = await db.pool.query("SELECT 1 FROM pg_database WHERE datname = $1", [missing]);
  assert.equal(created.rowCount, 0, "mailctl created the mistyped database");
});

test("the existing database still works (list of 5 domains)", async () => {
  const result = await runMailctl(db.url, ["domain", "list"]);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stdout.trimEnd().split("\n").length, 5);
});
