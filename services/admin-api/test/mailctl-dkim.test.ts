import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { addDomain } from "@mailstack/db";
import { publicKeyValue } from "@mailstack/dkim";
import { createTestDatabase, runMailctl, type TestDatabase } from "@mailstack/testkit";

let db: TestDatabase;
before(async () => {
  db = await createTestDatabase();
  await addDomain(db.pool, "signed.test");
});
after(async () => db.drop());

function mailctl(args: string[]) {
  return runMailctl(db.url, args);
}

test("domain dkim generates a key, stores it and prints the TXT record of that key", async () => {
  const result = await mailctl(["domain", "dkim", "signed.test", "--selector", "mail2026", "--algorithm", "ed25519-sha256"]);
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /name: {2}mail2026\._domainkey\.signed\.test/);
  const row = (await db.pool.query("SELECT dkim_selector, dkim_algorithm, dkim_private_key FROM domains WHERE name = 'signed.test'")).rows[0];
  assert.equal(row.dkim_selector, "mail2026");
  assert.equal(row.dkim_algorithm, "ed25519-sha256");
  const p = publicKeyValue(row.dkim_private_key, "ed25519-sha256");
  assert.ok(result.stdout.includes(`value: v=DKIM1; k=ed25519; p=${p}`));
  assert.ok(!result.stdout.includes("PRIVATE KEY"));

  const shown = await mailctl(["domain", "dkim", "signed.test", "--show"]);
  assert.equal(shown.code, 0, shown.stderr);
  assert.ok(shown.stdout.includes(`p=${p}`));
});

test("domain dkim defaults to rsa-sha256 and refuses bad input", async () => {
  const rsa = await mailctl(["domain", "dkim", "signed.test"]);
  assert.equal(rsa.code, 0, rsa.stderr);
  assert.match(rsa.stdout, /k=rsa; p=/);
  const unknown = await mailctl(["domain", "dkim", "nowhere.test"]);
  assert.equal(unknown.code, 1);
  assert.match(unknown.stderr, /no such domain/);
  const badAlgorithm = await mailctl(["domain", "dkim", "signed.test", "--algorithm", "rsa-sha1"]);
  assert.equal(badAlgorithm.code, 2);
});
