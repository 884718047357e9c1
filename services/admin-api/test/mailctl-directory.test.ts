import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createTestDatabase, runMailctl, type TestDatabase } from "@mailstack/testkit";
import { verifyPassword } from "@mailstack/mail";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
});
after(async () => db.drop());

function mailctl(args: string[], stdin = "") {
  return runMailctl(db.url, args, stdin);
}

async function count(table: string): Promise<number> {
  return (await db.pool.query(`SELECT count(*)::int AS n FROM ${table}`)).rows[0].n;
}

test("domain add, then account add stores the account with a scrypt hash", async () => {
  const domain = await mailctl(["domain", "add", "example.test"]);
  assert.equal(domain.code, 0, domain.stderr);
  const account = await mailctl(["account", "add", "alice@example.test", "--password", "s3cret"]);
  assert.equal(account.code, 0, account.stderr);
  const row = (await db.pool.query("SELECT password_hash FROM accounts WHERE address = 'alice@example.test'")).rows[0];
  assert.match(row.password_hash, /^scrypt\$/);
  assert.ok(!row.password_hash.includes("s3cret"));
  assert.ok(await verifyPassword("s3cret", row.password_hash));
});

test("--password-stdin, quotas, listing and passwd", async () => {
  const added = await mailctl(["account", "add", "bob@example.test", "--password-stdin", "--quota", "10M"], "from-stdin\n");
  assert.equal(added.code, 0, added.stderr);
  const row = (await db.pool.query("SELECT password_hash, quota_bytes FROM accounts WHERE address = 'bob@example.test'")).rows[0];
  assert.ok(await verifyPassword("from-stdin", row.password_hash));
  assert.equal(row.quota_bytes, 10 * 1024 * 1024);
  const changed = await mailctl(["account", "passwd", "bob@example.test"], "changed\n");
  assert.equal(changed.code, 0, changed.stderr);
  const after = (await db.pool.query("SELECT password_hash FROM accounts WHERE address = 'bob@example.test'")).rows[0];
  assert.ok(await verifyPassword("changed", after.password_hash));
  const list = await mailctl(["account", "list", "example.test"]);
  assert.match(list.stdout, /^alice@example\.test\t/m);
  assert.match(list.stdout, /^bob@example\.test\tused 0B of 10MiB/m);
});

test("aliases: add, list, catch-all, remove", async () => {
  assert.equal((await mailctl(["alias", "add", "team@example.test", "alice@example.test", "bob@example.test", "x@remote.test"])).code, 0);
  assert.equal((await mailctl(["alias", "add", "*@example.test", "alice@example.test"])).code, 0);
  const list = await mailctl(["alias", "list"]);
  assert.match(list.stdout, /^\*@example\.test\talice@example\.test$/m);
  assert.match(list.stdout, /^team@example\.test\talice@example\.test, bob@example\.test, x@remote\.test$/m);
  assert.equal((await mailctl(["alias", "remove", "team@example.test"])).code, 0);
  assert.doesNotMatch((await mailctl(["alias", "list"])).stdout, /team@/);
});

test("bad input gets a one-line error, a non-zero exit and changes nothing", async () => {
  const before = { domains: await count("domains"), accounts: await count("accounts"), aliases: await count("aliases") };
  const cases: Array<{ args: string[]; stdin?: string; error: RegExp; code: number }> = [
    { args: ["account", "add", "not-an-address", "--password", "x"], error: /invalid address/, code: 1 },
    { args: ["account", "add", "carol@nowhere.test", "--password", "x"], error: /no such domain: nowhere\.test/, code: 1 },
    { args: ["account", "add", "alice@example.test", "--password", "x"], error: /already exists/, code: 1 },
    { args: ["domain", "add", "example.test"], error: /domain already exists/, code: 1 },
    { args: ["domain", "add", "bad_domain!"], error: /invalid domain/, code: 1 },
    { args: ["domain", "add", "192.0.2.1"], error: /invalid domain/, code: 1 },
    { args: ["account", "add", "dave@example.test"], error: /password is needed/, code: 2 },
    { args: ["account", "add", "dave@example.test", "--password", "x", "--quota", "lots"], error: /invalid quota/, code: 2 },
    { args: ["alias", "add", "list@example.test", "ghost@example.test"], error: /no account or alias/, code: 1 },
    { args: ["alias", "add", "alice@example.test", "bob@example.test"], error: /already exists/, code: 1 },
    { args: ["alias", "remove", "nothing@example.test"], error: /no such alias/, code: 1 },
    { args: ["account", "remove", "nobody@example.test"], error: /no such account/, code: 1 },
    { args: ["domain", "remove", "example.test"], error: /still has accounts/, code: 1 },
    { args: ["domain", "frobnicate"], error: /unknown command/, code: 2 },
    // Numbers past what PostgreSQL's bigint holds are usage errors, not a database error (exit 70).
    { args: ["account", "quota", "alice@example.test", "99999999999999999999"], error: /invalid quota/, code: 2 },
    { args: ["queue", "show", "99999999999999999999"], error: /invalid id/, code: 2 },
  ];
  for (const c of cases) {
    const result = await mailctl(c.args, c.stdin);
    assert.equal(result.code, c.code, `${c.args.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr.split("\n")[0]!, c.error, c.args.join(" "));
    assert.match(result.stderr.split("\n")[0]!, /^mailctl: /);
  }
  assert.deepEqual({ domains: await count("domains"), accounts: await count("accounts"), aliases: await count("aliases") }, before);
});

test("--help shows a command's or a group's usage and exits 0, without the database; a bare group names its commands", async () => {
  // No PostgreSQL listens here: help must not need one.
  const nowhere = "postgres://nobody@127.0.0.1:1/none";
  const one = await runMailctl(nowhere, ["queue", "list", "--help"]);
  assert.equal(one.code, 0, one.stderr);
  assert.match(one.stdout, /^usage: mailctl queue list \[--state /);
  const group = await runMailctl(nowhere, ["queue", "-h"]);
  assert.equal(group.code, 0, group.stderr);
  for (const name of ["list", "show", "retry", "delete", "purge"]) assert.match(group.stdout, new RegExp(`mailctl queue ${name} `));
  assert.doesNotMatch(group.stdout, /mailctl domain /);
  const bare = await runMailctl(nowhere, ["account"]);
  assert.equal(bare.code, 2);
  assert.match(bare.stderr, /account needs a subcommand/);
  assert.match(bare.stderr, /mailctl account add /);
  // After "--", --help is an argument, not a request for help.
  const literal = await mailctl(["account", "add", "x@example.test", "--password", "p", "--", "--help"]);
  assert.equal(literal.code, 2);
  assert.match(literal.stderr, /unexpected argument: --help/);
});
