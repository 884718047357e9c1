import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { fileURLToPath } from "node:url";
import pg from "pg";
import { DEFAULT_DATABASE_URL } from "@mailstack/config";
import { checkDatabase, ensureDatabase, MissingDatabaseError, redactDatabaseUrl } from "../src/index.ts";

const migrateCli = fileURLToPath(new URL("../src/migrate-cli.ts", import.meta.url));

function runMigrate(databaseUrl: string) {
  return spawnSync(process.execPath, [migrateCli], { env: { ...process.env, DATABASE_URL: databaseUrl }, encoding: "utf8", timeout: 60_000 });
}

const baseUrl = process.env.TEST_DATABASE_URL ?? process.env.DATABASE_URL ?? DEFAULT_DATABASE_URL;
const suffix = randomBytes(5).toString("hex");
// A role that may connect to its own database only, as with a managed PostgreSQL's per-database user.
const role = `mailstack_t_role_${suffix}`;
const ownDatabase = `mailstack_t_own_${suffix}`;
const createdDatabase = `mailstack_t_new_${suffix}`;

function urlFor(database: string, user?: string): string {
  const url = new URL(baseUrl);
  url.pathname = `/${database}`;
  if (user) {
    url.username = user;
    url.password = "";
  }
  return url.toString();
}

async function asAdmin(sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: urlFor("postgres") });
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end();
  }
}

before(async () => {
  await asAdmin(`CREATE ROLE ${role} LOGIN`);
  await asAdmin(`CREATE DATABASE ${ownDatabase} OWNER ${role}`);
  await asAdmin(`REVOKE CONNECT ON DATABASE ${ownDatabase} FROM PUBLIC`);
  // The server is shared, so CONNECT on "postgres" cannot be revoked from PUBLIC and pg_hba.conf
  // is not ours: a library that does not exist, preloaded for this role in "postgres" only, makes
  // every connection of this role to "postgres" fail (FATAL) and leaves every other role alone.
  // DROP ROLE removes the setting.
  await asAdmin(`ALTER ROLE ${role} IN DATABASE postgres SET session_preload_libraries = 'mailstack_test_refuses_${suffix}'`);
});

after(async () => {
  await asAdmin(`DROP DATABASE IF EXISTS ${ownDatabase} WITH (FORCE)`);
  await asAdmin(`DROP DATABASE IF EXISTS ${createdDatabase} WITH (FORCE)`);
  await asAdmin(`DROP ROLE IF EXISTS ${role}`);
});

test("the test role cannot connect to the postgres maintenance database (the setup works)", async () => {
  const client = new pg.Client({ connectionString: urlFor("postgres", role) });
  await assert.rejects(client.connect());
  await client.end().catch(() => undefined);
});

test("an existing database is used without connecting to the postgres maintenance database", async () => {
  await ensureDatabase(urlFor(ownDatabase, role));
});

test("a missing database that the role cannot create is named in the error", async () => {
  await assert.rejects(ensureDatabase(urlFor(createdDatabase, role)), (error: Error) => {
    assert.match(error.message, new RegExp(`database "${createdDatabase}" does not exist and could not be created`));
    return true;
  });
});

test("a missing database is created through the postgres database by a role allowed to", async () => {
  await assert.rejects(checkDatabase(urlFor(createdDatabase)), MissingDatabaseError);
  await ensureDatabase(urlFor(createdDatabase));
  await checkDatabase(urlFor(createdDatabase));
  await ensureDatabase(urlFor(createdDatabase)); // exists now: nothing to do
});

test("checkDatabase names the missing database and never creates it", async () => {
  const name = `mailstack_t_absent_${suffix}`;
  await assert.rejects(checkDatabase(urlFor(name, role)), (error: unknown) => {
    assert.ok(error instanceof MissingDatabaseError);
    assert.equal(error.database, name);
    return true;
  });
  await assert.rejects(checkDatabase(urlFor(name)), MissingDatabaseError);
});

test("redactDatabaseUrl hides the password only", () => {
  assert.equal(redactDatabaseUrl("postgres://mail:s3cret@db.example:5432/mail"), "postgres://mail:***@db.example:5432/mail");
  assert.equal(redactDatabaseUrl("postgres://mail@db.example/mail"), "postgres://mail@db.example/mail");
});

test("the migrate command (the Kubernetes Job) migrates the database of a role limited to it", async () => {
  const result = runMigrate(urlFor(ownDatabase, role));
  assert.equal(result.status, 0, result.stderr);
  assert.match(result.stdout, /^applied: /);
  const client = new pg.Client({ connectionString: urlFor(ownDatabase, role) });
  await client.connect();
  try {
    const tables = await client.query("SELECT count(*)::int AS n FROM pg_tables WHERE schemaname = 'public' AND tableowner = $1", [role]);
    assert.ok(tables.rows[0].n > 0, "the migrations' tables belong to the limited role");
  } finally {
    await client.end();
  }
});

test("the migrate command says in one line, without the password, that the database cannot be reached", () => {
  const url = new URL(urlFor(ownDatabase, role));
  url.password = "s3cret-pw";
  url.port = "1"; // nothing listens on a privileged port 1 here
  const result = runMigrate(url.toString());
  assert.equal(result.status, 1);
  assert.equal(result.stdout, "");
  const [line, ...more] = result.stderr.trimEnd().split("\n");
  assert.equal(more.length, 0, result.stderr);
  assert.match(line ?? "", /^migrate: cannot use the database at DATABASE_URL=postgres:\/\/mailstack_t_role_\w+:\*\*\*@127\.0\.0\.1:1\/\w+: \S/);
  assert.ok(!result.stderr.includes("s3cret-pw"));
});
